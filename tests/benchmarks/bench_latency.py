"""Latency predictor benchmarks (issue: on-device latency predictor).
Run: python tests/benchmarks/bench_latency.py [space...]   (default: mobilenetv3_compact mobilenetv3_small)

For each space: time to profile it from scratch (goal for mobilenetv3_compact <= 2 min), then
`validate` on 100 random architectures built with nas.build_model and measured for real: share
within +-10% (goal >= 95%), Kendall tau (goal >= 0.9), mean absolute error, and the measurement's own
run-to-run spread; plus predict() time per call. Figures go to results/BENCHMARKS.md and
results/benchmarks/latency-*.json.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import write_section

from nas.latency import load_predictor, validate
from nas.space import load_space

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "results" / "benchmarks"


def bench(space_name: str) -> dict:
    space = load_space(space_name)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        predictor = load_predictor(space, root=tmp, progress=False)
        profile_s = time.perf_counter() - start
    report = validate(predictor, space, n=100, seed=1, progress=False)
    specs = [space.sample(random.Random(i)) for i in range(200)]
    per_call = []
    for _ in range(5):
        t = time.perf_counter()
        for s in specs:
            predictor.predict(s)
        per_call.append((time.perf_counter() - t) / len(specs) * 1e6)
    row = {"space": space_name, "layers": len(predictor.table), "profile_s": profile_s,
           "predict_us": statistics.median(per_call), "scale": predictor.scale, "offset_ms": predictor.offset,
           **report.to_json()}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"latency-{space_name}.json").write_text(json.dumps(row, indent=2))
    print(report.format(), flush=True)
    return row


if __name__ == "__main__":
    rows = [bench(name) for name in (sys.argv[1:] or ["mobilenetv3_compact", "mobilenetv3_small"])]
    table = ["| space | layers | profile time | within +-10% | Kendall tau | MAPE | noise: run-to-run spread "
             "(median) | noise: repeat within +-10% | noise: tau of repeat vs first | predict() per call |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    table += [f"| {r['space']} ({r['fingerprint']['device']}, batch {r['fingerprint']['batch_size']}) | {r['layers']} "
              f"| {r['profile_s']:.0f} s | {r['within_10']:.0%} | {r['kendall_tau']:.3f} | {r['mape']:.1%} | "
              f"{r['noise_spread']:.1%} | {r['noise_within_10']:.0%} | {r['noise_kendall_tau']:.3f} | "
              f"{r['predict_us']:.0f} us |" for r in rows]
    worst = "\n".join(f"- {r['space']}: " + "; ".join(f"{w['error']:+.1%} ({w['measured_ms']:.2f} ms measured)"
                                                       for w in r["worst"]) for r in rows)
    write_section("latency", "Latency predictor vs real measurements (goals: >= 95% within +-10%, tau >= 0.9, "
                  "profiling mobilenetv3_compact <= 2 min)",
                  "100 random architectures per space, each built with `nas.build_model` and timed for real in 4 "
                  "interleaved rounds (10 runs after 3 warm-up per round, batch 1, inference mode, glibc malloc "
                  "thresholds fixed as in `nas.latency.steady_allocator`); predictions are compared with the median "
                  "of all 40 runs. The predictor's table was profiled from scratch in the same run (3 interleaved "
                  "rounds per layer, correction fitted on 30 whole networks). The noise columns compare the first "
                  "two rounds of each network with the last two, two independent measurements: the floor the "
                  "predictor's error should be read against.\n\n"
                  + "\n".join(table) + "\n\nWorst predictions:\n\n" + worst)
