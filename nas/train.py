"""Supernet training: the sandwich rule with in-place distillation (BigNAS sec. 3.1, OFA), resumable.

Each step trains the largest subnet on the labels, then the smallest and ``random_subnets`` random ones
(or, with ``sampling="fair"``, ``random_subnets + 1`` members drawn fairly: :func:`fair_members`)
on the largest's soft predictions (their soft cross-entropy, or with ``distillation="alpha"``
:func:`alpha_divergence`; with ``distillation="none"``, on the labels instead), accumulating gradients
into one optimiser step. Checkpoints are written atomically after every epoch and loaded with
``weights_only=True``; rerunning the same command resumes from the last one, and a finished checkpoint
is reused as a cache.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from nas._schema import SpecError, check_choices, digest, ensure_writable, results_root, to_data, write_atomic
from nas.data import DataSplit, check_classes
from nas.distributed import all_sum, join
from nas.model import channels_last
from nas.space import SearchSpace
from nas.spec import NetworkSpec
from nas.supernet import Supernet, recalibrate_bn

CHECKPOINT_VERSION = 1
CALIBRATION_BATCH = 128  # images per batch of BN recalibration
CALIBRATION_SEED = 12345  # which training images: the same set for every subnet scored


def proxy_calibration_batches(proxy_images: int) -> int:
    """Batches of training images the search's proxy re-estimates each subnet's BN statistics on, for a proxy that
    scores ``proxy_images`` validation images: one per five batches scored, at least one.

    Which images calibrate moves a subnet's proxy accuracy. On CIFAR-10's 10,000 validation images it moved by
    0.20-0.33 points per network with one batch, 0.14-0.19 with 4 and 0.08-0.15 with 16, against 0.7-1.9 points
    between the networks ranked (tests/benchmarks/bench_verify.py --calibration; results/BENCHMARKS.md). At a fifth
    of the images scored, a trial took 1.09-1.32x as long as with one batch; digits (359 images) keep one batch.
    """
    return max(1, round(proxy_images / (5 * CALIBRATION_BATCH)))


@dataclass(frozen=True)
class TrainSettings:
    # Defaults: the digits run that meets the accuracy goals in about a minute on 2 cores
    # (tests/benchmarks/bench_supernet.py digits; results/BENCHMARKS.md).
    epochs: int = field(default=5, metadata={"help": "training epochs"})
    batch_size: int = field(default=32, metadata={"help": "images per step"})
    lr: float = field(default=0.1, metadata={"help": "peak SGD learning rate, cosine decay"})
    weight_decay: float = field(default=5e-5, metadata={"help": "SGD weight decay (not on BN and biases)"})
    random_subnets: int = field(default=1, metadata={
        "help": "random subnets per step besides the largest and smallest (sandwich rule; with sampling fair, "
                "one fewer than the fair members a step)"})
    sampling: Literal["sandwich", "fair"] = field(default="sandwich", metadata={
        "omit_default": True,
        "help": "the subnets each step trains besides the largest: sandwich (the smallest and random_subnets random "
                "ones) or fair (random_subnets + 1 members that take each decision's options in turn, FairNAS)"})
    distillation: Literal["kl", "alpha", "none"] = field(default="kl", metadata={
        "omit_default": True,
        "help": "what the subnets besides the largest learn from: the largest's predictions, by kl (their soft "
                "cross-entropy) or alpha (AlphaNet's adaptive alpha-divergence, which also penalises a subnet's "
                "overconfidence), or none: the labels, as the largest does"})
    augment: bool | None = field(default=None, metadata={
        "help": "random crop and horizontal flip of training images, on the training device (default: on for "
                "natural images, off for digits)"})
    label_smoothing: float = field(default=0.0, metadata={
        "help": "label smoothing of the loss on the labels (the largest subnet's, in a supernet)"})
    seed: int = field(default=0, metadata={"help": "seeds data order, augmentation, subnet sampling and "
                                                   "initialisation"})

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise SpecError(name, f"{getattr(self, name)} must be positive")
        if not self.lr > 0:
            raise SpecError("lr", f"{self.lr} must be positive")
        if not self.weight_decay >= 0:
            raise SpecError("weight_decay", f"{self.weight_decay} must be zero or more")
        if self.random_subnets < 0:
            raise SpecError("random_subnets", f"{self.random_subnets} must be zero or more")
        check_choices(self)
        if not 0 <= self.label_smoothing < 1:
            raise SpecError("label_smoothing", f"{self.label_smoothing} must be at least 0 and below 1")

    def augments(self, data: DataSplit) -> bool:
        return data.natural if self.augment is None else self.augment


@dataclass
class TrainResult:
    supernet: Supernet
    checkpoint: Path
    history: list[dict[str, float]]  # one row per epoch: loss, train accuracy of the largest, seconds
    reused: bool  # True when a finished checkpoint was loaded instead of training


def checkpoint_path(space: SearchSpace, data: DataSplit, settings: TrainSettings,
                    root: str | os.PathLike[str] | None = None) -> Path:
    """The cache file for this space, data set and training settings (default root: ``<results>/supernets``)."""
    root = results_root() / "supernets" if root is None else Path(root)
    return root / f"{space.name}-{data.key()}-{digest(space, data.key(), settings)}.pt"


def _save_atomic(obj: dict[str, Any], path: Path) -> None:
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SpecError("", "no such supernet checkpoint", source=str(path)) from None
    except Exception as e:  # a truncated or foreign file: pickle, zip and torch each raise their own type
        raise SpecError("", f"not a readable supernet checkpoint ({type(e).__name__})", source=str(path)) from None
    if not isinstance(ckpt, dict) or ckpt.get("version") != CHECKPOINT_VERSION:
        raise SpecError("", "not a supernet checkpoint of this version of nas", source=str(path))
    return ckpt


def _optimizer(model: nn.Module, s: TrainSettings, params: list[nn.Parameter] | None = None) -> torch.optim.Optimizer:
    # No weight decay on BN and biases, as in torchvision's and OFA's recipes.
    params = list(model.parameters()) if params is None else params
    decay = [p for p in params if p.dim() > 1]
    rest = [p for p in params if p.dim() <= 1]
    return torch.optim.SGD([{"params": decay, "weight_decay": s.weight_decay}, {"params": rest, "weight_decay": 0}],
                           lr=s.lr, momentum=0.9, nesterov=True)


# (model, x, y) -> (objective, loss, logits): fit backpropagates the objective once per step and reports the loss.
Step = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def fit(model: nn.Module, data: DataSplit, settings: TrainSettings, step: Step, *, path: Path,
        meta: dict[str, Any], device: torch.device, progress: bool, desc: str,
        rng: random.Random | None = None, params: list[nn.Parameter] | None = None
        ) -> tuple[list[dict[str, float]], bool]:
    """The epoch loop shared by supernet and stand-alone training: SGD with cosine decay, one atomic
    checkpoint per epoch, resume from ``path`` (refused when ``meta`` differs), reuse when finished.

    ``step`` computes a batch's objective through ``model`` (or its DistributedDataParallel wrapper under
    torchrun, which all-reduces the gradients of that one backward); returns (history, reused).
    """
    w, device = join(device)
    if w.main:
        ensure_writable(path.parent, "checkpoint")  # before the first epoch, not after it
    if settings.batch_size % w.size:
        raise SpecError("batch_size", f"{settings.batch_size} is not divisible by the {w.size} processes")
    opt = _optimizer(model, settings, params)
    steps_per_epoch = data.steps(settings.batch_size)
    if steps_per_epoch < 1:
        raise SpecError("batch_size", f"{settings.batch_size} is more than the {len(data.train)} training images")
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=settings.epochs * steps_per_epoch)
    start, history = 0, []
    if path.exists():  # every process resumes from the same file (a shared folder across machines)
        ckpt = load_checkpoint(path)
        if ckpt["meta"] != meta:
            raise SpecError("", "was trained with another network, data set or settings", source=str(path))
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        if rng is not None:
            rng.setstate(_as_random_state(ckpt["rng"]))
        torch.set_rng_state(ckpt["torch_rng"])
        start, history = ckpt["epoch"], ckpt["history"]
    model.to(device)
    _optimizer_to(opt, device)
    if start >= settings.epochs:
        return history, True
    data = data.on(device)
    # Weight sharing leaves no parameter unused: every step's objective includes the largest subnet (or is the
    # whole stand-alone network), so DDP needs no find_unused_parameters and reduces each gradient once.
    net = (nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
           if w.distributed else model)
    bar = tqdm(total=settings.epochs * steps_per_epoch, initial=start * steps_per_epoch,
               disable=not progress or not w.main, desc=desc, unit="step", dynamic_ncols=True)
    for epoch in range(start, settings.epochs):
        model.train()
        batches = data.batches("train", settings.batch_size // w.size, shuffle=True,
                               seed=settings.seed * 1000 + epoch, device=device, augment=settings.augments(data),
                               rank=w.rank, world=w.size)
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss x images, correct, images
        t0 = time.perf_counter()
        for i, (x, y) in enumerate(batches):
            x = channels_last(x)
            opt.zero_grad(set_to_none=True)
            with _autocast(device):
                objective, loss, logits = step(net, x, y)
            objective.backward()
            opt.step()
            sched.step()
            # Summed on the device: reading a value each step would stall a GPU's queue (once per 20 steps here).
            sums += torch.stack([loss.detach().double() * len(y), (logits.argmax(1) == y).sum().double(),
                                 torch.tensor(len(y), dtype=torch.float64, device=device)])
            bar.update()
            if bar.disable is False and (i % 20 == 0 or device.type == "cpu"):
                total_loss, correct, seen = sums.tolist()
                bar.set_postfix(epoch=f"{epoch + 1}/{settings.epochs}", loss=f"{total_loss / seen:.3f}",
                                acc=f"{correct / seen:.3f}")
        total_loss, correct, seen = all_sum(sums.tolist(), device)
        history.append({"epoch": epoch + 1, "loss": total_loss / seen, "train_acc": correct / seen,
                        "seconds": time.perf_counter() - t0})
        if w.main:
            _save_atomic({"version": CHECKPOINT_VERSION, "meta": meta, "epoch": epoch + 1, "history": history,
                          "model": model.state_dict(), "optimizer": opt.state_dict(),
                          "scheduler": sched.state_dict(), "rng": None if rng is None else rng.getstate(),
                          "torch_rng": torch.get_rng_state()}, path)
        if w.distributed:
            dist.barrier()  # a resumed run finds every process's last finished epoch in the file
    bar.close()
    return history, False


def fair_members(space: SearchSpace, rng: random.Random, per_epoch: int) -> Callable[[], NetworkSpec]:
    """Draws of members in which each decision takes its options in turn, in an order shuffled anew each round:
    over any of its rounds every option trains equally often (FairNAS's strict fairness, where decisions have
    different numbers of options and several members train a step). The sandwich rule trains the largest and the
    smallest every step, so an option between them (kernel 5 of 3/5/7) trains a quarter as often as either end.
    Rounds restart with each epoch (every ``per_epoch`` draws), so a resumed run draws as an uninterrupted one:
    ``rng``'s state is checkpointed per epoch, the rounds are not."""
    rounds: dict[str, list[Any]] = {}
    draws = 0

    def pick(name: str, options: Sequence[Any]) -> Any:
        turn = rounds.setdefault(name, [])
        if not turn:
            turn.extend(rng.sample(list(options), len(options)))
        return turn.pop()

    def draw() -> NetworkSpec:
        nonlocal draws
        if draws % per_epoch == 0:
            rounds.clear()
        draws += 1
        return space.build(pick)

    return draw


def alpha_divergence(logits: torch.Tensor, teacher: torch.Tensor, clip: float = 5.0) -> torch.Tensor:
    """AlphaNet's adaptive alpha-divergence (Wang et al., ICML 2021) of a subnet's predictions q (``logits``)
    from the teacher's probabilities p: per image the larger of D_+1 = KL(p||q), whose gradient is the soft
    cross-entropy's, and D_-1 = sum q (q/p - 1) / 2, which is large where the subnet is confident and the teacher
    is not; mean over the batch. The ratio q/p is clipped at ``clip`` (5, as AlphaNet's released loss does) and,
    as there, held as a weight: the gradient is -sum_i q_i (p_i/q_i)^alpha / alpha * grad log q_i. Written here
    because torch has no alpha-divergence loss; computed in float32 (bf16 autocast would round the ratio)."""
    log_q = logits.float().log_softmax(dim=1)
    q = log_q.exp().detach()
    p = teacher.float()
    log_ratio = (p.clamp_min(torch.finfo(torch.float32).tiny).log() - log_q).detach()  # log p/q
    inverse = (-log_ratio).exp().clamp(max=clip)  # (p/q)^-1, clipped
    kl = (p * log_ratio).sum(dim=1)
    chi = (q * (inverse - 1)).sum(dim=1) / 2
    minus = chi > kl  # the larger divergence trains each image
    weight = torch.where(minus[:, None], -q * inverse, p)
    surrogate = -(weight * log_q).sum(dim=1)
    # the value is the divergence, the gradient the surrogate's
    return (torch.where(minus, chi, kl) + surrogate - surrogate.detach()).mean()


def subnet_loss(settings: TrainSettings) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss of a subnet other than the largest, given its logits, the labels and the largest's probabilities:
    ``settings.distillation``'s."""
    if settings.distillation == "none":
        return lambda logits, y, _: F.cross_entropy(logits, y, label_smoothing=settings.label_smoothing)
    distill = alpha_divergence if settings.distillation == "alpha" else F.cross_entropy
    return lambda logits, _, soft: distill(logits, soft)


def train_supernet(space: SearchSpace, data: DataSplit, settings: TrainSettings = TrainSettings(), *,
                   checkpoint: Path | None = None, device: torch.device | str = "cpu",
                   progress: bool = True) -> TrainResult:
    """Train (or resume, or reuse) a supernet of ``space`` on ``data`` (see ``nas.data.load_for``)."""
    check_classes(space, data)
    device = torch.device(device)
    path = checkpoint or checkpoint_path(space, data, settings)
    torch.manual_seed(settings.seed)
    supernet = Supernet(space)
    rng = random.Random(settings.seed)
    largest, smallest = space.largest(), space.smallest()
    fair = fair_members(space, rng, data.steps(settings.batch_size) * (settings.random_subnets + 1))

    member_loss = subnet_loss(settings)

    def sandwich(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = net(x, largest)
        loss = F.cross_entropy(logits, y, label_smoothing=settings.label_smoothing)
        soft = logits.detach().softmax(dim=1)
        # In-place distillation from the largest. One backward of the summed losses gives the same gradients as
        # one per subnet, and lets DDP all-reduce once per step. Every process draws the same random subnets: the
        # same seeded rng, drawn in the same order.
        members = ([fair() for _ in range(settings.random_subnets + 1)] if settings.sampling == "fair" else
                   [smallest, *(space.sample(rng) for _ in range(settings.random_subnets))])
        return loss + sum(member_loss(net(x, spec), y, soft) for spec in members), loss, logits

    meta = {"space": to_data(space), "data": data.key(), "settings": to_data(settings)}
    history, reused = fit(supernet, data, settings, sandwich, path=path, meta=meta, device=device,
                          progress=progress, desc=f"supernet {space.name}", rng=rng)
    return TrainResult(supernet.eval(), path, history, reused)


def _autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA (tensor cores; no loss scaling needed, unlike fp16); CPU training stays fp32."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def _as_random_state(state: Any) -> tuple[Any, ...]:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def _optimizer_to(opt: torch.optim.Optimizer, device: torch.device) -> None:
    for state in opt.state.values():
        for k, v in state.items():
            if isinstance(v, torch.Tensor):
                state[k] = v.to(device)


def calibration_batches(data: DataSplit, *, batches: int = 4, batch_size: int = CALIBRATION_BATCH,
                        device: torch.device | str = "cpu", seed: int = CALIBRATION_SEED) -> list[torch.Tensor]:
    """A fixed set of training images (not augmented) for BN recalibration, the same for every subnet scored
    (another ``seed``, another set: only to measure how much the set matters)."""
    out = []
    for x, _ in data.batches("train", batch_size, shuffle=True, seed=seed, device=device):
        out.append(x)
        if len(out) == batches:
            break
    return out


def precise_bn(model: nn.Module, data: DataSplit, device: torch.device | str = "cpu") -> None:
    """Re-estimate a trained network's BN statistics on 8 batches of training images (precise BN): with
    torchvision's momentum of 0.01, running statistics lag far behind the weights in short runs."""
    recalibrate_bn(model, calibration_batches(data, batches=8, device=device))


def binomial_stderr(accuracy: float, images: int) -> float:
    """The standard error of an accuracy measured on ``images`` independent images."""
    return math.sqrt(accuracy * (1 - accuracy) / images)


@dataclass(frozen=True)
class Score:
    """A network's accuracy on (part of) the validation split, and the mean log-likelihood of the true class: a
    continuous score that separates networks whose accuracies tie within their standard error."""

    accuracy: float
    log_likelihood: float
    images: int

    @property
    def stderr(self) -> float:
        """Binomial standard error of ``accuracy`` over ``images`` images."""
        return binomial_stderr(self.accuracy, self.images)


@torch.inference_mode()
def evaluate(model: nn.Module, data: DataSplit, *, batch_size: int = 512, device: torch.device | str = "cpu",
             max_images: int | None = None, spec: NetworkSpec | None = None) -> Score:
    """Score ``model``, or a supernet's member ``spec``, on the validation split (its first ``max_images``, if
    given; default all)."""
    model.eval()
    correct = seen = 0
    log_lik = 0.0
    for x, y in data.batches("val", batch_size, shuffle=False, device=device):
        if max_images is not None:
            if seen >= max_images:
                break
            x, y = x[:max_images - seen], y[:max_images - seen]
        x = channels_last(x)
        logits = model(x) if spec is None else model(x, spec)
        correct += (logits.argmax(1) == y).sum().item()
        log_lik -= F.cross_entropy(logits.float(), y, reduction="sum").item()
        seen += len(y)
    return Score(correct / seen, log_lik / seen, seen)


def score_subnet(supernet: Supernet, spec: NetworkSpec, data: DataSplit, calibration: list[torch.Tensor], *,
                 device: torch.device | str = "cpu", max_images: int | None = None) -> Score:
    """Proxy score of ``spec`` through the shared weights, with its BN statistics recalibrated first."""
    recalibrate_bn(supernet, calibration, spec)
    return evaluate(supernet, data, device=device, max_images=max_images, spec=spec)
