"""A readable summary of a spec: per-layer table, parameters, MACs/FLOPs and measured latency.

Computed as a plain object first (:func:`summarize`), formatted second, so tests check numbers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch.utils.flop_counter import FlopCounterMode

from nas.latency import Measurement, measure_module
from nas.model import build_model
from nas.spec import BlockSpec, LastConvSpec, NetworkSpec, StemSpec, network_parts


@dataclass(frozen=True)
class LayerRow:
    name: str  # module path in the built network
    op: str
    in_channels: int
    expanded: int | None
    out_channels: int
    kernel: int | None
    stride: int | None
    se: bool | None
    activation: str
    out_size: int  # spatial side of the output feature map
    params: int
    macs: int


@dataclass(frozen=True)
class Summary:
    source: str
    resolution: int
    num_classes: int
    layers: tuple[LayerRow, ...]
    params: int
    macs: int  # multiply-accumulates of convolutions and linear layers at batch 1
    latency: Measurement | None

    @property
    def flops(self) -> int:
        """torch.utils.flop_counter's count: 2 FLOPs per multiply-accumulate."""
        return 2 * self.macs

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["flops"] = self.flops
        if self.latency is not None:
            data["latency"]["spread"] = self.latency.spread
        return data


def summarize(spec: NetworkSpec, *, source: str = "", latency: bool = True, device: str = "cpu",
              threads: int | None = None, repeats: int = 30) -> Summary:
    model = build_model(spec).eval()
    res = spec.input.resolution
    x = torch.randn(1, spec.input.channels, res, res)
    sizes: dict[str, int] = {}
    hooks = [m.register_forward_hook(lambda _m, _i, out, name=name: sizes.__setitem__(name, out.shape[-1]))
             for name, m in model.named_modules() if name.count(".") == 1 and name.startswith("features.")]
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x)
    for h in hooks:
        h.remove()
    flops = counter.get_flop_counts()

    def macs_of(path: str) -> int:
        return int(sum(flops.get(f"Network.{path}", {}).values())) // 2

    def params_of(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    rows = []
    for p in network_parts(spec):
        module = model.get_submodule(p.path)
        op = p.op
        common = {"name": p.path, "in_channels": p.in_channels, "params": params_of(module), "macs": macs_of(p.path),
                  "out_size": sizes.get(p.path, 1)}
        if isinstance(op, StemSpec):
            row = LayerRow(op="stem conv", expanded=None, out_channels=op.out_channels, kernel=op.kernel,
                           stride=op.stride, se=None, activation=op.activation, **common)
        elif isinstance(op, BlockSpec):
            row = LayerRow(op="inverted residual" + (" +skip" if op.use_residual else ""),
                           expanded=op.expanded_channels, out_channels=op.out_channels, kernel=op.kernel,
                           stride=op.stride, se=op.se, activation=op.activation, **common)
        elif isinstance(op, LastConvSpec):
            row = LayerRow(op="last conv 1x1", expanded=None, out_channels=op.out_channels, kernel=1, stride=1,
                           se=None, activation=op.activation, **common)
        else:
            head = "pool+dropout+linear" if op.hidden is None else f"pool+linear({op.hidden})+linear"
            row = LayerRow(op=head, expanded=op.hidden, out_channels=spec.num_classes, kernel=None, stride=None,
                           se=None, activation=op.activation or "", **common)
        rows.append(row)
    lat = None
    if latency:
        lat = measure_module(model, tuple(x.shape), device=device, threads=threads, repeats=repeats)
    return Summary(source, res, spec.num_classes, tuple(rows), params_of(model), int(counter.get_total_flops()) // 2,
                   lat)


def format_summary(s: Summary) -> str:
    table = pd.DataFrame([dataclasses.asdict(r) for r in s.layers]).rename(columns={
        "in_channels": "in", "expanded": "exp", "out_channels": "out", "kernel": "k", "stride": "s",
        "activation": "act", "out_size": "out HxW"})
    table["out HxW"] = [f"{v}x{v}" for v in table["out HxW"]]
    for col in ("exp", "k", "s"):
        table[col] = [("" if pd.isna(v) else int(v)) for v in table[col]]
    table["se"] = [{True: "yes", False: "no"}.get(v, "") for v in table["se"]]
    table["params"] = [f"{v:,}" for v in table["params"]]
    table["macs"] = [f"{v:,}" for v in table["macs"]]
    lines = [f"{s.source}: {s.resolution}x{s.resolution} input, {s.num_classes} classes", "",
             table.to_string(index=False), "",
             f"parameters: {s.params:,}",
             f"MACs:       {s.macs:,} ({s.macs / 1e6:.1f} M multiply-accumulates, conv + linear, batch 1)",
             f"FLOPs:      {s.flops:,} (2 per MAC, torch.utils.flop_counter)"]
    if s.latency is not None:
        lat = s.latency
        lines.append(f"latency:    {lat.median_ms:.2f} ms median on {lat.device}, batch {lat.batch_size}, "
                     f"{lat.threads} thread{'s' if lat.threads != 1 else ''} "
                     f"(IQR {lat.q1_ms:.2f}-{lat.q3_ms:.2f} ms over {lat.repeats} runs)")
    return "\n".join(lines)
