"""Does the search beat MobileNetV3, and does the supernet rank networks truthfully? (issue: search truth)
Run: python tests/benchmarks/bench_verify.py [--size cpu|gpu|tiny] [--seed N]

On the CIFAR-10 JPEGs of ../shared/data at 32x32 (an 80/20 train/validation split carved with seed N, default 0;
every accuracy is on the validation split): train the mobilenetv3_compact supernet, run 200 trials with the latency
limit at the reference member's predicted latency, proxy on the whole validation split, then `nas verify`:
retrain the 12 architectures spanning the feasible front and the MobileNetV3 reference (5 seeds on cpu, 3 on gpu,
and 4 or 2 of the 12 with a second seed: the ground truth's own noise, pooled, and from it the tau a perfect proxy
would score) with one recipe, and compare.
Another --seed is an independent replicate of the whole benchmark, recorded in a section of its own.
--proxy SETTING=VALUE... re-scores a finished run's verified networks through supernets trained with changed
recipes, against the stand-alone accuracies it measured: proxies compared on one ground truth, for supernet
trainings alone (seed=N: the same recipe from another seed, the supernet's own noise; a recipe's two or more seeds
are also averaged, an ensemble). --random N ranks N random members within the run's latency limit instead (trained
stand-alone with its recipe): the proxy's own ranking, where a front's is mostly its latency order.
--calibration N... scores them with BN re-estimated on N batches, from two sets of images: how far the set alone
moves the proxy.
--standalone-epochs N trains the ground truth of any of these for N epochs instead: is a short ground truth the truth?
--finetune SETTING=VALUE... trains each of them briefly from the run's supernet's shared weights with the stand-alone
recipe so changed (e.g. epochs=1,lr=0.01) and ranks them by that: does a short fine-tune rank as the proxy cannot?
Goals: Kendall tau >= 0.7 over >= 12 networks; at least 7 of the 10 most proxy-accurate found networks beat the
reference stand-alone at no more measured latency; the best found >= reference + 1.5 points.

Sizes: ``cpu`` takes 40-55 minutes on a 2-core machine (80 before training fed channels-last batches); ``gpu``
is sized for one device call on an H200 (about 8 minutes estimated from the launch-bound step times of an earlier
H200 run; see SIZES below), run there by tests/benchmarks/on_device.sh; ``tiny`` tries that whole path here in a
few minutes (100 images a class, 1 epoch) and records nothing in BENCHMARKS.md. Work (images, decoded cache,
supernet, study, checkpoints) is kept under results/benchmarks/cifar10-verify/, so an interrupted run resumes, on a
device machine too while it stays warm; figures go to $OUT (default results/benchmarks/), which is all that comes
back from a device machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import re
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import cifar_images, recorded_sections, write_section

from nas._schema import digest, to_data
from nas.data import DataSplit
from nas.report import build_report, write_report
from nas.search import SearchConfig, prepare, run_search
from nas.space import SearchSpace
from nas.spec import NetworkSpec
from nas.study import StudyRecord
from nas.supernet import Supernet
from nas.train import TrainSettings
from nas.verify import pooled_std, seed_accuracies_of, seed_pairs_text, tau_ceiling, verify, write_verification

ROOT = Path(__file__).resolve().parents[2]
OUT = Path(os.environ.get("OUT", ROOT / "results" / "benchmarks"))
# Never under $OUT: 50,000 JPEGs and a 147 MB cache cannot come back from a device machine, and the repository's
# ignored results folder is kept there between calls while the machine stays warm.
WORK = ROOT / "results" / "benchmarks" / "cifar10-verify"
NOISE_SEEDS = 3  # --noise-epochs: the reference's seeds 0-2 at each number of epochs


@dataclasses.dataclass(frozen=True)
class Size:
    supernet: TrainSettings
    recipe: TrainSettings  # the stand-alone ground truth
    device: str
    top: int = 12  # networks verified besides the reference
    budget: int = 200
    per_class: int | None = None  # training images of each class kept (None: all 50,000)
    jobs: int = 1  # stand-alone trainings at a time (nas verify --jobs)
    seeds: int = 3  # the reference's seeds (nas verify --seeds): the ground truth's noise, and the tau ceiling
    noise_networks: int = 2  # ...pooled with these networks' second seeds (nas verify --noise-networks)
    record: bool = True  # its section goes into results/BENCHMARKS.md


# Label smoothing and the default augmentation (random crop and flip: CIFAR-10 is natural images) everywhere.
# GPU: on an H200 an earlier run trained this supernet at 4,482 images/s at batch 256 (3 subnets a step): ~10 us
# per operator launched, whatever the batch, so steps of these small networks cost launches, not images. Counted
# on CPU with torch.profiler, a stand-alone step launches ~2,300 operators and a 4-subnet supernet step ~7,200, so
# batch 1024 buys 4x fewer launches an epoch: supernet 40 epochs ~2 min, 15 trainings x 12 epochs ~3 min, beside
# ~3 min of images, latency table (built on the device machine's CPU), search and timing. At batch 256 the same
# would take ~20 min, past the 15 minutes of device time a session has, start-up included, and the 10 a call
# may run (DEVELOPERS.md). lr 0.4 at batch 1024, as bench_gpu.py trains. Four trainings at a time on the one GPU
# (16 CPU cores to launch from): unmeasured there, so the estimate above does not count on them.
SIZES = {
    "cpu": Size(TrainSettings(epochs=6, batch_size=128, lr=0.1, label_smoothing=0.1),
                TrainSettings(epochs=2, batch_size=128, lr=0.1, label_smoothing=0.1, random_subnets=0), "cpu",
                # three seeds' std varied 2x between runs (1.40 vs 0.68%); two more cost ~4 minutes, and 4 networks'
                # second seeds ~6 more: the reference's noise alone put the ceiling below a tau measured (0.38 < 0.74)
                seeds=5, noise_networks=4),
    "gpu": Size(TrainSettings(epochs=40, batch_size=1024, lr=0.4, label_smoothing=0.1, random_subnets=2),
                TrainSettings(epochs=12, batch_size=1024, lr=0.4, label_smoothing=0.1, random_subnets=0), "cuda",
                jobs=4),
    "tiny": Size(TrainSettings(epochs=1, batch_size=64, lr=0.1, label_smoothing=0.1),
                 TrainSettings(epochs=1, batch_size=64, lr=0.1, label_smoothing=0.1, random_subnets=0), "cpu",
                 top=3, budget=8, per_class=100, record=False, jobs=2, noise_networks=1),
}


def subset(train: Path, per_class: int, dest: Path) -> Path:
    """The first ``per_class`` images of each class of ``train`` (sorted by name), hard-linked under ``dest``."""
    for folder in sorted(d for d in train.iterdir() if d.is_dir()):
        (dest / folder.name).mkdir(parents=True, exist_ok=True)
        for f in sorted(folder.iterdir())[:per_class]:
            if not (dest / folder.name / f.name).exists():
                os.link(f, dest / folder.name / f.name)
    return dest


class Clock:
    """Seconds spent in each phase, summed over every run of one size: a run cut short (a device machine's call
    ends at 10 minutes) and resumed by the next adds its part, saved by a heartbeat every 10 s, so a resumed run's
    figures count all the work, not the last call's share. Each phase's time is printed as it ends."""

    def __init__(self, path: Path) -> None:
        self.path = path
        saved = json.loads(path.read_text()) if path.exists() else {}
        self.runs: int = saved.pop("runs", 0) + 1
        self.spent: dict[str, float] = saved
        self.phase: tuple[str, float, float] | None = None  # label, its seconds in earlier runs, when this run began it
        self.lock = threading.Lock()
        threading.Thread(target=self._beat, daemon=True).start()

    def _save(self) -> None:  # under the lock
        if self.phase is not None:
            label, before, since = self.phase
            self.spent[label] = before + time.perf_counter() - since
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps({"runs": self.runs, **self.spent}))

    def _beat(self) -> None:
        while True:
            time.sleep(10)
            with self.lock:
                self._save()

    def start(self, label: str) -> None:
        with self.lock:
            self.phase = (label, self.spent.get(label, 0.0), time.perf_counter())
            self._save()

    def stop(self) -> float:
        with self.lock:
            self._save()
            label, _, _ = self.phase
            self.phase = None
        runs = f" (over {self.runs} runs)" if self.runs > 1 else ""
        print(f"[bench_verify] {label}: {self.spent[label]:.0f} s{runs}", flush=True)
        return self.spent[label]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=SIZES, default="cpu")
    ap.add_argument("--seed", type=int, default=0,
                    help="seeds the data split, supernet, search and stand-alone recipe: an independent replicate "
                         "(its own study, cifar10-SIZE-seedN)")
    ap.add_argument("--noise-epochs", type=int, nargs="+", default=None, metavar="N",
                    help="instead: the stand-alone recipe's seed-to-seed noise on the reference at N epochs")
    ap.add_argument("--noise-networks", type=int, default=0, metavar="K",
                    help="with --noise-epochs: K random members of the space with no more FLOPs than the reference "
                         "trained with the same seeds beside it: the noise pooled over networks, not one network's")
    ap.add_argument("--compare-jobs", type=int, default=None, metavar="N",
                    help="instead: the reference and 3 random networks trained 1 epoch with the recipe, one at a "
                         "time and N at a time (nas verify --jobs), alternately twice: wall time of each")
    ap.add_argument("--proxy", nargs="+", default=None, metavar="SETTING=VALUE[,...]",
                    help="instead: re-score the networks a finished run of this size and seed verified through "
                         "its own supernet and one trained with each of these changes to its recipe (e.g. "
                         "epochs=12, or random_subnets=2,label_smoothing=0, or seed=3: the same recipe from another "
                         "seed), against the stand-alone accuracies it measured, beside ranking them by FLOPs and by "
                         "predicted latency")
    ap.add_argument("--random", type=int, default=None, metavar="N",
                    help="with or without --proxy: rank N random members of the space within the run's latency limit "
                         "instead of the networks it verified, trained stand-alone with its recipe: the proxy's own "
                         "ranking, which along one front is mostly that front's latency order")
    ap.add_argument("--calibration", type=int, nargs="+", default=None, metavar="N",
                    help="instead: score a finished run's verified networks (or --random N's) through its own "
                         "supernet with BN re-estimated on N batches of training images, from two sets: how far the "
                         "set alone moves the proxy")
    ap.add_argument("--finetune", nargs="+", default=None, metavar="SETTING=VALUE[,...]",
                    help="instead: each network a finished run verified (or --random N's) extracted from its own "
                         "supernet with the shared weights and trained with its stand-alone recipe so changed (e.g. "
                         "epochs=1,lr=0.01), then scored as stand-alone training is: a short fine-tune's ranking "
                         "beside the proxy's")
    ap.add_argument("--standalone-epochs", type=int, default=None, metavar="N",
                    help="with --proxy, --random, --calibration or --finetune: the ground truth trained for N epochs "
                         "instead of the run's recipe's (its noise measured again on the reference at N epochs, "
                         "with verify's seeds): does a longer ground truth rank the networks as the short one does, "
                         "and the proxy?")
    args = ap.parse_args()
    if args.standalone_epochs is not None and args.standalone_epochs < 1:
        ap.error(f"argument --standalone-epochs: {args.standalone_epochs} is not positive")
    if (args.standalone_epochs is not None and args.proxy is None and args.random is None and args.calibration is None
            and args.finetune is None):
        ap.error("argument --standalone-epochs: only with --proxy, --random, --calibration or --finetune, which rank a "
                 "finished run's networks")
    if args.random is not None and args.random < 3:
        ap.error(f"argument --random: {args.random} is not 3 or more")
    if args.calibration is not None and min(args.calibration) < 1:
        ap.error(f"argument --calibration: {min(args.calibration)} is not positive")
    if args.random is not None and args.proxy is None and args.calibration is None and args.finetune is None:
        args.proxy = []
    if sum(x is not None for x in (args.noise_epochs, args.compare_jobs, args.proxy, args.calibration,
                                   args.finetune)) > 1:
        ap.error("--noise-epochs, --compare-jobs, --proxy, --calibration and --finetune are separate runs: give one")
    if args.seed and args.noise_epochs:
        ap.error("argument --seed: not used with --noise-epochs, which trains seeds 0-2")
    if args.noise_networks and not args.noise_epochs:
        ap.error("argument --noise-networks: only with --noise-epochs")
    if args.noise_networks < 0:
        ap.error(f"argument --noise-networks: {args.noise_networks} is negative")
    if args.compare_jobs is not None and args.compare_jobs < 2:
        ap.error(f"argument --compare-jobs: {args.compare_jobs} is not 2 or more")
    size = SIZES[args.size]
    supernet, device = size.supernet, size.device
    recipe = dataclasses.replace(size.recipe, seed=args.seed)
    run = f"{args.size}-seed{args.seed}" if args.seed else args.size  # seed 0 keeps the names recorded so far
    work = WORK

    def training_images() -> Path | None:
        images = cifar_images(work)
        if images is None or size.per_class is None:
            return None if images is None else images / "train"
        return subset(images / "train", size.per_class, work / f"cifar10-{size.per_class}-a-class" / "train")

    if args.noise_epochs or args.compare_jobs:  # untimed by the clock, which sums the whole benchmark's phases
        train = training_images()
        if train is not None and args.noise_epochs:
            noise(args.size, recipe, device, train, work, args.noise_epochs, args.noise_networks)
        elif train is not None:
            compare_jobs(args.size, recipe, device, train, work, args.compare_jobs)
        return
    def config_of(train: Path) -> SearchConfig:
        return SearchConfig(space="mobilenetv3_compact", dataset=f"folder:{train}", budget=size.budget,
                            study_name=f"cifar10-{run}", seed=args.seed, device=device, results=str(work),
                            data_dir=str(work / "data"), supernet=supernet)

    if args.proxy is not None or args.calibration is not None or args.finetune is not None:
        # bad input fails before any work
        variants = [proxy_variant(dataclasses.replace(supernet, seed=args.seed), text) for text in args.proxy or []]
        tunes = [proxy_variant(recipe, text, "--finetune") for text in args.finetune or []]
        train = training_images()
        if train is None:
            return
        config = config_of(train)
        truth = ground_truth(args.size, run, config, recipe, args.random, args.standalone_epochs)
        if args.calibration is not None:
            calibration_noise(args.size, run, config, args.calibration, truth)
        elif args.finetune is not None:
            finetune(args.size, run, config, args.finetune, tunes, truth)
        else:
            rescore(args.size, run, config, args.proxy, variants, truth)
        return
    clock = Clock(WORK / f"seconds-{run}.json")
    clock.start("images")
    train = training_images()
    if train is None:
        return
    clock.stop()
    config = config_of(train)
    clock.start("prepare")
    prepared = prepare(config)
    prepare_s = clock.stop()
    clock.start("search")
    outcome = run_search(config, prepared=prepared)
    search_s = clock.stop()
    report = build_report(outcome.study)
    write_report(report, outcome.study, config.study_dir)
    clock.start("verify")
    v = verify(outcome.study, top=size.top, settings=recipe, device=device, out_dir=config.study_dir / "verify",
               seeds=size.seeds, noise_networks=size.noise_networks, jobs=size.jobs)
    verify_s = clock.stop()
    write_verification(v, config.study_dir)
    print(v.format(), flush=True)
    total_s = sum(clock.spent.values())

    found = [r for r in v.rows if r.name != "reference"]
    ref = next(r for r in v.rows if r.name == "reference")
    best = max(found, key=lambda r: r.proxy_accuracy)  # what the search reports as its best architecture
    top10 = sorted(found, key=lambda r: -r.proxy_accuracy)[:10]
    beat = [r for r in top10 if r.standalone_accuracy > ref.standalone_accuracy and r.measured_ms <= ref.measured_ms]
    # The reference's best estimate is the mean of its seeds; each found network was trained once, as it was.
    ref_mean = statistics.fmean(v.reference_seed_accuracies)
    beat_mean = [r for r in top10 if r.standalone_accuracy > ref_mean and r.measured_ms <= ref.measured_ms]
    feasible = int((report.trials["feasible"] == True).sum())  # noqa: E712 - pandas mask
    figures = {"size": args.size, "seed": args.seed,
               "train_images": len(prepared.data.train), "val_images": len(prepared.data.val),
               "prepare_s": prepare_s, "search_s": search_s, "trials": outcome.completed, "runs": clock.runs,
               "feasible": feasible, "limit_ms": report.limit_ms, "pareto_size": len(report.pareto),
               "verify_s": verify_s, "total_s": total_s, "supernet": dataclasses.asdict(config.supernet_settings),
               "recipe": dataclasses.asdict(recipe),
               "beat_reference_of_top10": len(beat),
               "beat_reference_mean_of_top10": len(beat_mean), **v.to_json()}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"verify-cifar10-{run}.json").write_text(json.dumps(figures, indent=2))

    rows = ["| network | proxy acc | proxy log-lik | stand-alone acc | predicted ms | measured ms |",
            "|---|---|---|---|---|---|"]
    rows += [f"| {r.name} | {r.proxy_accuracy:.2%} | {r.proxy_log_likelihood:.4f} | {r.standalone_accuracy:.2%} | "
             f"{r.predicted_ms:.3f} | {r.measured_ms:.3f} |" for r in v.rows]
    gain = best.standalone_accuracy - ref.standalone_accuracy
    lines = [
        f"| wall time, from the JPEG archive to the last figure | {total_s / 60:.1f} min"
        + (f", over {clock.runs} runs (each resuming the last's work: cut short, or extended)" if clock.runs > 1
           else "") + " |",
        f"| supernet training ({supernet.epochs} epochs, batch {supernet.batch_size}, {device}) and latency table | "
        f"{prepare_s / 60:.1f} min |",
        f"| search: {outcome.completed} trials, proxy on all {prepared.proxy_images} validation images | "
        f"{search_s / 60:.1f} min ({outcome.completed / search_s:.1f} trials/s) |",
        f"| trials within the {report.limit_ms:.3f} ms limit / feasible Pareto front | {feasible} / "
        f"{len(report.pareto)} |",
        f"| retraining {len(v.rows)} networks ({recipe.epochs} epochs each), the reference for {size.seeds - 1} "
        f"more seeds and {len(v.network_seed_accuracies)} of them for one more | {verify_s / 60:.1f} min |",
        f"| proxy accuracy standard error | {v.proxy_stderr:.2%} |",
        f"| stand-alone seed-to-seed std: reference ({size.seeds} seeds) / pooled with "
        f"{len(v.network_seed_accuracies)} of the networks' second seeds ({v.noise_dof} degrees of freedom) / std "
        f"between the networks | {v.seed_std:.2%} / {v.noise_std:.2%} / {v.network_std:.2%} |",
        f"| the re-seeded networks, seed {args.seed} then {args.seed + 1} | "
        f"{seed_pairs_text(v.network_seed_accuracies)} |",
        "| Kendall tau a perfect proxy would score against this ground truth, median (10-90%) | "
        f"{ceiling_text(v.tau_ceiling)} |",
        f"| Kendall tau / Spearman rho, proxy accuracy vs stand-alone, {len(v.rows)} networks (goal tau >= 0.7) | "
        f"{v.kendall_tau:.3f} / {v.spearman_rho:.3f} |",
        f"| Kendall tau, proxy log-likelihood vs stand-alone | {v.kendall_tau_log_likelihood:.3f} |",
        f"| of the 10 most proxy-accurate found, beating the reference at no more measured latency (goal >= 7) | "
        f"{len(beat)} |",
        f"| best found ({best.name}) minus reference, stand-alone (goal >= +1.5 points) | {gain * 100:+.2f} points "
        f"({best.standalone_accuracy:.2%} at {best.measured_ms:.3f} ms vs {ref.standalone_accuracy:.2%} at "
        f"{ref.measured_ms:.3f} ms) |",
        f"| the same two against the mean of the reference's {size.seeds} seeds ({ref_mean:.2%}) | {len(beat_mean)} "
        f"of 10; {(best.standalone_accuracy - ref_mean) * 100:+.2f} points |"]
    write_section(
        f"verify-cifar10-{run}", f"Search truth on CIFAR-10, {args.size} size"
        + (f", seed {args.seed}" if args.seed else "") + " (goals: tau >= 0.7 over >= 12 networks, 7 of 10 found beat "
        "the reference, best found +1.5 points)",
        f"`python tests/benchmarks/bench_verify.py --size {args.size}" + (f" --seed {args.seed}" if args.seed else "")
        + "`: the CIFAR-10 JPEGs of ../shared/data at "
        f"32x32, {figures['train_images']} training / {figures['val_images']} validation images (seed-{args.seed} "
        f"split, and seed {args.seed} for the supernet, the search and the stand-alone recipe; every "
        f"accuracy below is on the validation split). Space mobilenetv3_compact; supernet: sandwich rule with "
        f"{supernet.random_subnets} random subnet(s) per step, lr {supernet.lr} cosine, label smoothing "
        f"{supernet.label_smoothing}, random crop and flip. TPE, {size.budget} trials, latency limit = the reference "
        f"member's predicted latency. `nas verify` retrains {len(found)} distinct architectures spanning the "
        f"feasible front and the reference from scratch: {recipe.epochs} epochs, batch {recipe.batch_size}, lr "
        f"{recipe.lr} cosine, label smoothing {recipe.label_smoothing}, random crop and flip, BN statistics "
        f"re-estimated on 8 training batches; {size.jobs} training(s) at a time. Measured latency: once all are "
        "trained, with the table's threads and "
        "batch, every network side by side in 4 interleaved rounds of 10 runs; median.\n\n"
        "| figure | value |\n|---|---|\n" + "\n".join(lines) + "\n\n" + "\n".join(rows), record=size.record)


def proxy_variant(recipe: TrainSettings, text: str, flag: str = "--proxy") -> TrainSettings:
    """``recipe`` (the run's supernet settings, its seed included; for --finetune, its stand-alone recipe) changed by
    ``text``, comma-separated SETTING=VALUE pairs (values read as YAML scalars; seed=N alone is the same recipe trained
    from another seed: how far the supernet's own training noise moves its ranking); a one-line SpecError naming the
    setting (under ``flag``) where one is unknown, malformed or invalid."""
    from nas import SpecError
    from nas._schema import from_data, to_data

    changes = {}
    for pair in text.split(","):
        key, eq, value = pair.partition("=")
        if not eq or not key.strip():
            raise SpecError(flag, f"{pair!r} is not SETTING=VALUE")
        changes[key.strip()] = yaml.safe_load(value)
    return from_data(TrainSettings, {**to_data(recipe), **changes}, path=flag)


def random_members(config: SearchConfig, record: StudyRecord, space: SearchSpace, n: int
                   ) -> list[tuple[str, NetworkSpec, float, float, float]]:
    """``n`` distinct random members of ``space`` (seeded by the run's seed) that the run's latency predictor, at its
    recorded drift, puts within its limit: networks the search chose among, in verified_networks' form (name, spec,
    proxy accuracy, log-likelihood, predicted ms; no proxy yet: NaN)."""
    from nas.latency import load_predictor

    c = record.config
    predictor = load_predictor(space, device=c.latency_device, root=config.results_dir / "latency",
                               table=c.latency_table, force=c.latency_table is not None, runtime=c.runtime,
                               progress=False).with_drift(record.latency_drift)
    rng, chosen = random.Random(config.seed), {}
    for _ in range(1000 * n):  # a limit that almost no member meets fails below, not forever
        spec = space.sample(rng)
        if spec not in chosen and (ms := predictor.predict(spec)) <= record.latency_limit_ms:
            chosen[spec] = ms
            if len(chosen) == n:
                break
    else:
        from nas import SpecError
        raise SpecError("--random", f"found only {len(chosen)} distinct members within "
                                    f"{record.latency_limit_ms:.3f} ms in {1000 * n} draws")
    return [(f"random{i:02d}", spec, math.nan, math.nan, ms) for i, (spec, ms) in enumerate(chosen.items(), 1)]


@dataclasses.dataclass(frozen=True)
class GroundTruth:
    """Networks of a finished run and their stand-alone accuracies, what --proxy and --calibration rank."""

    networks: list[tuple[str, NetworkSpec, float, float, float]]  # as verified_networks gives them
    standalone: list[float]
    ceiling: tuple[float, float, float]  # the tau a perfect proxy would score: 10%, median, 90%
    record: StudyRecord
    space: SearchSpace
    data: DataSplit
    random: int | None  # --random N: N random members; None: the networks the run verified
    epochs: int | None  # --standalone-epochs N, where it differs from the run's recipe; None: the recipe's
    text: str  # what the networks are and how their accuracies were measured, for a section's text

    @property
    def kind(self) -> str:
        """What names its sections and files: "" for the run's verified networks, "-random16", "-random16-6epochs"."""
        return (f"-random{self.random}" if self.random else "") + (f"-{self.epochs}epochs" if self.epochs else "")

    @property
    def flags(self) -> str:
        """The command-line flags that chose it, e.g. " --random 16 --standalone-epochs 6"."""
        return ((f" --random {self.random}" if self.random else "")
                + (f" --standalone-epochs {self.epochs}" if self.epochs else ""))

    @property
    def epochs_note(self) -> str:
        """For a section's title: ", 6-epoch ground truth" where the ground truth is not the run's recipe's."""
        return f", {self.epochs}-epoch ground truth" if self.epochs else ""


def ground_truth(size: str, run: str, config: SearchConfig, recipe: TrainSettings, random_networks: int | None,
                 epochs: int | None = None) -> GroundTruth:
    """The networks a finished run verified, or with ``random_networks`` that many random members within its latency
    limit, and their stand-alone accuracies: as the run measured them, or trained with ``recipe`` (the run's) for
    ``epochs`` (checkpoints beside its verification's, so a cut run resumes). Along one Pareto front the proxy's
    order is the front's latency order, so only networks the search did not pick measure the proxy's own ranking.
    Trained for other ``epochs`` than the run's recipe, the ground truth's noise is measured again at those epochs,
    on the reference with as many seeds as the run's verify (from the recipe's seed, so --noise-epochs and this
    share checkpoints)."""
    from nas import SpecError
    from nas.data import load_for
    from nas.space import load_space
    from nas.standalone import checkpoint_for, rank_agreement
    from nas.study import load_study
    from nas.train import load_checkpoint
    from nas.verify import reseeded_networks, train_all, verified_networks

    recorded = config.study_dir / "verify.json"
    if not recorded.exists():
        raise SpecError("", f"no verification to re-score: run bench_verify.py --size {size} (with this --seed) "
                            "first", source=str(recorded))
    verification = json.loads(recorded.read_text())
    study, record = load_study(config.name, results=config.results)
    space, data = load_for(load_space(config.space), config.dataset, seed=config.seed, data_dir=config.data_dir)
    seed = f" --seed {config.seed}" if config.seed else ""
    the_runs = f"`bench_verify.py --size {size}{seed}`"
    trained = dataclasses.replace(recipe, epochs=epochs or recipe.epochs)
    if random_networks is None:
        truth = {r["name"]: r["standalone_accuracy"] for r in verification["rows"]}
        networks = verified_networks(study, build_report(study, measure_latency=False), SIZES[size].top)
        if [name for name, *_ in networks] != list(truth):
            raise SpecError("", f"the study's verified networks {[n for n, *_ in networks]} are not the ones "
                                f"verify.json ranks {list(truth)}", source=str(recorded))
        text = f"the {len(networks)} networks that {the_runs} verified (its section, `verify-cifar10-{run}`)"
        if trained == recipe:
            return GroundTruth(networks, list(truth.values()), tuple(verification["tau_ceiling"]), record, space,
                               data, None, None, f"{text}, ranked against the stand-alone accuracies that run "
                                                 "measured")
    else:
        networks = random_members(config, record, space, random_networks)
        text = (f"{len(networks)} distinct random members of the space (seed {config.seed}) within the "
                f"{record.latency_limit_ms:.3f} ms limit of the run {the_runs} (its study's latency predictor and "
                "drift)")
    out = config.study_dir / "verify"
    dataset = (config.dataset, space.input.resolution, config.seed, config.data_dir)
    standalone = train_all([(spec, trained) for _, spec, *_ in networks], dataset, device=config.device,
                           out_dir=out, jobs=SIZES[size].jobs)
    # As trained, from each checkpoint's history: a resumed run's wall time would count only its own share.
    train_s = sum(h["seconds"] for _, spec, *_ in networks for h in load_checkpoint(
        checkpoint_for(spec, data, trained, None, out / "checkpoints"))["history"])
    how = ("trained stand-alone with its recipe " + (f"({trained.epochs} epochs, " if trained == recipe else
                                                     f"for {trained.epochs} epochs instead of {recipe.epochs} (")
           + f"batch {trained.batch_size}, lr {trained.lr} cosine, label smoothing "
           f"{trained.label_smoothing}, random crop and flip; {train_s / 60:.1f} min of training in all; std between "
           f"them {statistics.stdev(standalone):.2%}")
    if trained == recipe:  # the ground truth's noise as the run measured it, with this recipe
        seed_std = verification["noise_std"]
        how += (f", the seed-to-seed std in that run {seed_std:.2%}, pooled over the reference and "
                f"{len(verification['network_seed_accuracies'])} of its networks)")
    else:
        # As many seeds and re-seeded networks as the run's verify trains (5 and 4 on cpu): a 3-seed std is
        # uncertain by a factor of 2 either way, and networks differ in their noise.
        seeds = range(recipe.seed, recipe.seed + SIZES[size].seeds)
        reference = seed_accuracies_of(space.reference_member(), data, trained, seeds, device=config.device,
                                       out_dir=out)
        reseeded = reseeded_networks(networks, SIZES[size].noise_networks)
        again = train_all([(networks[k][1], dataclasses.replace(trained, seed=trained.seed + 1)) for k in reseeded],
                          dataset, device=config.device, out_dir=out, jobs=SIZES[size].jobs)
        pairs = [(networks[k][0], (standalone[k], a)) for k, a in zip(reseeded, again, strict=True)]
        seed_std = pooled_std([reference, *(a for _, a in pairs)])
        how += (f", the reference's seed-to-seed std at {trained.epochs} epochs {statistics.stdev(reference):.2%}, "
                f"seeds {seeds.start}-{seeds.stop - 1}, mean {statistics.fmean(reference):.2%}; pooled with "
                f"{len(reseeded)} of the networks' second seeds, {seed_pairs_text(pairs)}: {seed_std:.2%})")
        # Against the run's own ground truth on the same networks, where it exists (no hidden trainings): how far
        # does the ranking a short ground truth gives hold at a longer one?
        if random_networks is None:
            short = list(truth.values())
        elif all((path := checkpoint_for(spec, data, recipe, None, out / "checkpoints")).exists()
                 and len(load_checkpoint(path)["history"]) == recipe.epochs for _, spec, *_ in networks):  # finished
            short = train_all([(spec, recipe) for _, spec, *_ in networks], dataset, device=config.device,
                              out_dir=out, jobs=SIZES[size].jobs)
        else:
            short = None
            print(f"[bench_verify] these networks have no {recipe.epochs}-epoch trainings to compare with: run "
                  f"--random {random_networks} without --standalone-epochs to train them", flush=True)
        if short is not None:
            tau, rho = rank_agreement(standalone, short)
            how += (f". Kendall tau / Spearman rho between these accuracies and the same networks' at the run's "
                    f"{recipe.epochs} epoch(s): {tau:.3f} / {rho:.3f}")
    return GroundTruth(networks, standalone, tau_ceiling(standalone, seed_std), record, space, data, random_networks,
                       None if trained == recipe else trained.epochs, f"{text}, ranked against their accuracies {how}")


def ceiling_text(ceiling: tuple[float, float, float]) -> str:
    """A tau ceiling (10th percentile, median, 90th; nas.verify.tau_ceiling) as the sections print it: "0.41 (0.18 to
    0.62)"."""
    low, median, high = ceiling
    return f"{median:.2f} ({low:.2f} to {high:.2f})"


def _tau_note(truth: GroundTruth) -> str:
    n = len(truth.networks)
    return (f"The ground truth is the same in every row, so the rows compare as pairs; a tau over {n} networks still "
            f"has a standard error of {math.sqrt(2 * (2 * n + 5) / (9 * n * (n - 1))):.2f} (no correlation). A "
            f"perfect proxy would score {ceiling_text(truth.ceiling)} against it.")


def _own_supernet(config: SearchConfig) -> str:
    s = config.supernet
    return (f"its own supernet ({s.epochs} epochs, batch {s.batch_size}, lr {s.lr} cosine, {s.random_subnets} random "
            f"subnet(s) a step, label smoothing {s.label_smoothing})")


def _supernet(config: SearchConfig, truth: GroundTruth, settings: TrainSettings) -> tuple[Supernet, float]:
    """A supernet of the run's space and data trained with ``settings`` (seed included), cached beside the run's own,
    and its training seconds as its checkpoint recorded them."""
    from nas.train import checkpoint_path, train_supernet

    trained = train_supernet(truth.space, truth.data, settings, device=config.device,
                             checkpoint=checkpoint_path(truth.space, truth.data, settings,
                                                        config.results_dir / "supernets"))
    return trained.supernet, sum(h["seconds"] for h in trained.history)  # a reused one keeps its history


def seed_ensembles(rows: list[dict[str, Any]], standalone: list[float]) -> list[dict[str, Any]]:
    """For each recipe among ``rows`` (rescore's, the run's own first) trained from more than one seed, an ensemble:
    each network's proxy accuracy averaged over that recipe's supernets, ranked against ``standalone``."""
    from nas.standalone import rank_agreement

    recipes: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        recipes.setdefault(json.dumps({**r["settings"], "seed": None}, sort_keys=True), []).append(r)
    ensembles = []
    for seeds in (group for group in recipes.values() if len(group) > 1):
        mean = [statistics.fmean(values) for values in zip(*(r["proxy_accuracy"] for r in seeds), strict=True)]
        changes = ",".join(pair for pair in seeds[0]["supernet"].split(",") if not pair.startswith("seed="))
        recipe = "the run's recipe" if seeds[0] is rows[0] or not changes else f"the {changes} recipe"
        ensembles.append(dict(zip(("kendall_tau", "spearman_rho"), rank_agreement(mean, standalone), strict=True),
                              recipe=recipe, seeds=len(seeds),
                              kendall_tau_own=rank_agreement(mean, rows[0]["proxy_accuracy"])[0],
                              proxy_std=statistics.stdev(mean), proxy_accuracy=mean))
    return ensembles


def rescore(size: str, run: str, config: SearchConfig, labels: list[str], variants: list[TrainSettings],
            truth: GroundTruth) -> None:
    """A ground truth's networks scored through the run's own supernet and one trained with each of ``variants``
    (``labels`` says how each differs), BN recalibrated as the run's search did: which supernet recipe ranks better,
    on one ground truth, at the cost of supernet trainings alone. FLOPs and predicted latency rank them too: a proxy
    is worth its training only where it ranks better than counting."""
    from nas.standalone import rank_agreement
    from nas.summary import summarize
    from nas.train import calibration_batches, score_subnet

    device, networks, standalone = torch.device(config.device), truth.networks, truth.standalone
    calibration = calibration_batches(truth.data, batches=truth.record.calibration_batches, device=device)
    flops = [summarize(spec, latency=False).flops for _, spec, *_ in networks]
    rows = []
    for label, variant in zip(["the run's own", *labels], [config.supernet_settings, *variants], strict=True):
        supernet, seconds = _supernet(config, truth, variant)
        scores = [score_subnet(supernet, spec, truth.data, calibration, device=device) for _, spec, *_ in networks]
        accuracy = [sc.accuracy for sc in scores]
        tau, rho = rank_agreement(accuracy, standalone)
        # the run's own supernet should score as the study recorded: a check that this is its proxy (random
        # networks have no recorded proxy: NaN)
        gaps = [abs(a - p) for a, (_, _, p, *_) in zip(accuracy, networks, strict=True) if not math.isnan(p)]
        rows.append({"supernet": label, "settings": to_data(variant), "supernet_s": seconds,
                     "kendall_tau": tau, "spearman_rho": rho,
                     "kendall_tau_log_likelihood": rank_agreement([sc.log_likelihood for sc in scores], standalone)[0],
                     # how alike two supernets rank the networks: for seed=N, the supernet's own training noise
                     "kendall_tau_own": rank_agreement(accuracy, rows[0]["proxy_accuracy"])[0] if rows else 1.0,
                     "proxy_std": statistics.stdev(accuracy), "proxy_accuracy": accuracy,
                     "max_gap_to_study": max(gaps, default=math.nan)})
        print({k: v for k, v in rows[-1].items() if k != "proxy_accuracy"}, flush=True)
    ensembles = seed_ensembles(rows, standalone)
    flops_tau, flops_rho = rank_agreement(flops, standalone)
    # Along one Pareto front the proxy rises with predicted latency by construction, so the run's own tau is mostly
    # this one: how far stand-alone accuracy rises with latency among the networks the search picked.
    latency_tau, latency_rho = rank_agreement([ms for *_, ms in networks], standalone)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"verify-proxy{truth.kind}-{run}.json").write_text(json.dumps(
        {"networks": [name for name, *_ in networks], "specs": [to_data(spec) for _, spec, *_ in networks],
         "standalone": standalone, "predicted_ms": [ms for *_, ms in networks], "flops": flops,
         "flops_kendall_tau": flops_tau, "latency_kendall_tau": latency_tau, "tau_ceiling": truth.ceiling,
         "rows": rows, "ensembles": ensembles}, indent=2))
    table = ["| supernet | supernet training | proxy std between networks | Kendall tau / Spearman rho | "
             "tau by log-likelihood | tau with the run's own proxy | largest gap to the study's proxy |",
             "|---|---|---|---|---|---|---|"]
    table += [f"| {r['supernet']} | {r['supernet_s'] / 60:.1f} min | {r['proxy_std']:.2%} | {r['kendall_tau']:.3f} / "
              f"{r['spearman_rho']:.3f} | {r['kendall_tau_log_likelihood']:.3f} | "
              + ("- | " if k == 0 else f"{r['kendall_tau_own']:.3f} | ")
              + ("- |" if math.isnan(r["max_gap_to_study"]) else f"{r['max_gap_to_study']:.2%} |")
              for k, r in enumerate(rows)]
    table += [f"| the mean of {e['recipe']}'s {e['seeds']} seeds' proxy accuracies | | {e['proxy_std']:.2%} | "
              f"{e['kendall_tau']:.3f} / {e['spearman_rho']:.3f} | | {e['kendall_tau_own']:.3f} | |" for e in ensembles]
    table.append(f"| FLOPs (torch.utils.flop_counter), no training | | | {flops_tau:.3f} / {flops_rho:.3f} | | | |")
    table.append(f"| the study's predicted latency, no training | | | {latency_tau:.3f} / {latency_rho:.3f} | | | |")
    proxy_flag = f" --proxy {' '.join(labels)}" if labels else ""
    seed = f" --seed {config.seed}" if config.seed else ""
    write_section(
        f"verify-proxy{truth.kind}-{run}",
        ("Does the supernet rank networks the search did not pick?" if truth.random else
         "Which supernet recipe ranks better?") + f" ({size} size" + (f", seed {config.seed}" if config.seed else "")
        + f"{truth.epochs_note}, one ground truth)",
        f"`python tests/benchmarks/bench_verify.py --size {size}{seed}{truth.flags}{proxy_flag}`: {truth.text}; "
        f"scored through {_own_supernet(config)}"
        + (" and through one trained with each change named (the same split, and the run's seed unless seed= "
           "names another)" if labels else "")
        + f", on all {len(truth.data.val)} validation images with BN recalibrated as the search did. "
        f"{_tau_note(truth)} Supernet training time is as its checkpoint recorded it, summed over epochs (this "
        "machine's speed drifts up to 1.8x).\n\n" + "\n".join(table), record=SIZES[size].record)


def finetune(size: str, run: str, config: SearchConfig, labels: list[str], tunes: list[TrainSettings],
             truth: GroundTruth) -> None:
    """A ground truth's networks extracted from the run's own supernet (shared weights and BN statistics) and trained
    with each of ``tunes`` (``labels`` says how each differs from the stand-alone recipe), then scored as stand-alone
    training is (precise BN, the whole validation split): does a short fine-tune from inherited weights rank them
    as stand-alone training does, where the proxy, which scores the inherited weights as they are, does not?
    Checkpoints sit beside the run's verification's, so a cut run resumes."""
    from nas.standalone import classification_step, rank_agreement
    from nas.train import calibration_batches, evaluate, fit, precise_bn, score_subnet

    device, networks, standalone = torch.device(config.device), truth.networks, truth.standalone
    supernet, _ = _supernet(config, truth, config.supernet_settings)
    calibration = calibration_batches(truth.data, batches=truth.record.calibration_batches, device=device)
    proxy = [score_subnet(supernet, spec, truth.data, calibration, device=device).accuracy for _, spec, *_ in networks]
    out = config.study_dir / "verify" / "finetune"
    rows = []
    for label, tune in zip(labels, tunes, strict=True):
        accuracy, seconds = [], []
        for name, spec, *_ in networks:
            model = supernet.extract(spec)
            meta = {"spec": to_data(spec.without_metadata()), "data": truth.data.key(), "settings": to_data(tune),
                    "supernet": to_data(config.supernet_settings)}
            torch.manual_seed(tune.seed)
            history, _ = fit(model, truth.data, tune, classification_step(tune), path=out / f"{digest(meta)}.pt",
                             meta=meta, device=device, progress=True, desc=f"fine-tuning {name}")
            precise_bn(model, truth.data, device)
            accuracy.append(evaluate(model, truth.data, device=device).accuracy)
            seconds.append(sum(h["seconds"] for h in history))  # as trained: a resumed run's share would mislead
        tau, rho = rank_agreement(accuracy, standalone)
        rows.append({"finetune": label, "settings": to_data(tune), "kendall_tau": tau, "spearman_rho": rho,
                     "kendall_tau_proxy": rank_agreement(accuracy, proxy)[0],
                     "accuracy_std": statistics.stdev(accuracy), "mean_accuracy": statistics.fmean(accuracy),
                     "seconds": seconds, "accuracy": accuracy})
        print({k: v for k, v in rows[-1].items() if k not in ("accuracy", "seconds")}, flush=True)
    proxy_tau, proxy_rho = rank_agreement(proxy, standalone)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"verify-finetune{truth.kind}-{run}.json").write_text(json.dumps(
        {"networks": [name for name, *_ in networks], "standalone": standalone, "proxy_accuracy": proxy,
         "proxy_kendall_tau": proxy_tau, "tau_ceiling": truth.ceiling, "rows": rows}, indent=2))
    table = ["| ranked by | training a network, median | mean accuracy | std between networks | Kendall tau / "
             "Spearman rho | tau with the proxy |", "|---|---|---|---|---|---|"]
    table.append(f"| the proxy: the supernet's shared weights as they are | - | {statistics.fmean(proxy):.2%} | "
                 f"{statistics.stdev(proxy):.2%} | {proxy_tau:.3f} / {proxy_rho:.3f} | - |")
    table += [f"| fine-tuned from the supernet, {r['finetune']} | {statistics.median(r['seconds']):.0f} s | "
              f"{r['mean_accuracy']:.2%} | {r['accuracy_std']:.2%} | {r['kendall_tau']:.3f} / {r['spearman_rho']:.3f}"
              f" | {r['kendall_tau_proxy']:.3f} |" for r in rows]
    seed = f" --seed {config.seed}" if config.seed else ""
    write_section(
        f"verify-finetune{truth.kind}-{run}", "Does a short fine-tune from the supernet's weights rank networks as "
        f"stand-alone training does? ({size} size" + (f", seed {config.seed}" if config.seed else "")
        + f", {'random networks' if truth.random else 'the front'}{truth.epochs_note})",
        f"`python tests/benchmarks/bench_verify.py --size {size}{seed}{truth.flags} --finetune {' '.join(labels)}`: "
        f"{truth.text}. Each network is extracted from {_own_supernet(config)} with its shared weights and BN "
        "statistics (`Supernet.extract`), trained with the stand-alone recipe changed as named (SGD, cosine decay "
        "from that lr), its BN statistics re-estimated on 8 training batches, and scored on all "
        f"{len(truth.data.val)} validation images, as the ground truth was. The proxy row scores the same networks "
        f"through the supernet as the search did. {_tau_note(truth)}\n\n" + "\n".join(table),
        record=SIZES[size].record)


def calibration_noise(size: str, run: str, config: SearchConfig, counts: list[int], truth: GroundTruth) -> None:
    """A ground truth's networks scored through the run's own supernet with BN re-estimated on each of ``counts``
    batches of training images, drawn twice (the search's set and another): how far the set alone moves a network's
    proxy accuracy, against how far the networks differ, and what that does to the ranking."""
    from nas.standalone import rank_agreement
    from nas.train import (
        CALIBRATION_BATCH,
        CALIBRATION_SEED,
        calibration_batches,
        proxy_calibration_batches,
        score_subnet,
    )

    device, networks = torch.device(config.device), truth.networks
    supernet, _ = _supernet(config, truth, config.supernet_settings)
    seeds = (CALIBRATION_SEED, 1)  # the search's set, then another
    sets = {(n, seed): calibration_batches(truth.data, batches=n, device=device, seed=seed)
            for n in counts for seed in seeds}
    scored: dict[tuple[int, int], list[float]] = {key: [] for key in sets}
    seconds: dict[int, list[float]] = {n: [] for n in counts}
    for _, spec, *_ in networks:  # every count on one network before the next: timed side by side, as drift allows
        for (n, seed), calibration in sets.items():
            t = time.perf_counter()
            scored[n, seed].append(score_subnet(supernet, spec, truth.data, calibration, device=device).accuracy)
            seconds[n].append(time.perf_counter() - t)
    rows = []
    for n in counts:
        pair = [scored[n, seed] for seed in seeds]
        # The sets' difference per network, its common shift removed (it moves no rank), over sqrt 2: one set's noise.
        noise = statistics.pstdev(a - b for a, b in zip(*pair, strict=True)) / math.sqrt(2)
        rows.append({"batches": n, "images": n * CALIBRATION_BATCH, "noise": noise,
                     "proxy_std": statistics.stdev(pair[0]),
                     "kendall_tau": [rank_agreement(s, truth.standalone)[0] for s in pair],
                     "score_s": statistics.median(seconds[n]), "proxy_accuracy": pair})
        print({k: v for k, v in rows[-1].items() if k != "proxy_accuracy"}, flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"verify-calibration{truth.kind}-{run}.json").write_text(json.dumps(
        {"networks": [name for name, *_ in networks], "standalone": truth.standalone, "rows": rows}, indent=2))
    images = len(truth.data.val)
    table = ["| BN calibration | images, as a share of those scored | calibration noise per network | proxy std "
             "between networks | Kendall tau, search's set / another | time to score a network, median |",
             "|---|---|---|---|---|---|"]
    table += [f"| {r['batches']} batch(es) | {r['images']} ({r['images'] / images:.0%}) | {r['noise']:.2%} | "
              f"{r['proxy_std']:.2%} | {r['kendall_tau'][0]:.3f} / {r['kendall_tau'][1]:.3f} | {r['score_s']:.2f} s "
              f"(x{r['score_s'] / rows[0]['score_s']:.2f}) |" for r in rows]
    seed = f" --seed {config.seed}" if config.seed else ""
    write_section(
        f"verify-calibration{truth.kind}-{run}", f"How much does the proxy's BN calibration move it? ({size} size"
        + (f", seed {config.seed}" if config.seed else "")
        + f", {'random networks' if truth.random else 'the front'}{truth.epochs_note})",
        f"`python tests/benchmarks/bench_verify.py --size {size}{seed}{truth.flags} --calibration "
        f"{' '.join(map(str, counts))}`: {truth.text}; scored through {_own_supernet(config)} on all {images} "
        f"validation images, each subnet's BN statistics re-estimated on N batches of {CALIBRATION_BATCH} training "
        f"images: the search's fixed set, and another. Calibration noise: the std over networks of the two sets' "
        f"difference in proxy accuracy (its mean removed: a shift common to all moves no rank), over sqrt 2. Each "
        f"network is scored with every count and set in turn, so the times compare side by side (x: against the "
        f"first count). The "
        f"search now calibrates on {proxy_calibration_batches(images)} batch(es) for {images} images scored "
        f"(`nas.train.proxy_calibration_batches`); this run's study was scored with "
        f"{truth.record.calibration_batches}. {_tau_note(truth)}\n\n" + "\n".join(table), record=SIZES[size].record)


def compare_jobs(size: str, recipe: TrainSettings, device: str, train: Path, work: Path, jobs: int) -> None:
    """Wall time of the same trainings one at a time and ``jobs`` at a time, alternately twice (ABAB: this
    machine's speed drifts within minutes), each time from scratch into a fresh folder."""
    import shutil

    from nas.data import load_for
    from nas.space import load_space
    from nas.verify import train_all
    space, _ = load_for(load_space("mobilenetv3_compact"), f"folder:{train}", data_dir=work / "data")
    rng, one_epoch = random.Random(0), dataclasses.replace(recipe, epochs=1)
    specs = [space.reference_member(), *(space.sample(rng) for _ in range(3))]
    dataset = (f"folder:{train}", space.input.resolution, 0, str(work / "data"))
    runs = []
    for n in (1, jobs, 1, jobs):
        out = work / f"compare-jobs-{size}"
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        accuracies = train_all([(s, one_epoch) for s in specs], dataset, device=device, out_dir=out, jobs=n,
                               progress=False)
        runs.append({"jobs": n, "seconds": time.perf_counter() - t, "accuracies": accuracies})
        print(runs[-1], flush=True)
    (OUT / f"verify-compare-jobs-{size}.json").write_text(json.dumps(runs, indent=2))
    ratios = [runs[i]["seconds"] / runs[i + 1]["seconds"] for i in (0, 2)]
    gap = max(abs(a - b) for r in runs[1::2] for a, b in zip(runs[0]["accuracies"], r["accuracies"], strict=True))
    table = ["| order | jobs | wall time | accuracies (reference, then 3 random networks) |", "|---|---|---|---|"]
    table += [f"| {i + 1} | {r['jobs']} | {r['seconds']:.0f} s | {', '.join(f'{a:.2%}' for a in r['accuracies'])} |"
              for i, r in enumerate(runs)]
    write_section(
        f"verify-jobs-{size}", f"nas verify --jobs: trainings one at a time vs {jobs} at a time ({size})",
        f"`python tests/benchmarks/bench_verify.py --size {size} --compare-jobs {jobs}`: the reference and 3 random "
        f"mobilenetv3_compact networks (seed 0) trained for 1 epoch on the CIFAR-10 split above with verify's {size} "
        f"recipe otherwise (batch {recipe.batch_size}), on {device}, through `nas.verify.train_all`, one at a time "
        f"({torch.get_num_threads()} threads) and {jobs} at a time ({max(1, torch.get_num_threads() // jobs)} "
        f"thread(s) each), alternately twice, each from scratch. One at a time / {jobs} at a time: "
        f"x{ratios[0]:.2f} and x{ratios[1]:.2f} (above 1: {jobs} at a time is faster). Largest accuracy difference "
        f"between the ways: {gap:.2%} (the same seeds; the threads per training differ, and with them the order of "
        f"floating-point sums).\n\n" + "\n".join(table), record=SIZES[size].record)


def small_members(space: SearchSpace, k: int, seed: int = 0) -> list[NetworkSpec]:
    """``k`` distinct random members of ``space`` with no more FLOPs than its reference (seeded): networks like those
    a search under the reference's latency chooses among, found without a latency table (FLOPs are the machine's
    stand-in for latency: torch.utils.flop_counter, through nas.summary)."""
    from nas.summary import summarize
    cap = summarize(space.reference_member(), latency=False).flops
    rng, chosen = random.Random(seed), []
    for _ in range(1000 * k):
        if len(chosen) == k:
            break
        spec = space.sample(rng)
        if spec not in chosen and summarize(spec, latency=False).flops <= cap:
            chosen.append(spec)
    if len(chosen) == k:
        return chosen
    raise SystemExit(f"error: --noise-networks: found only {len(chosen)} members within the reference's FLOPs")


def recorded_standalone(size: str) -> dict[str, list[float]]:
    """The stand-alone accuracies in each recorded base run of ``size`` (its section's network table, as
    :func:`main` writes it: network | proxy acc | proxy log-lik | stand-alone acc | ...), by section name."""
    row = re.compile(r"^\| \S+ \| [\d.]+% \| -?[\d.]+ \| ([\d.]+)% \|", re.M)
    return {name: [float(a) / 100 for a in row.findall(text)]
            for name, text in recorded_sections(rf"verify-cifar10-{re.escape(size)}(-seed\d+)?").items()}


def noise(size: str, recipe: TrainSettings, device: str, train: Path, work: Path, epochs: list[int],
          networks: int = 0) -> None:
    """The reference trained with NOISE_SEEDS seeds at each of ``epochs`` (the recipe otherwise), as verify trains it,
    and beside it ``networks`` random members no dearer in FLOPs: how long must a ground truth train before its
    seed-to-seed noise is small against the networks' spread, and is one network's noise every network's?"""
    from nas.data import load_for
    from nas.space import load_space
    space, data = load_for(load_space("mobilenetv3_compact"), f"folder:{train}", data_dir=work / "data")
    named = [("reference", space.reference_member())]
    named += [(f"random{i:02d}", spec) for i, spec in enumerate(small_members(space, networks), 1)]
    rows = []
    for n in epochs:
        t = time.perf_counter()
        accs = {name: seed_accuracies_of(spec, data, dataclasses.replace(recipe, epochs=n), range(NOISE_SEEDS),
                                         device=device, out_dir=work / f"cifar10-{size}" / "verify")
                for name, spec in named}
        rows.append({"epochs": n, "accuracies": accs, "std": {k: statistics.stdev(a) for k, a in accs.items()},
                     "pooled_std": pooled_std(accs.values()), "pooled_dof": len(named) * (NOISE_SEEDS - 1),
                     "std_of_means": statistics.stdev(statistics.fmean(a) for a in accs.values())
                     if networks else math.nan, "seconds": time.perf_counter() - t})
        print(rows[-1], flush=True)
    seeds = f"seeds 0-{NOISE_SEEDS - 1}"
    command = (f"`python tests/benchmarks/bench_verify.py --size {size} --noise-epochs {' '.join(map(str, epochs))}"
               + (f" --noise-networks {networks}`" if networks else "`"))
    recipe_text = (f"verify's {size} recipe (batch {recipe.batch_size}, lr {recipe.lr} cosine, label smoothing "
                   f"{recipe.label_smoothing}, random crop and flip) but for N epochs")
    if not networks:  # the reference alone: the section recorded before --noise-networks
        (OUT / f"verify-noise-{size}.json").write_text(json.dumps(rows, indent=2))
        table = ["| stand-alone epochs | accuracy, seeds 0-2 | seed-to-seed std | mean |", "|---|---|---|---|"]
        table += [f"| {r['epochs']} | {', '.join(f'{a:.2%}' for a in r['accuracies']['reference'])} | "
                  f"{r['std']['reference']:.2%} | {statistics.fmean(r['accuracies']['reference']):.2%} |"
                  for r in rows]
        write_section(f"verify-noise-{size}", "How noisy is the stand-alone ground truth? (the reference, 3 seeds)",
                      f"{command}: MobileNetV3 (the compact space's reference) trained from scratch on the CIFAR-10 "
                      f"split above with {recipe_text}, {seeds}; validation accuracy after BN re-estimation.\n\n"
                      + "\n".join(table), record=SIZES[size].record)
        return
    from scipy.stats import chi2
    for r in rows:  # the pooled std's 90% interval, for normal noise: dof * s^2 / sigma^2 is chi-square
        r["pooled_std_90"] = [r["pooled_std"] * math.sqrt(r["pooled_dof"] / chi2.ppf(q, r["pooled_dof"]))
                              for q in (0.95, 0.05)]
    # What the noise at the recipe's own epochs leaves of a ranking: the ceiling on each recorded base run's networks
    fronts = recorded_standalone(size)
    at_recipe = next((r for r in rows if r["epochs"] == recipe.epochs), None)
    ceilings = {run: tau_ceiling(accs, at_recipe["pooled_std"]) for run, accs in fronts.items()} if at_recipe else {}
    (OUT / f"verify-noise-pooled-{size}.json").write_text(json.dumps({"rows": rows, "ceilings": ceilings}, indent=2))
    table = ["| stand-alone epochs | network | accuracy, " + seeds + " | seed-to-seed std | mean |",
             "|---|---|---|---|---|"]
    for r in rows:
        table += [f"| {r['epochs']} | {name} | {', '.join(f'{a:.2%}' for a in accs)} | {r['std'][name]:.2%} | "
                  f"{statistics.fmean(accs):.2%} |" for name, accs in r["accuracies"].items()]
        low, high = r["pooled_std_90"]
        table.append(f"| {r['epochs']} | pooled over {len(named)} networks ({r['pooled_dof']} degrees of freedom; 90% "
                     f"interval {low:.2%} to {high:.2%}) / std between their means | | {r['pooled_std']:.2%} | "
                     f"{r['std_of_means']:.2%} |")
    if ceilings:
        table += ["", f"Taken as every network's noise, the pooled std at the recipe's {recipe.epochs} epochs "
                  f"({at_recipe['pooled_std']:.2%}) puts a perfect proxy's Kendall tau against the stand-alone "
                  f"accuracies each recorded run retrained (`nas.verify.tau_ceiling`) at:", "",
                  "| recorded run | networks | tau ceiling, median (10-90%) |", "|---|---|---|"]
        table += [f"| {run} | {len(fronts[run])} | {ceiling_text(c)} |" for run, c in ceilings.items()]
    write_section(f"verify-noise-pooled-{size}",
                  f"Is one network's seed noise every network's? (the reference and {networks} random networks, "
                  f"{NOISE_SEEDS} seeds each)",
                  f"{command}: MobileNetV3 (the compact space's reference) and {networks} distinct random members of "
                  f"the space with no more FLOPs than it (seed 0; torch.utils.flop_counter, FLOPs standing in for "
                  f"the latency limit a search would set), each trained from scratch on the CIFAR-10 split above "
                  f"with {recipe_text}, {seeds}; validation accuracy after BN re-estimation. Pooled: each network's "
                  f"squared deviations from its own mean, summed over networks, over their summed degrees of freedom "
                  f"(`nas.verify.pooled_std`, what `nas verify` reads its ceiling from). The std between the means "
                  f"still holds noise (its std over sqrt {NOISE_SEEDS}); {len(named)} networks are too few to rank."
                  f"\n\n" + "\n".join(table), record=SIZES[size].record)


if __name__ == "__main__":
    from nas import SpecError
    try:
        main()
    except SpecError as e:  # e.g. a latency table the machine has drifted away from: its one line says what to do
        raise SystemExit(f"error: {e}") from None
