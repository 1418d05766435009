"""torchrun: two gloo processes on CPU train as one process does with the same global batch; only rank 0 writes;
a run killed in one rank resumes to the weights of an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nas.train import load_checkpoint

TINY = str(Path(__file__).with_name("tiny_space.yaml"))
# Two processes on two cores: one thread each (the CI machine has two cores).
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# The stated tolerance: after 22 steps of the global batch 128, the 2-process weights sit within 1.2% of the
# distance both runs moved from their common initial weights (0.43% measured here). They cannot be equal: each
# process normalises its half batch with its own BN statistics, as DDP without SyncBatchNorm does. With DDP
# replaced by the bare module (no gradient all-reduce: rank 0 trains on its half alone) the same check measured
# 2.6%, so the test tells the two apart.
TOLERANCE = 0.012


def supernet_cmd(out: Path, processes: int, epochs: int) -> list[str]:
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", "-m"]
              if processes > 1 else [sys.executable, "-m"])
    return [*launch, "nas", "train-supernet", "--space", TINY, "--dataset", "digits", "--epochs", str(epochs),
            "--batch-size", "128", "--device", "cpu", "--out", str(out)]


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def weights(path: Path) -> torch.Tensor:
    state = load_checkpoint(path)["model"]
    return torch.cat([v.flatten().double() for k, v in sorted(state.items()) if v.is_floating_point()])


def initial_weights() -> torch.Tensor:
    from nas.data import load_for
    from nas.space import load_space
    from nas.supernet import Supernet
    space, _ = load_for(load_space(TINY), "digits")
    torch.manual_seed(0)  # as train_supernet seeds it
    state = Supernet(space).state_dict()
    return torch.cat([v.flatten().double() for k, v in sorted(state.items()) if v.is_floating_point()])


def test_two_gloo_processes_train_as_one_process_with_the_same_global_batch(tmp_path: Path) -> None:
    one, two = tmp_path / "one" / "sn.pt", tmp_path / "two" / "sn.pt"
    run(supernet_cmd(one, 1, 2), tmp_path)
    r = run(supernet_cmd(two, 2, 2), tmp_path)
    assert r.stdout.count("supernet: ") == 1 and r.stdout.count("largest  subnet") == 1  # rank 0 reports
    assert [p.name for p in two.parent.iterdir()] == ["sn.pt"]  # rank 0 wrote it; no other file, no temp file
    a, b, start = weights(one), weights(two), initial_weights()
    moved = (a - start).norm()
    assert moved > 1.0  # training changed the weights
    assert (b - a).norm() / moved < TOLERANCE, float((b - a).norm() / moved)
    h1, h2 = load_checkpoint(one)["history"], load_checkpoint(two)["history"]
    assert [h["epoch"] for h in h2] == [1, 2] and h2[-1]["loss"] == pytest.approx(h1[-1]["loss"], rel=0.05)


def test_a_run_killed_in_one_rank_resumes_to_the_uninterrupted_weights(tmp_path: Path) -> None:
    straight, killed = tmp_path / "straight" / "sn.pt", tmp_path / "killed" / "sn.pt"
    run(supernet_cmd(straight, 2, 4), tmp_path)
    proc = subprocess.Popen(supernet_cmd(killed, 2, 4), cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while not killed.exists():  # the first epoch's checkpoint
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2
    os.kill(int(workers[-1]), signal.SIGKILL)  # one rank dies; torchrun stops the other and fails
    assert proc.wait(timeout=120) != 0
    assert load_checkpoint(killed)["epoch"] < 4
    run(supernet_cmd(killed, 2, 4), tmp_path)  # the same command resumes
    assert load_checkpoint(killed)["epoch"] == 4
    assert torch.allclose(weights(killed), weights(straight), rtol=0, atol=1e-6)


def test_stand_alone_training_under_torchrun_reports_once(tmp_path: Path) -> None:
    r = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "nas", "train",
             "mobilenet_v3_compact", "--dataset", "digits", "--epochs", "1", "--batch-size", "128", "--device", "cpu",
             "--no-augment"], tmp_path)
    assert r.stdout.count("validation accuracy: ") == 1  # rank 0 evaluates, measures and writes
    assert len(list((tmp_path / "results" / "train").glob("*.metrics.json"))) == 1
    assert [p.suffix for p in (tmp_path / "results" / "train").iterdir()].count(".pt") == 1
