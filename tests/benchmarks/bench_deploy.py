"""Deploy: are exports exact, what does int8 cost, which runtime is fastest here, and does the onnxruntime latency
predictor meet the torch predictor's goals? (issue: deploy)
Run: python tests/benchmarks/bench_deploy.py [export] [runtimes] [isolation] [overhead] [predictor]
     [executorch-predictor]

export: ONNX against PyTorch (max abs logit difference <= 1e-4, identical top-1) for mobilenet_v3_small (1 epoch
  on digits at 224px; digits has 359 validation images), the compact space's MobileNetV3 reference trained on
  CIFAR-10 (verify's cpu recipe at 6 epochs, seed 0: bench_verify.py --noise-epochs 6 trains it, and this reuses
  its checkpoint) on 1,000 CIFAR-10 validation images, and the top network of the default digits search (supernet
  weights). int8 (onnxruntime static, 512 calibration images) against fp32 on all 10,000 CIFAR-10 validation
  images for the trained compact reference: goal a loss of at most 1.0 point.
runtimes: latency of those networks in torch eager, onnxruntime fp32 and int8, and ExecuTorch (XNNPACK), at 1 and 2
  threads, timed side by side in interleaved rounds.
isolation: does a network cost the sum of its layers timed alone (what a latency table adds up), in each runtime?
  Each layer of mobilenet_v3_small and of the compact reference is timed as a graph of its own beside the whole
  network, with the per-call cost of an empty graph on each input shape taken off (as tables do).
predictor: onnxruntime latency tables of mobilenetv3_compact and mobilenetv3_small, validated on 100 random
  networks each (drift-calibrated first, as a search uses them): goals >= 95% within +-10% relative to the
  reference and Kendall tau >= 0.9.
overhead: outside torch, which per-call cost taken off each layer makes layer sums fit whole networks? 12
  networks of mobilenetv3_compact (its largest, smallest, reference and 9 random), their layers timed alone in
  onnxruntime and ExecuTorch, fitted raw, minus an empty graph of the layer's input (what tables do), and minus a
  graph that writes an output of the layer's output shape.
executorch-predictor: the same for an ExecuTorch table of mobilenetv3_compact (about 30 minutes to build here, as
  ExecuTorch lowers each of its 880 layers in 1-2 s).
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import random
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import ANCHORS_HEADER, cifar_images, reference_anchors, refused, retrying, write_section
from bench_latency import validate_timing, validated
from bench_verify import SIZES

import nas
from nas import SpecError
from nas.data import load_for
from nas.deploy import CHECK_IMAGES, Weights, deploy, from_checkpoint, from_study
from nas.latency import (
    Drift,
    Predictor,
    Validation,
    layers_of,
    load_predictor,
    median_of_rounds,
    num_threads,
    time_interleaved,
)
from nas.runtime import Compiled, Empty
from nas.search import SearchConfig, run_search
from nas.space import load_space
from nas.standalone import checkpoint_for, train_network
from nas.train import TrainSettings

ROOT = Path(__file__).resolve().parents[2]
OUT = Path(os.environ.get("OUT", ROOT / "results" / "benchmarks"))
WORK = OUT / "deploy"
CIFAR_WORK = OUT / "cifar10-verify"  # bench_verify's: its extracted images, decode cache and checkpoints
RUNTIMES = ("torch", "onnxruntime", "onnxruntime-int8", "executorch")
ISOLATION_RUNTIMES = ("torch", "onnxruntime", "executorch")
PREDICTOR_SPACES = ("mobilenetv3_compact", "mobilenetv3_small")


def networks() -> dict[str, Weights]:
    """The three networks of the issue, trained (or reused from earlier runs)."""
    out: dict[str, Weights] = {}
    small = nas.load_spec("mobilenet_v3_small")
    settings = TrainSettings(epochs=1, batch_size=64, lr=0.05, random_subnets=0)
    spec, data = load_for(small, "digits", seed=settings.seed)
    ckpt = checkpoint_for(spec, data, settings, None, WORK / "train")
    train_network(spec, data, settings, checkpoint=ckpt, measure_latency=False)
    out["mobilenet_v3_small (digits, 224px)"] = from_checkpoint(small, ckpt, "digits")

    images = cifar_images(CIFAR_WORK)
    if images is not None:
        space, cifar = load_for(load_space("mobilenetv3_compact"), f"folder:{images / 'train'}",
                                data_dir=CIFAR_WORK / "data")
        recipe = dataclasses.replace(SIZES["cpu"][1], epochs=6, seed=0)
        reference = space.reference_member()
        ckpt = checkpoint_for(reference, cifar, recipe, None, CIFAR_WORK / "cifar10-cpu" / "verify" / "checkpoints")
        train_network(reference, cifar, recipe, checkpoint=ckpt, measure_latency=False)
        out["compact reference (CIFAR-10, 6 epochs)"] = from_checkpoint(
            reference, ckpt, f"folder:{images / 'train'}", data_dir=CIFAR_WORK / "data")

    config = SearchConfig(results=str(WORK / "results"), device="cpu")  # the README's default search
    run_search(config)
    out["top digits network (supernet weights)"] = from_study(config.name, rank=1, results=config.results)
    return out


def export(nets: dict[str, Weights]) -> dict[str, dict]:
    rows, manifests = [], {}
    for i, (name, w) in enumerate(nets.items()):
        int8 = "CIFAR" in name
        t = time.perf_counter()
        m = deploy(w, WORK / f"deployed-{i}", fmt="onnx", quantize="int8" if int8 else None)
        manifests[name] = m
        c = m["check"]
        row = (f"| {name} | {c['images']} | {c['max_abs_diff']:.1e} | {c['top1_agreement']:.2%} | "
               f"{m['accuracy']['pytorch_top1']:.2%} | {m['accuracy']['top1']:.2%} | ")
        if int8:
            q = m["quantization"]
            row += f"{q['top1']:.2%} ({q['top1'] - q['top1_fp32']:+.2%}) |"
        else:
            row += "not run |"
        rows.append(row + f" {time.perf_counter() - t:.0f} s |")
        print(rows[-1], flush=True)
    (OUT / "deploy-export.json").write_text(json.dumps(manifests, indent=2, default=str))
    table = ["| network | images checked | max abs logit diff | top-1 agreement | PyTorch top-1 | ONNX top-1 | "
             "int8 top-1 (vs fp32) | deploy wall |", "|---|---|---|---|---|---|---|---|", *rows]
    write_section("deploy-export", "Deploy: ONNX exactness and int8 accuracy",
                  "`python tests/benchmarks/bench_deploy.py export`: `nas.deploy.deploy(..., fmt='onnx')` on "
                  f"each network; the check compares onnxruntime's logits with PyTorch's on the first {CHECK_IMAGES} "
                  "validation images (all 359 for digits) and must meet 1e-4 and identical top-1. Top-1 is on the "
                  "whole validation split (10,000 CIFAR-10 images, 359 digits). int8: onnxruntime `quantize_static` "
                  "(QDQ, per-channel int8 weights, uint8 activations, MinMax) calibrated on 512 training images; "
                  "goal: at most 1.0 point lost on CIFAR-10.\n\n" + "\n".join(table))
    return manifests


def runtimes(nets: dict[str, Weights]) -> None:
    rows = []
    for name, w in nets.items():
        spec = w.spec
        r = spec.input.resolution
        x = torch.randn(1, spec.input.channels, r, r)
        for threads in (1, 2):
            compiled = [Compiled(w.model, x, rt, threads) for rt in RUNTIMES]
            with num_threads(threads), torch.inference_mode():
                times = time_interleaved(len(RUNTIMES), lambda i, c=compiled: c[i].runner(), torch.device("cpu"),
                                         rounds=5, warmup=10, repeats=20)
            ms = [median_of_rounds(t) for t in times]
            best = min(range(len(RUNTIMES)), key=ms.__getitem__)
            rows.append(f"| {name} | {threads} | " + " | ".join(f"{v:.3f}" for v in ms) +
                        f" | {RUNTIMES[best]}, x{sorted(ms)[1] / ms[best]:.2f} ahead of the next |")
            print(rows[-1], flush=True)
    write_section("deploy-runtimes", "Deploy: latency per runtime on this machine",
                  "`python tests/benchmarks/bench_deploy.py runtimes`: batch 1, median ms over 5 interleaved rounds "
                  "of 20 timed runs (after 10 warm-up runs) per runtime, the three runtimes side by side in each "
                  "round. int8 is onnxruntime static QDQ quantisation (uint8 activations, int8 weights); "
                  "ExecuTorch is its XNNPACK delegate (fp32, the .pte `nas deploy --format executorch` writes).\n\n"
                  "| network | threads | torch eager | onnxruntime fp32 | onnxruntime int8 | ExecuTorch (XNNPACK) | "
                  "fastest |\n|---|---|---|---|---|---|---|\n" + "\n".join(rows))


def isolation() -> None:
    rows = []
    specs = {"mobilenet_v3_small (224px)": nas.load_spec("mobilenet_v3_small"),
             "compact reference (32px)": load_space("mobilenetv3_compact").reference_member()}
    for name, spec in specs.items():
        layers = layers_of(spec)
        shapes = sorted({(layer.in_channels, layer.size) for layer in layers})
        r = spec.input.resolution
        for runtime in ISOLATION_RUNTIMES:
            calls = [Compiled(layer.module(spec.batch_norm), torch.randn(1, layer.in_channels, layer.size, layer.size),
                              runtime) for layer in layers]
            calls += [Compiled(Empty(), torch.zeros(1, c, size, size), runtime) for c, size in shapes]
            calls.append(Compiled(nas.build_model(spec), torch.randn(1, spec.input.channels, r, r), runtime))
            with torch.inference_mode():
                times = time_interleaved(len(calls), lambda i, c=calls: c[i].runner(), torch.device("cpu"), rounds=5,
                                         warmup=5, repeats=20)
            ms = [median_of_rounds(t) for t in times]
            network = ms[-1]
            call = dict(zip(shapes, ms[len(layers):-1], strict=True))
            alone = sum(ms[:len(layers)])
            # torch tables take nothing off (eager has no graph to enter), the others an empty graph's call
            corrected = alone if runtime == "torch" else sum(
                t - call[(layer.in_channels, layer.size)] for layer, t in zip(layers, ms, strict=False))
            rows.append(f"| {name} | {len(layers)} | {runtime} | {network:.3f} | {alone:.3f} | {corrected:.3f} | "
                        f"x{corrected / network:.2f} |")
            print(rows[-1], flush=True)
    write_section("deploy-isolation", "Deploy: does a network cost the sum of its layers timed alone?",
                  "`python tests/benchmarks/bench_deploy.py isolation`: each layer of the network timed as a graph "
                  "of its own (random input of its shape) beside the whole network, 5 interleaved rounds of 20 "
                  "runs, batch 1, 2 threads; medians. A latency table adds up such layer times, then fits one scale "
                  "and offset on whole networks, so it needs the last column near one value across networks.\n\n"
                  "| network | layers | runtime | whole network ms | sum of layers alone ms | minus each graph's "
                  "call (empty graph) ms | sum / network |\n|---|---|---|---|---|---|---|\n" + "\n".join(rows))


class _Output(nn.Module):
    """A graph that reads one value of its input and writes an output of ``shape``: a call, its input fed, and an
    output of a layer's size written and returned."""

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.shape = shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1, :1, :1].reshape(1, *[1] * (len(self.shape) - 1)).expand(*self.shape) * 2


def overhead() -> None:
    space = load_space("mobilenetv3_compact")
    rng = random.Random(0)
    specs = [space.largest(), space.smallest(), space.reference_member(), *(space.sample(rng) for _ in range(9))]
    layers = list(dict.fromkeys(layer for spec in specs for layer in layers_of(spec)))
    with torch.inference_mode():
        outs = [tuple(layer.module(space.batch_norm).eval()(torch.zeros(1, layer.in_channels, layer.size,
                                                                        layer.size)).shape) for layer in layers]
    ins = [(1, layer.in_channels, layer.size, layer.size) for layer in layers]
    in_shapes, pairs = sorted(set(ins)), sorted(set(zip(ins, outs, strict=True)))
    rows = []
    for runtime in ("onnxruntime", "executorch"):
        calls = [Compiled(layer.module(space.batch_norm), torch.randn(shape), runtime)
                 for layer, shape in zip(layers, ins, strict=True)]
        calls += [Compiled(Empty(), torch.zeros(shape), runtime) for shape in in_shapes]
        calls += [Compiled(_Output(out), torch.zeros(shape), runtime) for shape, out in pairs]
        # The networks in the same rounds as their layers, so the machine's drift cannot come between them
        r = space.input.resolution
        calls += [Compiled(nas.build_model(spec), torch.randn(1, space.input.channels, r, r), runtime)
                  for spec in specs]
        with torch.inference_mode():
            times = time_interleaved(len(calls), lambda i, c=calls: c[i].runner(), torch.device("cpu"), rounds=3,
                                     warmup=2, repeats=7)
        ms = [median_of_rounds(t) for t in times]
        n, m = len(layers), len(layers) + len(in_shapes)
        empty = dict(zip(in_shapes, ms[n:m], strict=True))
        output = dict(zip(pairs, ms[m:m + len(pairs)], strict=True))
        measured = np.array(ms[m + len(pairs):])
        index = {layer: i for i, layer in enumerate(layers)}
        entries = {"raw": ms[:n],
                   "minus empty graph of its input (tables)": [max(ms[i] - empty[ins[i]], 0.1 * ms[i])
                                                               for i in range(n)],
                   "minus an output-writing graph": [max(ms[i] - output[(ins[i], outs[i])], 0.1 * ms[i])
                                                     for i in range(n)]}
        for name, entry in entries.items():
            sums = np.array([sum(entry[index[layer]] for layer in layers_of(spec)) for spec in specs])
            w = 1 / measured
            a = np.stack([sums, np.ones(len(sums))], 1) * w[:, None]
            scale, offset = np.linalg.lstsq(a, measured * w, rcond=None)[0]
            err = (scale * sums + offset) / measured - 1
            rows.append(f"| {runtime} | {name} | {scale:.3f} | {offset:+.4f} | {offset / measured.min():+.0%} | "
                        f"{np.mean(abs(err) <= 0.1):.0%} | {np.median(abs(err)):.1%} |")
            print(rows[-1], flush=True)
    write_section("deploy-overhead", "Deploy: the per-call cost a layer table takes off, outside torch",
                  "`python tests/benchmarks/bench_deploy.py overhead`: 12 networks of mobilenetv3_compact (largest, "
                  f"smallest, reference, 9 random; {len(layers)} distinct layers) timed whole and layer by layer, all "
                  "in the same 3 interleaved rounds of 7 runs, batch 1, 2 threads; the fit is a table's (least "
                  "squares on relative error) over these 12 networks, in sample. A table refuses an offset over "
                  "50% of the fastest network.\n\n| runtime | each layer's entry | scale | offset ms | offset / "
                  "fastest network | within +-10% (in sample) | median abs error |\n|---|---|---|---|---|---|---|\n"
                  + "\n".join(rows))


def _validated_fresh(space_name: str, runtime: str, table: str) -> tuple[Drift, Validation, float] | str:
    """:func:`bench_latency.validated` of the table file ``table``, meant for a process of its own that has done
    nothing else; a refusal comes back as its message."""
    try:
        return validated(load_predictor(load_space(space_name), table=table, runtime=runtime))
    except SpecError as e:
        return str(e)


def _predictors(spaces: tuple[str, ...], runtimes: tuple[str, ...], again: bool = False
                ) -> tuple[list[str], list[str]]:
    """Build each space's table in each runtime, calibrate its drift, validate it on 100 random networks: table rows,
    and the refusals met on the way. With ``again`` the same table is validated twice more: in a newly started
    process (spawned, so it inherits nothing of this one's state), then again in this one."""
    rows, refusals = [], []

    def row(space_name: str, runtime: str, build: str, p: Predictor, drift: Drift, v: Validation, seconds: float
            ) -> None:
        rows.append(f"| {space_name} | {runtime} | {build} | {p.formula()} | x{drift.factor:.3f} | "
                    f"{v.relative_within_10:.0%} ({v.relative_noise_within_10:.0%}) | {reference_anchors(p, v)} | "
                    f"{v.within_10:.0%} ({v.noise_within_10:.0%}) | {v.kendall_tau:.3f} "
                    f"({v.noise_kendall_tau:.3f}) | {seconds:.0f} s |")
        print(rows[-1], flush=True)

    for space_name in spaces:
        space = load_space(space_name)
        for runtime in runtimes:
            label = f"{space_name} {runtime}"
            built = retrying(lambda s=space, r=runtime: load_predictor(s, runtime=r, root=WORK / "latency",
                                                                       rebuild=True), label, refusals)
            if built is None:
                continue
            p, build_s = built
            row(space_name, runtime, f"{build_s:.0f} s", p, *validated(p))
            if again:
                with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                    fresh = pool.submit(_validated_fresh, space_name, runtime, str(p.path)).result()
                if isinstance(fresh, str):
                    refusals.append(f"{label}, fresh process: {fresh}")
                else:
                    row(space_name, f"{runtime}, then in a fresh process", "the same table", p, *fresh)
                # Again here, after it: a difference between the process that built the table and a fresh one shows
                # as this row agreeing with the first; a difference in time, as this row agreeing with the fresh one.
                row(space_name, f"{runtime}, then again in this process", "the same table", p, *validated(p))
    return rows, refusals


def _predictor_section(key: str, title: str, text: str, spaces: tuple[str, ...], runtimes: tuple[str, ...],
                       again: bool = False) -> None:
    rows, refusals = _predictors(spaces, runtimes, again)
    write_section(key, title, text + f"\n\n| space | runtime | build | fit | drift | {ANCHORS_HEADER} | within "
                  "+-10% absolute | Kendall tau | validation wall |\n"
                  "|---|---|---|---|---|---|---|---|---|---|\n" +
                  "\n".join(rows) + refused(refusals))


def predictor() -> None:
    _predictor_section(
        "deploy-predictor", "Deploy: the onnxruntime latency predictor",
        "`python tests/benchmarks/bench_deploy.py predictor`: for each space, a table built in onnxruntime fp32 (every "
        "layer exported as its own graph; the empty graph's call cost taken off each entry), then, straight after, "
        f"drift calibration and `latency validate` on 100 random networks ({validate_timing()}, beside "
        "the reference, which the table predicts by the geometric mean of its measurement in the build and the fitted "
        "model; beside it, each alone, from the same timings); the torch table built and validated the same way "
        "just after, side by side. In brackets: the measurement's own noise floor (its first half of the rounds "
        "against its second). Goals: >= 95% within +-10% relative to the reference, tau >= 0.9.", PREDICTOR_SPACES,
        ("onnxruntime", "torch"))


def executorch_predictor() -> None:
    _predictor_section(
        "deploy-predictor-executorch", "Deploy: the ExecuTorch (XNNPACK) latency predictor",
        "`python tests/benchmarks/bench_deploy.py executorch-predictor`: the mobilenetv3_compact table built in "
        "ExecuTorch (every layer lowered to XNNPACK as a program of its own, all before any timing; the empty "
        "graph's call cost taken off each entry), then, straight after, drift calibration and `latency validate` on "
        f"100 random networks, each lowered whole ({validate_timing()}, beside the reference, predicted as in the "
        "onnxruntime section); then the same "
        "calibration and validation of the same table in a newly started process, which has lowered and timed "
        "nothing before, and then once more in the benchmark's own process (once, in an earlier session, a fresh "
        "process's measurement disagreed with this benchmark's own: this tells a process's state from the time "
        "since the build). In brackets: the measurement's own noise floor. The torch and onnxruntime "
        "predictors' goals: >= 95% within +-10% relative to the reference, tau >= 0.9.", ("mobilenetv3_compact",),
        ("executorch",), again=True)


PARTS = ("export", "runtimes", "isolation", "overhead", "predictor", "executorch-predictor")


def main() -> None:
    parts = sys.argv[1:] or list(PARTS)
    unknown = set(parts) - set(PARTS)
    if unknown:
        sys.exit(f"unknown part(s): {', '.join(sorted(unknown))}")
    if "export" in parts or "runtimes" in parts:
        nets = networks()
        if "export" in parts:
            export(nets)
        if "runtimes" in parts:
            runtimes(nets)
    if "isolation" in parts:
        isolation()
    if "overhead" in parts:
        overhead()
    if "predictor" in parts:
        predictor()
    if "executorch-predictor" in parts:
        executorch_predictor()


if __name__ == "__main__":
    main()
