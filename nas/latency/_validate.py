"""Validating a predictor against real measurements of real networks, with the noise floor beside it."""

from __future__ import annotations

import dataclasses
import random
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scipy.stats import kendalltau

from nas._schema import SpecError, write_json_atomic
from nas.latency._measure import REFERENCE_COPIES, median_of_rounds, time_beside_reference
from nas.latency._predictor import Predictor, table_path
from nas.space import SearchSpace
from nas.spec import NetworkSpec


@dataclass(frozen=True)
class Validation:
    space: str
    fingerprint: dict[str, Any]
    n: int
    mape: float  # mean absolute percentage error of predicted vs measured
    within_10: float  # share of networks predicted within +-10% of measured
    kendall_tau: float
    # The noise floor: two independent measurements of each network (the halves of the interleaved rounds)
    noise_spread: float  # median |m1 - m2| / m1
    noise_within_10: float  # share of networks whose two measurements agree within +-10%
    noise_kendall_tau: float  # tau of the first measurement against the second
    worst: tuple[dict[str, Any], ...]  # the largest relative errors, with the architecture
    # Relative to the reference member measured in the same rounds (what the default limit, "no slower than
    # MobileNetV3", depends on): predicted_i / predicted_ref against measured_i / measured_ref. None without one.
    relative_within_10: float | None = None
    relative_mape: float | None = None
    relative_noise_within_10: float | None = None  # the same ratio from the two halves of the rounds
    relative_errors: tuple[float, ...] = ()  # each network's relative error, in sample order
    drift: float = 1.0  # the predictor's drift factor (nas.latency.calibrate) when validated

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, predictor: Predictor) -> Path:
        """Write the report as JSON beside the predictor's table; returns the path."""
        table = predictor.path or table_path(predictor.space, predictor.fingerprint)
        out = table.with_name(f"validate-{table.stem}-n{self.n}.json")
        write_json_atomic(self.to_json(), out)
        return out

    def format(self) -> str:
        lines = [
            f"latency predictor, space {self.space}, {self.n} random architectures measured for real "
            f"({self.fingerprint['device']} '{self.fingerprint['processor']}', {self.fingerprint['threads']} "
            f"threads, batch {self.fingerprint['batch_size']}, {self.fingerprint['runtime']})",
            f"  within +-10% of measured: {self.within_10:.1%}   (noise floor: two measurements of the same network "
            f"agree within +-10% for {self.noise_within_10:.1%})",
            f"  mean absolute % error:    {self.mape:.1%}   (noise floor: median run-to-run spread "
            f"{self.noise_spread:.1%})",
            f"  Kendall tau:              {self.kendall_tau:.3f}   (noise floor: tau of the first measurement "
            f"against the second {self.noise_kendall_tau:.3f})"]
        if self.relative_within_10 is not None:
            lines.append(f"  relative to the reference measured in the same rounds: {self.relative_within_10:.1%} "
                         f"within +-10%, mean absolute error {self.relative_mape:.1%}   (noise floor: "
                         f"{self.relative_noise_within_10:.1%} within +-10%)")
        lines.append(f"  predictions rescaled by drift x{self.drift:.3f}; worst cases:")
        lines += [f"    predicted {w['predicted_ms']:.3f} ms, measured {w['measured_ms']:.3f} ms "
                  f"({w['error']:+.1%}), {w['blocks']} blocks" for w in self.worst]
        return "\n".join(lines)


def validate(predictor: Predictor, space: SearchSpace, *, n: int = 100, seed: int = 1, worst: int = 5,
             rounds: int = 4, warmup: int = 3, repeats: int = 10, reference_copies: int = REFERENCE_COPIES,
             progress: bool = True) -> Validation:
    """Sample ``n`` members, predict them, and time ``nas.build_model`` of each for real (never the supernet)
    in ``rounds`` interleaved sweeps (each visit ``warmup`` untimed and ``repeats`` timed runs), with the space's
    reference member among them. The prediction is compared with
    the median over all rounds, absolutely and relative to the reference; the noise floor compares the first half
    of the rounds with the second, two independent measurements. Calibrate ``predictor`` first
    (``predictor.with_drift(nas.latency.calibrate(predictor).factor)``) to validate it as a search uses it.

    The reference divides every relative figure, so an error in its one measurement would shift all of them the
    same way: it is visited ``reference_copies`` times per round, at places spread by the shuffle, and measured
    by the median over all those visits."""
    if rounds < 2:
        raise SpecError("rounds", f"{rounds}: the noise floor needs at least 2")
    rng = random.Random(seed)
    specs: list[NetworkSpec] = [space.sample(rng) for _ in range(n)]
    reference = space.reference_member()
    fp = predictor.fingerprint
    ref_times, times = time_beside_reference(reference, specs, copies=reference_copies, **fp.timing, rounds=rounds,
                                             warmup=warmup, repeats=repeats, seed=seed, desc="measuring",
                                             progress=progress)
    k = 0 if ref_times is None else 1  # the reference comes first, one call from here
    times = [ref_times, *times] if k else times
    networks = [reference, *specs] if k else specs
    half = rounds // 2
    measured_all = [median_of_rounds(net) for net in times]
    first_all = [median_of_rounds(net[:half]) for net in times]
    second_all = [median_of_rounds(net[half:]) for net in times]
    predicted_all = [predictor.predict(s) for s in networks]
    measured, first, second, predicted = (v[k:] for v in (measured_all, first_all, second_all, predicted_all))
    errors = [(p - m) / m for p, m in zip(predicted, measured, strict=True)]
    spread = [abs(a - b) / a for a, b in zip(first, second, strict=True)]
    order = sorted(range(n), key=lambda i: -abs(errors[i]))[:worst]
    relative: dict[str, Any] = {}
    if reference is not None:
        rel_err = [(p / predicted_all[0]) / (m / measured_all[0]) - 1 for p, m in zip(predicted, measured, strict=True)]
        rel_noise = [(a / first_all[0]) / (b / second_all[0]) - 1 for a, b in zip(first, second, strict=True)]
        relative = {"relative_within_10": sum(abs(e) <= 0.10 for e in rel_err) / n,
                    "relative_mape": statistics.fmean(abs(e) for e in rel_err),
                    "relative_noise_within_10": sum(abs(e) <= 0.10 for e in rel_noise) / n,
                    "relative_errors": tuple(rel_err)}
    return Validation(
        space=space.name, fingerprint=dataclasses.asdict(fp), n=n,
        mape=statistics.fmean(abs(e) for e in errors),
        within_10=sum(abs(e) <= 0.10 for e in errors) / n,
        kendall_tau=float(kendalltau(predicted, measured).statistic),
        noise_spread=statistics.median(spread),
        noise_within_10=sum(s <= 0.10 for s in spread) / n,
        noise_kendall_tau=float(kendalltau(first, second).statistic),
        worst=tuple({"predicted_ms": predicted[i], "measured_ms": measured[i], "error": errors[i],
                     "blocks": len(specs[i].blocks), "choices": space.choices(specs[i])} for i in order),
        drift=predictor.drift, **relative)
