"""Build a concrete torch network from a :class:`~nas.spec.NetworkSpec`.

Module layout and names are torchvision's ``MobileNetV3`` (``features.<i>.block.<j>``, ``avgpool``,
``classifier``), so torchvision's state dicts load strictly, and the supernet (``nas.supernet``)
uses the same :func:`block_layout` so extracting a subnet is a copy of weight slices.
"""

from __future__ import annotations

import typing
from functools import partial

import torch
from torch import nn
from torchvision.ops.misc import Conv2dNormActivation, SqueezeExcitation

from nas.spec import Activation, BatchNormSpec, BlockSpec, ClassifierSpec, LastConvSpec, NetworkSpec, StemSpec

# The one registry of activations; spec.Activation lists the same names for validation.
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "hswish": nn.Hardswish}
if set(ACTIVATIONS) != set(typing.get_args(Activation)):  # pragma: no cover - an edit that forgot one side
    raise ImportError("nas.model.ACTIVATIONS and nas.spec.Activation disagree")

BlockRole = typing.Literal["expand", "depthwise", "se", "project"]


def block_layout(block: BlockSpec) -> tuple[BlockRole, ...]:
    """The parts of ``block`` in order; their positions are the indices in ``InvertedResidual.block``.

    Absent parts are skipped (not ``nn.Identity``) because torchvision's indices shift the same way,
    and matching its state-dict keys exactly is worth more than stable indices.
    """
    roles: list[BlockRole] = ["expand"] if block.has_expand else []
    roles.append("depthwise")
    if block.se:
        roles.append("se")
    roles.append("project")
    return tuple(roles)


def norm_layer(bn: BatchNormSpec) -> partial[nn.BatchNorm2d]:
    return partial(nn.BatchNorm2d, eps=bn.eps, momentum=bn.momentum)


def conv_bn(cin: int, cout: int, kernel: int, bn: BatchNormSpec, activation: Activation | None,
            stride: int = 1, groups: int = 1, dilation: int = 1) -> Conv2dNormActivation:
    return Conv2dNormActivation(cin, cout, kernel_size=kernel, stride=stride, groups=groups, dilation=dilation,
                                norm_layer=norm_layer(bn),
                                activation_layer=ACTIVATIONS[activation] if activation else None)


def make_block_part(role: BlockRole, block: BlockSpec, bn: BatchNormSpec) -> nn.Module:
    """One part of an inverted residual, at the sizes ``block`` gives (the supernet passes its largest)."""
    e = block.expanded_channels
    if role == "expand":
        return conv_bn(block.in_channels, e, 1, bn, block.activation)
    if role == "depthwise":
        return conv_bn(e, e, block.kernel, bn, block.activation, stride=block.depthwise_stride, groups=e,
                       dilation=block.dilation)
    if role == "se":
        # MobileNetV3 sec. 5.3: SE with a hard-sigmoid gate.
        return SqueezeExcitation(e, block.squeeze_channels, scale_activation=nn.Hardsigmoid)
    return conv_bn(e, block.out_channels, 1, bn, None)


class InvertedResidual(nn.Module):
    """MobileNetV2's inverted residual with linear bottleneck, plus MobileNetV3's SE and activation choice."""

    def __init__(self, block: BlockSpec, bn: BatchNormSpec):
        super().__init__()
        self.block = nn.Sequential(*(make_block_part(role, block, bn) for role in block_layout(block)))
        self.use_residual = block.use_residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.use_residual else out


def make_classifier(in_features: int, spec: ClassifierSpec, num_classes: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_features, spec.hidden),
        ACTIVATIONS[spec.activation](inplace=True),
        nn.Dropout(p=spec.dropout, inplace=True),
        nn.Linear(spec.hidden, num_classes),
    )


def init_weights(module: nn.Module) -> None:
    """torchvision's MobileNetV3 initialisation, so a built network trains like torchvision's."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


def make_stem(in_channels: int, stem: StemSpec, bn: BatchNormSpec) -> Conv2dNormActivation:
    return conv_bn(in_channels, stem.out_channels, stem.kernel, bn, stem.activation, stride=stem.stride)


def make_last_conv(in_channels: int, spec: LastConvSpec, bn: BatchNormSpec) -> Conv2dNormActivation:
    return conv_bn(in_channels, spec.out_channels, 1, bn, spec.activation)


class Network(nn.Module):
    """A MobileNetV3-style network; ``spec`` is the description it was built from."""

    def __init__(self, spec: NetworkSpec):
        super().__init__()
        self.spec = spec
        bn = spec.batch_norm
        last = make_last_conv(spec.blocks[-1].out_channels, spec.last_conv, bn)
        blocks = (InvertedResidual(b, bn) for b in spec.blocks)
        self.features = nn.Sequential(make_stem(spec.input.channels, spec.stem, bn), *blocks, last)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = make_classifier(spec.last_conv.out_channels, spec.classifier, spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def build_model(spec: NetworkSpec) -> Network:
    """The torch network ``spec`` describes, freshly initialised as torchvision initialises MobileNetV3."""
    model = Network(spec)
    init_weights(model)
    return model
