"""Measuring latency the way a deployed network runs: eval mode, inference mode, fixed threads, warm-up."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from nas._schema import SpecError
from nas.model import build_model
from nas.runtime import Compiled, prepare_all
from nas.spec import NetworkSpec


@dataclass(frozen=True)
class Measurement:
    """Latency of one network: median and interquartile range over ``repeats`` timed runs, in ms."""

    median_ms: float
    q1_ms: float
    q3_ms: float
    repeats: int
    device: str
    threads: int
    batch_size: int
    runtime: str = "torch"

    @classmethod
    def of(cls, times: list[float], device: str, threads: int, batch_size: int, runtime: str) -> Measurement:
        """The median and quartiles of ``times`` (ms), one call's timed runs."""
        q1, med, q3 = statistics.quantiles(times, n=4, method="inclusive")
        return cls(med, q1, q3, len(times), device, threads, batch_size, runtime)

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median: the run-to-run noise of this measurement."""
        return (self.q3_ms - self.q1_ms) / self.median_ms


def check_device(device: str, field: str = "device") -> None:
    """A SpecError at ``field`` unless ``device`` is ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (its syntax only:
    whether this machine has it is :func:`resolve_device`'s to say)."""
    if device == "auto":
        return
    try:
        kind = torch.device(device).type
    except RuntimeError:
        kind = None
    if kind not in ("cpu", "cuda"):
        raise SpecError(field, f"{device!r} is not one of 'cpu', 'cuda', 'cuda:N', 'auto'")


def resolve_device(device: str, field: str = "device") -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto``; a CUDA request without CUDA is an error, not a fallback."""
    check_device(device, field)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SpecError(field, f"{device!r} requested but torch sees no CUDA device")
    return dev


@contextlib.contextmanager
def num_threads(threads: int | None) -> Iterator[int]:
    """Run with ``threads`` intra-op threads (default: torch's current setting), restoring it after."""
    before = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise SpecError("threads", f"{threads} must be positive")
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


@functools.cache
def steady_allocator() -> bool:
    """Fix glibc malloc's thresholds (``mallopt``) so freed activations are reused instead of unmapped and
    faulted in afresh on the next call. Returns whether it applied (glibc only; other allocators are left be).

    glibc moves its mmap and trim thresholds with the history of the process's frees, so on this project's
    2-core machine the same 224px network measured 6.5 ms in one process and 9.5 ms in another (about 2,000
    page faults per forward pass), which no per-layer table can predict. Fixed thresholds measure the cost of
    the computation itself, as a caching allocator (jemalloc, tcmalloc, inference runtimes) gives it. The
    setting is process-wide and keeps up to 512 MiB of freed memory for reuse."""
    if sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    return bool(mallopt(m_trim_threshold, 512 << 20)) and bool(mallopt(m_mmap_threshold, 32 << 20))


def busy_share(seconds: float = 1.0) -> float | None:
    """The share of all CPU time that other programs use, sampled from /proc/stat over ``seconds`` while this process
    sleeps (Linux; None elsewhere). A steadily loaded machine times every layer consistently slowly, so round-to-round
    spread alone does not reveal it; this does, in a second."""
    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]) - idle, sum(fields[:8])

    try:
        busy0, total0 = sample()
        time.sleep(seconds)
        busy1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return (busy1 - busy0) / max(total1 - total0, 1)


def time_call(fn: Callable[[], object], device: torch.device, *, warmup: int, repeats: int) -> list[float]:
    """Wall times in ms of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones (CUDA synchronised)."""
    steady_allocator()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return times


COMMON_MODE_WINDOW = 3  # visits either side whose speed judges a visit's (see common_mode)


class Sweeps:
    """Visits of ``n`` calls in interleaved rounds, kept raw with the order they ran in, so that rounds added later
    (:meth:`run` on a subset) are corrected for the machine's speed together with the first (:meth:`corrected`).
    ``make(i)`` gives call i afresh each visit, so nothing large stays in memory; each visit is ``warmup`` untimed
    and ``repeats`` timed calls."""

    def __init__(self, n: int, make: Callable[[int], Callable[[], object]], device: torch.device, *, warmup: int,
                 repeats: int, seed: int = 0, progress: tqdm | None = None) -> None:
        self.make, self.device, self.warmup, self.repeats, self.progress = make, device, warmup, repeats, progress
        self.samples: list[list[list[float]]] = [[] for _ in range(n)]  # [call][visit][repeat], ms
        self.chronology: list[int] = []  # the call of each visit, in the order they ran
        self._rng = random.Random(seed)

    def run(self, rounds: int, calls: list[int] | None = None) -> None:
        """``rounds`` sweeps over ``calls`` (default: all), in a new shuffled order each."""
        for _ in range(rounds):
            order = list(range(len(self.samples))) if calls is None else list(calls)
            self._rng.shuffle(order)
            for i in order:
                self.samples[i].append(time_call(self.make(i), self.device, warmup=self.warmup, repeats=self.repeats))
                self.chronology.append(i)
                if self.progress is not None:
                    self.progress.update()

    def corrected(self, window: int = COMMON_MODE_WINDOW) -> list[list[list[float]]]:
        """The samples so far with each visit divided by the machine's speed around it (:func:`common_mode`)."""
        return common_mode(self.samples, self.chronology, window) if window else self.samples


def time_interleaved(n: int, make: Callable[[int], Callable[[], object]], device: torch.device, *, rounds: int,
                     warmup: int, repeats: int, seed: int = 0, progress: tqdm | None = None,
                     window: int = COMMON_MODE_WINDOW) -> list[list[list[float]]]:
    """Wall times in ms of ``n`` calls, ``[call][round][repeat]``: ``rounds`` sweeps in a new shuffled order each
    (:class:`Sweeps`), each visit's times divided by the machine's speed around it (:func:`common_mode`;
    ``window=0`` leaves them raw).

    A shared machine has bursts of noise and a cold start; timing each call in one stretch lets a burst inflate
    every sample of a few calls, while interleaving spreads it over single samples of many, which the median
    and the common mode then discard."""
    sweeps = Sweeps(n, make, device, warmup=warmup, repeats=repeats, seed=seed, progress=progress)
    sweeps.run(rounds)
    return sweeps.corrected(window)


def common_mode(samples: list[list[list[float]]], chronology: list[int], window: int,
                iterations: int = 3) -> list[list[list[float]]]:
    """``samples`` (``[call][visit][repeat]``, as :class:`Sweeps` takes them) with each visit's times divided by
    the machine's speed at that moment: the median, over the ``window`` visits either side of it in ``chronology``
    (the call of each visit in the order they ran) and itself, of each visit's median over its call's typical median.
    The typical medians are re-estimated from the corrected visits ``iterations`` times.

    This project's 2-core machine changes speed within seconds, by up to 1.8x within an hour, and every call a
    visit's neighbours ran (shuffled, so unrelated to it) slowed with it. Dividing that common mode out is what made
    its measurements agree with themselves: 40 mobilenetv3_small networks timed in 8 rounds while another process ran
    on one core in random 0.5-4 s bursts agreed within +-10% relative to the reference, first 4 rounds against last
    4, for 12% of the networks raw and 98% so corrected, from the same visits (Kendall tau 0.29 and 0.83;
    tests/benchmarks/bench_latency.py bursts)."""
    visit = [0] * len(samples)
    order = []  # (call, its visit index) of each visit, in chronological order
    for i in chronology:
        order.append((i, visit[i]))
        visit[i] += 1
    med = [statistics.median(samples[i][v]) for i, v in order]
    factor = [1.0] * len(order)
    for _ in range(iterations):
        per_call: list[list[float]] = [[] for _ in samples]
        for k, (i, _) in enumerate(order):
            per_call[i].append(med[k] / factor[k])
        typical = [statistics.median(m) if m else 1.0 for m in per_call]
        ratio = [med[k] / typical[i] if typical[i] > 0 else 1.0 for k, (i, _) in enumerate(order)]
        factor = [statistics.median(ratio[max(0, k - window):k + window + 1]) for k in range(len(order))]
    out: list[list[list[float]]] = [[[] for _ in call] for call in samples]  # every visit is in the chronology
    for k, (i, v) in enumerate(order):
        speed = factor[k] if factor[k] > 0 else 1.0
        out[i][v] = [t / speed for t in samples[i][v]]
    return out


def visits(compile: Callable[[int], Compiled], runtime: str, n: int, progress: tqdm | None = None
           ) -> Callable[[int], Callable[[], object]]:
    """``time_interleaved``'s ``make`` over ``compile(i)`` for ``i < n``. In torch each visit compiles afresh, so
    nothing large stays in memory. Other runtimes prepare every call first (export, quantise or lower: the costly
    step, 1-2 s a layer in ExecuTorch, see :func:`nas.runtime.prepare_all`), once each and before any timing, so no
    export runs between the timings of a round; each visit opens the prepared call afresh. ``progress`` counts the
    preparations."""
    if runtime == "torch":
        return lambda i: compile(i).runner()
    if progress is not None:
        progress.total += n
        progress.refresh()
    ready = [compile(i) for i in range(n)]
    prepare_all(ready, progress.update if progress is not None else lambda: None)
    return lambda i: ready[i].runner()


REFERENCE_COPIES = 8  # visits per round of a network that every relative figure divides by (the space's reference)


def pooled(copies: list[list[list[float]]]) -> list[list[float]]:
    """Several calls of one network (its copies, visited at places spread by the shuffle) as one call's rounds,
    round by round, so that one unlucky visit cannot decide its time."""
    return [[t for copy in copies for t in copy[r]] for r in range(len(copies[0]))]


def median_of_rounds(rounds: list[list[float]]) -> float:
    """The median over every sample of ``time_interleaved``'s rounds for one call."""
    return statistics.median(t for r in rounds for t in r)


def network_compiler(specs: list[NetworkSpec], device: torch.device, batch_size: int, runtime: str,
                     threads: int | None, prepared: dict[NetworkSpec, Compiled] | None = None
                     ) -> Callable[[int], Compiled]:
    """``visits``' ``compile`` over ``nas.build_model(specs[i])`` on a random input of the spec's shape. Outside
    torch each distinct architecture is exported once, into ``prepared`` when given (so another call reuses it)."""
    prepared = {} if prepared is None else prepared

    def compiled(i: int) -> Compiled:
        key = specs[i].without_metadata()
        if key in prepared:
            return prepared[key]
        r = specs[i].input.resolution
        x = torch.randn(batch_size, specs[i].input.channels, r, r, device=device)
        c = Compiled(build_model(specs[i]).to(device), x, runtime, threads)
        if runtime != "torch":
            prepared[key] = c
        return c

    return compiled


def time_networks(specs: list[NetworkSpec], *, device: str = "cpu", threads: int | None = None, batch_size: int = 1,
                  rounds: int, warmup: int, repeats: int, seed: int = 0, progress: tqdm | None = None,
                  runtime: str = "torch", prepared: dict[NetworkSpec, Compiled] | None = None
                  ) -> list[list[list[float]]]:
    """``time_interleaved`` over ``nas.build_model(spec)`` of each spec in ``runtime``: real networks, never a
    supernet (exported through ``prepared``, see :func:`network_compiler`)."""
    dev = resolve_device(device)
    with num_threads(threads), torch.inference_mode():
        call = visits(network_compiler(specs, dev, batch_size, runtime, threads, prepared), runtime, len(specs),
                      progress)
        return time_interleaved(len(specs), call, dev, rounds=rounds, warmup=warmup, repeats=repeats, seed=seed,
                                progress=progress)


def time_beside_reference(reference: NetworkSpec | None, specs: list[NetworkSpec], *, copies: int = REFERENCE_COPIES,
                          rounds: int, desc: str, progress: bool = True, **timing: Any
                          ) -> tuple[list[list[float]] | None, list[list[list[float]]]]:
    """``time_networks`` over ``specs`` with ``reference`` among them ``copies`` times per round, at places spread by
    the shuffle: the reference's rounds pooled (None without one) and each spec's rounds, with a progress bar ``desc``
    over every visit. Every figure relative to the reference divides by its one measurement, so one unlucky visit must
    not decide it; and relative figures, taken in the same rounds, do not depend on how fast this machine happens to
    run while they are taken."""
    if copies < 1:
        raise SpecError("reference_copies", f"{copies} must be positive")
    timed = [*([reference] * copies if reference is not None else []), *specs]
    with tqdm(total=rounds * len(timed), desc=desc, unit="net", disable=not progress, dynamic_ncols=True) as bar:
        times = time_networks(timed, rounds=rounds, progress=bar, **timing)
    k = len(timed) - len(specs)
    return (pooled(times[:k]) if k else None), times[k:]


def measure_module(model: nn.Module, input_shape: tuple[int, ...], *, device: str = "cpu", threads: int | None = None,
                   warmup: int = 10, repeats: int = 30, runtime: str = "torch") -> Measurement:
    """Time ``model`` in ``runtime`` on a random input of ``input_shape`` (batch first)."""
    dev = resolve_device(device)
    x = torch.randn(input_shape, device=dev)
    with num_threads(threads) as n, torch.inference_mode():
        times = time_call(Compiled(model.to(dev), x, runtime, threads).runner(), dev, warmup=warmup, repeats=repeats)
    return Measurement.of(times, str(dev), n, input_shape[0], runtime)


def measure(spec: NetworkSpec, *, device: str = "cpu", batch_size: int = 1, threads: int | None = None,
            warmup: int = 10, repeats: int = 30, runtime: str = "torch") -> Measurement:
    """Real latency of ``nas.build_model(spec)`` at the spec's resolution in ``runtime`` (never a supernet)."""
    shape = (batch_size, spec.input.channels, spec.input.resolution, spec.input.resolution)
    return measure_module(build_model(spec), shape, device=device, threads=threads, warmup=warmup, repeats=repeats,
                          runtime=runtime)
