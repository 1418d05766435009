"""The benchmarks' report plumbing: a section written on the device machine comes back through $OUT and lands in
results/BENCHMARKS.md here, in place of the old one, without touching the others."""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "benchmarks"))
import _report  # the benchmarks' own module, beside them


def test_a_section_written_on_the_device_machine_is_spliced_into_benchmarks_here(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    here = tmp_path / "BENCHMARKS.md"
    here.write_text("# Benchmarks\n\n<!-- bench:a -->\n## A\n\nold figures\n<!-- /bench:a -->\n\n"
                    "<!-- bench:b -->\n## B\n\nkept\n<!-- /bench:b -->\n")
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setenv("OUT", str(out))
    monkeypatch.setattr(_report, "BENCHMARKS", tmp_path / "device-checkout-BENCHMARKS.md")  # lost with the machine
    _report.write_section("a", "A", "new figures")
    _report.write_section("trial", "A trial run", "not recorded", record=False)
    assert not (tmp_path / "device-checkout-BENCHMARKS.md").read_text().count("not recorded")
    assert (out / "bench-trial.md").exists()  # still comes back, to read

    monkeypatch.setattr(_report, "BENCHMARKS", here)
    _report.splice([str(out / "bench-a.md")])
    text = here.read_text()
    assert "new figures" in text and "old figures" not in text and "kept" in text
    assert text.count("<!-- bench:a -->") == 1 and text.index("<!-- bench:a -->") < text.index("<!-- bench:b -->")
    assert f"Measured {_report.datetime.date.today().isoformat()} on " in text


def test_splicing_a_file_without_a_section_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_report, "BENCHMARKS", tmp_path / "BENCHMARKS.md")
    stray = tmp_path / "device.log"
    stray.write_text("a log, not a section\n")
    with pytest.raises(SystemExit, match=re.escape("device.log: no <!-- bench:NAME --> section in it")):
        _report.splice([str(stray)])
    with pytest.raises(SystemExit, match=re.escape(f"{tmp_path / 'absent.md'}: No such file or directory")):
        _report.splice([str(tmp_path / "absent.md")])
    assert not (tmp_path / "BENCHMARKS.md").exists()


def test_bench_verify_proxy_changes_are_the_supernet_recipe_settings_and_a_bad_one_is_named() -> None:
    import bench_verify

    from nas import SpecError

    own = dataclasses.replace(bench_verify.SIZES["cpu"].supernet, seed=2)  # a --seed 2 run's
    changed = bench_verify.proxy_variant(own, "epochs=12,label_smoothing=0")
    assert (changed.epochs, changed.label_smoothing, changed.lr, changed.seed) == (12, 0.0, own.lr, 2)
    assert bench_verify.proxy_variant(own, "seed=3") == dataclasses.replace(own, seed=3)  # another supernet seed
    for text, message in [("epochs", "--proxy: 'epochs' is not SETTING=VALUE"),
                          ("epoch=3", "--proxy.epoch: unknown key"),
                          ("epochs=x", "--proxy.epochs: expected an integer, got a string"),
                          ("seed=x", "--proxy.seed: expected an integer, got a string")]:
        with pytest.raises(SpecError, match=re.escape(message)):
            bench_verify.proxy_variant(own, text)
    # --finetune changes the stand-alone recipe with the same parser, and names its own flag
    recipe = bench_verify.SIZES["cpu"].recipe
    tuned = bench_verify.proxy_variant(recipe, "epochs=1,lr=0.01", "--finetune")
    assert (tuned.epochs, tuned.lr, tuned.batch_size) == (1, 0.01, recipe.batch_size)
    with pytest.raises(SpecError, match=re.escape("--finetune.lr: 0.0 must be positive")):
        bench_verify.proxy_variant(recipe, "lr=0", "--finetune")


def test_bench_verify_averages_each_recipe_trained_from_several_seeds() -> None:
    import bench_verify

    from nas._schema import to_data

    own = dataclasses.replace(bench_verify.SIZES["cpu"].supernet, seed=2)
    labels = ["the run's own", "seed=3", "sampling=fair", "sampling=fair,seed=3", "epochs=12"]
    accuracy = [[0.50, 0.60, 0.70], [0.56, 0.58, 0.60], [0.70, 0.50, 0.60], [0.60, 0.50, 0.70], [0.5, 0.6, 0.7]]
    rows = [{"supernet": label, "settings": to_data(bench_verify.proxy_variant(own, label) if k else own),
             "proxy_accuracy": a} for k, (label, a) in enumerate(zip(labels, accuracy, strict=True))]
    recipe, fair = bench_verify.seed_ensembles(rows, [0.1, 0.3, 0.2])
    # epochs=12 has one seed: no ensemble; the others average their own seeds, not each other's
    assert (recipe["recipe"], recipe["seeds"], fair["recipe"], fair["seeds"]) == \
        ("the run's recipe", 2, "the sampling=fair recipe", 2)
    assert recipe["proxy_accuracy"] == pytest.approx([0.53, 0.59, 0.65])
    assert fair["proxy_accuracy"] == pytest.approx([0.65, 0.50, 0.65])
    assert recipe["kendall_tau"] == pytest.approx(1 / 3) and recipe["kendall_tau_own"] == pytest.approx(1.0)
