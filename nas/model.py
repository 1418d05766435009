"""Networks from a :class:`~nas.spec.NetworkSpec`, and the one block implementation the supernet shares.

Module layout and names are torchvision's ``MobileNetV3`` (``features.<i>.block.<j>``, ``avgpool``,
``classifier``), so its state dicts load strictly; MobileNetV2's load through :func:`from_torchvision`.

Every part runs at any leading slice of its channels and the centre of its kernel (Once-for-All sec. 3.2):
a built network runs its parts at their own sizes, where each is plain torchvision code, and
:class:`nas.supernet.Supernet` runs the very same modules at a subnet's sizes. So a subnet and the network
extracted from it compute the same thing by construction, and extracting is a copy of weight slices.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Iterable, Mapping
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops.misc import Conv2dNormActivation, SqueezeExcitation

from nas.registry import ACTIVATIONS, activation
from nas.spec import BatchNormSpec, BlockSpec, ClassifierSpec, LastConvSpec, NetworkSpec, Op, StemSpec, network_parts

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


def _batch_norm(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """``bn`` on the leading ``x.shape[1]`` channels, updating those channels' running statistics in place exactly
    as ``nn.BatchNorm2d.forward`` does (momentum None: the cumulative average used for recalibration)."""
    c = x.shape[1]
    if c == bn.num_features:
        return typing.cast(torch.Tensor, bn(x))
    momentum = 0.0
    if bn.training:
        assert bn.num_batches_tracked is not None
        bn.num_batches_tracked.add_(1)
        momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    assert bn.running_mean is not None and bn.running_var is not None
    return F.batch_norm(x, bn.running_mean[:c], bn.running_var[:c], bn.weight[:c], bn.bias[:c], bn.training,
                        momentum, bn.eps)


def centre_kernel(weight: torch.Tensor, kernel: int) -> torch.Tensor:
    """The centre ``kernel`` x ``kernel`` of a conv weight: how a smaller kernel shares a larger one (OFA)."""
    cut = (weight.shape[-1] - kernel) // 2
    return weight[..., cut:cut + kernel, cut:cut + kernel] if cut else weight


class ConvBN(Conv2dNormActivation):
    """torchvision's ``Conv2dNormActivation`` (conv, batch norm, optional activation; the same keys) that also runs
    at fewer output channels, fewer input channels (those of ``x``) and a centred smaller kernel."""

    def forward(self, x: torch.Tensor, out: int | None = None, kernel: int | None = None) -> torch.Tensor:
        # Unpacked from _modules: Sequential's indexing walks its modules on every call, a cost a subnet pays
        # per layer per call.
        conv, bn, *act = typing.cast(tuple[nn.Conv2d, nn.BatchNorm2d, nn.Module], self._modules.values())
        out = out or conv.out_channels
        k = kernel or conv.kernel_size[0]
        depthwise = conv.groups > 1
        if out == conv.out_channels and k == conv.kernel_size[0] and x.shape[1] == conv.in_channels:
            return typing.cast(torch.Tensor, super().forward(x))  # its own size: plain torchvision
        weight = centre_kernel(conv.weight[:out] if depthwise else conv.weight[:out, :x.shape[1]], k)
        dilation = conv.dilation[0]
        y = _batch_norm(bn, F.conv2d(x, weight, None, conv.stride, (k - 1) // 2 * dilation, dilation,
                                     out if depthwise else 1))
        return typing.cast(torch.Tensor, act[0](y)) if act else y


def conv_bn(cin: int, cout: int, kernel: int, bn: BatchNormSpec, activation_name: str | None = None, *,
            stride: int = 1, groups: int = 1, dilation: int = 1) -> ConvBN:
    act = ACTIVATIONS[activation_name].module if activation_name else None
    return ConvBN(cin, cout, kernel_size=kernel, stride=stride, groups=groups, dilation=dilation,
                  norm_layer=norm_layer(bn), activation_layer=act)


def _squeeze_excite(se: SqueezeExcitation, x: torch.Tensor, squeeze: int) -> torch.Tensor:
    """torchvision's ``SqueezeExcitation`` on the leading channels of ``x`` with ``squeeze`` bottleneck units."""
    e = x.shape[1]
    if e == se.fc1.in_channels and squeeze == se.fc1.out_channels:
        return typing.cast(torch.Tensor, se(x))
    s = F.adaptive_avg_pool2d(x, 1)
    s = se.activation(F.conv2d(s, se.fc1.weight[:squeeze, :e], se.fc1.bias[:squeeze]))
    return x * se.scale_activation(F.conv2d(s, se.fc2.weight[:e, :squeeze], se.fc2.bias[:e]))


class InvertedResidual(nn.Module):
    """MobileNetV2's inverted residual with linear bottleneck (sec. 3.3), plus MobileNetV3's SE and activation
    choice. Runs as ``spec`` (default: the block it was built as), which may be any smaller block: fewer channels,
    a smaller kernel, no SE or no expansion, another activation."""

    def __init__(self, block: BlockSpec, bn: BatchNormSpec):
        super().__init__()
        self.spec = block  # what it was built as; never changed
        e = block.expanded_channels
        make: dict[BlockRole, typing.Callable[[], nn.Module]] = {
            "expand": lambda: conv_bn(block.in_channels, e, 1, bn),
            "depthwise": lambda: conv_bn(e, e, block.kernel, bn, stride=block.depthwise_stride, groups=e,
                                         dilation=block.dilation),
            # MobileNetV3 sec. 5.3: SE with a hard-sigmoid gate.
            "se": lambda: SqueezeExcitation(e, block.squeeze_channels, scale_activation=nn.Hardsigmoid),
            "project": lambda: conv_bn(e, block.out_channels, 1, bn),
        }
        roles = block_layout(block)
        # Activations are applied by name in forward (nas.registry.activation), not held: in a supernet the
        # activation is a per-call choice. They hold no weights, so the state-dict keys are torchvision's.
        self.block = nn.Sequential(*(make[role]() for role in roles))
        # By role, for forward (a plain dict: the modules are registered once, under block).
        self._parts: dict[BlockRole, nn.Module] = dict(zip(roles, self.block, strict=True))

    def part(self, role: BlockRole) -> nn.Module:
        return self._parts[role]

    def forward(self, x: torch.Tensor, spec: BlockSpec | None = None) -> torch.Tensor:
        b = spec or self.spec
        act = activation(b.activation)
        e = b.expanded_channels
        out = act(self.part("expand")(x, e)) if b.has_expand else x  # expand
        out = act(self.part("depthwise")(out, e, b.kernel))  # depthwise
        if b.se:
            out = _squeeze_excite(typing.cast(SqueezeExcitation, self.part("se")), out, b.squeeze_channels)
        out = self.part("project")(out, b.out_channels)  # linear bottleneck: no activation
        return out + x if b.use_residual else out

    def extra_repr(self) -> str:
        return f"activation={self.spec.activation}, residual={self.spec.use_residual}"


class Classifier(nn.Sequential):
    """MobileNetV3's head (linear, activation, dropout, linear) or MobileNetV2's (dropout, linear), with
    torchvision's indices; runs at fewer input features (those of ``x``) and ``hidden`` units."""

    def __init__(self, in_features: int, spec: ClassifierSpec, num_classes: int):
        if spec.hidden is None:
            super().__init__(nn.Dropout(p=spec.dropout), nn.Linear(in_features, num_classes))
        else:
            assert spec.activation is not None  # ClassifierSpec: set exactly when hidden is
            super().__init__(nn.Linear(in_features, spec.hidden), ACTIVATIONS[spec.activation].module(inplace=True),
                             nn.Dropout(p=spec.dropout, inplace=True), nn.Linear(spec.hidden, num_classes))

    def forward(self, x: torch.Tensor, hidden: int | None = None) -> torch.Tensor:
        first = typing.cast(nn.Linear, self[0] if len(self) == 4 else self[1])
        if x.shape[1] == first.in_features and (hidden is None or hidden == first.out_features):
            return typing.cast(torch.Tensor, super().forward(x))
        if len(self) == 2:
            return F.linear(self[0](x), first.weight[:, :x.shape[1]], first.bias)
        fc1, act, drop, fc2 = typing.cast(tuple[nn.Linear, nn.Module, nn.Module, nn.Linear], tuple(self))
        h = hidden or fc1.out_features
        x = drop(act(F.linear(x, fc1.weight[:h, :x.shape[1]], fc1.bias[:h])))
        return F.linear(x, fc2.weight[:, :h], fc2.bias)


def make_part(op: Op, in_channels: int, bn: BatchNormSpec, num_classes: int) -> nn.Module:
    """The module ``nas.build_model`` makes for one part (see ``nas.spec.network_parts``)."""
    if isinstance(op, StemSpec):
        return conv_bn(in_channels, op.out_channels, op.kernel, bn, op.activation, stride=op.stride)
    if isinstance(op, BlockSpec):
        return InvertedResidual(op, bn)
    if isinstance(op, LastConvSpec):
        return conv_bn(in_channels, op.out_channels, 1, bn, op.activation)
    return Classifier(in_features=in_channels, spec=op, num_classes=num_classes)


def init_weights(module: nn.Module) -> None:
    """torchvision's MobileNetV2/V3 initialisation, so a built network trains like torchvision's."""
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


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """A batch in channels-last memory order, as training and scoring feed it: on the CPU oneDNN's convolutions
    run a step of these networks 1.8-2.5x faster in it (bench_supernet.py layout), and cuDNN's are fast in it too.
    Only float rounding differs. Built networks keep the caller's layout (latency tables, export)."""
    return x.contiguous(memory_format=torch.channels_last)


def run_network(net: nn.Module, x: torch.Tensor, spec: NetworkSpec, slots: Iterable[int]) -> torch.Tensor:
    """The forward pass of ``spec`` through the modules of ``net`` (a :class:`Network` or a supernet): the stem,
    the blocks at ``slots`` (indices into ``net.features``) each run as its block of ``spec``, the last conv, pooling
    and the classifier at ``spec``'s widths."""
    features = list(typing.cast(nn.Sequential, net.features))
    x = features[0](x)
    for slot, block in zip(slots, spec.blocks, strict=True):
        x = features[slot](x, block)
    x = features[-1](x, spec.last_conv.out_channels)
    x = torch.flatten(net.avgpool(x), 1)
    return typing.cast(torch.Tensor, net.classifier(x, spec.classifier.hidden))


class Network(nn.Module):
    """A MobileNetV2/V3-style network; ``spec`` is the description it was built from."""

    def __init__(self, spec: NetworkSpec):
        super().__init__()
        self.spec = spec
        *layers, head = (make_part(p.op, p.in_channels, spec.batch_norm, spec.num_classes)
                         for p in network_parts(spec))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = head
        self._slots = range(1, len(spec.blocks) + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_network(self, x, self.spec, self._slots)


def build_model(spec: NetworkSpec) -> Network:
    """The torch network ``spec`` describes, freshly initialised as torchvision initialises MobileNets."""
    model = Network(spec)
    init_weights(model)
    return model


_TV_V2_BLOCK = re.compile(r"features\.(\d+)\.conv\.(\d+)\.(.+)")


def from_torchvision(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A torchvision MobileNetV2 or V3 state dict with this project's keys, for ``load_state_dict(strict=True)``.

    V3's keys are already ours. V2 names a block's layers ``conv`` and leaves its projection as a bare conv and BN
    (``conv.P``, ``conv.P+1``) where V3, and so this project, uses ``block`` and a ``Conv2dNormActivation``
    (``block.P.0``, ``block.P.1``): ``features.i.conv.j.k.x`` -> ``features.i.block.j.k.x``,
    ``features.i.conv.P.weight`` -> ``features.i.block.P.0.weight``, ``features.i.conv.P+1.x`` ->
    ``features.i.block.P.1.x``.
    """
    out = {}
    for key, value in state_dict.items():
        m = _TV_V2_BLOCK.fullmatch(key)
        if m is not None:
            i, j, rest = m.group(1), int(m.group(2)), m.group(3)
            if "." in rest:  # inside a Conv2dNormActivation: same layout
                key = f"features.{i}.block.{j}.{rest}"
            elif rest == "weight" and value.dim() == 4:  # the projection conv
                key = f"features.{i}.block.{j}.0.weight"
            else:  # the projection's batch norm
                key = f"features.{i}.block.{j - 1}.1.{rest}"
        out[key] = value
    return out
