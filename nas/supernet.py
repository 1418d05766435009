"""A weight-sharing supernet over a search space: sample, activate, extract (Once-for-All's vocabulary).

Every block slot holds the modules :func:`nas.model.make_block_part` builds for the slot's largest
block, so the supernet and the builder share block structure and module classes. A subnet uses
leading slices of them: the first input/hidden/output channels (width, expansion), the centre of the
largest kernel (kernel), the first blocks of each stage (depth), the leading SE channels; activations
carry no weights. :meth:`Supernet.extract` copies those slices into :func:`nas.build_model`'s modules.
"""

from __future__ import annotations

import random
import typing
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops.misc import SqueezeExcitation

from nas.model import (
    ACTIVATIONS,
    BlockRole,
    InvertedResidual,
    Network,
    block_layout,
    init_weights,
    make_classifier,
    make_last_conv,
    make_stem,
)
from nas.space import SearchSpace
from nas.spec import BlockSpec, NetworkSpec


def _slot_blocks(space: SearchSpace) -> list[list[BlockSpec]]:
    """Per stage, the largest block each slot can hold (widest input, hidden and output; largest kernel; SE)."""
    stages = []
    cin = space.stem.out_channels
    for stage in space.stages:
        width = max(stage.width)
        slots = []
        for b in range(max(stage.depth)):
            hidden = max(stage.hidden(cin, o) for o in stage.expansion)
            # expanded == in would drop the expand conv; a slot always keeps it so smaller inputs can use it.
            slots.append(BlockSpec(cin, max(stage.kernel), hidden if hidden != cin else hidden + 1, width,
                                   True in stage.se, "hswish", stage.stride if b == 0 else 1))
            cin = width
        stages.append(slots)
    return stages


# Functional twins of nas.model.ACTIVATIONS: the supernet calls them on sliced tensors.
_ACT_FN = {"relu": F.relu, "hswish": F.hardswish}
if set(_ACT_FN) != set(ACTIVATIONS):  # pragma: no cover - an edit that forgot one side
    raise ImportError("nas.supernet._ACT_FN and nas.model.ACTIVATIONS disagree")


def _bn(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """Batch norm on the leading channels; running statistics of those channels update in place."""
    c = x.shape[1]
    momentum = 0.0
    if bn.training:
        assert bn.num_batches_tracked is not None
        bn.num_batches_tracked.add_(1)
        # momentum None means a cumulative average, as in nn.BatchNorm2d (used for recalibration).
        momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    assert bn.running_mean is not None and bn.running_var is not None
    return F.batch_norm(x, bn.running_mean[:c], bn.running_var[:c], bn.weight[:c], bn.bias[:c], bn.training,
                        momentum, bn.eps)


def _conv_bn(part: nn.Module) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    conv, bn = list(part.children())[:2]
    return typing.cast(nn.Conv2d, conv), typing.cast(nn.BatchNorm2d, bn)


@dataclass(frozen=True)
class _Parts:
    """Typed handles to one slot's modules (registered under ``features``), by role."""

    roles: tuple[BlockRole, ...]
    expand: tuple[nn.Conv2d, nn.BatchNorm2d] | None
    depthwise: tuple[nn.Conv2d, nn.BatchNorm2d]
    se: SqueezeExcitation | None
    project: tuple[nn.Conv2d, nn.BatchNorm2d]

    @classmethod
    def of(cls, block: InvertedResidual, roles: tuple[BlockRole, ...]) -> _Parts:
        by_role = dict(zip(roles, block.block.children(), strict=True))
        se = by_role.get("se")
        return cls(roles, _conv_bn(by_role["expand"]) if "expand" in by_role else None,
                   _conv_bn(by_role["depthwise"]), typing.cast(SqueezeExcitation, se) if se else None,
                   _conv_bn(by_role["project"]))


def _centre(weight: torch.Tensor, kernel: int) -> torch.Tensor:
    cut = (weight.shape[-1] - kernel) // 2
    return weight[..., cut:cut + kernel, cut:cut + kernel] if cut else weight


@dataclass(frozen=True)
class _Active:
    blocks: tuple[tuple[int, BlockSpec], ...]  # (slot index in features, block spec)
    spec: NetworkSpec


class Supernet(nn.Module):
    """Shared weights for every member of ``space``. ``activate(spec)`` chooses the subnet ``forward`` runs."""

    def __init__(self, space: SearchSpace):
        super().__init__()
        self.space = space
        bn = space.batch_norm
        self._slots = _slot_blocks(space)
        flat = [b for stage in self._slots for b in stage]
        largest = space.largest()
        stem = make_stem(space.input.channels, space.stem, bn)
        last = make_last_conv(flat[-1].out_channels, largest.last_conv, bn)
        # Module names as in nas.model.Network: features.<i>.block.<j>, avgpool, classifier.
        blocks = [InvertedResidual(b, bn) for b in flat]
        self.features = nn.Sequential(stem, *blocks, last)
        self._parts = {i: _Parts.of(m, block_layout(b))
                       for i, (m, b) in enumerate(zip(blocks, flat, strict=True), start=1)}
        self._last = _conv_bn(last)  # a tuple, so not registered twice
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = make_classifier(largest.last_conv.out_channels, largest.classifier, space.num_classes)
        init_weights(self)
        self._active = self._plan(largest)

    # -- sample, activate, extract -----------------------------------------------------------------------------------

    def sample(self, rng: random.Random) -> NetworkSpec:
        return self.space.sample(rng)

    def _plan(self, spec: NetworkSpec) -> _Active:
        choices = self.space.choices(spec)  # raises SpecError naming what is not in the space
        slots: list[int] = []
        start = 1
        for s, stage in enumerate(self._slots, start=1):
            slots.extend(range(start, start + choices[f"stage{s}.depth"]))
            start += len(stage)
        return _Active(tuple(zip(slots, spec.blocks, strict=True)), spec)

    def activate(self, spec: NetworkSpec) -> None:
        """Make ``forward`` run the subnet ``spec`` (a member of the space)."""
        self._active = self._plan(spec)

    @property
    def active(self) -> NetworkSpec:
        return self._active.spec

    def extract(self, spec: NetworkSpec | None = None) -> Network:
        """``nas.build_model(spec)`` carrying the shared weights and BN statistics of ``spec`` (default: active)."""
        plan = self._active if spec is None else self._plan(spec)
        net = Network(plan.spec)
        last = len(self.features) - 1
        pairs = [(self.features[0], net.features[0]), (self.features[last], net.features[-1])]
        for i, (slot, block) in enumerate(plan.blocks, start=1):
            src = list(typing.cast(InvertedResidual, self.features[slot]).block)
            dst = list(typing.cast(InvertedResidual, net.features[i]).block)
            for j, role in enumerate(block_layout(block)):
                pairs.append((src[self._parts[slot].roles.index(role)], dst[j]))
        pairs += [(self.classifier[0], net.classifier[0]), (self.classifier[3], net.classifier[3])]
        with torch.no_grad():
            for src_m, dst_m in pairs:
                src_tensors = dict(src_m.state_dict(keep_vars=True))
                for name, t in dst_m.state_dict(keep_vars=True).items():
                    s = src_tensors[name]
                    if t.dim() == 4:
                        s = _centre(s, t.shape[-1])
                    t.copy_(s[tuple(slice(0, n) for n in t.shape)] if t.dim() else s)
        return net.train(self.training)

    # -- forward ----------------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features[0](x)
        for slot, block in self._active.blocks:
            x = self._block(self._parts[slot], block, x)
        spec = self._active.spec
        conv, bn = self._last
        x = _ACT_FN[spec.last_conv.activation](_bn(bn, F.conv2d(x, conv.weight[:spec.last_conv.out_channels,
                                                                                 :x.shape[1]])))
        x = torch.flatten(self.avgpool(x), 1)
        fc1, act, drop, fc2 = typing.cast(tuple[nn.Linear, nn.Module, nn.Module, nn.Linear], tuple(self.classifier))
        h = spec.classifier.hidden
        x = drop(act(F.linear(x, fc1.weight[:h, :x.shape[1]], fc1.bias[:h])))
        return F.linear(x, fc2.weight[:, :h], fc2.bias)

    @staticmethod
    def _block(parts: _Parts, block: BlockSpec, x: torch.Tensor) -> torch.Tensor:
        act = _ACT_FN[block.activation]
        inp, e = x, block.expanded_channels
        if block.has_expand:
            assert parts.expand is not None  # every slot has an expand conv (see _slot_blocks)
            conv, bn = parts.expand
            x = act(_bn(bn, F.conv2d(x, conv.weight[:e, :x.shape[1]])))
        conv, bn = parts.depthwise
        k = block.kernel
        x = act(_bn(bn, F.conv2d(x, _centre(conv.weight[:e], k), stride=block.depthwise_stride,
                                 padding=(k - 1) // 2 * block.dilation, dilation=block.dilation, groups=e)))
        if block.se:
            se = parts.se
            assert se is not None  # a slot has SE whenever its stage allows it
            q = block.squeeze_channels
            s = F.adaptive_avg_pool2d(x, 1)
            s = F.relu(F.conv2d(s, se.fc1.weight[:q, :e], se.fc1.bias[:q]))
            x = x * F.hardsigmoid(F.conv2d(s, se.fc2.weight[:e, :q], se.fc2.bias[:e]))
        conv, bn = parts.project
        x = _bn(bn, F.conv2d(x, conv.weight[:block.out_channels, :e]))
        return x + inp if block.use_residual else x


def recalibrate_bn(model: nn.Module, batches: Iterable[torch.Tensor]) -> None:
    """Reset BN running statistics and re-estimate them as an exact average over ``batches`` (train mode).

    Needed per subnet of a supernet, whose shared statistics mix every subnet trained (OFA sec. 3.3).
    """
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    momenta = [m.momentum for m in bns]
    was_training = model.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        for x in batches:
            model(x)
    for m, mom in zip(bns, momenta, strict=True):
        m.momentum = mom
    model.train(was_training)
