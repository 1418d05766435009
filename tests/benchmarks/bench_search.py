"""Search benchmarks (issue: nas search). Run: python tests/benchmarks/bench_search.py [part...]

Parts (all by default):
  wall       the README's main command in a fresh clone with no caches (goal <= 180 s), then a rerun there
             with the caches and a new study (goal <= 60 s); search-phase throughput (goal >= 5 trials/s)
  samplers   hypervolume of (accuracy, latency) after 200 trials for nsga2, tpe and random, 3 seeds each,
             on one fixed supernet and latency table (only the sampler's seed varies); the default must beat random
Figures go to results/BENCHMARKS.md (with date and machine) and results/benchmarks/search-*.json.
"""

from __future__ import annotations

import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import write_section

from nas.report import build_report
from nas.search import DEFAULT_SAMPLER, SAMPLERS, SearchConfig, prepare, run_search

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "results" / "benchmarks"


def save(name: str, data: dict) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"search-{name}.json").write_text(json.dumps(data, indent=2))


def _timed(cmd: list[str], cwd: Path) -> tuple[float, str]:
    start = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return seconds, r.stdout


def _rate(stdout: str) -> float:
    m = re.search(r"this run: (\d+) trials in ([\d.]+) s \(([\d.]+) trials/s\)", stdout)
    if not m:
        raise SystemExit("no throughput line in the search output")
    return float(m.group(3))


def wall() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        clone = Path(tmp) / "nas"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        # The main command of the README, minus the venv set-up (this interpreter's venv has the package).
        cmd = [sys.executable, "-m", "nas", "search", "--budget", "200"]
        cold, out_cold = _timed(cmd, clone)
        warm, out_warm = _timed([*cmd, "--study-name", "rerun"], clone)
        data = {"cold_s": cold, "warm_s": warm, "cold_trials_per_s": _rate(out_cold),
                "warm_trials_per_s": _rate(out_warm), "summary": out_cold}
    save("wall", data)
    write_section("search-wall", "Main command wall time (goals: <= 180 s cold, <= 60 s warm, >= 5 trials/s)",
                  "`python -m nas search --budget 200` in a fresh `git clone` with no results/ (supernet training, "
                  "latency table, 200 trials, reports), then again in that clone with the caches and "
                  "`--study-name rerun`.\n\n"
                  "| figure | value |\n|---|---|\n"
                  f"| cold run, everything included | {cold:.0f} s |\n"
                  f"| warm run (cached supernet and table, new study) | {warm:.0f} s |\n"
                  f"| search-phase throughput, cold / warm | {data['cold_trials_per_s']:.1f} / "
                  f"{data['warm_trials_per_s']:.1f} trials/s |\n\n"
                  "Summary printed by the cold run:\n\n```text\n" + out_cold.strip() + "\n```")


def samplers(seeds: tuple[int, ...] = (0, 1, 2), budget: int = 200) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        base = SearchConfig(results=tmp)
        prepared = prepare(base, progress=False)
        rows = []
        for sampler in SAMPLERS:
            for seed in seeds:
                config = SearchConfig(results=tmp, sampler=sampler, seed=seed, budget=budget,
                                      study_name=f"{sampler}-{seed}")
                outcome = run_search(config, progress=False, prepared=prepared)
                report = build_report(outcome.study, measure_latency=False)
                rows.append({"sampler": sampler, "seed": seed, "hypervolume": report.hypervolume,
                             "trials_per_s": outcome.trials_run / outcome.seconds,
                             "best_feasible_accuracy": max(e.accuracy for e in report.pareto) if report.pareto
                             else None})
                print(rows[-1], flush=True)
        shutil.rmtree(tmp, ignore_errors=True)
    data = {"rows": rows, "limit_ms": prepared.limit_ms, "seeds": list(seeds)}
    save("samplers", data)
    render_samplers(data)


def render_samplers(data: dict) -> None:
    """Write the samplers section from saved results (``samplers-render`` redoes it without rerunning)."""
    rows, seeds, limit = data["rows"], data.get("seeds", [0, 1, 2]), data["limit_ms"]
    med = {s: statistics.median(r["hypervolume"] for r in rows if r["sampler"] == s) for s in SAMPLERS}
    table = ["| sampler | hypervolume, seeds " + ", ".join(map(str, seeds)) + " | median | trials/s (median) |",
             "|---|---|---|---|"]
    for s in SAMPLERS:
        hv = [r["hypervolume"] for r in rows if r["sampler"] == s]
        tps = statistics.median(r["trials_per_s"] for r in rows if r["sampler"] == s)
        table.append(f"| {s}{' (default)' if s == DEFAULT_SAMPLER else ''} | {', '.join(f'{v:.4f}' for v in hv)} "
                     f"| {med[s]:.4f} | {tps:.1f} |")
    verdict = "beats" if med[DEFAULT_SAMPLER] > med["random"] else "does NOT beat"
    write_section("search-samplers", "Sampler comparison: hypervolume after 200 trials",
                  f"mobilenetv3_compact on digits, one supernet and latency table for all runs, latency limit "
                  f"{limit:.3f} ms (the reference member's predicted latency). Hypervolume of the "
                  "feasible (accuracy, latency) points in accuracy [0, 1] x latency [0, limit], normalised to 1. "
                  f"The default ({DEFAULT_SAMPLER}) {verdict} random by median.\n\n" + "\n".join(table))


if __name__ == "__main__":
    parts = sys.argv[1:] or ["wall", "samplers"]
    for part in parts:
        {"wall": wall, "samplers": samplers,
         "samplers-render": lambda: render_samplers(json.loads((OUT / "search-samplers.json").read_text()))}[part]()
