"""``nas deploy`` and the runtimes: exports checked against PyTorch, int8, manifests, runtime-aware latency tables."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import optuna
import pytest
import torch
from PIL import Image

import nas
from nas.data import load_for
from nas.deploy import deploy, from_checkpoint
from nas.latency import load_predictor, measure
from nas.runtime import PARALLEL_MIN, Compiled, prepare_all
from nas.space import load_space
from nas.standalone import checkpoint_for, train_network
from nas.study import StudyRecord, open_storage
from nas.train import TrainSettings

TINY = str(Path(__file__).with_name("tiny_space.yaml"))
SETTINGS = TrainSettings(epochs=1, batch_size=64, lr=0.1, random_subnets=0)


def nas_cmd(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nas", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=env)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A compact network trained for one epoch on digits: (working folder, its checkpoint)."""
    work = tmp_path_factory.mktemp("deploy")
    spec, data = load_for(nas.load_spec("mobilenet_v3_compact"), "digits", seed=SETTINGS.seed)
    ckpt = checkpoint_for(spec, data, SETTINGS, None, work / "train")
    train_network(spec, data, SETTINGS, checkpoint=ckpt, progress=False, measure_latency=False)
    return work, ckpt


def test_onnx_deploy_is_checked_quantised_and_described(trained: tuple[Path, Path]) -> None:
    work, ckpt = trained
    r = nas_cmd("deploy", "mobilenet_v3_compact", "--weights", str(ckpt), "--format", "onnx", "--quantize", "int8",
                "--calibration-images", "128", "--out", "out", cwd=work)
    assert r.returncode == 0, r.stderr
    out = work / "out"
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.int8.onnx", "model.onnx", "spec.yaml"]
    m = json.loads((out / "manifest.json").read_text())
    assert m["check"]["passed"] and m["check"]["max_abs_diff"] <= 1e-4 and m["check"]["top1_agreement"] == 1.0
    assert m["input"]["shape"] == [1, 3, 32, 32] and m["classes"] == [str(i) for i in range(10)]
    assert m["weights"]["kind"] == "nas train checkpoint" and m["latency"]["runtime"] == "onnxruntime"
    assert m["quantization"]["calibration_images"] == 128 and m["quantization"]["latency"]["runtime"] == \
        "onnxruntime-int8"
    assert nas.load_spec(out / "spec.yaml") == nas.load_spec("mobilenet_v3_compact").with_metadata()  # 10 classes

    # Independently of deploy's own check: the file, fed as the manifest says, gives PyTorch's logits.
    spec, data = load_for(nas.load_spec("mobilenet_v3_compact"), "digits", seed=0)
    model = from_checkpoint(spec, ckpt, "digits").model
    x, _ = next(data.batches("val", 64, shuffle=False))
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {m["input"]["name"]: x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), atol=1e-4)
    # int8 ran on real images: its accuracy is a real figure near fp32's (a 1-epoch net; no bound asserted here).
    q = m["quantization"]
    assert 0 <= q["top1"] <= 1 and q["top1_fp32"] == m["accuracy"]["top1"]


@pytest.mark.parametrize("fmt", ["torchscript", "exported", "state_dict"])
def test_other_formats_load_back_and_match(trained: tuple[Path, Path], fmt: str) -> None:
    work, ckpt = trained
    spec, data = load_for(nas.load_spec("mobilenet_v3_compact"), "digits", seed=0)
    weights = from_checkpoint(spec, ckpt, "digits")
    m = deploy(weights, work / fmt, fmt=fmt, repeats=5, progress=False)
    x, _ = next(data.batches("val", 16, shuffle=False))
    path = work / fmt / m["model"]
    if fmt == "torchscript":
        loaded = torch.jit.load(str(path))
    elif fmt == "exported":
        loaded = torch.export.load(str(path)).module()
    else:
        loaded = nas.build_model(nas.load_spec(work / fmt / "spec.yaml")).eval()
        loaded.load_state_dict(torch.load(path, weights_only=True))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), weights.model(x), atol=1e-5, rtol=0)
    assert m["check"]["passed"] and m["accuracy"]["top1"] == m["accuracy"]["pytorch_top1"]


def test_executorch_program_loads_back_in_executorch_and_matches(trained: tuple[Path, Path]) -> None:
    from executorch.runtime import Runtime

    work, ckpt = trained
    spec, data = load_for(nas.load_spec("mobilenet_v3_compact"), "digits", seed=0)
    weights = from_checkpoint(spec, ckpt, "digits")
    m = deploy(weights, work / "pte", fmt="executorch", repeats=5, progress=False)
    assert m["model"] == "model.pte" and m["latency"]["runtime"] == "executorch" and m["check"]["passed"]
    # Checked independently: the file opened with ExecuTorch's own runtime, image by image (the program is batch 1).
    method = Runtime.get().load_program(work / "pte" / "model.pte").load_method("forward")
    x, _ = next(data.batches("val", 8, shuffle=False))
    got = torch.cat([method.execute([image[None]])[0] for image in x])
    with torch.no_grad():
        torch.testing.assert_close(got, weights.model(x), atol=1e-4, rtol=0)


def test_a_failed_check_fails_and_writes_nothing(trained: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    work, ckpt = trained
    monkeypatch.setattr("nas.deploy.TOLERANCE", -1.0)  # no export can meet it
    spec = nas.load_spec("mobilenet_v3_compact")
    with pytest.raises(nas.SpecError, match="disagrees with PyTorch"):
        deploy(from_checkpoint(spec, ckpt, "digits"), work / "never", fmt="state_dict", progress=False)
    assert not (work / "never").exists() and not list(work.glob(".never.*"))


def test_bad_deploy_input_is_one_line(trained: tuple[Path, Path]) -> None:
    work, ckpt = trained
    cases = {
        ("mobilenet_v3_compact", "--weights", str(ckpt), "--format", "torchscript", "--quantize", "int8"):
            "--quantize: int8 quantisation is onnxruntime's",
        ("mobilenet_v3_small", "--weights", str(ckpt)): "another architecture",
        ("mobilenet_v3_compact", "--weights", "supernet"): "--study: is needed",
        ("mobilenet_v3_compact", "--weights", str(work / "nope.pt")): "no such supernet checkpoint",
        ("mobilenet_v3_compact", "--weights", str(ckpt), "--dataset", f"folder:{work / 'images'}"):
            "but the checkpoint was trained on digits",
    }
    for c in ("cat", "dog"):  # a real two-class image folder, so only the data set differs from the checkpoint's
        (work / "images" / c).mkdir(parents=True, exist_ok=True)
        for i in range(3):
            Image.new("RGB", (40, 40), (i * 80, 20, 200)).save(work / "images" / c / f"{i}.png")
    for args, message in cases.items():
        r = nas_cmd("deploy", *args, "--out", "bad", cwd=work)
        errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]  # beside a decoding bar
        assert r.returncode == 2 and len(errors) == 1 and message in errors[0], (args, r.stderr)
    # Without the deploy extra: one line naming the pip command.
    code = ("import sys; sys.modules['onnxruntime'] = None; from nas.cli import main; "
            f"sys.exit(main(['deploy', 'mobilenet_v3_compact', '--weights', {str(ckpt)!r}, '--out', 'x']))")
    r = subprocess.run([sys.executable, "-c", code], cwd=work, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "pip install 'nas[deploy]'" in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    code = ("import sys; sys.modules['executorch'] = None; from nas.cli import main; "
            f"sys.exit(main(['deploy', 'mobilenet_v3_compact', '--weights', {str(ckpt)!r}, '--out', 'x', "
            "'--format', 'executorch']))")
    r = subprocess.run([sys.executable, "-c", code], cwd=work, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "pip install 'nas[executorch]'" in r.stderr and len(r.stderr.splitlines()) == 1, \
        r.stderr


def test_search_under_onnxruntime_latency_then_deploy_the_top_pick_from_the_supernet(tmp_path: Path) -> None:
    r = nas_cmd("search", "--space", TINY, "--budget", "6", "--supernet-epochs", "1", "--device", "cpu",
                "--runtime", "onnxruntime", "--latency-ms", "1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    study = optuna.load_study(study_name="tiny_space-digits",
                              storage=open_storage(f"sqlite:///{tmp_path / 'results/tiny_space-digits/study.db'}"))
    record = StudyRecord.load(study)
    assert record.fingerprint.runtime == "onnxruntime"
    table = next((tmp_path / "results/latency").glob("tiny-cpu-onnxruntime-*.json"))
    assert json.loads(table.read_text())["fingerprint"]["runtime"] == "onnxruntime"

    r = nas_cmd("deploy", "--weights", "supernet", "--study", "tiny_space-digits", "--rank", "1", "--out", "top",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "top/manifest.json").read_text())
    top = max((t for t in study.best_trials if "duplicate_of" not in t.user_attrs),
              key=lambda t: (t.values[0], -t.values[1]))
    assert m["weights"]["kind"] == "supernet" and m["weights"]["rank"] == 1
    assert nas.load_spec(tmp_path / "top/spec.yaml").metadata["trial"] == top.number
    # The deployed network scores what the search's proxy scored (the same weights and BN recalibration).
    assert abs(m["accuracy"]["top1"] - top.values[0]) <= 0.01
    r = nas_cmd("deploy", "--weights", "supernet", "--study", "tiny_space-digits", "--rank", "99", "--out", "x",
                cwd=tmp_path)
    assert r.returncode == 2 and "--rank: 99" in r.stderr


@pytest.mark.parametrize("runtime", ["onnxruntime", "onnxruntime-int8"])
def test_runtime_latency_tables_are_measured_in_that_runtime(tmp_path: Path, runtime: str) -> None:
    space = load_space(TINY)
    predictor = load_predictor(space, runtime=runtime, root=tmp_path, progress=False)
    assert predictor.fingerprint.runtime == runtime and runtime in predictor.path.name
    assert all(ms > 0 for ms in predictor.table.values())
    assert predictor.predict(space.largest()) > predictor.predict(space.smallest())
    # A second load reads the table; the torch table is another file.
    again = load_predictor(space, runtime=runtime, root=tmp_path)
    assert again == dataclasses.replace(predictor, path=again.path)  # every field, the fitted terms included
    assert not load_predictor(space, root=tmp_path, progress=False).path.samefile(predictor.path)
    assert measure(space.smallest(), runtime=runtime, repeats=5).runtime == runtime




def test_many_executorch_programs_lower_in_worker_processes_as_they_would_here() -> None:
    # A table lowers hundreds of layers: in a pool of worker processes, each program must come back as this process
    # would have lowered it, in order, the same network standing at several places prepared once.
    torch.manual_seed(0)
    modules = [torch.nn.Conv2d(4, 4 + i % 3, 3, padding=1) for i in range(PARALLEL_MIN)]
    calls = [Compiled(m, torch.randn(1, 4, 8, 8), "executorch", threads=1) for m in modules]
    calls.append(calls[0])
    ticks: list[int] = []
    prepare_all(calls, lambda: ticks.append(1), workers=2)
    assert len(ticks) == len(calls) and all(c._model is not None and c.module is None for c in calls)
    for m, c in zip(modules, calls, strict=False):
        assert torch.allclose(c.runner()()[0], m(c.example), atol=1e-5)
    with pytest.raises(nas.SpecError, match="runs on the CPU"):
        Compiled(modules[0], torch.randn(1, 4, 8, 8, device="meta"), "executorch")


def test_executorch_table_search_and_deploy_on_a_micro_space(tmp_path: Path) -> None:
    # ExecuTorch lowers each layer in 1-2 s, so this uses a space of a few layers, its members far apart. At this
    # scale a graph's call (7-10 us) is much of each layer, so the fit is no guide; the built-in spaces' fits are
    # benchmarked (tests/benchmarks/bench_deploy.py).
    path = tmp_path / "micro.yaml"
    path.write_text("""format_version: 1
name: micro
input: {resolution: 64, channels: 3}
num_classes: 4
stem: {out_channels: 8, kernel: 3, stride: 2, activation: hswish}
stages:
- {depth: [1], width: [8, 32], stride: 1, kernel: [3], expand_ratio: [2, 6], se: [false], activation: [relu]}
last_conv: {out_channels: [32, 48], activation: hswish}
classifier: {hidden: [32], activation: hswish, dropout: 0.0}
""")
    space = load_space(str(path))
    r = nas_cmd("latency", "build", "--space", str(path), "--runtime", "executorch", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    predictor = load_predictor(space, runtime="executorch", root=tmp_path / "results/latency")
    assert predictor.fingerprint.runtime == "executorch" and "-executorch-" in predictor.path.name
    assert all(ms > 0 for ms in predictor.table.values())
    assert predictor.layer_sum(space.largest()) > predictor.layer_sum(space.smallest())
    assert measure(space.smallest(), runtime="executorch", repeats=5).runtime == "executorch"
    # The search finds the table it needs, and its top pick leaves as a checked ExecuTorch program.
    r = nas_cmd("search", "--space", str(path), "--budget", "3", "--supernet-epochs", "1", "--device", "cpu",
                "--runtime", "executorch", "--latency-ms", "1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = nas_cmd("deploy", "--weights", "supernet", "--study", "micro-digits", "--rank", "1", "--format", "executorch",
                "--out", "top", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "top/manifest.json").read_text())
    assert m["model"] == "model.pte" and m["check"]["passed"] and m["latency"]["runtime"] == "executorch"
