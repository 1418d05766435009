"""Supernet benchmarks (issue: search spaces and supernet). Run: python tests/benchmarks/bench_supernet.py [part...]

Parts (all by default):
  forward   forward time of supernet(x, spec) vs the extracted network, same batch, as a ratio (goal <= 1.3)
  digits    the default `train-supernet` on digits: wall time (goal <= 90 s), largest/smallest validation
            accuracy (goals >= 97% / >= 93%), training throughput in images/s
  cifar10   supernet training on the CIFAR-10 JPEGs of ../shared/data (32x32, seeded 80/20 split of the
            50,000 training images): throughput, and largest/smallest accuracy after a stated run
  decode    the same 50,000 JPEGs: first load (decode into the uint8 cache) vs a later load (from the cache),
            and one epoch of batches with and without augmentation
  layout    a supernet training step, a stand-alone training step and scoring, with the batch in the default
            (NCHW-contiguous) memory order vs channels-last (what training and scoring feed, nas.model.channels_last)
Figures go to results/BENCHMARKS.md (with date and machine) and results/benchmarks/supernet-*.json.
"""

from __future__ import annotations

import dataclasses
import json
import random
import statistics
import sys
import tarfile
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import write_section

from nas.data import load_dataset
from nas.latency import time_call
from nas.model import build_model
from nas.space import load_space
from nas.supernet import Supernet, recalibrate_bn
from nas.train import TrainSettings, calibration_batches, score_subnet, train_supernet

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "results" / "benchmarks"
CIFAR = ROOT.parent / "shared" / "data" / "cifar10-jpeg-train.tar.gz"


def save(name: str, data: dict) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"supernet-{name}.json").write_text(json.dumps(data, indent=2))


def forward() -> None:
    rows, cpu = [], torch.device("cpu")
    for space_name, batch in (("mobilenetv3_compact", 64), ("mobilenetv3_compact", 1), ("mobilenetv3_small", 8)):
        space = load_space(space_name)
        supernet = Supernet(space)
        res = space.input.resolution
        x = torch.randn(batch, 3, res, res)
        rng = random.Random(0)
        specs = {"largest": space.largest(), "smallest": space.smallest(), "reference": space.reference_spec()}
        specs |= {f"random{i}": space.sample(rng) for i in range(3)}
        for label, spec in specs.items():
            recalibrate_bn(supernet, [x], spec)
            net = supernet.extract(spec).eval()
            supernet.eval()
            ratios = []
            with torch.inference_mode():
                for _ in range(5):  # interleaved rounds, so both see the same machine noise
                    a = statistics.median(time_call(partial(supernet, x, spec), cpu, warmup=2, repeats=5))
                    b = statistics.median(time_call(partial(net, x), cpu, warmup=2, repeats=5))
                    ratios.append(a / b)
            rows.append({"space": space_name, "batch": batch, "subnet": label, "supernet_ms": a, "extracted_ms": b,
                         "ratio": statistics.median(ratios)})
            print(rows[-1], flush=True)
    save("forward", {"rows": rows})
    table = ["| space | batch | subnet | supernet ms | extracted ms | ratio (median of 5 rounds) |",
             "|---|---|---|---|---|---|"]
    table += [f"| {r['space']} | {r['batch']} | {r['subnet']} | {r['supernet_ms']:.2f} | {r['extracted_ms']:.2f} | "
              f"{r['ratio']:.2f} |" for r in rows]
    overall = statistics.median(r["ratio"] for r in rows)
    write_section("supernet-forward", "Supernet forward vs extracted network (goal: ratio <= 1.3)",
                  f"Eval mode, inference mode, the same input batch; ratio = `supernet(x, spec)` / extracted "
                  f"`nas.build_model` network. Median ratio over all rows: **{overall:.2f}** "
                  f"(worst {max(r['ratio'] for r in rows):.2f}).\n\n" + "\n".join(table))


def _train_and_score(space_name: str, dataset: str, settings: TrainSettings, data=None) -> dict:
    space = load_space(space_name)
    data = data or load_dataset(dataset, space.input.resolution, seed=settings.seed)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = train_supernet(space, data, settings, checkpoint=Path(tmp) / "sn.pt", progress=False)
        seconds = time.perf_counter() - start
    calib = calibration_batches(data)
    acc = {name: score_subnet(result.supernet, spec, data, calib).accuracy
           for name, spec in (("largest", space.largest()), ("smallest", space.smallest()),
                              ("reference", space.reference_spec()))}
    images = len(data.train) // settings.batch_size * settings.batch_size * settings.epochs
    return {"space": space_name, "dataset": dataset, "settings": settings.__dict__, "train_images": len(data.train),
            "val_images": len(data.val), "wall_s": seconds, "images_per_s": images / seconds,
            "subnet_passes_per_step": 2 + settings.random_subnets, "val_acc": acc,
            "epoch_s": [h["seconds"] for h in result.history]}


def digits() -> None:
    r = _train_and_score("mobilenetv3_compact", "digits", TrainSettings())
    save("digits", r)
    s = r["settings"]
    write_section("supernet-digits", "Default supernet training on digits (goals: <= 90 s, largest >= 97%, "
                  "smallest >= 93%)",
                  f"`python -m nas train-supernet` defaults: space mobilenetv3_compact, {s['epochs']} epochs, batch "
                  f"{s['batch_size']}, lr {s['lr']}, {s['random_subnets']} random subnet(s) per step besides the "
                  f"largest and smallest; {r['train_images']} training / {r['val_images']} validation images.\n\n"
                  f"| figure | value |\n|---|---|\n"
                  f"| training wall time | {r['wall_s']:.1f} s |\n"
                  f"| throughput | {r['images_per_s']:.0f} images/s ({r['subnet_passes_per_step']} subnet passes "
                  f"per image) |\n"
                  f"| largest subnet, val accuracy | {r['val_acc']['largest']:.2%} |\n"
                  f"| smallest subnet, val accuracy | {r['val_acc']['smallest']:.2%} |\n"
                  f"| reference (MobileNetV3-Small layout), val accuracy | {r['val_acc']['reference']:.2%} |")


def cifar10(epochs: int = 3) -> None:
    if not CIFAR.exists():
        print(f"skipped: {CIFAR} is absent")
        return
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        with tarfile.open(CIFAR, "r:gz") as tar:
            tar.extractall(tmp, filter="data")
        data = load_dataset(f"folder:{tmp}/train", 32, seed=0, data_dir=tmp)
        load_s = time.perf_counter() - start
    settings = TrainSettings(epochs=epochs, batch_size=128, lr=0.1, random_subnets=1)
    r = _train_and_score("mobilenetv3_compact", "cifar10-jpeg", settings, data=data)
    r["extract_and_decode_s"] = load_s
    save("cifar10", r)
    write_section("supernet-cifar10", "Supernet training on CIFAR-10 JPEGs (32x32)",
                  f"The 50,000 JPEGs of ../shared/data, decoded once ({load_s:.0f} s to extract and decode), split "
                  f"80/20 with seed 0: {r['train_images']} training, {r['val_images']} validation images. Space "
                  f"mobilenetv3_compact, {epochs} epochs, batch 128, lr 0.1 cosine, 1 random subnet per step besides "
                  f"the largest and smallest, random crop and flip (the default for natural images).\n\n"
                  f"| figure | value |\n|---|---|\n"
                  f"| training wall time | {r['wall_s'] / 60:.1f} min |\n"
                  f"| throughput | {r['images_per_s']:.0f} images/s ({r['subnet_passes_per_step']} subnet passes "
                  f"per image) |\n"
                  f"| largest subnet, val accuracy | {r['val_acc']['largest']:.2%} |\n"
                  f"| smallest subnet, val accuracy | {r['val_acc']['smallest']:.2%} |\n"
                  f"| reference (MobileNetV3-Small layout), val accuracy | {r['val_acc']['reference']:.2%} |")


def decode() -> None:
    if not CIFAR.exists():
        print(f"skipped: {CIFAR} is absent")
        return
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(CIFAR, "r:gz") as tar:
            tar.extractall(tmp, filter="data")
        times = []
        for _ in range(2):  # the first decodes and writes the cache, the second reads it
            start = time.perf_counter()
            data = load_dataset(f"folder:{tmp}/train", 32, seed=0, data_dir=f"{tmp}/data")
            times.append(time.perf_counter() - start)
        cache_mb = sum(p.stat().st_size for p in Path(tmp, "data", "cache").iterdir()) / 2**20
    epoch = {}
    for augment in (False, True):  # one epoch of training batches, as fit() draws them (CPU)
        start = time.perf_counter()
        for _ in data.batches("train", 128, shuffle=True, augment=augment):
            pass
        epoch[augment] = time.perf_counter() - start
    r = {"first_load_s": times[0], "cached_load_s": times[1], "cache_mb": cache_mb, "epoch_batches_s": epoch[False],
         "epoch_batches_augmented_s": epoch[True], "train_images": len(data.train)}
    save("decode", r)
    write_section("data-decode", "Decode once: a folder data set's first load vs later loads",
                  f"`python tests/benchmarks/bench_supernet.py decode`: the 50,000 CIFAR-10 JPEGs of ../shared/data "
                  f"at 32x32, loaded twice with `nas.data.load_dataset('folder:...')` into a fresh data folder.\n\n"
                  f"| figure | value |\n|---|---|\n"
                  f"| first load: decode 50,000 JPEGs, write the uint8 cache ({cache_mb:.0f} MB) | {times[0]:.1f} s |\n"
                  f"| later load, from the cache | {times[1]:.2f} s |\n"
                  f"| one epoch of batches ({len(data.train)} images, batch 128), plain / random crop and flip, "
                  f"CPU | {epoch[False]:.2f} s / {epoch[True]:.2f} s |")


def layout(rounds: int = 7) -> None:
    """The three kinds of work training and scoring do, on the compact space at 32x32 and CIFAR-10's 10 classes,
    with the batch contiguous vs channels-last, interleaved (each round times both, in alternating order)."""
    space = load_space("mobilenetv3_compact")
    res, classes = space.input.resolution, 10
    torch.manual_seed(0)
    space = dataclasses.replace(space, num_classes=classes)
    supernet, net = Supernet(space), build_model(space.reference_member())
    rng = random.Random(0)
    x, y = torch.randn(128, 3, res, res), torch.randint(0, classes, (128,))
    x512 = torch.randn(512, 3, res, res)

    def sandwich(x: torch.Tensor) -> None:  # train_supernet's step: largest on labels, 2 more distilled from it
        supernet.zero_grad()
        logits = supernet(x, space.largest())
        soft = logits.detach().softmax(1)
        (F.cross_entropy(logits, y) + sum(F.cross_entropy(supernet(x, s), soft)
                                         for s in (space.smallest(), space.sample(rng)))).backward()

    def standalone(x: torch.Tensor) -> None:
        net.zero_grad()
        F.cross_entropy(net(x), y).backward()

    def score(x: torch.Tensor) -> None:  # the search's proxy per trial: BN re-estimated, then a forward pass
        # recalibrate_bn's pass written out: recalibrate_bn itself feeds channels-last whatever it is given.
        supernet.train()
        with torch.no_grad():
            supernet(x[:128], space.reference_member())
        supernet.eval()
        with torch.inference_mode():
            supernet(x, space.reference_member())

    cases = [("supernet training step (sandwich: 3 subnets, batch 128)", sandwich, x),
             ("stand-alone training step (the reference, batch 128)", standalone, x),
             ("scoring one subnet (BN on 128 images, forward on 512)", score, x512)]
    cpu, rows = torch.device("cpu"), []
    for label, fn, batch in cases:
        layouts = {"contiguous": batch, "channels-last": batch.contiguous(memory_format=torch.channels_last)}
        ms: dict[str, list[float]] = {k: [] for k in layouts}
        for r in range(rounds):
            for k in (list(layouts) if r % 2 == 0 else list(layouts)[::-1]):
                supernet.train(), net.train()
                ms[k].append(statistics.median(time_call(partial(fn, layouts[k]), cpu, warmup=1, repeats=3)))
        ratios = [a / b for a, b in zip(ms["contiguous"], ms["channels-last"], strict=True)]
        rows.append({"case": label, "contiguous_ms": statistics.median(ms["contiguous"]),
                     "channels_last_ms": statistics.median(ms["channels-last"]), "ratio": statistics.median(ratios),
                     "ratios": ratios})
        print(rows[-1], flush=True)
    supernet.eval()
    with torch.inference_mode():  # the same weights, both layouts: only float rounding may differ
        a = supernet(x512, space.reference_member())
        b = supernet(x512.contiguous(memory_format=torch.channels_last), space.reference_member())
    diff = (a - b).abs().max().item()
    save("layout", {"rows": rows, "max_abs_logit_diff": diff, "threads": torch.get_num_threads()})
    table = ["| work | contiguous ms | channels-last ms | contiguous / channels-last (median of rounds) |",
             "|---|---|---|---|"]
    table += [f"| {r['case']} | {r['contiguous_ms']:.0f} | {r['channels_last_ms']:.0f} | x{r['ratio']:.2f} |"
              for r in rows]
    write_section("supernet-layout", "Memory layout of training and scoring batches: contiguous vs channels-last",
                  f"`python tests/benchmarks/bench_supernet.py layout`: space mobilenetv3_compact at {res}x{res}, "
                  f"{classes} classes, {torch.get_num_threads()} threads, CPU; each row's two layouts timed in "
                  f"{rounds} interleaved rounds (median of 3 calls each, after 1 untimed). Training and scoring "
                  f"feed channels-last batches since this measurement (`nas.model.channels_last`); built networks, "
                  f"latency tables and exports keep the caller's layout. Largest logit difference between the "
                  f"layouts, same weights, 512 images: {diff:.1e}.\n\n" + "\n".join(table))


if __name__ == "__main__":
    parts = sys.argv[1:] or ["forward", "digits", "cifar10", "decode", "layout"]
    for part in parts:
        {"forward": forward, "digits": digits, "cifar10": cifar10, "decode": decode, "layout": layout}[part]()
