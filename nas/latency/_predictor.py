"""A latency predictor built on the user's own device: a table of every layer a space can hold.

Predicted latency of a network = a * (sum of its layers' measured latencies) + b + c * (its number of layers)
+ d * (its millions of parameters), where a and b, and c and d where each earns its place, are fitted on a sample of
whole networks measured for real: the sum misses per-network overhead; c, what a layer pays as a graph of its own and
not inside a network (outside torch); d, fetching weights that a layer timed alone on repeat keeps in cache.
The predictor is a function of the network description only: its table keys are hashable dataclasses.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from nas._schema import SpecError, check_positive, digest, ensure_writable, results_root, to_data, write_json_atomic
from nas.latency._measure import (
    REFERENCE_COPIES,
    Sweeps,
    busy_share,
    median_of_rounds,
    network_compiler,
    num_threads,
    pooled,
    resolve_device,
    time_networks,
    visits,
)
from nas.model import make_part
from nas.runtime import Compiled, Empty, check_runtime, require
from nas.space import SearchSpace
from nas.spec import (
    BatchNormSpec,
    BlockSpec,
    ClassifierSpec,
    LastConvSpec,
    NetworkSpec,
    Op,
    StemSpec,
    conv_out,
    network_parts,
    spec_from_dict,
    spec_to_dict,
)

TABLE_VERSION = 5  # 2: interleaved rounds, a fixed malloc; 3: the per-layer term; 4: the weights term; 5: the
# reference's own measurement (older: rebuilt)

# What a trustworthy table is. A build that cannot meet these refuses, naming the cause, rather than writing a table
# that ranks networks wrongly (two builds on a busy machine fitted 0.009 x sum + 14.5 ms and -0.009 x sum + 13.1 ms).
# A table's noise is mostly each visit's (a layer built afresh, the machine's state), not each run's, so it falls with
# rounds, not runs a visit: two builds of mobilenetv3_compact's table, entries apart by a median of 3.4% with 3 rounds
# of 7 runs, 5.6% with 3 of 21 and 2.1% with 6 of 7; their predictions' Kendall tau 0.905, 0.858 and 0.942
# (tests/benchmarks/bench_latency.py repeat, one noisy run). The build takes 41 s with 6 (24 s with 3).
ROUNDS = 6
MAX_BUSY_SHARE = 0.5  # other programs using more of all cores than this (sampled for a second): too busy to start
PROBE_ROUNDS = 5
PROBE_SPREAD = 0.25  # a probe network's middle round medians spread wider: the machine is too busy to start
# Either check that finds the machine busy checks again, BUSY_WAIT_S apart, up to BUSY_RECHECKS times before refusing:
# a burst (a program finishing) passes, a steady load does not. One recheck was too eager on this shared machine: the
# README's first command, run straight after the test suite or CI, was refused at 29%, 35% and 41% spread, and built
# its table when simply run again 20 s to a minute later.
BUSY_WAIT_S = 10.0
BUSY_RECHECKS = 6
LAYER_SPREAD = 0.20  # a layer whose round medians spread wider than this is measured again
LAYER_FLOOR_MS = 0.02  # ... unless they are this close in absolute terms
EXTRA_ROUNDS = 2  # ... in this many more interleaved rounds
MAX_UNSETTLED = 0.10  # refuse when a larger share of layers still disagrees after that
SCALE_BAND = (0.5, 2.0)  # whole network / sum of its layers: about 1.1 on a quiet 2-core machine
MAX_OFFSET_SHARE = 0.5  # |offset| at most this share of the smallest network's measured latency
MAX_PER_LAYER_SHARE = 0.5  # |per-layer term x layers| at most this share of scale x sum, in every fit network
FRESH_S = 600.0  # a table built this long ago by this process counts as fresh (see Predictor.built_at)
MAX_REFERENCE_ERROR = 0.15  # the reference's prediction against its own direct measurement in the fit
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
        module = make_part(self.op, self.in_channels, spec_bn, self.num_classes)
        if isinstance(self.op, ClassifierSpec):
            return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), module)
        return module

    def to_json(self) -> dict[str, Any]:
        return {"op": type(self.op).__name__, "fields": to_data(self.op), "size": self.size,
                "in_channels": self.in_channels, "num_classes": self.num_classes}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Layer:
        return cls(_OPS[data["op"]](**data["fields"]), data["size"], data["in_channels"], data["num_classes"])


def layers_of(spec: NetworkSpec) -> list[Layer]:
    """The layers of ``nas.build_model(spec)`` in order, as table keys."""
    return [Layer(p.op, p.size, p.in_channels, spec.num_classes if isinstance(p.op, ClassifierSpec) else 0)
            for p in network_parts(spec)]


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
            # (input, output) widths: the first block changes width, the others keep the stage's
            widths = list(itertools.product(in_widths, stage.width)) if b == 0 else [(w, w) for w in stage.width]
            for (cin, width), k, option, se, act in itertools.product(widths, stage.kernel, stage.expansion,
                                                                      stage.se, stage.activation):
                found[Layer(BlockSpec(cin, k, stage.hidden(cin, option), width, se, act, stride), size, cin)] = None
            size = conv_out(size, max(stage.kernel), stride)  # the side does not depend on the kernel
        in_widths = list(stage.width)
    for cin, out in itertools.product(in_widths, space.last_conv.out_channels):
        found[Layer(LastConvSpec(out, space.last_conv.activation), size, cin)] = None
    for width, hidden in itertools.product(space.last_conv.out_channels, space.classifier.options()):
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
    runtime: str = "torch"  # the runtime the network runs in: nas.runtime.RUNTIMES

    @classmethod
    def current(cls, device: str = "cpu", threads: int | None = None, batch_size: int = 1,
                runtime: str = "torch") -> Fingerprint:
        dev = resolve_device(device)
        processor = torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name()
        if threads is not None and threads < 1:
            raise SpecError("threads", f"{threads} must be positive")
        if batch_size < 1:
            raise SpecError("batch_size", f"{batch_size} must be positive")
        check_runtime(runtime)
        if runtime != "torch":
            if dev.type != "cpu":
                raise SpecError("runtime", f"{runtime} is measured on the CPU here, not {device!r}")
            require("runtime", runtime)
        return cls(dev.type, processor, threads or torch.get_num_threads(), batch_size, torch.__version__, runtime)

    @property
    def timing(self) -> dict[str, Any]:
        """The keyword arguments that time a network as this table's entries were timed (``nas.latency.measure``)."""
        return {"device": self.device, "threads": self.threads, "batch_size": self.batch_size,
                "runtime": self.runtime}

    def describe(self) -> str:
        return (f"{self.device} '{self.processor}', {self.threads} thread{'s' if self.threads != 1 else ''}, "
                f"batch {self.batch_size}, torch {self.torch}, runtime {self.runtime}")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def space_digest(space: SearchSpace) -> str:
    # The reference member does not change which layers exist.
    return digest(dataclasses.replace(space, reference=None), length=12)


def table_path(space: SearchSpace, fp: Fingerprint, root: str | os.PathLike[str] | None = None) -> Path:
    """Where the table of ``space`` on device ``fp`` lives (default root: ``<results>/latency``)."""
    root = results_root() / "latency" if root is None else Path(root)
    runtime = "" if fp.runtime == "torch" else f"-{fp.runtime}"
    return root / f"{space.name}-{fp.device}{runtime}-{digest(fp, space_digest(space), TABLE_VERSION)}.json"


@dataclass(frozen=True)
class Predictor:
    """Predicts a member's latency in milliseconds from the table; ``fingerprint`` says what it was measured
    under, ``path`` where it is stored (None until saved)."""

    space: SearchSpace
    fingerprint: Fingerprint
    table: Mapping[Layer, float]
    scale: float
    offset: float
    path: Path | None = None
    per_layer: float = 0.0  # ms per layer (fitted outside torch where it earns its place; see fit_correction)
    per_mparam: float = 0.0  # ms per million parameters (fitted where it earns its place; see fit_correction)
    params: Mapping[Layer, int] = dataclasses.field(default_factory=dict)  # each layer's parameters (with per_mparam)
    # The space's reference member (reference_spec) measured whole in the fit's rounds (ms). It anchors the default
    # limit, "no slower than the reference", and divides every relative figure, so the fit's error on this one network
    # must not move them all; but one measurement is only as good as its stretch of time. Each has missed the
    # reference's later measurements by 5-7% while the other held: the model once (mobilenetv3_compact in
    # onnxruntime: 85% of 100 networks within +-10% relative to it, 99% to this measurement), the measurement in
    # ExecuTorch (80%, 79%, 40% in three validations; the model 100%, 100%, 76%). predict() gives the reference
    # their geometric mean, which halves either miss; in the next ExecuTorch build it gave 99%, 100%, 94% (the
    # measurement alone 98%, 98%, 85%; the model 99%, 100%, 96%; tests/benchmarks/bench_deploy.py). The spec is
    # kept, not looked up: a space's reference can change without changing its layers, so its table.
    reference_ms: float | None = None
    reference_spec: NetworkSpec | None = None
    drift: float = 1.0  # this machine's speed now against the table's (nas.latency.calibrate); not stored
    # When this process measured it (profile's time.monotonic()); None when loaded; not stored. While ``fresh``, its
    # drift is the machine changing speed since moments ago (x1.53 a minute after a build here), which calibrate()
    # rescales but never answers with "rebuild it".
    built_at: float | None = dataclasses.field(default=None, compare=False)
    _entries: dict[Layer, tuple[float, int]] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("scale", "offset", "drift", "per_layer", "per_mparam"):
            if not math.isfinite(getattr(self, name)):
                raise SpecError(name, f"{getattr(self, name)} is not a finite number")
        if (self.reference_ms is None) != (self.reference_spec is None):
            raise SpecError("reference_ms", "comes with the network it measured (reference_spec), and only with it")
        if self.reference_ms is not None:
            check_positive("reference_ms", self.reference_ms)
        for layer, ms in self.table.items():
            if not (math.isfinite(ms) and ms > 0):
                raise SpecError("layers", f"{ms} ms for {type(layer.op).__name__} at {layer.size}x{layer.size}: "
                                          "every entry must be a finite, positive time")
        if self.per_mparam and self.params.keys() != self.table.keys():
            raise SpecError("layers", "a weights term needs every layer's parameter count")
        # One lookup per layer in predict(), a search's hot path: hashing a Layer (its op's every field) is most of it.
        entries = {layer: (ms, self.params.get(layer, 0)) for layer, ms in self.table.items()}
        object.__setattr__(self, "_entries", entries)

    @property
    def fresh(self) -> bool:
        """Built by this process within FRESH_S: a notebook that keeps a table for hours gets it checked again."""
        return self.built_at is not None and time.monotonic() - self.built_at <= FRESH_S

    device = property(lambda self: self.fingerprint.device)
    threads = property(lambda self: self.fingerprint.threads)
    batch_size = property(lambda self: self.fingerprint.batch_size)

    def layer_sum(self, spec: NetworkSpec) -> float:
        return self.features(spec)[0]

    def features(self, spec: NetworkSpec) -> tuple[float, int, float]:
        """What the fit weighs for ``spec``: the table's entries for its layers summed (ms), how many layers that is,
        and their millions of parameters (0 without parameter counts)."""
        layers = layers_of(spec)
        total, params = 0.0, 0
        for layer in layers:
            entry = self._entries.get(layer)
            if entry is None:
                raise SpecError("", f"layer {layer.op} at {layer.size}x{layer.size} is not in the latency table "
                                    f"of space {self.space.name!r}; is the spec a member?")
            total += entry[0]
            params += entry[1]
        return total, len(layers), params / 1e6

    def predict(self, spec: NetworkSpec) -> float:
        """Predicted latency of ``nas.build_model(spec)`` in milliseconds (rescaled by ``drift``); for the space's
        reference member, where the table measured it, the geometric mean of that measurement (``reference_ms``) and
        the model (see the field)."""
        modelled = self.modelled(spec)
        if self.reference_ms is not None and spec == self.reference_spec:
            return self.drift * math.sqrt(self.reference_ms * modelled)
        return self.drift * modelled

    def modelled(self, spec: NetworkSpec) -> float:
        """The fitted model's latency for ``spec`` (ms, at the table's speed): the reference's too."""
        total, count, mparams = self.features(spec)
        return self.scale * total + self.per_layer * count + self.per_mparam * mparams + self.offset

    def formula(self) -> str:
        return fit_formula(self.scale, self.offset, self.per_layer, self.per_mparam)

    def with_drift(self, factor: float) -> Predictor:
        return dataclasses.replace(self, drift=factor)

    def save(self, path: Path) -> Predictor:
        """Write the table to ``path``; returns the predictor with its ``path``."""
        data = {"version": TABLE_VERSION, "space": self.space.name, "space_digest": space_digest(self.space),
                "fingerprint": dataclasses.asdict(self.fingerprint), "scale": self.scale, "offset": self.offset,
                "per_layer": self.per_layer, "per_mparam": self.per_mparam, "reference_ms": self.reference_ms,
                "reference_spec": None if self.reference_spec is None else spec_to_dict(self.reference_spec),
                "layers": [{**layer.to_json(), "ms": ms, "params": self.params.get(layer, 0)}
                           for layer, ms in self.table.items()]}
        write_json_atomic(data, path, indent=1)
        return dataclasses.replace(self, path=path)


def _layer_input(layer: Layer, batch: int, device: torch.device) -> torch.Tensor:
    return torch.randn(batch, layer.in_channels, layer.size, layer.size, device=device)


def _disagreement(rounds: list[list[float]], floor_ms: float) -> float:
    """How far the round medians of one call disagree, (max - min) / median; 0 when max - min is under
    ``floor_ms`` (jitter of a few microseconds on a tiny layer changes no network's latency)."""
    medians = [statistics.median(r) for r in rounds]
    gap = max(medians) - min(medians)
    return 0.0 if gap < floor_ms else gap / statistics.median(medians)


def _middle(rounds: list[list[float]]) -> list[list[float]]:
    """The rounds without the fastest and the slowest quarter (at least one each, by median; all of three or fewer):
    a burst of noise cannot decide, and the spread of what is left does not grow with the number of rounds."""
    cut = max(1, len(rounds) // 4)
    return sorted(rounds, key=statistics.median)[cut:-cut] if len(rounds) > 3 else rounds


CHECKS_ENV = "NAS_LATENCY_CHECKS"  # "refuse" (default) or "warn"


def enforce(error: SpecError) -> None:
    """Raise ``error`` (a latency check failed), or with $NAS_LATENCY_CHECKS=warn print it as a warning and go on.
    The test suite sets warn: a shared machine's noise must not fail a functional test; its own tests of the checks
    set refuse."""
    mode = os.environ.get(CHECKS_ENV, "refuse")
    if mode not in ("refuse", "warn"):
        raise SpecError(CHECKS_ENV, f"{mode!r} is not one of 'refuse', 'warn'")
    if mode == "refuse":
        raise error
    print(f"warning ({CHECKS_ENV}=warn): {error}", file=sys.stderr)


def _refuse(space: SearchSpace, cause: str) -> SpecError:
    return SpecError("", f"refused: {cause}; rerun when the machine is quieter (or with fewer other programs "
                         "running)", source=f"latency table of {space.name}")


def settle(space: SearchSpace, busy: Callable[[], str | None], bar: tqdm | None = None) -> None:
    """Return once ``busy()``, a check of the machine, names no cause; refuse (``enforce``) with the last cause when
    it still names one after ``BUSY_RECHECKS`` more checks, ``BUSY_WAIT_S`` apart."""
    cause = busy()
    if cause is None:
        return
    message = (f"the machine is busy: {cause}; checking again every {BUSY_WAIT_S:.0f} s, up to {BUSY_RECHECKS} "
               "times")
    (bar.write if bar is not None else print)(message, file=sys.stderr)
    for _ in range(BUSY_RECHECKS):
        time.sleep(BUSY_WAIT_S)
        cause = busy()
        if cause is None:
            return
    enforce(_refuse(space, cause))


def profile(space: SearchSpace, *, device: str = "cpu", threads: int | None = None, batch_size: int = 1,
            rounds: int = ROUNDS, warmup: int = 2, repeats: int = 7, fit_networks: int = 60, seed: int = 0,
            progress: bool = True, runtime: str = "torch") -> Predictor:
    """Measure every layer of ``space`` on this device in ``runtime``, then fit the correction on whole networks.

    Layers and networks are timed together in ``rounds`` interleaved sweeps (:class:`Sweeps`), with the machine's
    speed divided out, so no median rests on one stretch of a noisy machine. The build checks its own noise and
    refuses (a SpecError naming the cause) rather than write an untrustworthy table: a probe of two networks first
    (a second or two), layers whose rounds disagree are measured again, and the fit must be plausible (see the
    bands above)."""
    fp = Fingerprint.current(device, threads, batch_size, runtime)
    dev = resolve_device(device)
    layers = space_layers(space)
    rng = random.Random(seed)
    reference = space.reference_member()
    anchors = [space.largest(), space.smallest(), *([reference] if reference is not None else [])]
    specs = [*anchors, *(space.sample(rng) for _ in range(max(0, fit_networks - len(anchors))))]
    # The reference is timed at several places a round and pooled (Predictor.reference_ms), which with the model
    # anchors the default limit. Timed once a round, it came out 6% under the model that 97% of
    # validated networks agreed with (mobilenetv3_compact in onnxruntime), and moved every relative figure.
    timed = [*specs, *[reference] * (REFERENCE_COPIES - 1 if reference is not None else 0)]
    net_kw = {"device": device, "threads": threads, "batch_size": batch_size, "warmup": warmup, "seed": seed,
              "runtime": runtime}

    def others_busy() -> str | None:
        others = busy_share() if dev.type == "cpu" else None
        if others is None or others <= MAX_BUSY_SHARE:
            return None
        return (f"other programs are using {others:.0%} of this machine's CPU time (limit {MAX_BUSY_SHARE:.0%}), "
                "so every layer would be timed slow")

    settle(space, others_busy)
    # In onnxruntime each layer runs as a graph of its own and pays for the call and for feeding it its input (7-12 us
    # here, most of a small layer's time), which inside a whole network it does not. An empty graph on each distinct
    # input shape (nas.runtime.Empty), timed in the same rounds as the layers (the last calls), measures that cost,
    # and it is taken off every entry of that shape (the fit's offset pays the network's own once).
    shapes = sorted({(layer.in_channels, layer.size) for layer in layers}) if runtime != "torch" else []
    # The fit's networks are timed in the same rounds as the layers, so the machine's speed, which changes within
    # seconds here, is divided out of both alike (nas.latency.common_mode) rather than put between them.
    first_net = len(layers) + len(shapes)
    calls = first_net + len(timed)
    prepared: dict[NetworkSpec, Compiled] = {}  # outside torch: each network exported once, for the probe and the fit
    network = network_compiler(timed, dev, batch_size, runtime, threads, prepared)

    def compile_call(i: int) -> Compiled:
        if i >= first_net:
            return network(i - first_net)
        if i >= len(layers):
            channels, size = shapes[i - len(layers)]
            return Compiled(Empty(), torch.zeros(batch_size, channels, size, size), runtime, threads)
        module = layers[i].module(space.batch_norm).to(dev)
        return Compiled(module, _layer_input(layers[i], batch_size, dev), runtime, threads)

    with tqdm(total=rounds * calls + PROBE_ROUNDS * len(anchors), unit="call",
              desc=f"latency table {space.name} ({runtime})", disable=not progress, dynamic_ncols=True) as bar:
        def unsteady() -> str | None:
            if bar.n:  # probing again
                bar.total += PROBE_ROUNDS * len(anchors)
            probe = time_networks(anchors, rounds=PROBE_ROUNDS, repeats=5, progress=bar, prepared=prepared, **net_kw)
            worst = max(_disagreement(_middle(t), floor_ms=0.1) for t in probe)
            if worst <= PROBE_SPREAD:
                return None
            return (f"the same network's timings varied by {worst:.0%} across {PROBE_ROUNDS} rounds (limit "
                    f"{PROBE_SPREAD:.0%}), so the machine is too busy for a trustworthy table")

        settle(space, unsteady, bar)
        with num_threads(threads), torch.inference_mode():
            # Outside torch every call is exported before any is timed (visits): ExecuTorch lowers a layer in 1-2 s.
            sweeps = Sweeps(calls, visits(compile_call, runtime, calls, bar), dev, warmup=warmup, repeats=repeats,
                            seed=seed, progress=bar)
            sweeps.run(rounds)
            times = sweeps.corrected()
            # Layers whose middle rounds disagree met a burst of noise: measure them again, then judge again.
            again = [i for i, t in enumerate(times[:len(layers)])
                     if _disagreement(_middle(t), LAYER_FLOOR_MS) > LAYER_SPREAD]
            if again:
                bar.total += EXTRA_ROUNDS * len(again)
                sweeps.run(EXTRA_ROUNDS, again)
                times = sweeps.corrected()
        unsettled = sum(_disagreement(_middle(t), LAYER_FLOOR_MS) > LAYER_SPREAD for t in times[:len(layers)])
        if unsettled > MAX_UNSETTLED * len(layers):
            enforce(_refuse(space, f"{unsettled} of {len(layers)} layers' timings still disagreed by more than "
                                 f"{LAYER_SPREAD:.0%} across rounds after measuring them again"))
        overhead = {shape: median_of_rounds(t) for shape, t in zip(shapes, times[len(layers):first_net], strict=True)}
        # A layer within the overhead's noise keeps a tenth of its time: positive, and negligible in any sum.
        table = {layer: max(median_of_rounds(t) - overhead.get((layer.in_channels, layer.size), 0.0),
                            0.1 * median_of_rounds(t)) for layer, t in zip(layers, times[:len(layers)], strict=True)}
        nets = times[first_net:]
        if reference is not None:
            nets = [*nets[:2], pooled([nets[2], *nets[len(specs):]]), *nets[3:len(specs)]]
        measured = np.array([median_of_rounds(t) for t in nets])
    params = {layer: sum(p.numel() for p in layer.module(space.batch_norm).parameters()) for layer in layers}
    unfitted = Predictor(space, fp, table, 1.0, 0.0, params=params)
    sums, counts, mparams = np.array([unfitted.features(spec) for spec in specs], dtype=float).T
    networks = {"reference_index": 2 if len(anchors) == 3 else None, "counts": counts, "mparams": mparams}
    fit = fit_correction(sums, counts, mparams, measured, per_layer_term=runtime != "torch",
                         cheapest_layer=min(table.values()),
                         plausible=lambda f: implausible(f, sums, measured, **networks) is None)
    check_fit(space, fit, sums, measured, **networks)
    scale, offset, per_layer, per_mparam = fit
    return Predictor(space, fp, table, scale, offset, per_layer=per_layer, per_mparam=per_mparam, params=params,
                     reference_ms=float(measured[2]) if reference is not None else None, reference_spec=reference,
                     built_at=time.monotonic())


Fit = tuple[float, float, float, float]  # scale, offset, per_layer, per_mparam


def fit_correction(sums: np.ndarray, counts: np.ndarray, mparams: np.ndarray, measured: np.ndarray, *,
                   per_layer_term: bool, cheapest_layer: float,
                   plausible: Callable[[Fit], bool] = lambda fit: True) -> Fit:
    """(scale, offset, per_layer, per_mparam) fitting ``measured`` ~ scale x ``sums`` + offset + per_layer x ``counts``
    + per_mparam x ``mparams`` (the fit networks' layer sums, numbers of layers and millions of parameters).

    Least squares on relative error (weights 1/measured), since the goal is a percentage error. One scale per
    feature-map size was tried too: within noise of this on both built-in spaces, with more to overfit. Two terms may
    join scale and offset, each where it earns its parameter (a lower Bayesian information criterion, added one at a
    time, best first) and is physical:
    - Weights (``mparams``): a layer timed alone, call after call, finds its weights in cache; inside a network every
      layer's weights are fetched afresh, so a network pays for its parameters beyond its layers' entries. Where the
      compute is small that cost is not: on the 32 px mobilenetv3_compact in onnxruntime, 100 networks measured apart
      were within +-10% relative to the reference for 32% with scale and offset alone, and 84-93% with the term, in
      three runs of ``tests/benchmarks/bench_deploy.py predictor`` in one noisy hour. Physical: per_mparam >= 0.
    - Layers (``counts``, outside torch only: ``per_layer_term``): what a layer timed as a graph of its own pays beyond
      the empty graph's cost taken off its entry, which the offset cannot absorb as members differ in depth. Physical:
      every layer still adds time (scale x ``cheapest_layer``, the table's smallest entry, + per_layer > 0). Both terms
      are collinear with the sum, so on a few dozen noisy networks they can fit noise: a mobilenetv3_small onnxruntime
      build fitted -86.5 us x layers, below its cheapest entry, and validated at 84% within +-10% relative. In torch a
      layer is one Python call either way and the per-layer term changed tau by under 0.01 on both built-in spaces.

    A term also joins only where the fit stays ``plausible`` (:func:`implausible`, on the same timings): trading
    against the offset, the weights term once took an ExecuTorch fit to -0.050 ms, over half its fastest network's
    0.098 ms, and the build refused a table whose layers had taken 50 minutes to lower and time. Without the term the
    same timings give a fit that may pass; the checks still judge the one chosen."""
    w = 1.0 / measured
    n = len(measured)

    def fit(columns: list[np.ndarray]) -> tuple[np.ndarray, float]:
        x = np.stack(columns, axis=1) * w[:, None]
        coef = np.linalg.lstsq(x, measured * w, rcond=None)[0]
        residual = float(np.sum((x @ coef - 1.0) ** 2))  # relative errors: measured * w is 1
        return coef, n * math.log(max(residual, 1e-300) / n) + len(columns) * math.log(n)

    def as_fit(coef: np.ndarray, names: list[str]) -> Fit:
        terms = dict(zip(names, coef[2:], strict=True))
        return float(coef[0]), float(coef[1]), float(terms.get("per_layer", 0.0)), float(terms.get("per_mparam", 0.0))

    def acceptable(coef: np.ndarray, names: list[str]) -> bool:
        scale, _, per_layer, per_mparam = fit = as_fit(coef, names)
        return per_mparam >= 0 and scale * cheapest_layer + per_layer > 0 and plausible(fit)

    candidates = {"per_mparam": mparams, **({"per_layer": counts} if per_layer_term else {})}
    candidates = {name: column for name, column in candidates.items() if np.ptp(column) > 0}
    chosen: list[str] = []
    coef, bic = fit([sums, np.ones(n)])
    while True:
        tries = [(name, *fit([sums, np.ones(n), *(candidates[c] for c in chosen), candidates[name]]))
                 for name in candidates if name not in chosen]
        better = [(b, name, c) for name, c, b in tries if b < bic and acceptable(c, [*chosen, name])]
        if not better:
            break
        bic, name, coef = min(better, key=lambda t: t[0])
        chosen.append(name)
    return as_fit(coef, chosen)


def fit_formula(scale: float, offset: float, per_layer: float = 0.0, per_mparam: float = 0.0) -> str:
    layers = f" {per_layer * 1e3:+.1f} us x layers" if per_layer else ""
    weights = f" {per_mparam:+.3f} ms x M params" if per_mparam else ""
    return f"predicted = {scale:.3f} x sum of layers{layers}{weights} {offset:+.3f} ms"


def implausible(fit: Fit, sums: np.ndarray, measured: np.ndarray, *, reference_index: int | None,
                counts: np.ndarray | None = None, mparams: np.ndarray | None = None) -> str | None:
    """What makes a correction (``fit_correction``'s) implausible, or None. ``sums``, ``counts``, ``mparams`` and
    ``measured`` are the fit networks' layer sums, numbers of layers, millions of parameters and direct measurements,
    the largest member first, then the smallest, then the reference (at ``reference_index``)."""
    scale, offset, per_layer, per_mparam = fit
    fitted = fit_formula(*fit)
    if not all(math.isfinite(v) for v in (scale, offset, per_layer, per_mparam)):
        return f"the fit did not converge ({fitted})"
    if not SCALE_BAND[0] <= scale <= SCALE_BAND[1]:
        return (f"{fitted}: a scale outside [{SCALE_BAND[0]}, {SCALE_BAND[1]}] means whole networks were not timed "
                "like their layers")
    if abs(offset) > MAX_OFFSET_SHARE * float(measured.min()):
        return f"{fitted}: the offset is over {MAX_OFFSET_SHARE:.0%} of the fastest network's {measured.min():.3f} ms"
    layer_term = per_layer * (0.0 if counts is None else counts)
    if np.any(np.abs(layer_term) > MAX_PER_LAYER_SHARE * scale * sums):
        return (f"{fitted}: the per-layer term is over {MAX_PER_LAYER_SHARE:.0%} of a network's scaled sum of layers, "
                "so its layers were not timed as the network runs them")
    predicted = scale * sums + layer_term + per_mparam * (0.0 if mparams is None else mparams) + offset
    if predicted[0] <= predicted[1]:
        return (f"{fitted} predicts the largest member ({predicted[0]:.3f} ms) no slower than the smallest "
                f"({predicted[1]:.3f} ms)")
    if reference_index is not None:
        error = predicted[reference_index] / measured[reference_index] - 1
        if abs(error) > MAX_REFERENCE_ERROR:
            return (f"{fitted} predicts the reference {predicted[reference_index]:.3f} ms, {error:+.0%} off its direct "
                    f"measurement (limit {MAX_REFERENCE_ERROR:.0%})")
    return None


def check_fit(space: SearchSpace, fit: Fit, sums: np.ndarray, measured: np.ndarray, **networks: Any) -> None:
    """Refuse (``enforce``) an implausible correction, naming the cause (:func:`implausible`, which takes
    ``networks``)."""
    cause = implausible(fit, sums, measured, **networks)
    if cause is not None:
        enforce(_refuse(space, cause))


def load_table(path: Path, space: SearchSpace, expected: Fingerprint | None, *, force: bool = False) -> Predictor:
    """Read a table, refusing one made for another space or device unless ``force``."""
    try:
        data = json.loads(path.read_text())
        version = data["version"]
        if version != TABLE_VERSION:  # before its fields: another version's are not this one's
            raise SpecError("", f"latency table version {version}, this nas reads {TABLE_VERSION}", source=str(path))
        fp = Fingerprint(**data["fingerprint"])
        layers = [(Layer.from_json(d), d) for d in data["layers"]]
        table = {layer: float(d["ms"]) for layer, d in layers}
        params = {layer: int(d["params"]) for layer, d in layers}
        scale, offset, per_layer = float(data["scale"]), float(data["offset"]), float(data["per_layer"])
        per_mparam = float(data["per_mparam"])
        reference_ms = None if data["reference_ms"] is None else float(data["reference_ms"])
        reference_data = data["reference_spec"]
        name, digest = data["space"], data["space_digest"]
    except FileNotFoundError:
        raise SpecError("", "no such latency table", source=str(path)) from None
    except SpecError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SpecError("", f"not a readable latency table ({type(e).__name__}: {e})", source=str(path)) from None
    try:
        reference_spec = None if reference_data is None else spec_from_dict(reference_data)
        predictor = Predictor(space, fp, table, scale, offset, path, per_layer=per_layer, per_mparam=per_mparam,
                              params=params, reference_ms=reference_ms, reference_spec=reference_spec)
    except SpecError as e:
        raise e.in_file(path) from None
    if not force:
        if digest != space_digest(space):
            raise SpecError("", f"was made for space {name!r} ({digest}), not {space.name!r} "
                                f"({space_digest(space)}); use --force to use it anyway", source=str(path))
        if expected is not None and fp != expected:
            raise SpecError("", f"was measured on {fp.describe()}, this is {expected.describe()}; "
                                "use --force to use it anyway", source=str(path))
    return predictor


def load_predictor(space: SearchSpace, *, device: str = "cpu", threads: int | None = None, batch_size: int = 1,
                   table: str | os.PathLike[str] | None = None, root: str | os.PathLike[str] | None = None,
                   force: bool = False, rebuild: bool = False, progress: bool = True, runtime: str = "torch"
                   ) -> Predictor:
    """The predictor for ``space`` on this device, building its table on first use (or when ``rebuild``).

    ``table`` names a table file explicitly (one copied from elsewhere, say): it is refused when it was made
    for another space or device, unless ``force``.
    """
    fp = Fingerprint.current(device, threads, batch_size, runtime)
    if table is not None:
        return load_table(Path(table), space, fp, force=force)
    path = table_path(space, fp, root)
    if path.exists() and not rebuild:
        return load_table(path, space, fp, force=force)
    ensure_writable(path.parent, "latency table")  # before measuring for a minute, not after
    return profile(space, device=device, threads=threads, batch_size=batch_size, progress=progress,
                   runtime=runtime).save(path)
