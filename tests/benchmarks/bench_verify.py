"""Does the search beat MobileNetV3, and does the supernet rank networks truthfully? (issue: train and verify)
Run: python tests/benchmarks/bench_verify.py [--epochs N] [--supernet-epochs N] [--top K]

On the CIFAR-10 JPEGs of ../shared/data at 32x32 (an 80/20 train/validation split carved with seed 0):
train the mobilenetv3_compact supernet (the stated CPU budget: --supernet-epochs at batch 128), run 200
trials with the latency limit at the reference member's predicted latency, then `nas verify`: retrain
the top K architectures spanning the front plus the MobileNetV3 reference with one recipe, and compare.
Goals: best found >= reference + 1.0 point at no more measured latency; Kendall tau >= 0.6 over >= 10
networks. Everything is kept under results/benchmarks/cifar10-verify/, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import write_section

from nas.report import build_report, write_report
from nas.search import SearchConfig, prepare, run_search
from nas.train import TrainSettings
from nas.verify import verify, write_verification

ROOT = Path(__file__).resolve().parents[2]
CIFAR = ROOT.parent / "shared" / "data" / "cifar10-jpeg-train.tar.gz"
WORK = ROOT / "results" / "benchmarks" / "cifar10-verify"
OUT = ROOT / "results" / "benchmarks"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--supernet-epochs", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=2, help="stand-alone epochs for every retrained network")
    ap.add_argument("--top", type=int, default=10)
    args = ap.parse_args()
    if not CIFAR.exists():
        print(f"skipped: {CIFAR} is absent")
        return
    images = WORK / "cifar10-jpeg"
    if not (images / "train").is_dir():
        images.mkdir(parents=True, exist_ok=True)
        with tarfile.open(CIFAR, "r:gz") as tar:
            tar.extractall(images, filter="data")
    config = SearchConfig(space="mobilenetv3_compact", dataset=f"folder:{images / 'train'}", budget=200,
                          study_name=f"cifar10-sn{args.supernet_epochs}", device="cpu", results=str(WORK),
                          supernet_epochs=args.supernet_epochs, supernet_batch_size=128, val_images=2000)
    t = time.perf_counter()
    prepared = prepare(config)
    prepare_s = time.perf_counter() - t
    outcome = run_search(config, prepared=prepared)
    report = build_report(outcome.study)
    write_report(report, outcome.study, config.study_dir)
    recipe = TrainSettings(epochs=args.epochs, batch_size=128, lr=0.1, random_subnets=0)
    t = time.perf_counter()
    v = verify(outcome.study, top=args.top, settings=recipe, device="cpu", out_dir=config.study_dir / "verify")
    verify_s = time.perf_counter() - t
    write_verification(v, config.study_dir)
    print(v.format(), flush=True)

    found = [r for r in v.rows if r.name != "reference"]
    ref = next(r for r in v.rows if r.name == "reference")
    best = max(found, key=lambda r: r.proxy_accuracy)  # what the search reports as its best architecture
    no_slower = [r for r in found if r.measured_ms <= ref.measured_ms]
    best_no_slower = max(no_slower, key=lambda r: r.standalone_accuracy, default=None)
    feasible = int((report.trials["feasible"] == True).sum())  # noqa: E712 - pandas mask
    figures = {"train_images": len(prepared.data.train), "val_images": len(prepared.data.val),
               "prepare_s": prepare_s, "search_s": outcome.seconds, "trials": outcome.completed,
               "feasible": feasible, "limit_ms": report.limit_ms, "pareto_size": len(report.pareto),
               "verify_s": verify_s, "recipe": recipe.__dict__, "supernet_epochs": args.supernet_epochs, **v.to_json()}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"verify-cifar10-sn{args.supernet_epochs}.json").write_text(json.dumps(figures, indent=2))

    rows = ["| network | proxy acc (supernet) | stand-alone acc | predicted ms | measured ms |",
            "|---|---|---|---|---|"]
    rows += [f"| {r.name} | {r.proxy_accuracy:.2%} | {r.standalone_accuracy:.2%} | {r.predicted_ms:.3f} | "
             f"{r.measured_ms:.3f} |" for r in v.rows]
    gain = best.standalone_accuracy - ref.standalone_accuracy
    lines = [
        f"| supernet training (stated budget: {args.supernet_epochs} epochs at batch 128, 2 CPU cores) and latency "
        f"table | {prepare_s / 60:.1f} min |",
        f"| search: {outcome.completed} trials, proxy on {config.val_images} validation images | "
        f"{outcome.seconds / 60:.1f} min ({outcome.trials_run / max(outcome.seconds, 1e-9):.1f} trials/s) |",
        f"| trials within the {report.limit_ms:.3f} ms limit / feasible Pareto front | {feasible} / "
        f"{len(report.pareto)} |",
        f"| retraining {len(v.rows)} networks, {args.epochs} epochs each | {verify_s / 60:.1f} min |",
        f"| best found ({best.name}), stand-alone | {best.standalone_accuracy:.2%} at {best.measured_ms:.3f} ms |",
        f"| MobileNetV3 reference, stand-alone | {ref.standalone_accuracy:.2%} at {ref.measured_ms:.3f} ms |",
        f"| best found minus reference (goal >= +1.0 point at no more latency) | {gain * 100:+.2f} points, "
        f"{'no slower' if best.measured_ms <= ref.measured_ms else 'slower'} "
        f"({best.measured_ms / ref.measured_ms - 1:+.0%} measured latency) |",
        "| most accurate retrained network no slower than the reference | "
        + ("none" if best_no_slower is None else f"{best_no_slower.name}: {best_no_slower.standalone_accuracy:.2%} "
           f"at {best_no_slower.measured_ms:.3f} ms") + " |",
        f"| Kendall tau / Spearman rho, proxy vs stand-alone, {len(v.rows)} networks (goal tau >= 0.6) | "
        f"{v.kendall_tau:.3f} / {v.spearman_rho:.3f} |"]
    write_section(
        "verify-cifar10", "Search vs MobileNetV3 on CIFAR-10, and supernet rank agreement (goals: +1.0 point at no "
        "more latency, Kendall tau >= 0.6)",
        f"`python tests/benchmarks/bench_verify.py`: the CIFAR-10 JPEGs of ../shared/data at 32x32, "
        f"{figures['train_images']} training / {figures['val_images']} validation images (seed-0 split; every "
        f"accuracy below is on the validation split, proxy accuracy on its first {config.val_images} images). "
        f"Space mobilenetv3_compact; supernet {args.supernet_epochs} epochs, batch 128, lr 0.1, sandwich rule; "
        f"TPE, 200 trials, latency limit = the reference member's predicted latency. `nas verify` then retrains "
        f"{len(v.rows) - 1} distinct architectures spanning the feasible front (the most accurate first) and the "
        f"reference from scratch with one recipe: {args.epochs} epochs, batch 128, lr 0.1 cosine, no augmentation, "
        f"BN statistics re-estimated on 8 training batches. Measured latency: batch 1, median of 30 runs.\n\n"
        "| figure | value |\n|---|---|\n" + "\n".join(lines) + "\n\n" + "\n".join(rows)
        + "\n\nEvery supernet budget run so far (raw figures in results/benchmarks/verify-cifar10-sn*.json):\n\n"
        + budgets())


def budgets() -> str:
    """One row per supernet budget this script has been run with, from the JSON each run leaves."""
    out = ["| supernet epochs | supernet + table | best found, stand-alone | reference, stand-alone "
           "| found - reference "
           "| Kendall tau / Spearman rho |", "|---|---|---|---|---|---|"]
    runs = [json.loads(p.read_text()) for p in OUT.glob("verify-cifar10-sn*.json")]
    for r in sorted(runs, key=lambda r: r["supernet_epochs"]):
        found = [row for row in r["rows"] if row["name"] != "reference"]
        ref = next(row for row in r["rows"] if row["name"] == "reference")
        best = max(found, key=lambda row: row["proxy_accuracy"])
        out.append(f"| {r['supernet_epochs']} | {r['prepare_s'] / 60:.1f} min | {best['standalone_accuracy']:.2%} at "
                   f"{best['measured_ms']:.3f} ms | {ref['standalone_accuracy']:.2%} at {ref['measured_ms']:.3f} ms | "
                   f"{(best['standalone_accuracy'] - ref['standalone_accuracy']) * 100:+.2f} points | "
                   f"{r['kendall_tau']:.3f} / {r['spearman_rho']:.3f} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
