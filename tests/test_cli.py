import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import nas
from nas.cli import COMMANDS
from tests.test_spec import mutated


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nas", *args], capture_output=True, text=True, timeout=120)


def test_build_prints_a_readable_summary_with_latency() -> None:
    r = run("build", "mobilenet_v3_large", "--repeats", "3", "--threads", "1")
    assert r.returncode == 0, r.stderr
    assert "parameters: 5,483,032" in r.stdout
    assert "MACs:       216,589,760" in r.stdout
    assert "FLOPs:      433,179,520" in r.stdout
    assert "ms median on cpu, batch 1, 1 thread " in r.stdout
    assert "features.16" in r.stdout and "last conv 1x1" in r.stdout


def test_build_json_on_a_spec_file(tmp_path: Path) -> None:
    spec = nas.load_spec("mobilenet_v3_small")
    nas.save_spec(spec, tmp_path / "small.yaml")
    r = run("build", str(tmp_path / "small.yaml"), "--json", "--no-latency")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["params"] == 2_542_856
    assert data["flops"] == 2 * data["macs"]
    assert len(data["layers"]) == len(spec.blocks) + 3
    assert data["latency"] is None
    assert [row["out_size"] for row in data["layers"]][:3] == [112, 56, 28]


@pytest.mark.parametrize(("args", "expected"), [
    (["build", "{bad}"], "error: {bad}: blocks[3].kernel: 4 is not one of 3, 5, 7"),
    (["build", "no/such.yaml"], "error: no/such.yaml: no such file"),
    (["build", "mobilenet_v9"], "error: mobilenet_v9: not a file nor a built-in spec"),
    (["build", "mobilenet_v3_small", "--threads", "zero"], "error: nas build: argument --threads: 'zero' is not"),
    (["build", "mobilenet_v3_small", "--device", "tpu"], "error: --device: 'tpu' is not one of"),
    (["frobnicate"], "error: nas: argument COMMAND: invalid choice: 'frobnicate'"),
])
def test_bad_input_is_one_line_and_exit_2(args: list[str], expected: str, tmp_path: Path) -> None:
    bad = tmp_path / "my.yaml"
    bad.write_text(yaml.safe_dump(mutated("blocks[3].kernel", 4)))
    args = [a.replace("{bad}", str(bad)) for a in args]
    r = run(*args)
    assert r.returncode == 2
    assert r.stderr.startswith(expected.replace("{bad}", str(bad))), r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert r.stdout == ""


@pytest.mark.parametrize("command", [[], *[[name] for name in COMMANDS]])
def test_every_command_has_help(command: list[str]) -> None:
    r = run(*command, "--help")
    assert r.returncode == 0
    assert "usage: nas" in r.stdout and len(r.stdout.splitlines()) > 3


def test_train_supernet_trains_then_reuses_its_checkpoint(tmp_path: Path) -> None:
    args = ["train-supernet", "--epochs", "1", "--batch-size", "256", "--random-subnets", "0", "--device", "cpu"]
    first = run(*args, "--results", str(tmp_path / "r"))
    assert first.returncode == 0, first.stderr
    assert "largest  subnet: " in first.stdout and "smallest subnet: " in first.stdout
    (checkpoint,) = (tmp_path / "r" / "supernets").glob("mobilenetv3_compact-digits-*.pt")  # under --results
    assert "trained in" in first.stdout and str(checkpoint) in first.stdout
    second = subprocess.run([sys.executable, "-m", "nas", *args], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "NAS_RESULTS": str(tmp_path / "r")})  # the same root from the env
    assert second.returncode == 0 and "reused finished checkpoint" in second.stdout, second.stderr
    bad = run("train-supernet", "--space", "nope.yaml", "--out", str(tmp_path / "x.pt"))
    assert bad.returncode == 2 and bad.stderr == "error: nope.yaml: no such file\n"
    (tmp_path / "broken.pt").write_bytes(b"garbage")
    broken = run(*args, "--out", str(tmp_path / "broken.pt"))
    assert broken.returncode == 2 and broken.stderr.startswith("error: ") and broken.stderr.count("\n") == 1
    lr = run("train-supernet", "--lr", "0", "--out", str(tmp_path / "y.pt"))
    assert lr.returncode == 2 and lr.stderr == "error: --lr: 0.0 must be positive\n"  # TrainSettings' field, as a flag
