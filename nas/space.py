"""Search spaces: the set of networks a search may choose from, stored as YAML like specs.

A space is a fixed stem, a list of stages (each with depth and width choices and a stride), per-block
choices of kernel, expansion, SE and activation, and width choices for the last conv and classifier.
Every member is a :class:`~nas.spec.NetworkSpec`. One walker (:meth:`SearchSpace.build`) turns a
``pick(name, options)`` function into a spec, so sampling, the largest and smallest members, Optuna's
``trial.suggest_categorical`` and a flat dict of choices all produce members the same way.
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Any, Literal, TypeVar

from torchvision.models._utils import _make_divisible

from nas._schema import (
    MAX_BLOCKS,
    MAX_CHANNELS,
    MAX_CLASSES,
    SpecError,
    check_choice,
    check_choices,
    check_positive,
    from_data,
    read_yaml,
    shown,
)
from nas.registry import Activation, BlockKernel, cost_order
from nas.spec import (
    BatchNormSpec,
    BlockSpec,
    ClassifierSpec,
    InputSpec,
    LastConvSpec,
    NetworkSpec,
    StemSpec,
    Stride,
    _resolve,
    builtin_names,
    load_spec,
)

T = TypeVar("T")
MAX_DEPTH = 32  # blocks per stage
MAX_EXPANSION = 64.0  # expansion ratio
MAX_OPTIONS = 64  # choices listed for one decision
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # a space's name names its files (supernets, tables)
Pick = Callable[[str, Sequence[Any]], Any]


def _check_options(path: str, options: Sequence[Any], limit: float | None = None) -> None:
    """A non-empty list of distinct choices; numbers positive, finite and at most ``limit`` when one is given."""
    if not options:
        raise SpecError(path, "must list at least one choice")
    if len(options) > MAX_OPTIONS:
        raise SpecError(path, f"{len(options):,} choices is over the limit of {MAX_OPTIONS}")
    if len(set(options)) != len(options):
        raise SpecError(path, f"lists a choice twice: {shown(list(options))}")
    for i, v in enumerate(options):
        if limit is not None:
            check_positive(f"{path}[{i}]", v, limit)


def expanded_width(in_channels: int, ratio: float) -> int:
    """Hidden width for an expansion ratio: torchvision's rounding to a multiple of 8 (MobileNetV2 sec. 3.4)."""
    return int(_make_divisible(in_channels * ratio, 8))


@dataclass(frozen=True)
class StageSpace:
    """A run of blocks with one output width; the first block has ``stride``, the rest stride 1."""

    depth: tuple[int, ...]
    width: tuple[int, ...]
    stride: Stride
    kernel: tuple[BlockKernel, ...]
    expand_ratio: tuple[float, ...] | None = None  # hidden = in_channels * ratio, rounded to 8
    expanded_channels: tuple[int, ...] | None = None  # or explicit hidden widths
    se: tuple[bool, ...] = (False,)
    activation: tuple[Activation, ...] = ("relu",)

    def __post_init__(self) -> None:
        check_choices(self)
        limits = {"depth": MAX_DEPTH, "width": MAX_CHANNELS, "expand_ratio": MAX_EXPANSION,
                  "expanded_channels": MAX_CHANNELS}
        for name, limit in limits.items():
            if getattr(self, name) is not None:
                _check_options(name, getattr(self, name), limit)
        for name in ("kernel", "activation", "se"):  # kernel and activation values: check_choices above
            _check_options(name, getattr(self, name))
        for i, v in enumerate(self.se):
            check_choice(f"se[{i}]", v, (False, True))
        if (self.expand_ratio is None) == (self.expanded_channels is None):
            raise SpecError("expand_ratio", "give exactly one of expand_ratio and expanded_channels")

    @property
    def expansion(self) -> tuple[float, ...]:
        """The expansion options as listed: ratios, or explicit hidden widths."""
        return self.expand_ratio if self.expand_ratio is not None else self.expanded_channels  # type: ignore[return-value]

    def hidden(self, in_channels: int, option: float) -> int:
        return expanded_width(in_channels, option) if self.expand_ratio is not None else int(option)


@dataclass(frozen=True)
class LastConvSpace:
    out_channels: tuple[int, ...]
    activation: Activation = "hswish"

    def __post_init__(self) -> None:
        check_choices(self)
        _check_options("out_channels", self.out_channels, MAX_CHANNELS)


@dataclass(frozen=True)
class ClassifierSpace:
    """Hidden-width choices of the classifier; ``hidden`` and ``activation`` null: MobileNetV2's single linear."""

    hidden: tuple[int, ...] | None
    activation: Activation | None = "hswish"
    dropout: float = 0.2

    def __post_init__(self) -> None:
        check_choices(self)
        if self.hidden is not None:
            _check_options("hidden", self.hidden, MAX_CHANNELS)
        ClassifierSpec(None if self.hidden is None else 1, self.activation, self.dropout)  # a spec's checks

    def options(self) -> tuple[int | None, ...]:
        return (None,) if self.hidden is None else self.hidden


@dataclass(frozen=True)
class SearchSpace:
    format_version: Literal[1]
    name: str
    input: InputSpec
    num_classes: int
    stem: StemSpec
    stages: tuple[StageSpace, ...]
    last_conv: LastConvSpace
    classifier: ClassifierSpace
    batch_norm: BatchNormSpec = field(default_factory=BatchNormSpec)
    reference: str | None = None  # a built-in spec or path: the hand-designed member (MobileNetV3) to compare with

    def __post_init__(self) -> None:
        check_choices(self)
        check_positive("num_classes", self.num_classes, MAX_CLASSES)
        if not NAME.fullmatch(self.name):
            raise SpecError("name", f"{shown(self.name)} is not a safe file name: up to 64 letters, digits, '.', '_' "
                                    "or '-', starting with a letter or digit")
        if not self.stages:
            raise SpecError("stages", "must list at least one stage")
        if sum(max(s.depth) for s in self.stages) > MAX_BLOCKS:
            raise SpecError("stages", f"the deepest member would have {sum(max(s.depth) for s in self.stages):,} "
                                      f"blocks, over the limit of {MAX_BLOCKS}")

    # -- the one walker -------------------------------------------------------------------------------------------

    def build(self, pick: Pick) -> NetworkSpec:
        """The member whose every choice is ``pick(name, options)``; names look like ``stage2.block1.kernel``."""
        blocks = []
        cin = self.stem.out_channels
        for s, stage in enumerate(self.stages, start=1):
            depth = pick(f"stage{s}.depth", stage.depth)
            width = pick(f"stage{s}.width", stage.width)
            for b in range(depth):
                p = f"stage{s}.block{b + 1}"
                kernel = pick(f"{p}.kernel", stage.kernel)
                hidden = stage.hidden(cin, pick(f"{p}.expansion", stage.expansion))
                se = pick(f"{p}.se", stage.se)
                act = pick(f"{p}.activation", stage.activation)
                blocks.append(BlockSpec(cin, kernel, hidden, width, se, act, stage.stride if b == 0 else 1))
                cin = width
        return NetworkSpec(
            format_version=1, input=self.input, num_classes=self.num_classes, stem=self.stem, blocks=tuple(blocks),
            last_conv=LastConvSpec(pick("last_conv.out_channels", self.last_conv.out_channels),
                                   self.last_conv.activation),
            classifier=ClassifierSpec(self._pick_hidden(pick), self.classifier.activation, self.classifier.dropout),
            batch_norm=self.batch_norm, metadata={"search_space": self.name})

    def _pick_hidden(self, pick: Pick) -> int | None:
        # No choice to make (nor an Optuna parameter) for MobileNetV2's head, which has no hidden layer.
        return None if self.classifier.hidden is None else pick("classifier.hidden", self.classifier.hidden)

    def sample(self, rng: random.Random) -> NetworkSpec:
        """A uniformly random choice at every decision."""
        return self.build(lambda _name, options: rng.choice(list(options)))

    def largest(self) -> NetworkSpec:
        """The member with every width, depth, kernel and expansion at its maximum, SE on, the dearest activation."""
        return self.build(lambda name, options: max(options, key=cost_order))

    def smallest(self) -> NetworkSpec:
        """The member with every width, depth, kernel and expansion at its minimum, SE off, the cheapest activation."""
        return self.build(lambda name, options: min(options, key=cost_order))

    def from_choices(self, choices: Mapping[str, Any]) -> NetworkSpec:
        """The member a flat dict of choices describes (keys of blocks beyond a stage's depth are ignored)."""

        def pick(name: str, options: Sequence[Any]) -> Any:
            if name not in choices:
                raise SpecError(name, "missing from the choices")
            value = choices[name]
            if value not in options or isinstance(value, bool) != isinstance(options[0], bool):
                raise SpecError(name, f"{value!r} is not one of {', '.join(map(str, options))}")
            return value

        return self.build(pick)

    # -- membership ----------------------------------------------------------------------------------------------

    def choices(self, spec: NetworkSpec) -> dict[str, Any]:
        """The flat dict of choices that rebuilds ``spec`` (metadata aside); a SpecError if it is not a member."""
        fixed = {"input": self.input, "num_classes": self.num_classes, "stem": self.stem,
                 "batch_norm": self.batch_norm}
        for name, value in fixed.items():
            if getattr(spec, name) != value:
                raise SpecError(name, f"{getattr(spec, name)} differs from space {self.name!r}: {value}")
        found = self._match_stages(spec.blocks, 0, self.stem.out_channels)
        if found is None:
            raise SpecError("blocks", f"do not fit the stages of space {self.name!r}")
        found["last_conv.out_channels"] = spec.last_conv.out_channels
        if self.classifier.hidden is not None:
            found["classifier.hidden"] = spec.classifier.hidden
        rebuilt = self.from_choices(found)
        for name in ("last_conv", "classifier"):
            if getattr(rebuilt, name) != getattr(spec, name):
                raise SpecError(name, f"{getattr(spec, name)} is not a choice of space {self.name!r}")
        return found

    def contains(self, spec: NetworkSpec) -> bool:
        try:
            self.choices(spec)
        except SpecError:
            return False
        return True

    def _match_stages(self, blocks: Sequence[BlockSpec], s: int, cin: int) -> dict[str, Any] | None:
        if s == len(self.stages):
            return {} if not blocks else None
        stage = self.stages[s]
        for depth in stage.depth:
            run = blocks[:depth]
            if len(run) < depth or run[0].out_channels not in stage.width:
                continue
            found: dict[str, Any] | None = {f"stage{s + 1}.depth": depth, f"stage{s + 1}.width": run[0].out_channels}
            c = cin
            for b, block in enumerate(run):
                found = self._match_block(stage, f"stage{s + 1}.block{b + 1}", block, c, b, found or {})
                if found is None:
                    break
                c = block.out_channels
            rest = None if found is None else self._match_stages(blocks[depth:], s + 1, run[-1].out_channels)
            if found is not None and rest is not None:
                return found | rest
        return None

    @staticmethod
    def _match_block(stage: StageSpace, prefix: str, block: BlockSpec, cin: int, index: int,
                     found: dict[str, Any]) -> dict[str, Any] | None:
        expansion = [o for o in stage.expansion if stage.hidden(cin, o) == block.expanded_channels]
        ok = (block.in_channels == cin and block.out_channels == found[prefix.split(".")[0] + ".width"]
              and block.stride == (stage.stride if index == 0 else 1) and block.dilation == 1
              and block.kernel in stage.kernel and block.se in stage.se and block.activation in stage.activation
              and expansion)
        if not ok:
            return None
        return found | {f"{prefix}.kernel": block.kernel, f"{prefix}.expansion": expansion[0],
                        f"{prefix}.se": block.se, f"{prefix}.activation": block.activation}

    def reference_spec(self) -> NetworkSpec | None:
        """The hand-designed member, with this space's number of classes (a space adapted to a data set by
        ``nas.data.load_for`` has the data set's)."""
        return None if self.reference is None else dataclasses.replace(load_spec(self.reference),
                                                                        num_classes=self.num_classes)

    def reference_member(self) -> NetworkSpec | None:
        """The reference spec when it is a member of this space (always, for a space read by ``load_space``)."""
        ref = self.reference_spec()
        return ref if ref is not None and self.contains(ref) else None

    def size(self) -> int:
        """Number of distinct choice combinations (members may coincide when options round alike)."""
        total = 1
        for stage in self.stages:
            per_block = len(stage.kernel) * len(stage.expansion) * len(stage.se) * len(stage.activation)
            total *= len(stage.width) * sum(per_block ** d for d in stage.depth)
        return total * len(self.last_conv.out_channels) * len(self.classifier.options())


def _spaces_folder() -> Traversable:
    """The built-in spaces: the package ``nas.spaces`` once installed (pyproject.toml maps ``search_spaces/``
    there); in a source checkout run with PYTHONPATH, ``search_spaces/`` beside ``nas/`` itself."""
    try:
        return resources.files("nas.spaces")
    except ModuleNotFoundError:
        return resources.files("nas").joinpath("..", "search_spaces")


def builtin_space_names() -> list[str]:
    return builtin_names(_spaces_folder())


def load_space(name_or_path: str | os.PathLike[str]) -> SearchSpace:
    """Load a search space from YAML, or a built-in one by name (``mobilenetv3_compact``, ...)."""
    path = _resolve(name_or_path, "search space", _spaces_folder())
    data = read_yaml(path, "search space")
    try:
        space = from_data(SearchSpace, data)
    except SpecError as e:
        raise e.in_file(name_or_path) from None
    try:
        ref = space.reference_spec()
    except SpecError as e:
        raise SpecError("reference", str(e), source=str(name_or_path)) from None
    if ref is not None and not space.contains(ref):
        try:
            space.choices(ref)
        except SpecError as e:
            raise SpecError("reference", f"{space.reference} is not a member: {e}", source=str(name_or_path)) from None
    return space
