"""A latency predictor built on the user's own device: a table of every layer a space can hold.

Predicted latency of a network = a * (sum of its layers' measured latencies) + b, where a and b are fitted
on a sample of whole networks measured for real (the sum misses per-network overhead and cache effects).
The predictor is a function of the network description only: its table keys are hashable dataclasses.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import platform
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from nas._schema import SpecError, to_data, write_json_atomic
from nas.latency._measure import median_of_rounds, num_threads, resolve_device, time_interleaved, time_networks
from nas.model import InvertedResidual, make_classifier, make_last_conv, make_stem
from nas.space import SearchSpace
from nas.spec import BatchNormSpec, BlockSpec, ClassifierSpec, LastConvSpec, NetworkSpec, StemSpec

TABLE_VERSION = 2  # 2: interleaved rounds and a fixed malloc (tables of 1 are rebuilt, not read)
DEFAULT_DIR = Path("results/latency")
Op = StemSpec | BlockSpec | LastConvSpec | ClassifierSpec
_OPS: dict[str, type[Any]] = {t.__name__: t for t in (StemSpec, BlockSpec, LastConvSpec, ClassifierSpec)}


@dataclass(frozen=True)
class Layer:
    """One distinct layer: its op, the side of its input feature map, its input channels (and classes)."""

    op: Op
    size: int
    in_channels: int
    num_classes: int = 0  # the classifier's only

    def module(self, spec_bn: BatchNormSpec) -> nn.Module:
        """The module ``nas.build_model`` makes for this layer (the head includes the global pooling)."""
        op = self.op
        if isinstance(op, StemSpec):
            return make_stem(self.in_channels, op, spec_bn)
        if isinstance(op, BlockSpec):
            return InvertedResidual(op, spec_bn)
        if isinstance(op, LastConvSpec):
            return make_last_conv(self.in_channels, op, spec_bn)
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), make_classifier(self.in_channels, op,
                                                                                      self.num_classes))

    def to_json(self) -> dict[str, Any]:
        return {"op": type(self.op).__name__, "fields": to_data(self.op), "size": self.size,
                "in_channels": self.in_channels, "num_classes": self.num_classes}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Layer:
        return cls(_OPS[data["op"]](**data["fields"]), data["size"], data["in_channels"], data["num_classes"])


def conv_out(size: int, kernel: int, stride: int, dilation: int = 1) -> int:
    """Output side of a 'same'-padded conv (torchvision's Conv2dNormActivation padding), from the
    description alone, so predict() never builds or runs a module."""
    pad = (kernel - 1) // 2 * dilation
    return (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1


def layers_of(spec: NetworkSpec) -> list[Layer]:
    """The layers of ``nas.build_model(spec)`` in order, as table keys."""
    size = spec.input.resolution
    layers = [Layer(spec.stem, size, spec.input.channels)]
    size = conv_out(size, spec.stem.kernel, spec.stem.stride)
    for b in spec.blocks:
        layers.append(Layer(b, size, b.in_channels))
        size = conv_out(size, b.kernel, b.depthwise_stride, b.dilation)
    layers.append(Layer(spec.last_conv, size, spec.blocks[-1].out_channels))
    layers.append(Layer(spec.classifier, size, spec.last_conv.out_channels, spec.num_classes))
    return layers


def space_layers(space: SearchSpace) -> list[Layer]:
    """Every distinct layer any member of ``space`` can contain (the table's keys)."""
    found: dict[Layer, None] = {}
    size = space.input.resolution
    found[Layer(space.stem, size, space.input.channels)] = None
    size = conv_out(size, space.stem.kernel, space.stem.stride)
    in_widths = [space.stem.out_channels]
    for stage in space.stages:
        for b in range(max(stage.depth)):
            stride = stage.stride if b == 0 else 1
            for cin in in_widths if b == 0 else stage.width:
                for width in stage.width if b == 0 else (cin,):
                    for k in stage.kernel:
                        for option in stage.expansion:
                            for se in stage.se:
                                for act in stage.activation:
                                    block = BlockSpec(cin, k, stage.hidden(cin, option), width, se, act, stride)
                                    found[Layer(block, size, cin)] = None
            size = conv_out(size, max(stage.kernel), stride)  # the side does not depend on the kernel
        in_widths = list(stage.width)
    for cin in in_widths:
        for out in space.last_conv.out_channels:
            found[Layer(LastConvSpec(out, space.last_conv.activation), size, cin)] = None
    for width in space.last_conv.out_channels:
        for hidden in space.classifier.hidden:
            op = ClassifierSpec(hidden, space.classifier.activation, space.classifier.dropout)
            found[Layer(op, size, width, space.num_classes)] = None
    return list(found)


@dataclass(frozen=True)
class Fingerprint:
    """What a latency table is valid for: the device, its settings and the torch build."""

    device: str
    processor: str
    threads: int
    batch_size: int
    torch: str

    @classmethod
    def current(cls, device: str = "cpu", threads: int | None = None, batch_size: int = 1) -> Fingerprint:
        dev = resolve_device(device)
        processor = torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name()
        if threads is not None and threads < 1:
            raise SpecError("--threads", f"{threads} must be positive")
        if batch_size < 1:
            raise SpecError("--batch", f"{batch_size} must be positive")
        return cls(dev.type, processor, threads or torch.get_num_threads(), batch_size, torch.__version__)

    def describe(self) -> str:
        return (f"{self.device} '{self.processor}', {self.threads} thread{'s' if self.threads != 1 else ''}, "
                f"batch {self.batch_size}, torch {self.torch}")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def space_digest(space: SearchSpace) -> str:
    data = to_data(space)
    data.pop("reference", None)  # the reference member does not change which layers exist
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def table_path(space: SearchSpace, fp: Fingerprint, root: str | os.PathLike[str] = DEFAULT_DIR) -> Path:
    key = hashlib.sha256(json.dumps([dataclasses.asdict(fp), space_digest(space), TABLE_VERSION]).encode()
                         ).hexdigest()[:10]
    return Path(root) / f"{space.name}-{fp.device}-{key}.json"


class Predictor:
    """Predicts a member's latency in milliseconds from the table; ``device``, ``threads``, ``batch_size``
    say what it was measured under."""

    def __init__(self, space: SearchSpace, fingerprint: Fingerprint, table: dict[Layer, float], scale: float,
                 offset: float, path: Path | None = None):
        self.space = space
        self.fingerprint = fingerprint
        self.table = table
        self.scale = scale
        self.offset = offset
        self.path = path

    device = property(lambda self: self.fingerprint.device)
    threads = property(lambda self: self.fingerprint.threads)
    batch_size = property(lambda self: self.fingerprint.batch_size)

    def layer_sum(self, spec: NetworkSpec) -> float:
        total = 0.0
        for layer in layers_of(spec):
            ms = self.table.get(layer)
            if ms is None:
                raise SpecError("", f"layer {layer.op} at {layer.size}x{layer.size} is not in the latency table "
                                    f"of space {self.space.name!r}; is the spec a member?")
            total += ms
        return total

    def predict(self, spec: NetworkSpec) -> float:
        """Predicted latency of ``nas.build_model(spec)`` in milliseconds."""
        return self.scale * self.layer_sum(spec) + self.offset

    def save(self, path: Path) -> None:
        data = {"version": TABLE_VERSION, "space": self.space.name, "space_digest": space_digest(self.space),
                "fingerprint": dataclasses.asdict(self.fingerprint), "scale": self.scale, "offset": self.offset,
                "layers": [{**layer.to_json(), "ms": ms} for layer, ms in self.table.items()]}
        write_json_atomic(data, path, indent=1)
        self.path = path


def _layer_input(layer: Layer, batch: int, device: torch.device) -> torch.Tensor:
    return torch.randn(batch, layer.in_channels, layer.size, layer.size, device=device)


def profile(space: SearchSpace, *, device: str = "cpu", threads: int | None = None, batch_size: int = 1,
            rounds: int = 3, warmup: int = 2, repeats: int = 7, fit_networks: int = 30, seed: int = 0,
            progress: bool = True) -> Predictor:
    """Measure every layer of ``space`` on this device, then fit the correction on whole networks.

    Layers and networks are timed in ``rounds`` interleaved sweeps (``time_interleaved``), so no median rests
    on one stretch of a noisy machine."""
    fp = Fingerprint.current(device, threads, batch_size)
    dev = resolve_device(device)
    layers = space_layers(space)
    rng = random.Random(seed)
    specs = [space.largest(), space.smallest(), *(space.sample(rng) for _ in range(max(0, fit_networks - 2)))]

    def layer_call(i: int) -> Callable[[], object]:
        module = layers[i].module(space.batch_norm).to(dev).eval()
        return functools.partial(module, _layer_input(layers[i], batch_size, dev))

    kw = {"rounds": rounds, "warmup": warmup, "repeats": repeats, "seed": seed}
    with tqdm(total=rounds * (len(layers) + len(specs)), desc=f"latency table {space.name}", unit="call",
              disable=not progress, dynamic_ncols=True) as bar:
        with num_threads(threads), torch.inference_mode():
            times = time_interleaved(len(layers), layer_call, dev, progress=bar, **kw)
        table = {layer: median_of_rounds(t) for layer, t in zip(layers, times, strict=True)}
        measured = np.array([median_of_rounds(t) for t in time_networks(specs, device=device, threads=threads,
                                                                  batch_size=batch_size, progress=bar, **kw)])
    predictor = Predictor(space, fp, table, 1.0, 0.0)
    sums = np.array([predictor.layer_sum(spec) for spec in specs])
    # Least squares on relative error (weights 1/measured), since the goal is a percentage error. One scale per
    # feature-map size was tried too: within noise of this on both built-in spaces, with more to overfit.
    w = 1.0 / measured
    a = np.stack([sums, np.ones(len(sums))], axis=1) * w[:, None]
    scale, offset = np.linalg.lstsq(a, measured * w, rcond=None)[0]
    predictor.scale, predictor.offset = float(scale), float(offset)
    return predictor


def load_table(path: Path, space: SearchSpace, expected: Fingerprint | None, *, force: bool = False) -> Predictor:
    """Read a table, refusing one made for another space or device unless ``force``."""
    try:
        data = json.loads(path.read_text())
        fp = Fingerprint(**data["fingerprint"])
        table = {Layer.from_json(d): float(d["ms"]) for d in data["layers"]}
        scale, offset = float(data["scale"]), float(data["offset"])
        version, name, digest = data["version"], data["space"], data["space_digest"]
    except FileNotFoundError:
        raise SpecError("", "no such latency table", source=str(path)) from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SpecError("", f"not a readable latency table ({type(e).__name__}: {e})", source=str(path)) from None
    if version != TABLE_VERSION:
        raise SpecError("", f"latency table version {version}, this nas reads {TABLE_VERSION}", source=str(path))
    if not force:
        if digest != space_digest(space):
            raise SpecError("", f"was made for space {name!r} ({digest}), not {space.name!r} "
                                f"({space_digest(space)}); use --force to use it anyway", source=str(path))
        if expected is not None and fp != expected:
            raise SpecError("", f"was measured on {fp.describe()}, this is {expected.describe()}; "
                                "use --force to use it anyway", source=str(path))
    return Predictor(space, fp, table, scale, offset, path)


def load_predictor(space: SearchSpace, *, device: str = "cpu", threads: int | None = None, batch_size: int = 1,
                   table: str | os.PathLike[str] | None = None, root: str | os.PathLike[str] = DEFAULT_DIR,
                   force: bool = False, rebuild: bool = False, progress: bool = True) -> Predictor:
    """The predictor for ``space`` on this device, building its table on first use (or when ``rebuild``).

    ``table`` names a table file explicitly (one copied from elsewhere, say): it is refused when it was made
    for another space or device, unless ``force``.
    """
    fp = Fingerprint.current(device, threads, batch_size)
    if table is not None:
        return load_table(Path(table), space, fp, force=force)
    path = table_path(space, fp, root)
    if path.exists() and not rebuild:
        return load_table(path, space, fp, force=force)
    predictor = profile(space, device=device, threads=threads, batch_size=batch_size, progress=progress)
    predictor.save(path)
    return predictor
