"""Hostile input: malformed specs and spaces of every class (types, sizes, NaN, YAML tricks, special files). Each
gets a one-line error naming the field or file, and from the command line exit code 2 within 20 s under a 4 GiB
memory cap. With the corpora of test_spec.py and test_space.py this is well over 100 cases."""

import copy
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

import nas
from nas.space import load_space
from tests.test_space import BASE as SPACE
from tests.test_spec import BAD_FIELDS, mutated
from tests.test_spec import BASE as SPEC

SPECIAL = Path("/dev/zero")


def _spec(edit: Callable[[dict[str, Any]], object]) -> str:
    data = copy.deepcopy(SPEC)
    edit(data)
    return yaml.safe_dump(data, sort_keys=False, width=1 << 30)


def _space(edit: Callable[[dict[str, Any]], object]) -> str:
    data = copy.deepcopy(SPACE)
    edit(data)
    return yaml.safe_dump(data, sort_keys=False, width=1 << 30)


def _many_blocks(n: int) -> str:
    data = copy.deepcopy(SPEC)
    block = {**SPEC["blocks"][0]}
    data["blocks"] = [block] * n
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=True, width=1 << 30)


ALIASES = ("format_version: 1\nb: &b {in_channels: 16, kernel: 3, expanded_channels: 16, out_channels: 16, se: true, "
           "activation: relu, stride: 1, dilation: 1}\n"
           + "".join(f"l{i + 1}: &l{i + 1} [{', '.join([f'*l{i}' if i else '*b'] * 10)}]\n" for i in range(6))
           + "blocks: *l6\n")  # about 1.1 million blocks in a few hundred bytes (the 'billion laughs' shape)

SPECS: list[tuple[str, str, str]] = [
    # (id, file text, expected message after the file name)
    ("float kernel", _spec(lambda d: d["blocks"][0].update(kernel=3.0)), "blocks[0].kernel: 3.0 is not one of 3, 5, 7"),
    ("float stride", _spec(lambda d: d["blocks"][1].update(stride=2.0)), "blocks[1].stride: 2.0 is not one of 1, 2"),
    ("float stem kernel", _spec(lambda d: d["stem"].update(kernel=3.0)), "stem.kernel: 3.0 is not one of 1, 3, 5, 7"),
    ("huge channels", _spec(lambda d: d["blocks"][1].update(expanded_channels=10**12)),
     "blocks[1].expanded_channels: 1000000000000 is over the limit of 16,384"),
    ("huge out", _spec(lambda d: d["last_conv"].update(out_channels=10**12)),
     "last_conv.out_channels: 1000000000000 is over the limit of 16,384"),
    ("huge classes", _spec(lambda d: d.update(num_classes=10**12)),
     "num_classes: 1000000000000 is over the limit of 100,000"),
    ("huge resolution", _spec(lambda d: d["input"].update(resolution=10**9)),
     "input.resolution: 1000000000 is over the limit of 4,096"),
    ("huge input channels", _spec(lambda d: d["input"].update(channels=1000)),
     "input.channels: 1000 is over the limit of 64"),
    ("huge hidden", _spec(lambda d: d["classifier"].update(hidden=10**7)),
     "classifier.hidden: 10000000 is over the limit of 16,384"),
    ("huge dilation", _spec(lambda d: d["blocks"][0].update(dilation=1000)),
     "blocks[0].dilation: 1000 is over the limit of 16"),
    ("60-digit int", _spec(lambda d: d["stem"].update(out_channels=10**60)),
     "stem.out_channels: an integer of 61 digits is over the limit of 16,384"),
    ("5000-digit int", "format_version: 1\nnum_classes: " + "9" * 5000 + "\n", "not valid YAML: Exceeds the limit"),
    ("nan eps", _spec(lambda d: d["batch_norm"].update(eps=float("nan"))),
     "batch_norm.eps: nan is not a finite number"),
    ("inf eps", _spec(lambda d: d["batch_norm"].update(eps=float("inf"))),
     "batch_norm.eps: inf is not a finite number"),
    ("1e999 eps", _spec(lambda d: d["batch_norm"].update(eps=1e999)), "batch_norm.eps: inf is not a finite number"),
    ("nan momentum", _spec(lambda d: d["batch_norm"].update(momentum=float("nan"))),
     "batch_norm.momentum: nan is not a finite number"),
    ("nan dropout", _spec(lambda d: d["classifier"].update(dropout=float("nan"))),
     "classifier.dropout: nan is not a finite number"),
    ("-inf dropout", _spec(lambda d: d["classifier"].update(dropout=float("-inf"))),
     "classifier.dropout: -inf is not a finite number"),
    ("900 KB value", _spec(lambda d: d["blocks"][0].update(activation="x" * 900_000)),
     "blocks[0].activation: 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx... is not one of"),
    ("unhashable key", "format_version: 1\n? [1, 2]\n: 3\n", "not valid YAML at line 2, column 3: a key must be a"),
    ("mapping key", "format_version: 1\n? {a: 1}\n: 3\n", "not valid YAML at line 2, column 3: a key must be a"),
    ("50k-deep list", "blocks: " + "[" * 50_000 + "]" * 50_000 + "\n", "nested too deeply for a network spec"),
    ("40-deep metadata", _spec(lambda d: d.update(metadata=json.loads('{"a": ' * 40 + "1" + "}" * 40))),
     "nested more than 32 levels deep: not a network spec"),
    ("alias bomb", ALIASES, "more than 100,000 values (after YAML aliases are expanded)"),
    ("5000 blocks", _many_blocks(5000), "blocks: 5,000 blocks is over the limit of 256"),
    ("257 blocks", _many_blocks(257), "blocks: 257 blocks is over the limit of 256"),
    ("block as string", _spec(lambda d: d["blocks"].__setitem__(0, "ir_r1_k3_s1_e1_c16")),
     "blocks[0]: expected a mapping, got a string"),
    ("bool classes", _spec(lambda d: d.update(num_classes=True)), "num_classes: expected an integer, got a boolean"),
    ("list resolution", _spec(lambda d: d["input"].update(resolution=[32])),
     "input.resolution: expected an integer, got a list"),
    ("string eps", _spec(lambda d: d["batch_norm"].update(eps="1e-3")),
     "batch_norm.eps: expected a number, got a string"),
]

SPACES: list[tuple[str, str, str]] = [
    ("nan expansion", _space(lambda d: d["stages"][2].update(expand_ratio=[float("nan")])),
     "stages[2].expand_ratio[0]: nan is not a finite number"),
    ("inf expansion", _space(lambda d: d["stages"][2].update(expand_ratio=[float("inf")])),
     "stages[2].expand_ratio[0]: inf is not a finite number"),
    ("huge expansion", _space(lambda d: d["stages"][2].update(expand_ratio=[1000])),
     "stages[2].expand_ratio[0]: 1000.0 is over the limit of 64"),
    ("float kernel", _space(lambda d: d["stages"][1].update(kernel=[3.0, 5])),
     "stages[1].kernel[0]: 3.0 is not one of 3, 5, 7"),
    ("float stride", _space(lambda d: d["stages"][1].update(stride=2.0)), "stages[1].stride: 2.0 is not one of 1, 2"),
    ("huge width", _space(lambda d: d["stages"][1].update(width=[10**12])),
     "stages[1].width[0]: 1000000000000 is over the limit of 16,384"),
    ("huge depth", _space(lambda d: d["stages"][2].update(depth=[1, 1_000_000])),
     "stages[2].depth[1]: 1000000 is over the limit of 32"),
    ("too many options", _space(lambda d: d["stages"][1].update(width=list(range(8, 78)))),
     "stages[1].width: 70 choices is over the limit of 64"),
    ("too deep in all", _space(lambda d: d.update(stages=[{**d["stages"][0], "depth": [32]}] * 9)),
     "stages: the deepest member would have 288 blocks, over the limit of 256"),
    ("huge last conv", _space(lambda d: d["last_conv"].update(out_channels=[10**6])),
     "last_conv.out_channels[0]: 1000000 is over the limit of 16,384"),
    ("huge classes", _space(lambda d: d.update(num_classes=10**12)),
     "num_classes: 1000000000000 is over the limit of 100,000"),
    ("path name", _space(lambda d: d.update(name="../../../../tmp/x")),
     "name: '../../../../tmp/x' is not a safe file name"),
    ("long name", _space(lambda d: d.update(name="n" * 300)), "name: 'nnnnnnnnnnnnnnnn"),
    ("empty name", _space(lambda d: d.update(name="")), "name: '' is not a safe file name"),
    ("nan hidden", _space(lambda d: d["classifier"].update(hidden=[float("nan")])),
     "classifier.hidden[0]: expected an integer, got a number"),
    ("int se", _space(lambda d: d["stages"][1].update(se=[1])), "stages[1].se[0]: expected true or false"),
    ("relu7", _space(lambda d: d["stages"][1].update(activation=["relu7"])), "stages[1].activation[0]: 'relu7' is not"),
    ("nan eps", _space(lambda d: d["batch_norm"].update(eps=float("nan"))), "batch_norm.eps: nan is not a finite"),
    ("stage aliases", "format_version: 1\ns: &s {depth: [1], width: [8], stride: 1, kernel: [3], expand_ratio: [1]}\n"
     + "".join(f"l{i + 1}: &l{i + 1} [{', '.join([f'*l{i}' if i else '*s'] * 10)}]\n" for i in range(5))
     + "stages: *l5\n", "more than 100,000 values (after YAML aliases are expanded)"),
    ("unhashable key", "format_version: 1\n? [1, 2]\n: 3\n", "not valid YAML at line 2, column 3: a key must be"),
]


def _write(tmp: Path, kind: str, i: int, text: str) -> Path:
    path = tmp / f"{kind}{i:03d}.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(("name", "text", "expected"), SPECS, ids=[c[0] for c in SPECS])
def test_malformed_specs_get_one_line(name: str, text: str, expected: str, tmp_path: Path) -> None:
    f = _write(tmp_path, "spec", 0, text)
    with pytest.raises(nas.SpecError) as info:
        nas.load_spec(f)
    message = str(info.value)
    assert message.startswith(f"{f}: {expected}") and "\n" not in message and len(message) < 500, message[:300]


@pytest.mark.parametrize(("name", "text", "expected"), SPACES, ids=[c[0] for c in SPACES])
def test_malformed_spaces_get_one_line(name: str, text: str, expected: str, tmp_path: Path) -> None:
    f = _write(tmp_path, "space", 0, text)
    with pytest.raises(nas.SpecError) as info:
        load_space(f)
    message = str(info.value)
    assert message.startswith(f"{f}: {expected}") and "\n" not in message and len(message) < 500, message[:300]


def test_special_files_are_refused_without_reading(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    for path in (fifo, SPECIAL, Path("/dev/urandom")):
        with pytest.raises(nas.SpecError, match="is not a regular file"):
            nas.load_spec(path)
        with pytest.raises(nas.SpecError, match="is not a regular file"):
            load_space(path)


# Every case above, those of test_spec.py and test_space.py, and the special files, through the command line in one
# process (imports once) under a 4 GiB address-space cap: exit code 2, one line, at most 20 s each.
_CLI = """
import contextlib, io, json, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
from nas.cli import main
results = []
for command, path in json.loads(sys.argv[1]):
    err, start = io.StringIO(), time.perf_counter()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main([*command, path])
    results.append([path, code, err.getvalue(), time.perf_counter() - start])
print(json.dumps(results))
"""


def test_every_malformed_input_exits_2_in_one_line_within_20_s_under_4_gib(tmp_path: Path) -> None:
    from tests.test_space import BAD_SPACE_EDITS
    jobs = []
    for i, (_, text, _) in enumerate(SPECS):
        jobs.append((["build", "--no-latency"], str(_write(tmp_path, "spec", i, text))))
    for i, (path, value, _) in enumerate(BAD_FIELDS):
        text = yaml.safe_dump(mutated(path, value))
        jobs.append((["build", "--no-latency"], str(_write(tmp_path, "field", i, text))))
    for i, (_, text, _) in enumerate(SPACES):
        jobs.append((["train-supernet", "--out", str(tmp_path / "x.pt"), "--space"],
                     str(_write(tmp_path, "space", i, text))))
    for i, edit in enumerate(BAD_SPACE_EDITS):
        jobs.append((["train-supernet", "--out", str(tmp_path / "x.pt"), "--space"],
                     str(_write(tmp_path, "edit", i, _space(edit)))))
    os.mkfifo(tmp_path / "fifo.yaml")
    jobs += [(["build", "--no-latency"], str(tmp_path / "fifo.yaml")), (["build", "--no-latency"], str(SPECIAL))]
    assert len(jobs) >= 100
    r = subprocess.run([sys.executable, "-c", _CLI, json.dumps(jobs)], capture_output=True, text=True, timeout=900,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    for path, code, err, seconds in json.loads(r.stdout.splitlines()[-1]):
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, (path, code, err[:300])
        assert "Traceback" not in err and seconds <= 20, (path, seconds)
    assert not (tmp_path / "x.pt").exists()
