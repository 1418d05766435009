"""``nas deploy``: a found network leaves with its weights, as ONNX (optionally int8), an ExecuTorch program
(XNNPACK), TorchScript, a torch.export program or a state dict, with a manifest saying how to feed it, what it
scores and how fast it runs.

Every export is checked before it is written: the file is loaded back in its runtime and its logits compared
with PyTorch's on real validation images (max abs difference at most ``TOLERANCE``, identical top-1), or the
deploy fails and writes nothing.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from torch import nn

from nas._schema import SpecError, ensure_writable, results_root, to_data, write_json_atomic
from nas.data import MEAN, STD, DataSplit, load_for
from nas.latency import Measurement, num_threads, time_call
from nas.model import Network, build_model
from nas.runtime import INPUT, pte_method, quantize_int8, require, session, to_onnx, to_pte
from nas.spec import NetworkSpec, save_spec
from nas.supernet import Supernet, recalibrate_bn
from nas.train import calibration_batches, load_checkpoint, precise_bn

FORMATS = ("onnx", "executorch", "torchscript", "exported", "state_dict")
MODEL_FILES = {"onnx": "model.onnx", "executorch": "model.pte", "torchscript": "model.torchscript.pt",
               "exported": "model.pt2", "state_dict": "model.state_dict.pt"}
RUNTIME_OF = {"onnx": "onnxruntime", "executorch": "executorch", "torchscript": "torchscript",
              "exported": "torch.export", "state_dict": "torch"}
TOLERANCE = 1e-4  # max abs difference of logits between PyTorch and the exported file
CHECK_IMAGES = 1000  # validation images the check compares on
BATCH = 250


@dataclass(frozen=True)
class Weights:
    """A trained network and where its weights came from (for the manifest)."""

    spec: NetworkSpec
    model: Network
    data: DataSplit
    origin: dict[str, Any]


def from_checkpoint(spec: NetworkSpec, path: str | os.PathLike[str], dataset: str, *,
                    data_dir: str | os.PathLike[str] = "data") -> Weights:
    """The network of a ``nas train`` checkpoint, its BN statistics re-estimated as ``nas train`` does."""
    path = Path(path)
    ckpt = load_checkpoint(path)
    meta = ckpt["meta"]
    if "spec" not in meta:
        raise SpecError("weights", "is a supernet checkpoint; use --weights supernet --study NAME", source=str(path))
    trained_for = meta["spec"]  # the architecture with the class count of the data it was trained on
    if to_data(dataclasses.replace(spec.without_metadata(), num_classes=trained_for["num_classes"])) != trained_for:
        raise SpecError("weights", "was trained for another architecture than this spec", source=str(path))
    spec, data = load_for(spec, dataset, seed=meta["settings"]["seed"], data_dir=data_dir)
    if meta["data"] != data.key():
        raise SpecError("dataset", f"{dataset!r} gives data {data.key()}, but the checkpoint was trained on "
                                   f"{meta['data']}")
    model = build_model(spec)
    model.load_state_dict(ckpt["model"])
    precise_bn(model, data)
    return Weights(spec, model.eval(), data, {"kind": "nas train checkpoint", "path": str(path),
                                              "epochs": ckpt["epoch"], "settings": meta["settings"]})


def ranked_spec(study: optuna.Study, rank: int) -> NetworkSpec:
    """The study's ``rank``-th Pareto architecture (``nas report``'s ranking), with its metadata."""
    from nas.report import build_report

    pareto = build_report(study, measure_latency=False).pareto
    if not 1 <= rank <= len(pareto):
        raise SpecError("rank", f"{rank}: study {study.study_name!r} ranks {len(pareto)} Pareto architectures")
    return pareto[rank - 1].spec


def from_study(study_name: str, *, spec: NetworkSpec | None = None, rank: int | None = None,
               storage: str | None = None, results: str | os.PathLike[str] | None = None) -> Weights:
    """A member of a study's space with the weights it inherits from the study's supernet, BN recalibrated on the
    images the search used; ``rank`` picks the study's K-th Pareto architecture (:func:`ranked_spec`)."""
    from nas.space import load_space
    from nas.study import load_study
    from nas.train import checkpoint_path

    study, record = load_study(study_name, storage, results)
    if rank is not None:
        spec = ranked_spec(study, rank)
    if spec is None:
        raise SpecError("spec", "give a spec, or --rank K to take the study's K-th architecture")
    c = record.config
    space, data = load_for(load_space(c.space), c.dataset, seed=c.seed, data_dir=c.data_dir)
    path = checkpoint_path(space, data, c.supernet_settings, root=results_root(results) / "supernets")
    if not path.exists():
        raise SpecError("weights", f"study {study_name!r} has no supernet checkpoint at {path}")
    ckpt = load_checkpoint(path)
    if ckpt["epoch"] < c.supernet_settings.epochs:
        raise SpecError("weights", f"the supernet at {path} is unfinished ({ckpt['epoch']} of "
                                   f"{c.supernet_settings.epochs} epochs)")
    supernet = Supernet(space)
    supernet.load_state_dict(ckpt["model"])
    model = supernet.extract(spec)  # a SpecError naming the choice when the spec is not a member of the space
    recalibrate_bn(model, calibration_batches(data, batches=record.calibration_batches))  # as the search scored it
    return Weights(spec, model.eval(), data, {"kind": "supernet", "study": study_name, "path": str(path),
                                              "epochs": ckpt["epoch"], "rank": rank})


@dataclass(frozen=True)
class Check:
    """An exported file against PyTorch on the first ``images`` validation images."""

    max_abs_diff: float
    top1_agreement: float
    images: int

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= TOLERANCE and self.top1_agreement == 1.0


Predict = Callable[[torch.Tensor], np.ndarray]  # a batch of normalised images -> logits


def _logits(predict: Predict, data: DataSplit) -> np.ndarray:
    """``predict``'s logits for the whole validation split, in order."""
    return np.concatenate([predict(x) for x, _ in data.batches("val", BATCH, shuffle=False)])


def compare(reference: np.ndarray, candidate: np.ndarray, images: int = CHECK_IMAGES) -> Check:
    """Two models' logits on the first ``images`` validation images."""
    a, b = reference[:images], candidate[:images]
    return Check(float(np.abs(a - b).max()), float((a.argmax(1) == b.argmax(1)).mean()), len(a))


def _top1(logits: np.ndarray, data: DataSplit) -> float:
    return float((logits.argmax(1) == data.val.tensors[1].numpy()).mean())


def _torch_predict(module: nn.Module | Callable[[torch.Tensor], torch.Tensor]) -> Predict:
    def predict(x: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return module(x).float().numpy()
    return predict


def _onnx_predict(model: bytes | Path, threads: int | None) -> Predict:
    sess = session(model, threads)
    return lambda x: sess.run(None, {INPUT: x.numpy()})[0]


def _pte_predict(program: Path, threads: int | None) -> Predict:
    method = pte_method(program, threads)
    # The program has batch 1, as a phone runs it: a batch is fed image by image.
    return lambda x: np.concatenate([method.execute([image[None]])[0].numpy() for image in x])


def _latency(predict: Predict, example: torch.Tensor, runtime: str, threads: int | None, repeats: int
             ) -> Measurement:
    with num_threads(threads) as n:
        times = time_call(lambda: predict(example), torch.device("cpu"), warmup=10, repeats=repeats)
    return Measurement.of(times, "cpu", n, len(example), runtime)


def _write(fmt: str, model: Network, example: torch.Tensor, path: Path, threads: int | None) -> Predict:
    """Write ``model`` in ``fmt`` to ``path`` and return the file, loaded back, as a predictor (an onnxruntime
    session or an ExecuTorch method with ``threads``)."""
    if fmt == "onnx":
        path.write_bytes(to_onnx(model, example))
        return _onnx_predict(path, threads)
    if fmt == "executorch":
        path.write_bytes(to_pte(model, example))
        return _pte_predict(path, threads)
    if fmt == "torchscript":
        with warnings.catch_warnings():  # deprecated in torch 2.14, still what C++/mobile torch loads
            warnings.simplefilter("ignore")
            torch.jit.save(torch.jit.trace(model, example), str(path))
            return _torch_predict(torch.jit.load(str(path)))
    if fmt == "exported":
        batch = torch.export.Dim("batch", min=1, max=4096)
        program = torch.export.export(model, (example.expand(2, -1, -1, -1).clone(),), dynamic_shapes=({0: batch},))
        torch.export.save(program, str(path))
        return _torch_predict(torch.export.load(str(path)).module())
    torch.save(model.state_dict(), path)
    rebuilt = build_model(model.spec)
    rebuilt.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return _torch_predict(rebuilt.eval())


def deploy(weights: Weights, out: str | os.PathLike[str], *, fmt: str = "onnx", quantize: str | None = None,
           threads: int | None = None, calibration_images: int = 512, repeats: int = 50,
           progress: bool = True) -> dict[str, Any]:
    """Write ``weights`` to the folder ``out`` (replaced) as ``fmt``: the model file, ``spec.yaml`` and
    ``manifest.json``, which is returned. ``quantize="int8"`` (onnx only) adds ``model.int8.onnx``, calibrated on
    ``calibration_images`` training images. Latency is measured in the target runtime on this machine at batch 1
    with ``threads`` (default torch's)."""
    if fmt not in FORMATS:
        raise SpecError("format", f"{fmt!r} is not one of {', '.join(FORMATS)}")
    if quantize not in (None, "int8"):
        raise SpecError("quantize", f"{quantize!r}: only int8 is supported")
    if quantize and fmt != "onnx":
        raise SpecError("quantize", "int8 quantisation is onnxruntime's: use it with --format onnx")
    if calibration_images < 1:
        raise SpecError("calibration_images", f"{calibration_images} must be positive")
    if fmt in ("onnx", "executorch"):  # before any work: the runtime that checks the file is installed
        require("format", RUNTIME_OF[fmt])
    out = Path(out)
    ensure_writable(out.parent, "deploy folder")
    say = print if progress else (lambda *_a, **_k: None)
    spec, model, data = weights.spec, weights.model.eval(), weights.data
    r = spec.input.resolution
    example = next(data.batches("val", 1, shuffle=False))[0]
    reference = _logits(_torch_predict(model), data)
    manifest: dict[str, Any] = {
        "format": fmt, "model": MODEL_FILES[fmt], "spec": "spec.yaml",
        "input": {"name": INPUT, "shape": [1, spec.input.channels, r, r], "dtype": "float32", "layout": "NCHW",
                  "resize": f"{r}x{r}", "scale": "pixel values / 255", "mean": list(MEAN), "std": list(STD),
                  "normalise": "(x - mean) / std per channel, after scaling"},
        "output": {"name": "logits", "shape": [1, data.num_classes]},
        "classes": list(data.classes), "dataset": data.name, "weights": weights.origin}
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))  # renamed into place once all is written
    try:
        say(f"exporting {fmt} and checking it against PyTorch on {min(CHECK_IMAGES, len(data.val))} validation "
            "images")
        predict = _write(fmt, model, example, tmp / MODEL_FILES[fmt], threads)
        logits = _logits(predict, data)
        check = compare(reference, logits)
        manifest["check"] = {**dataclasses.asdict(check), "tolerance": TOLERANCE, "passed": check.passed}
        if not check.passed:
            raise SpecError("format", f"the {fmt} export disagrees with PyTorch on {check.images} validation images: "
                                      f"max abs logit difference {check.max_abs_diff:.2e} (limit {TOLERANCE:.0e}), "
                                      f"top-1 agreement {check.top1_agreement:.2%}")
        say(f"accuracy and latency in {RUNTIME_OF[fmt]}")
        manifest["accuracy"] = {"top1": _top1(logits, data), "pytorch_top1": _top1(reference, data),
                                "images": len(data.val), "split": "validation"}
        manifest["latency"] = dataclasses.asdict(_latency(predict, example, RUNTIME_OF[fmt], threads, repeats))
        if quantize:
            say(f"int8: calibrating on {calibration_images} training images")
            manifest["quantization"] = _int8(tmp, data, example, logits, calibration_images, threads, repeats,
                                             manifest)
        save_spec(spec, tmp / "spec.yaml")
        write_json_atomic(manifest, tmp / "manifest.json")
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _int8(folder: Path, data: DataSplit, example: torch.Tensor, fp32_logits: np.ndarray, images: int,
          threads: int | None, repeats: int, manifest: dict[str, Any]) -> dict[str, Any]:
    batches = [x.numpy() for x in calibration_batches(data, batches=-(-images // 64), batch_size=64)]
    calibration = np.concatenate(batches)[:images]
    fp32 = (folder / MODEL_FILES["onnx"]).read_bytes()
    (folder / "model.int8.onnx").write_bytes(quantize_int8(fp32, np.split(calibration, range(64, len(calibration),
                                                                                              64))))
    int8 = _onnx_predict(folder / "model.int8.onnx", threads)
    logits = _logits(int8, data)
    latency = _latency(int8, example, "onnxruntime-int8", threads, repeats)
    return {"model": "model.int8.onnx", "method": "onnxruntime quantize_static: QDQ, per-channel int8 weights, "
            "uint8 activations, MinMax calibration", "calibration_images": len(calibration),
            "top1": _top1(logits, data), "top1_fp32": manifest["accuracy"]["top1"],
            "top1_agreement_with_fp32": compare(fp32_logits, logits, images=len(logits)).top1_agreement,
            "latency": dataclasses.asdict(latency), "latency_fp32": manifest["latency"]}
