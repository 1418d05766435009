import copy
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
import yaml
from hypothesis import given, settings

import nas
from nas.registry import ACTIVATIONS
from nas.spec import spec_to_dict
from tests.strategies import network_specs

ACTS = ", ".join(map(repr, ACTIVATIONS))  # the registry's names, as errors list them


@settings(max_examples=40)
@given(spec=network_specs())
def test_random_specs_round_trip_and_build(spec: nas.NetworkSpec, tmp_path_factory: pytest.TempPathFactory) -> None:
    path = tmp_path_factory.mktemp("rt") / "spec.yaml"
    nas.save_spec(spec, path)
    loaded = nas.load_spec(path)
    assert loaded == spec
    assert dict(loaded.metadata) == dict(spec.metadata)
    model = nas.build_model(loaded).eval()
    x = torch.randn(2, spec.input.channels, spec.input.resolution, spec.input.resolution)
    with torch.no_grad():
        assert model(x).shape == (2, spec.num_classes)


@pytest.mark.parametrize("name", ["mobilenet_v3_large", "mobilenet_v3_small", "mobilenet_v2"])
def test_builtin_specs_survive_a_round_trip(name: str, tmp_path: Path) -> None:
    spec = nas.load_spec(name)
    nas.save_spec(spec, tmp_path / "s.yaml")
    assert nas.load_spec(tmp_path / "s.yaml") == spec
    assert hash(nas.load_spec(tmp_path / "s.yaml")) == hash(spec)


def _macs(model: torch.nn.Module, resolution: int) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, resolution, resolution))
    return counter.get_total_flops() // 2


@pytest.mark.parametrize(("name", "params"), [("mobilenet_v3_large", 5_483_032), ("mobilenet_v3_small", 2_542_856),
                                              ("mobilenet_v2", 3_504_872)])
def test_builtin_specs_regenerate_torchvision_exactly(name: str, params: int) -> None:
    ours = nas.build_model(nas.load_spec(name)).eval()
    theirs = getattr(torchvision.models, name)().eval()
    mapped = nas.from_torchvision(theirs.state_dict())
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [(k, v.shape) for k, v in mapped.items()]
    assert sum(p.numel() for p in ours.parameters()) == params
    assert _macs(ours, 224) == _macs(theirs, 224)
    # Trained-looking BN statistics, so a mismatch in eps or BN placement would show in the outputs.
    with torch.no_grad():
        for m in theirs.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    ours.load_state_dict(nas.from_torchvision(theirs.state_dict()), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert (ours(x) - theirs(x)).abs().max().item() <= 1e-5


def test_mobilenet_v2_is_relu6_without_se_and_v3_keys_need_no_mapping() -> None:
    spec = nas.load_spec("mobilenet_v2")
    assert {b.activation for b in spec.blocks} == {"relu6"} and not any(b.se for b in spec.blocks)
    assert spec.last_conv.out_channels == 1280 and spec.classifier.hidden is None
    v3 = torchvision.models.mobilenet_v3_small().state_dict()
    assert list(nas.from_torchvision(v3)) == list(v3)


def test_spec_expresses_what_torchvision_cannot() -> None:
    base = nas.load_spec("mobilenet_v3_small")
    import dataclasses
    blocks = list(base.blocks)
    blocks[1] = dataclasses.replace(blocks[1], kernel=7, se=True, activation="hswish", expanded_channels=50)
    spec = dataclasses.replace(base, input=nas.spec.InputSpec(32), stem=dataclasses.replace(base.stem, stride=1),
                               blocks=tuple(blocks), num_classes=10)
    model = nas.build_model(spec).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    assert model.features[2].block[1][0].kernel_size == (7, 7)


def test_code_built_specs_are_validated_too() -> None:
    with pytest.raises(nas.SpecError, match=r"^kernel: 4 is not one of 3, 5, 7$"):
        nas.spec.BlockSpec(16, 4, 16, 16, False, "relu", 1)  # type: ignore[arg-type]


def test_metadata_is_read_only_and_not_hashed() -> None:
    spec = nas.load_spec("mobilenet_v3_small")
    with pytest.raises(TypeError):
        spec.metadata["x"] = 1  # type: ignore[index]
    assert hash(spec.with_metadata(trial=3)) == hash(spec)
    assert spec.with_metadata(trial=3).metadata["trial"] == 3
    # It pickles (a network carries its spec into worker processes), and comes back read-only.
    back = pickle.loads(pickle.dumps(nas.build_model(spec.with_metadata(trial=3)))).spec
    assert back == spec and back.metadata["trial"] == 3
    with pytest.raises(TypeError):
        back.metadata["x"] = 1  # type: ignore[index]


# ---- bad specs: each names the exact field ------------------------------------------------------------------------

BASE: dict[str, Any] = {
    "format_version": 1,
    "input": {"resolution": 32, "channels": 3},
    "num_classes": 10,
    "stem": {"out_channels": 16, "kernel": 3, "stride": 1, "activation": "hswish"},
    "blocks": [
        {"in_channels": 16, "kernel": 3, "expanded_channels": 16, "out_channels": 16, "se": True,
         "activation": "relu", "stride": 1, "dilation": 1},
        {"in_channels": 16, "kernel": 5, "expanded_channels": 64, "out_channels": 24, "se": False,
         "activation": "hswish", "stride": 2, "dilation": 1},
        {"in_channels": 24, "kernel": 7, "expanded_channels": 72, "out_channels": 24, "se": True,
         "activation": "hswish", "stride": 1, "dilation": 1},
        {"in_channels": 24, "kernel": 3, "expanded_channels": 96, "out_channels": 40, "se": False,
         "activation": "relu", "stride": 2, "dilation": 1},
    ],
    "last_conv": {"out_channels": 240, "activation": "hswish"},
    "classifier": {"hidden": 128, "activation": "hswish", "dropout": 0.2},
    "batch_norm": {"eps": 0.001, "momentum": 0.01},
    "metadata": {"origin": "test"},
}
DELETE = object()


def mutated(path: str, value: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    *parents, last = path.replace("[", ".").replace("]", "").split(".")
    node: Any = data
    for key in parents:
        node = node[int(key)] if key.isdigit() else node[key]
    if value is DELETE:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return data


BAD_FIELDS = [
    ("blocks[3].kernel", 4, "blocks[3].kernel: 4 is not one of 3, 5, 7"),
    ("blocks[0].kernel", 2, "blocks[0].kernel: 2 is not one of 3, 5, 7"),
    ("blocks[1].kernel", 9, "blocks[1].kernel: 9 is not one of 3, 5, 7"),
    ("blocks[1].kernel", "5", "blocks[1].kernel: '5' is not one of 3, 5, 7"),
    ("blocks[1].kernel", True, "blocks[1].kernel: True is not one of 3, 5, 7"),
    ("blocks[1].kernel", 5.0, "blocks[1].kernel: 5.0 is not one of 3, 5, 7"),
    ("blocks[2].stride", 1.0, "blocks[2].stride: 1.0 is not one of 1, 2"),
    ("blocks[2].stride", 3, "blocks[2].stride: 3 is not one of 1, 2"),
    ("blocks[2].stride", 0, "blocks[2].stride: 0 is not one of 1, 2"),
    ("blocks[0].activation", "HS", f"blocks[0].activation: 'HS' is not one of {ACTS}"),
    ("blocks[0].activation", "RE", f"blocks[0].activation: 'RE' is not one of {ACTS}"),
    ("blocks[0].activation", "swish", f"blocks[0].activation: 'swish' is not one of {ACTS}"),
    ("blocks[0].activation", None, f"blocks[0].activation: None is not one of {ACTS}"),
    ("blocks[1].out_channels", 0, "blocks[1].out_channels: 0 must be positive"),
    ("blocks[1].expanded_channels", 0, "blocks[1].expanded_channels: 0 must be positive"),
    ("blocks[1].expanded_channels", -8, "blocks[1].expanded_channels: -8 must be positive"),
    ("blocks[1].expanded_channels", 64.0, "blocks[1].expanded_channels: expected an integer, got a number"),
    ("blocks[1].expanded_channels", "64", "blocks[1].expanded_channels: expected an integer, got a string"),
    ("blocks[1].dilation", 0, "blocks[1].dilation: 0 must be positive"),
    ("blocks[1].se", "yes please", "blocks[1].se: expected true or false, got a string"),
    ("blocks[1].se", 1, "blocks[1].se: expected true or false, got an integer"),
    ("blocks[1].in_channels", 24, "blocks[1].in_channels: 24 does not match blocks[0].out_channels 16"),
    ("blocks[2].in_channels", 16, "blocks[2].in_channels: 16 does not match blocks[1].out_channels 24"),
    ("blocks[0].in_channels", 8, "blocks[0].in_channels: 8 does not match stem.out_channels 16"),
    ("blocks[0].in_channels", DELETE, "blocks[0].in_channels: missing"),
    ("blocks[2].kernel", DELETE, "blocks[2].kernel: missing"),
    ("blocks[2].kernal", 3, "blocks[2].kernal: unknown key"),
    ("blocks[2].use_se", True, "blocks[2].use_se: unknown key"),
    ("blocks[1]", [16, 5, 64], "blocks[1]: expected a mapping, got a list"),
    ("blocks[1]", None, "blocks[1]: expected a mapping, got null"),
    ("blocks", [], "blocks: must list at least one block"),
    ("blocks", {"a": 1}, "blocks: expected a list, got a mapping"),
    ("blocks", DELETE, "blocks: missing"),
    ("stem.kernel", 4, "stem.kernel: 4 is not one of 1, 3, 5, 7"),
    ("stem.stride", 4, "stem.stride: 4 is not one of 1, 2"),
    ("stem.activation", "HS", f"stem.activation: 'HS' is not one of {ACTS}"),
    ("stem.out_channels", 0, "stem.out_channels: 0 must be positive"),
    ("stem.out_channels", DELETE, "stem.out_channels: missing"),
    ("stem.padding", 1, "stem.padding: unknown key"),
    ("stem", "conv", "stem: expected a mapping, got a string"),
    ("input.resolution", 0, "input.resolution: 0 must be positive"),
    ("input.resolution", "224", "input.resolution: expected an integer, got a string"),
    ("input.channels", -3, "input.channels: -3 must be positive"),
    ("input", DELETE, "input: missing"),
    ("num_classes", 0, "num_classes: 0 must be positive"),
    ("num_classes", 10.5, "num_classes: expected an integer, got a number"),
    ("last_conv.out_channels", 0, "last_conv.out_channels: 0 must be positive"),
    ("last_conv.activation", "hardswish", f"last_conv.activation: 'hardswish' is not one of {ACTS}"),
    ("last_conv.groups", 2, "last_conv.groups: unknown key"),
    ("classifier.dropout", 1.0, "classifier.dropout: 1.0 is not in [0, 1)"),
    ("classifier.dropout", -0.1, "classifier.dropout: -0.1 is not in [0, 1)"),
    ("classifier.dropout", "0.2", "classifier.dropout: expected a number, got a string"),
    ("classifier.hidden", 0, "classifier.hidden: 0 must be positive"),
    ("classifier.hidden", None, "classifier.activation: must be null exactly when hidden is null"),
    ("classifier.activation", None, "classifier.activation: must be null exactly when hidden is null"),
    ("classifier.activation", "gelu", f"classifier.activation: 'gelu' is not one of {ACTS}"),
    ("batch_norm.eps", 0, "batch_norm.eps: 0.0 must be positive"),
    ("batch_norm.momentum", 1.5, "batch_norm.momentum: 1.5 is not in (0, 1]"),
    ("batch_norm.affine", False, "batch_norm.affine: unknown key"),
    ("format_version", 2, "format_version: 2 is not one of 1"),
    ("format_version", DELETE, "format_version: missing"),
    ("metadata", ["a"], "metadata: expected a mapping, got a list"),
    ("metadata", {1: "a"}, "metadata: key 1 must be a string"),
    ("extra", 1, "extra: unknown key"),
]


@pytest.mark.parametrize(("path", "value", "expected"), BAD_FIELDS, ids=[f"{p}={v!r}" for p, v, _ in BAD_FIELDS])
def test_bad_field_names_its_path(path: str, value: Any, expected: str, tmp_path: Path) -> None:
    f = tmp_path / "my.yaml"
    f.write_text(yaml.safe_dump(mutated(path, value), sort_keys=False))
    with pytest.raises(nas.SpecError) as info:
        nas.load_spec(f)
    message = str(info.value)
    assert message.startswith(f"{f}: {expected}"), message
    assert "\n" not in message


def test_the_bad_corpus_is_large_and_the_base_is_valid(tmp_path: Path) -> None:
    assert len(BAD_FIELDS) >= 50
    f = tmp_path / "ok.yaml"
    f.write_text(yaml.safe_dump(BASE, sort_keys=False))
    assert spec_to_dict(nas.load_spec(f)) == BASE


BAD_FILES = [
    ("", "empty file, expected a network spec"),
    ("# only a comment\n", "empty file, expected a network spec"),
    ("blocks: [1, 2\n", "not valid YAML at line 2, column 1"),
    ("a: b: c\n", "not valid YAML at line 1, column 5"),
    ("- 1\n- 2\n", "expected a mapping, got a list"),
    ("just text\n", "expected a mapping, got a string"),
    ("format_version: 1\nformat_version: 1\n", "not valid YAML at line 2, column 1: duplicate key 'format_version'"),
    ("!!python/object/apply:os.system ['true']\n", "not valid YAML"),
]


@pytest.mark.parametrize(("text", "expected"), BAD_FILES)
def test_bad_file_gets_one_line(text: str, expected: str, tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(nas.SpecError) as info:
        nas.load_spec(f)
    assert str(info.value).startswith(f"{f}: {expected}"), str(info.value)
    assert "\n" not in str(info.value)


def test_missing_oversized_binary_and_directory_files(tmp_path: Path) -> None:
    with pytest.raises(nas.SpecError, match="no such file"):
        nas.load_spec(tmp_path / "absent.yaml")
    with pytest.raises(nas.SpecError, match=r"not a file nor a built-in spec \(built-ins: mobilenet_v2, mobilenet_v3"):
        nas.load_spec("mobilenet_v4")
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * (1 << 20))
    with pytest.raises(nas.SpecError, match="byte limit"):
        nas.load_spec(big)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(nas.SpecError, match="not UTF-8 text"):
        nas.load_spec(binary)
    with pytest.raises(nas.SpecError, match="is a directory"):
        nas.load_spec(tmp_path)
