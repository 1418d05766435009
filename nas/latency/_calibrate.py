"""Drift calibration: a shared machine's speed drifts (up to about 1.8x within an hour here), so a table built
earlier is checked against direct measurements of a few fixed members now, and its predictions rescaled."""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass

from nas._schema import SpecError
from nas.latency._measure import median_of_rounds, time_networks
from nas.latency._predictor import Predictor, enforce

DRIFT_BAND = (1 / 1.5, 1.5)  # beyond this the table no longer describes this machine: rebuild it


@dataclass(frozen=True)
class Drift:
    """How much slower (factor > 1) or faster this machine runs now than when the table was built."""

    factor: float  # median over the members of measured / predicted
    members: tuple[tuple[str, float, float], ...]  # (name, predicted ms from the table, measured ms now)
    seconds: float

    def describe(self) -> str:
        shown = ", ".join(f"{name} {p:.2f} -> {m:.2f} ms" for name, p, m in self.members)
        return (f"latency drift x{self.factor:.3f} since the table was built (table -> measured now: {shown}; "
                f"{self.seconds:.1f} s); predictions are rescaled by it")


def calibrate(predictor: Predictor, *, rounds: int = 3, seed: int = 0, refuse: bool = True) -> Drift:
    """Measure the space's reference member, its largest and smallest, and two fixed random members with the
    table's device, threads and batch size (a second or two), and compare with the table's predictions.
    Refuses (a SpecError saying to rebuild) when the factor is outside ``DRIFT_BAND``, unless not ``refuse`` or the
    table was built by this process (``predictor.fresh``): rebuilding is what just happened."""
    space, fp = predictor.space, predictor.fingerprint
    reference = space.reference_member()
    rng = random.Random(seed)
    members = {**({"reference": reference} if reference is not None else {}),
               "largest": space.largest(), "smallest": space.smallest(),
               "random1": space.sample(rng), "random2": space.sample(rng)}
    start = time.perf_counter()
    times = time_networks(list(members.values()), **fp.timing, rounds=rounds, warmup=2, repeats=5, seed=seed)
    base = predictor.with_drift(1.0)
    rows = tuple((name, base.predict(spec), median_of_rounds(t))
                 for (name, spec), t in zip(members.items(), times, strict=True))
    drift = Drift(statistics.median(m / p for _, p, m in rows), rows, time.perf_counter() - start)
    if refuse and not predictor.fresh and not DRIFT_BAND[0] <= drift.factor <= DRIFT_BAND[1]:
        where = str(predictor.path) if predictor.path else f"latency table of {space.name}"
        enforce(SpecError("", f"this machine now runs x{drift.factor:.2f} against the table (outside "
                            f"[{DRIFT_BAND[0]:.2f}, {DRIFT_BAND[1]:.2f}]); rebuild it: nas latency build --space "
                            f"{space.name} --rebuild", source=where))
    return drift
