import json
import random
from pathlib import Path

import pytest

import nas
from nas.latency import Fingerprint, Predictor, layers_of, load_predictor, load_table, measure, space_layers, table_path
from nas.space import load_space

TINY = Path(__file__).parent / "tiny_space.yaml"


@pytest.fixture(scope="module")
def tiny_predictor(tmp_path_factory: pytest.TempPathFactory) -> Predictor:
    root = tmp_path_factory.mktemp("latency")
    return load_predictor(load_space(TINY), root=root, progress=False)


@pytest.mark.parametrize("name", ["mobilenetv3_compact", "mobilenetv3_small", "mobilenetv3_large",
                                  str(Path(__file__).parent / "v2_space.yaml")])
def test_the_table_keys_cover_every_layer_of_every_member(name: str) -> None:
    space = load_space(name)
    keys = set(space_layers(space))
    rng = random.Random(0)
    specs = [space.largest(), space.smallest(), *(space.sample(rng) for _ in range(200))]
    if space.reference_spec() is not None:
        specs.append(space.reference_spec())
    for spec in specs:
        missing = [layer for layer in layers_of(spec) if layer not in keys]
        assert not missing, missing[0]


def test_layers_of_gives_the_real_feature_map_sizes() -> None:
    import torch
    spec = nas.load_spec("mobilenet_v3_small")
    model = nas.build_model(spec).eval()
    sizes = []
    hooks = [m.register_forward_pre_hook(lambda _m, inp: sizes.append(inp[0].shape[-1])) for m in model.features]
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    for h in hooks:
        h.remove()
    assert [layer.size for layer in layers_of(spec)][:-1] == sizes


def test_prediction_is_the_corrected_sum_over_layers(tiny_predictor: Predictor) -> None:
    space = tiny_predictor.space
    spec = space.sample(random.Random(3))
    total = sum(tiny_predictor.table[layer] for layer in layers_of(spec))
    assert tiny_predictor.predict(spec) == pytest.approx(tiny_predictor.scale * total + tiny_predictor.offset)
    assert tiny_predictor.predict(space.largest()) > tiny_predictor.predict(space.smallest()) > 0
    assert (tiny_predictor.device, tiny_predictor.threads, tiny_predictor.batch_size) == (
        "cpu", Fingerprint.current().threads, 1)


def test_the_table_is_built_once_then_loaded(tiny_predictor: Predictor, monkeypatch: pytest.MonkeyPatch) -> None:
    import nas.latency._predictor as predictor_module
    assert tiny_predictor.path is not None and tiny_predictor.path.exists()
    assert tiny_predictor.path == table_path(tiny_predictor.space, tiny_predictor.fingerprint,
                                             tiny_predictor.path.parent)

    def no_profiling(*args: object, **kwargs: object) -> None:
        raise AssertionError("profiled again instead of loading the table")

    monkeypatch.setattr(predictor_module, "profile", no_profiling)
    again = load_predictor(tiny_predictor.space, root=tiny_predictor.path.parent, progress=False)
    assert again.table == tiny_predictor.table
    assert (again.scale, again.offset) == (tiny_predictor.scale, tiny_predictor.offset)


def test_a_foreign_table_is_refused_unless_forced(tiny_predictor: Predictor, tmp_path: Path) -> None:
    assert tiny_predictor.path is not None
    data = json.loads(tiny_predictor.path.read_text())
    data["fingerprint"]["processor"] = "Apple M9"
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps(data))
    space = tiny_predictor.space
    with pytest.raises(nas.SpecError, match=r"foreign\.json: was measured on cpu 'Apple M9'.*use --force") as info:
        load_predictor(space, table=foreign)
    assert "\n" not in str(info.value)
    assert load_predictor(space, table=foreign, force=True).table == tiny_predictor.table
    with pytest.raises(nas.SpecError, match=r"was made for space 'tiny'.*not 'mobilenetv3_compact'"):
        load_table(tiny_predictor.path, load_space("mobilenetv3_compact"), None)
    foreign.write_text("{ not json")
    with pytest.raises(nas.SpecError, match="not a readable latency table"):
        load_predictor(space, table=foreign)


def test_predicting_a_non_member_names_the_missing_layer(tiny_predictor: Predictor) -> None:
    with pytest.raises(nas.SpecError, match="is not in the latency table of space 'tiny'"):
        tiny_predictor.predict(nas.load_spec("mobilenet_v3_small"))


def test_measure_times_the_built_network() -> None:
    spec = nas.load_spec("mobilenet_v3_compact")
    m = measure(spec, repeats=5, warmup=1, threads=1)
    assert m.threads == 1 and m.batch_size == 1 and m.device == "cpu" and m.repeats == 5
    assert 0 < m.q1_ms <= m.median_ms <= m.q3_ms


def test_latency_cli_builds_and_validates(tmp_path: Path) -> None:
    import shutil
    import subprocess
    import sys
    shutil.copy(TINY, tmp_path / "tiny.yaml")
    run = [sys.executable, "-m", "nas", "latency"]
    r = subprocess.run([*run, "validate", "--space", "tiny.yaml", "--n", "5", "--threads", "1"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "within +-10% of measured" in r.stdout and "Kendall tau" in r.stdout and "noise floor" in r.stdout
    reports = list((tmp_path / "results" / "latency").glob("validate-*.json"))
    assert len(reports) == 1 and json.loads(reports[0].read_text())["n"] == 5
    r = subprocess.run([*run, "build", "--space", "tiny.yaml", "--threads", "1"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "(reused)" not in r.stdout and "layers" in r.stdout
    r = subprocess.run([*run, "build", "--space", "tiny.yaml", "--table", "nope.json"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr == "error: nope.json: no such latency table\n"


def test_interleaved_timing_visits_every_call_once_per_round_in_a_new_order() -> None:
    import torch

    from nas.latency import time_interleaved
    visits: list[int] = []

    def make(i: int) -> object:
        visits.append(i)
        return lambda: None

    times = time_interleaved(5, make, torch.device("cpu"), rounds=3, warmup=1, repeats=4, seed=0)
    assert [len(t) for t in times] == [3] * 5 and all(len(r) == 4 for t in times for r in t)
    rounds = [visits[0:5], visits[5:10], visits[10:15]]
    assert all(sorted(r) == list(range(5)) for r in rounds) and len({tuple(r) for r in rounds}) > 1


def test_the_allocator_is_pinned_before_anything_is_timed() -> None:
    import platform

    from nas.latency import steady_allocator
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt exists in glibc only")
    assert steady_allocator() is True
