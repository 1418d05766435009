"""Validating a predictor against real measurements of real networks, with the noise floor beside it."""

from __future__ import annotations

import dataclasses
import random
import statistics
from dataclasses import dataclass
from typing import Any

from scipy.stats import kendalltau

from nas.latency._predictor import Predictor, iter_measured
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
    noise_spread: float  # median |m1 - m2| / m1 over two independent measurements of each network
    noise_within_10: float  # share of networks whose two measurements agree within +-10%
    worst: tuple[dict[str, Any], ...]  # the largest relative errors, with the architecture

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def format(self) -> str:
        lines = [
            f"latency predictor, space {self.space}, {self.n} random architectures measured for real "
            f"({self.fingerprint['device']} '{self.fingerprint['processor']}', {self.fingerprint['threads']} "
            f"threads, batch {self.fingerprint['batch_size']})",
            f"  within +-10% of measured: {self.within_10:.1%}   (noise floor: two measurements of the same network "
            f"agree within +-10% for {self.noise_within_10:.1%})",
            f"  mean absolute % error:    {self.mape:.1%}   (noise floor: median run-to-run spread "
            f"{self.noise_spread:.1%})",
            f"  Kendall tau:              {self.kendall_tau:.3f}",
            "  worst cases:"]
        lines += [f"    predicted {w['predicted_ms']:.3f} ms, measured {w['measured_ms']:.3f} ms "
                  f"({w['error']:+.1%}), {w['blocks']} blocks" for w in self.worst]
        return "\n".join(lines)


def validate(predictor: Predictor, space: SearchSpace, *, n: int = 100, seed: int = 1, worst: int = 5,
             progress: bool = True) -> Validation:
    """Sample ``n`` members, predict them, and measure ``nas.build_model`` of each twice (never the supernet)."""
    rng = random.Random(seed)
    specs: list[NetworkSpec] = [space.sample(rng) for _ in range(n)]
    fp = predictor.fingerprint
    kw = {"device": fp.device, "threads": fp.threads, "batch_size": fp.batch_size, "progress": progress}
    first = list(iter_measured(specs, desc="measuring (1/2)", **kw))  # type: ignore[arg-type]
    second = list(iter_measured(specs, desc="measuring (2/2)", **kw))  # type: ignore[arg-type]
    measured = [(a + b) / 2 for a, b in zip(first, second, strict=True)]
    predicted = [predictor.predict(s) for s in specs]
    errors = [(p - m) / m for p, m in zip(predicted, measured, strict=True)]
    spread = [abs(a - b) / a for a, b in zip(first, second, strict=True)]
    order = sorted(range(n), key=lambda i: -abs(errors[i]))[:worst]
    return Validation(
        space=space.name, fingerprint=dataclasses.asdict(fp), n=n,
        mape=statistics.fmean(abs(e) for e in errors),
        within_10=sum(abs(e) <= 0.10 for e in errors) / n,
        kendall_tau=float(kendalltau(predicted, measured).statistic),
        noise_spread=statistics.median(spread),
        noise_within_10=sum(s <= 0.10 for s in spread) / n,
        worst=tuple({"predicted_ms": predicted[i], "measured_ms": measured[i], "error": errors[i],
                     "blocks": len(specs[i].blocks), "choices": space.choices(specs[i])} for i in order))
