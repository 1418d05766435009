"""Stand-alone training of any spec from scratch (or fine-tuning torchvision's MobileNetV3), and
verification of a search: does the supernet's proxy accuracy rank architectures as real training does?
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from scipy.stats import kendalltau, spearmanr
from torch import nn

from nas._schema import SpecError, digest, results_root, to_data, write_json_atomic
from nas.data import DataSplit, check_classes
from nas.distributed import world
from nas.latency import Fingerprint, Measurement, measure
from nas.model import Network, build_model
from nas.spec import NetworkSpec, builtin_spec_names, load_spec
from nas.train import Step, TrainSettings, evaluate, fit, precise_bn

TORCHVISION_SPECS = {"mobilenet_v3_large": "MobileNet_V3_Large_Weights",
                     "mobilenet_v3_small": "MobileNet_V3_Small_Weights"}


@dataclass
class Trained:
    spec: NetworkSpec
    model: Network
    val_accuracy: float
    latency: Measurement
    history: list[dict[str, float]]
    checkpoint: Path
    reused: bool

    def metrics(self, source: str, dataset: str, settings: TrainSettings, init: str | None) -> dict[str, Any]:
        return {"spec": source, "dataset": dataset, "init": init, "settings": to_data(settings),
                "val_accuracy": self.val_accuracy, "latency": dataclasses.asdict(self.latency),
                "params": sum(p.numel() for p in self.model.parameters()), "history": self.history,
                "checkpoint": str(self.checkpoint)}

    def save_metrics(self, path: str | os.PathLike[str], source: str, dataset: str, settings: TrainSettings,
                     init: str | None) -> Path:
        write_json_atomic(self.metrics(source, dataset, settings, init), path)
        return Path(path)


def metrics_path(source: str, data: DataSplit, results: str | os.PathLike[str] | None = None) -> Path:
    """Where ``nas train SOURCE`` writes its metrics: beside a spec file, or under ``<results>/train`` for a
    built-in spec."""
    if source in builtin_spec_names() and not Path(source).exists():
        return results_root(results) / "train" / f"{source}.{data.key()}.metrics.json"
    return Path(source).parent / f"{Path(source).stem}.{data.key()}.metrics.json"


def _torchvision_init(spec: NetworkSpec, model: Network, num_classes: int) -> list[nn.Parameter]:
    """Load torchvision's ImageNet weights (from the local torch hub cache) and train only a new last layer."""
    import torchvision

    arch = spec.without_metadata()
    matches = [name for name in TORCHVISION_SPECS
               if load_spec(name) == dataclasses.replace(arch, num_classes=1000)]
    if not matches:
        raise SpecError("init", "torchvision weights exist only for the mobilenet_v3_large and mobilenet_v3_small "
                                  "specs (any number of classes)")
    weights = getattr(torchvision.models, TORCHVISION_SPECS[matches[0]]).IMAGENET1K_V1
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if not path.exists():
        raise SpecError("init", f"pretrained weights not found at {path}; download {weights.url} there "
                                  "(this machine has no network)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    full = build_model(dataclasses.replace(spec, num_classes=1000))
    full.load_state_dict(state, strict=True)
    model.load_state_dict({k: v for k, v in full.state_dict().items() if not k.startswith("classifier.3.")},
                          strict=False)
    for name, p in model.named_parameters():  # transfer learning: frozen features, new classifier head
        p.requires_grad = name.startswith("classifier.")
    return [p for p in model.parameters() if p.requires_grad]


def classification_step(settings: TrainSettings) -> Step:
    """A stand-alone network's objective for ``fit``: cross-entropy on the labels, smoothed as ``settings`` say."""

    def step(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = net(x)
        loss = F.cross_entropy(logits, y, label_smoothing=settings.label_smoothing)
        return loss, loss, logits

    return step


def train_network(spec: NetworkSpec, data: DataSplit, settings: TrainSettings, *, checkpoint: Path,
                  device: torch.device | str = "cpu", init: str | None = None, progress: bool = True,
                  measure_latency: bool = True, timing: Fingerprint | None = None) -> Trained:
    """Train ``nas.build_model(spec)`` on ``data`` (resumable through ``checkpoint``) and evaluate it; its latency is
    measured as ``timing``'s latency table was (device, threads, batch, runtime; default: ``nas.latency.measure``'s
    defaults)."""
    check_classes(spec, data)
    if spec.input.resolution != data.resolution:
        raise SpecError("dataset", f"was loaded at {data.resolution}px, the spec takes {spec.input.resolution}px")
    device = torch.device(device)
    torch.manual_seed(settings.seed)
    model = build_model(spec)
    params = _torchvision_init(spec, model, data.num_classes) if init == "torchvision" else None

    meta = {"spec": to_data(spec.without_metadata()), "data": data.key(), "init": init,
            "settings": to_data(settings)}
    history, reused = fit(model, data, settings, classification_step(settings), path=checkpoint, meta=meta,
                          device=device, progress=progress, desc=f"training {len(spec.blocks)}-block network",
                          params=params)
    nan = float("nan")
    unmeasured = Measurement(nan, nan, nan, 0, "cpu", torch.get_num_threads(), 1)
    if not world().main:  # under torchrun the main process evaluates and measures, undisturbed by the others
        return Trained(spec, model.eval(), nan, unmeasured, history, checkpoint, reused)
    precise_bn(model, data, device)
    acc = evaluate(model, data, device=device).accuracy
    latency = measure(spec, **(timing.timing if timing else {})) if measure_latency else unmeasured
    return Trained(spec, model.eval(), acc, latency, history, checkpoint, reused)


def checkpoint_for(spec: NetworkSpec, data: DataSplit, settings: TrainSettings, init: str | None,
                   root: str | os.PathLike[str]) -> Path:
    return Path(root) / f"net-{data.key()}-{digest(spec.without_metadata(), data.key(), settings, init)}.pt"


def rank_agreement(proxy: list[float], standalone: list[float]) -> tuple[float, float]:
    """Kendall's tau and Spearman's rho between proxy and stand-alone accuracies."""
    if len(proxy) < 2:
        raise SpecError("top", "rank agreement needs at least two architectures")
    return float(kendalltau(proxy, standalone).statistic), float(spearmanr(proxy, standalone).statistic)
