"""A weight-sharing supernet over a search space: sample, run, extract (Once-for-All's vocabulary).

The supernet is the modules of one network, the union of the space (each block slot at the largest block it
can hold), built by :func:`nas.model.Network`'s own part builder. A subnet runs those same modules through the
same forward code (:func:`nas.model.run_network`) at its own sizes: the first input/hidden/output channels
(width, expansion), the centre of the largest kernel (kernel), the first blocks of each stage (depth), the
leading SE channels; activations carry no weights. :meth:`Supernet.extract` copies those slices into
:func:`nas.build_model`'s modules. There is no active-subnet state: every call names its subnet.
"""

from __future__ import annotations

import dataclasses
import random
import typing
from collections.abc import Iterable

import torch
from torch import nn

from nas.model import InvertedResidual, Network, block_layout, centre_kernel, channels_last, init_weights, run_network
from nas.registry import cost_order
from nas.space import SearchSpace
from nas.spec import BlockSpec, NetworkSpec


def _union(space: SearchSpace) -> tuple[NetworkSpec, tuple[range, ...]]:
    """The network whose block slots hold the largest block each slot can hold (widest input, hidden and output,
    largest kernel, SE when allowed), and each stage's slot indices in ``features``."""
    largest = space.largest()
    blocks, stages, cin = [], [], space.stem.out_channels
    for stage in space.stages:
        width = max(stage.width)
        start = len(blocks) + 1
        for b in range(max(stage.depth)):
            hidden = max(stage.hidden(cin, o) for o in stage.expansion)
            # expanded == in would drop the expand conv; a slot always keeps it so smaller inputs can use it.
            blocks.append(BlockSpec(cin, max(stage.kernel), hidden if hidden != cin else hidden + 1, width,
                                    True in stage.se, max(stage.activation, key=cost_order),
                                    stage.stride if b == 0 else 1))
            cin = width
        stages.append(range(start, len(blocks) + 1))
    return dataclasses.replace(largest, blocks=tuple(blocks), metadata={}), tuple(stages)


class Supernet(nn.Module):
    """Shared weights for every member of ``space``; ``supernet(x, spec)`` runs the member ``spec``."""

    def __init__(self, space: SearchSpace):
        super().__init__()
        self.space = space
        union, self._stages = _union(space)
        shared = Network(union)
        # The union network's modules, registered under its names (features.<i>.block.<j>, avgpool, classifier),
        # so the supernet's state-dict keys are those of nas.build_model(space.largest()).
        self.features, self.avgpool, self.classifier = shared.features, shared.avgpool, shared.classifier
        init_weights(self)
        self._slots: dict[NetworkSpec, tuple[int, ...]] = {}  # a cache of slots(): membership is a search

    def sample(self, rng: random.Random) -> NetworkSpec:
        return self.space.sample(rng)

    def slots(self, spec: NetworkSpec) -> tuple[int, ...]:
        """Indices in ``features`` of the slots ``spec``'s blocks run in; a SpecError when it is not a member."""
        if spec not in self._slots:
            choices = self.space.choices(spec)  # raises SpecError naming what is not in the space
            self._slots[spec] = tuple(i for s, stage in enumerate(self._stages, start=1)
                                      for i in stage[:choices[f"stage{s}.depth"]])
        return self._slots[spec]

    def forward(self, x: torch.Tensor, spec: NetworkSpec) -> torch.Tensor:
        """Run the member ``spec`` through the shared weights."""
        return run_network(self, x, spec, self.slots(spec))

    def extract(self, spec: NetworkSpec) -> Network:
        """``nas.build_model(spec)`` carrying the shared weights and BN statistics of ``spec``."""
        net = Network(spec)
        pairs = [(self.features[0], net.features[0]), (self.features[-1], net.features[-1]),
                 (self.classifier, net.classifier)]
        for i, (slot, block) in enumerate(zip(self.slots(spec), spec.blocks, strict=True), start=1):
            src = typing.cast(InvertedResidual, self.features[slot])
            dst = typing.cast(InvertedResidual, net.features[i])
            pairs += [(src.part(role), dst.part(role)) for role in block_layout(block)]
        with torch.no_grad():
            for src_m, dst_m in pairs:
                src_tensors = dict(src_m.state_dict(keep_vars=True))
                for name, t in dst_m.state_dict(keep_vars=True).items():
                    s = src_tensors[name]
                    if t.dim() == 4:  # a conv kernel: the centre of the slot's
                        s = centre_kernel(s, t.shape[-1])
                    t.copy_(s[tuple(slice(0, n) for n in t.shape)] if t.dim() else s)
        return net.train(self.training)


def recalibrate_bn(model: nn.Module, batches: Iterable[torch.Tensor], spec: NetworkSpec | None = None) -> None:
    """Reset BN running statistics and re-estimate them as an exact average over ``batches`` (train mode), running
    ``model(x)``, or ``model(x, spec)`` for a supernet's member ``spec``.

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
        for x in map(channels_last, batches):
            model(x) if spec is None else model(x, spec)
    for m, mom in zip(bns, momenta, strict=True):
        m.momentum = mom
    model.train(was_training)
