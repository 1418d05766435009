import random
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import nas
from nas.registry import ACTIVATIONS
from nas.space import builtin_space_names, load_space

ACTS = ", ".join(map(repr, ACTIVATIONS))  # the registry's names, as errors list them

SPACES = ["mobilenetv3_compact", "mobilenetv3_large", "mobilenetv3_small"]


def test_builtin_spaces_are_the_three_documented() -> None:
    assert builtin_space_names() == SPACES


@pytest.mark.parametrize(("space", "reference"), [("mobilenetv3_large", "mobilenet_v3_large"),
                                                  ("mobilenetv3_small", "mobilenet_v3_small"),
                                                  ("mobilenetv3_compact", "mobilenet_v3_compact")])
def test_each_space_contains_its_torchvision_reference(space: str, reference: str) -> None:
    s = load_space(space)
    ref = nas.load_spec(reference)
    assert s.reference == reference
    assert s.contains(ref)
    assert s.from_choices(s.choices(ref)) == ref.without_metadata()


@pytest.mark.parametrize("name", SPACES)
@settings(max_examples=15)
@given(seed=st.integers(0, 2**32 - 1))
def test_samples_are_members_and_round_trip_through_choices(name: str, seed: int) -> None:
    space = load_space(name)
    spec = space.sample(random.Random(seed))
    choices = space.choices(spec)
    assert space.from_choices(choices) == spec
    assert space.choices(space.from_choices(choices)) == choices
    assert all(isinstance(k, str) and "." in k for k in choices)


@pytest.mark.parametrize("name", SPACES)
def test_largest_and_smallest_bound_the_space(name: str) -> None:
    space = load_space(name)
    big, small = space.largest(), space.smallest()
    assert space.contains(big) and space.contains(small)
    rng = random.Random(0)
    for _ in range(20):
        s = space.sample(rng)
        assert len(small.blocks) <= len(s.blocks) <= len(big.blocks)
        assert sum(b.expanded_channels for b in small.blocks) <= sum(b.expanded_channels for b in s.blocks)
        assert sum(b.expanded_channels for b in s.blocks) <= sum(b.expanded_channels for b in big.blocks)
    assert all(b.se and b.kernel == 7 for b in big.blocks)
    assert not any(b.se for b in small.blocks)


def test_sampling_is_reproducible() -> None:
    space = load_space("mobilenetv3_compact")
    assert space.sample(random.Random(7)) == space.sample(random.Random(7))
    assert space.sample(random.Random(7)) != space.sample(random.Random(8))


def test_non_members_are_refused_with_a_reason() -> None:
    space = load_space("mobilenetv3_compact")
    assert not space.contains(nas.load_spec("mobilenet_v3_small"))  # 224x224, 1000 classes
    with pytest.raises(nas.SpecError, match=r"^input: "):
        space.choices(nas.load_spec("mobilenet_v3_small"))
    import dataclasses
    ref = nas.load_spec("mobilenet_v3_compact")
    odd = dataclasses.replace(ref, blocks=(dataclasses.replace(ref.blocks[0], kernel=3, dilation=2), *ref.blocks[1:]))
    with pytest.raises(nas.SpecError, match=r"^blocks: do not fit the stages"):
        space.choices(odd)
    with pytest.raises(nas.SpecError, match=r"^last_conv\.out_channels: 100 is not one of 288, 432, 576$"):
        space.choices(dataclasses.replace(ref, last_conv=nas.spec.LastConvSpec(100)))
    with pytest.raises(nas.SpecError, match=r"^classifier: ClassifierSpec\(hidden=1024, activation='relu'"):
        space.choices(dataclasses.replace(ref, classifier=nas.spec.ClassifierSpec(1024, "relu")))


def test_from_choices_errors_name_the_choice() -> None:
    space = load_space("mobilenetv3_compact")
    choices = space.choices(space.largest())
    del choices["stage3.block2.kernel"]
    with pytest.raises(nas.SpecError, match=r"^stage3\.block2\.kernel: missing from the choices$"):
        space.from_choices(choices)
    choices["stage3.block2.kernel"] = 9
    with pytest.raises(nas.SpecError, match=r"^stage3\.block2\.kernel: 9 is not one of 3, 5, 7$"):
        space.from_choices(choices)


BASE: dict[str, Any] = yaml.safe_load(
    (Path(__file__).parents[1] / "search_spaces" / "mobilenetv3_compact.yaml").read_text())


BAD_SPACES: list[tuple[Any, str]] = [
    (lambda d: d["stages"][1].update(kernel=[3, 4]), "stages[1].kernel[1]: 4 is not one of 3, 5, 7"),
    (lambda d: d["stages"][1].update(kernel=[]), "stages[1].kernel: must list at least one choice"),
    (lambda d: d["stages"][2].update(depth=[0, 1]), "stages[2].depth[0]: 0 must be positive"),
    (lambda d: d["stages"][2].update(width=[32, 32]), "stages[2].width: lists a choice twice: [32, 32]"),
    (lambda d: d["stages"][2].update(activation=["HS"]),
     f"stages[2].activation[0]: 'HS' is not one of {ACTS}"),
    (lambda d: d["stages"][2].update(se=["yes"]), "stages[2].se[0]: expected true or false, got a string"),
    (lambda d: d["stages"][2].update(stride=3), "stages[2].stride: 3 is not one of 1, 2"),
    (lambda d: d["stages"][3].update(expanded_channels=[64]),
     "stages[3].expand_ratio: give exactly one of expand_ratio and expanded_channels"),
    (lambda d: d["stages"][3].pop("expand_ratio"),
     "stages[3].expand_ratio: give exactly one of expand_ratio and expanded_channels"),
    (lambda d: d["stages"][3].update(expand_ratio=[-1]), "stages[3].expand_ratio[0]: -1.0 must be positive"),
    (lambda d: d["stages"][0].update(kernels=[3]), "stages[0].kernels: unknown key"),
    (lambda d: d.update(stages=[]), "stages: must list at least one stage"),
    (lambda d: d["last_conv"].update(out_channels=576), "last_conv.out_channels: expected a list, got an integer"),
    (lambda d: d["classifier"].update(dropout=2.0), "classifier.dropout: 2.0 is not in [0, 1)"),
    (lambda d: d.update(reference="mobilenet_v3_small"), "reference: mobilenet_v3_small is not a member: input: "),
    (lambda d: d.update(reference="nope.yaml"), "reference: nope.yaml: no such file"),
]
BAD_SPACE_EDITS = [edit for edit, _ in BAD_SPACES]


@pytest.mark.parametrize(("edit", "expected"), BAD_SPACES)
def test_bad_spaces_name_the_field(edit: Any, expected: str, tmp_path: Path) -> None:
    import copy
    data = copy.deepcopy(BASE)
    edit(data)
    f = tmp_path / "space.yaml"
    f.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(nas.SpecError) as info:
        load_space(f)
    message = str(info.value)
    assert message.startswith(f"{f}: {expected}") and "\n" not in message, message
