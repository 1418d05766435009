"""The network description: one typed, frozen tree of dataclasses; YAML is only its storage form.

A :class:`NetworkSpec` means exactly one network (see :func:`nas.build_model`): a stem convolution,
an ordered list of inverted-residual blocks (MobileNetV2 sec. 3.3, with MobileNetV3's SE and
h-swish), a last 1x1 convolution, global pooling and a classifier (MobileNetV3's two linear layers, or
MobileNetV2's one). Choice lists (activations, kernels) come from :mod:`nas.registry`.
"""

from __future__ import annotations

import dataclasses
import os
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Literal

from torchvision.models._utils import _make_divisible

from nas._schema import (
    MAX_BLOCKS,
    MAX_CHANNELS,
    MAX_CLASSES,
    MAX_RESOLUTION,
    SpecError,
    check_choices,
    check_positive,
    from_data,
    read_yaml,
    to_data,
    write_yaml_atomic,
)
from nas.registry import Activation, BlockKernel, StemKernel

FORMAT_VERSION = 1
Stride = Literal[1, 2]


@dataclass(frozen=True)
class InputSpec:
    resolution: int
    channels: int = 3

    def __post_init__(self) -> None:
        check_choices(self)
        check_positive("resolution", self.resolution, MAX_RESOLUTION)
        check_positive("channels", self.channels, 64)


@dataclass(frozen=True)
class StemSpec:
    out_channels: int
    kernel: StemKernel = 3
    stride: Stride = 2
    activation: Activation = "hswish"

    def __post_init__(self) -> None:
        check_choices(self)
        check_positive("out_channels", self.out_channels, MAX_CHANNELS)


@dataclass(frozen=True)
class BlockSpec:
    """One inverted residual: 1x1 expand (absent when expanded == in), depthwise, optional SE, 1x1 project.

    Hashable, so the latency predictor can key its table on it.
    """

    in_channels: int
    kernel: BlockKernel
    expanded_channels: int
    out_channels: int
    se: bool
    activation: Activation
    stride: Stride
    dilation: int = 1

    def __post_init__(self) -> None:
        check_choices(self)
        for name in ("in_channels", "expanded_channels", "out_channels"):
            check_positive(name, getattr(self, name), MAX_CHANNELS)
        check_positive("dilation", self.dilation, 16)

    @property
    def has_expand(self) -> bool:
        return self.expanded_channels != self.in_channels

    @property
    def use_residual(self) -> bool:
        return self.stride == 1 and self.in_channels == self.out_channels

    @property
    def squeeze_channels(self) -> int:
        """SE bottleneck width, torchvision's rule (MobileNetV3 sec. 5.3: 1/4 of the expansion)."""
        return int(_make_divisible(self.expanded_channels // 4, 8))

    @property
    def depthwise_stride(self) -> int:
        # torchvision's dilated variant keeps resolution: a dilated block does not downsample.
        return 1 if self.dilation > 1 else self.stride


@dataclass(frozen=True)
class LastConvSpec:
    out_channels: int
    activation: Activation = "hswish"

    def __post_init__(self) -> None:
        check_choices(self)
        check_positive("out_channels", self.out_channels, MAX_CHANNELS)


@dataclass(frozen=True)
class ClassifierSpec:
    """After global pooling: linear to ``hidden``, activation, dropout, linear to the classes (MobileNetV3); or,
    with ``hidden`` and ``activation`` null, dropout and one linear layer (MobileNetV2)."""

    hidden: int | None
    activation: Activation | None = "hswish"
    dropout: float = 0.2

    def __post_init__(self) -> None:
        check_choices(self)
        if self.hidden is not None:
            check_positive("hidden", self.hidden, MAX_CHANNELS)
        if (self.hidden is None) != (self.activation is None):
            raise SpecError("activation", "must be null exactly when hidden is null (no hidden layer)")
        if not 0.0 <= self.dropout < 1.0:
            raise SpecError("dropout", f"{self.dropout} is not in [0, 1)")


@dataclass(frozen=True)
class BatchNormSpec:
    eps: float = 0.001
    momentum: float = 0.01

    def __post_init__(self) -> None:
        check_choices(self)
        check_positive("eps", self.eps)
        if not 0.0 < self.momentum <= 1.0:
            raise SpecError("momentum", f"{self.momentum} is not in (0, 1]")


@dataclass(frozen=True)
class NetworkSpec:
    """A whole network. ``metadata`` is free-form (origin, trial, latency...); equality and hashing ignore it,
    so two specs are equal exactly when they describe the same network."""

    format_version: Literal[1]
    input: InputSpec
    num_classes: int
    stem: StemSpec
    blocks: tuple[BlockSpec, ...]
    last_conv: LastConvSpec
    classifier: ClassifierSpec
    batch_norm: BatchNormSpec = field(default_factory=BatchNormSpec)
    metadata: Mapping[str, Any] = field(default_factory=lambda: types.MappingProxyType({}), compare=False)

    def __post_init__(self) -> None:
        check_choices(self)
        check_positive("num_classes", self.num_classes, MAX_CLASSES)
        if not self.blocks:
            raise SpecError("blocks", "must list at least one block")
        if len(self.blocks) > MAX_BLOCKS:
            raise SpecError("blocks", f"{len(self.blocks):,} blocks is over the limit of {MAX_BLOCKS}")
        if not isinstance(self.metadata, types.MappingProxyType):
            object.__setattr__(self, "metadata", types.MappingProxyType(dict(self.metadata)))
        previous, where = self.stem.out_channels, "stem.out_channels"
        for i, block in enumerate(self.blocks):
            if block.in_channels != previous:
                raise SpecError(f"blocks[{i}].in_channels", f"{block.in_channels} does not match {where} {previous}")
            previous, where = block.out_channels, f"blocks[{i}].out_channels"

    # The read-only metadata view (MappingProxyType) does not pickle, and a spec crosses processes inside its
    # network (nas.runtime.prepare_all's workers): pickled as a plain dict, restored read-only.
    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "metadata": dict(self.metadata)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, metadata=types.MappingProxyType(state["metadata"]))

    def with_metadata(self, **items: Any) -> NetworkSpec:
        """A copy with ``items`` merged into the metadata."""
        return dataclasses.replace(self, metadata={**self.metadata, **items})

    def without_metadata(self) -> NetworkSpec:
        return dataclasses.replace(self, metadata={})


def spec_from_dict(data: Any) -> NetworkSpec:
    """Validate plain data (as parsed from YAML) into a :class:`NetworkSpec`."""
    return from_data(NetworkSpec, data)


def spec_to_dict(spec: NetworkSpec) -> dict[str, Any]:
    data: dict[str, Any] = to_data(spec)
    return data


def builtin_names(folder: Traversable) -> list[str]:
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def builtin_spec_names() -> list[str]:
    return builtin_names(resources.files("nas.specs"))


def _resolve(name_or_path: str | os.PathLike[str], kind: str, folder: Traversable) -> Path:
    """A built-in name (no suffix, no directory) or a path; anything else is an error naming both."""
    text = str(name_or_path)
    path = Path(text)
    if path.exists() or path.suffix or os.sep in text:
        return path
    builtins = builtin_names(folder)
    if text in builtins:
        return Path(str(folder.joinpath(text + ".yaml")))
    raise SpecError("", f"not a file nor a built-in {kind} (built-ins: {', '.join(builtins)})", source=text)


def load_spec(name_or_path: str | os.PathLike[str]) -> NetworkSpec:
    """Load a spec from a YAML file, or a built-in one by name (``mobilenet_v3_large``, ``mobilenet_v2``, ...)."""
    path = _resolve(name_or_path, "spec", resources.files("nas.specs"))
    data = read_yaml(path, "network spec")
    try:
        return spec_from_dict(data)
    except SpecError as e:
        raise e.in_file(name_or_path) from None


def save_spec(spec: NetworkSpec, path: str | os.PathLike[str]) -> None:
    """Write ``spec`` as YAML (atomically); :func:`load_spec` gives back an equal spec."""
    header = "# nas network spec; build with nas.build_model(nas.load_spec(path))\n"
    write_yaml_atomic(spec_to_dict(spec), path, header=header)


Op = StemSpec | BlockSpec | LastConvSpec | ClassifierSpec


@dataclass(frozen=True)
class Part:
    """One top-level layer of a network: its module path in ``nas.build_model(spec)``, its description, and the
    channels and side of its input feature map."""

    path: str
    op: Op
    in_channels: int
    size: int


def conv_out(size: int, kernel: int, stride: int, dilation: int = 1) -> int:
    """Output side of a 'same'-padded conv (torchvision's Conv2dNormActivation padding)."""
    pad = (kernel - 1) // 2 * dilation
    return (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1


def network_parts(spec: NetworkSpec) -> tuple[Part, ...]:
    """The layers of ``spec`` in order, from the description alone: the one walk of a network's structure, shared
    by the builder, the latency table and the summary."""
    size = spec.input.resolution
    found = [Part("features.0", spec.stem, spec.input.channels, size)]
    size = conv_out(size, spec.stem.kernel, spec.stem.stride)
    for i, b in enumerate(spec.blocks, start=1):
        found.append(Part(f"features.{i}", b, b.in_channels, size))
        size = conv_out(size, b.kernel, b.depthwise_stride, b.dilation)
    found.append(Part(f"features.{len(spec.blocks) + 1}", spec.last_conv, spec.blocks[-1].out_channels, size))
    found.append(Part("classifier", spec.classifier, spec.last_conv.out_channels, size))
    return tuple(found)
