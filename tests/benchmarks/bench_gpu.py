"""Is the GPU kept busy? (issue: scale out) Run on a CUDA machine: python tests/benchmarks/bench_gpu.py [--epochs N]
[--batch-size B] [--processes N]

CIFAR-10 JPEGs of ../shared/data at 32px, space mobilenetv3_compact: supernet training throughput (training
images per second, each image passing through the sandwich's subnets) and the mean GPU utilisation over it
(nvidia-smi sampled every 200 ms), then a 200-trial search on that supernet (trials/s). Goals: at least 3x
4,482 images/s, at least 70% mean utilisation, at least 20 trials/s. With --processes N > 1 the training runs
under torchrun on N GPUs. Figures go to $OUT/bench-gpu.json (default results/benchmarks/); the work (images,
cache, supernet) stays under results/benchmarks/gpu-bench/, out of $OUT, which must come back from a device machine
(tests/benchmarks/on_device.sh). Not run on a CPU-only machine: it says so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import cifar_images

ROOT = Path(__file__).resolve().parents[2]
OUT = Path(os.environ.get("OUT", ROOT / "results" / "benchmarks"))


def utilisation(stop: threading.Event, samples: list[float]) -> None:
    """nvidia-smi's GPU utilisation (percent of time a kernel ran) every 200 ms until ``stop``."""
    proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                             "-lms", "200"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if stop.is_set():
            break
        values = [float(v) for v in line.split(",") if v.strip()]
        if values:
            samples.append(statistics.fmean(values))
    proc.terminate()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=0.4)
    ap.add_argument("--processes", type=int, default=1)
    ap.add_argument("--device", default="cuda", help="cpu only to try this script at a tiny size")
    ap.add_argument("--dataset", default=None, help="default: the CIFAR-10 JPEGs of ../shared/data")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("skipped: no CUDA device")
        return
    work = ROOT / "results" / "benchmarks" / "gpu-bench"
    if args.dataset is None:
        images = cifar_images(work)
        if images is None:
            return
        args.dataset = f"folder:{images / 'train'}"
    common = ["--dataset", args.dataset, "--data-dir", str(work / "data"), "--results", str(work),
              "--device", args.device]
    settings = ["--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--lr", str(args.lr)]
    # Decode once (timed apart: the later commands read the cache), so the training figure is training only.
    from nas.data import load_for
    from nas.space import load_space
    t = time.perf_counter()
    _, data = load_for(load_space("mobilenetv3_compact"), args.dataset, data_dir=work / "data")
    decode_s = time.perf_counter() - t
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.processes}",
               "-m"] if args.processes > 1 else [sys.executable, "-m"])
    stop, samples = threading.Event(), []
    if args.device == "cuda":
        threading.Thread(target=utilisation, args=(stop, samples), daemon=True).start()
    t = time.perf_counter()
    # The default checkpoint path (its cache key), so the search below reuses this supernet.
    subprocess.run([*launch, "nas", "train-supernet", *common, *settings], check=True)
    train_s = time.perf_counter() - t
    stop.set()
    from nas.train import load_checkpoint
    checkpoint = max((work / "supernets").glob("*.pt"), key=lambda p: p.stat().st_mtime)
    epoch_s = [h["seconds"] for h in load_checkpoint(checkpoint)["history"]]
    figures = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
               "processes": args.processes, "batch_size": args.batch_size, "epochs": args.epochs,
               "decode_s": decode_s, "train_command_s": train_s, "epoch_s": epoch_s,
               "images_per_s": data.steps(args.batch_size) * args.batch_size / statistics.median(epoch_s),
               "mean_gpu_utilisation_pct": statistics.fmean(samples) if samples else None}
    try:
        import optuna  # noqa: F401 - the search needs it; the device machine may lack it
    except ImportError:
        figures["search"] = "skipped: optuna is not installed here"
    else:
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "nas", "search", *common, "--budget", "200", "--study-name",
                            "gpu-bench", "--supernet-epochs", str(args.epochs), "--supernet-batch-size",
                            str(args.batch_size), "--supernet-lr", str(args.lr)], capture_output=True, text=True)
        figures["search"] = r.stdout.strip().splitlines()[-1] if r.returncode == 0 else r.stderr[-2000:]
        figures["search_command_s"] = time.perf_counter() - t
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "bench-gpu.json").write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
