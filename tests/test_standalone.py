import dataclasses
import json
import math
import random
import statistics
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from scipy.stats import kendalltau

import nas
from nas.latency import Fingerprint
from nas.space import load_space
from nas.spec import spec_to_dict
from nas.standalone import rank_agreement
from nas.study import CONSTRAINT, Reference, SearchConfig, StudyRecord
from nas.train import TrainSettings
from nas.verify import Verification, VerifyRow, pooled_std, select_networks, verify, write_verification


def test_train_on_digits_beats_chance_by_a_clear_margin(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "nas", "train", "mobilenet_v3_compact", "--dataset", "digits",
                        "--epochs", "2", "--lr", "0.1", "--device", "cpu"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    metrics = json.loads(next((tmp_path / "results" / "train").glob("mobilenet_v3_compact.*.metrics.json"))
                         .read_text())
    # Chance is 0.1. Two epochs land near 0.5 and move by a few points with the CPU's float kernels (48% here).
    assert metrics["val_accuracy"] > 0.3
    assert metrics["latency"]["median_ms"] > 0 and len(metrics["history"]) == 2
    assert "validation accuracy:" in r.stdout and "latency:" in r.stdout


def _digits_folder(root: Path, per_class: int = 24) -> Path:
    """An ImageFolder of PNGs (3 digit classes) made from scikit-learn's digits: a folder data set that
    exists on every machine."""
    from PIL import Image
    from sklearn.datasets import load_digits

    bunch = load_digits()
    counts = dict.fromkeys((0, 1, 2), 0)
    for image, label in zip(bunch.images, bunch.target, strict=True):
        if label in counts and counts[label] < per_class:
            (root / f"digit{label}").mkdir(parents=True, exist_ok=True)
            Image.fromarray((image * 15).astype("uint8")).save(root / f"digit{label}" / f"{counts[label]}.png")
            counts[label] += 1
    return root


def test_train_search_and_verify_on_a_folder_data_set(tmp_path: Path) -> None:
    folder = f"folder:{_digits_folder(tmp_path / 'images')}"
    r = subprocess.run([sys.executable, "-m", "nas", "train", "mobilenet_v3_compact", "--dataset", folder,
                        "--epochs", "1", "--batch-size", "16", "--device", "cpu"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    metrics = json.loads(next((tmp_path / "results" / "train").glob("*.metrics.json")).read_text())
    assert metrics["dataset"] == folder and 0 <= metrics["val_accuracy"] <= 1
    r = subprocess.run([sys.executable, "-m", "nas", "search", "--dataset", folder, "--budget", "6",
                        "--supernet-epochs", "1", "--supernet-batch-size", "16", "--device", "cpu",
                        "--study-name", "digitsfolder"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "nas", "verify", "--study", "digitsfolder", "--top", "2", "--epochs", "1",
                        "--batch-size", "16", "--device", "cpu"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    v = json.loads((tmp_path / "results" / "digitsfolder" / "verify.json").read_text())
    assert v["dataset"] == folder and [row["name"] for row in v["rows"]][-1] == "reference"
    assert len(v["rows"]) == 3 and "Kendall tau" in r.stdout


def test_train_errors_are_one_line(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "nas", "train", "mobilenet_v3_compact", "--init", "torchvision",
                        "--epochs", "1", "--device", "cpu"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and r.stderr.startswith("error: --init: torchvision weights exist only for")
    r = subprocess.run([sys.executable, "-m", "nas", "train", "mobilenet_v3_small", "--init", "torchvision",
                        "--epochs", "1", "--device", "cpu"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300, env={"TORCH_HOME": str(tmp_path / "hub"), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2 and "pretrained weights not found at" in r.stderr and r.stderr.count("\n") == 1


def test_rank_agreement_from_known_numbers() -> None:
    tau, rho = rank_agreement([0.1, 0.2, 0.3, 0.4], [0.1, 0.3, 0.2, 0.4])
    assert tau == pytest.approx(4 / 6) and rho == pytest.approx(0.8)
    with pytest.raises(nas.SpecError, match="at least two"):
        rank_agreement([0.5], [0.5])


def test_verify_retrains_a_tiny_study(tmp_path: Path) -> None:
    space = load_space("mobilenetv3_compact")
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="tiny", storage=storage, directions=["maximize", "minimize"])
    fp = Fingerprint("cpu", "x", 1, 1, "x")
    StudyRecord(SearchConfig(sampler="nsga2"), "mobilenetv3_compact", 10, 10.0, fp, proxy_images=359).save(study)
    rng = random.Random(0)
    known = [(0.9, 3.0, -0.5), (0.8, 2.0, -0.4), (0.7, 1.0, -0.6)]  # all Pareto-optimal
    for acc, ms, log_lik in known:
        spec = space.sample(rng)
        study.add_trial(optuna.trial.create_trial(
            values=[acc, ms], user_attrs={"spec": spec_to_dict(spec), "proxy_log_likelihood": log_lik},
            constraints={CONSTRAINT: ms - 10.0}))
    v = verify(study, top=3, settings=TrainSettings(epochs=1, batch_size=128, random_subnets=0), device="cpu",
               out_dir=tmp_path / "verify", progress=False, noise_networks=0)
    assert [r.proxy_accuracy for r in v.rows] == [0.9, 0.8, 0.7]
    assert [r.predicted_ms for r in v.rows] == [3.0, 2.0, 1.0]
    standalone = [r.standalone_accuracy for r in v.rows]
    assert v.kendall_tau == pytest.approx(kendalltau([0.9, 0.8, 0.7], standalone).statistic)
    assert v.kendall_tau_log_likelihood == pytest.approx(kendalltau([-0.5, -0.4, -0.6], standalone).statistic)
    assert v.proxy_stderr == pytest.approx(math.sqrt(0.8 * 0.2 / 359))  # no reference: at the mean proxy
    paths = write_verification(v, tmp_path)
    written = json.loads(paths["json"].read_text())
    assert written["rows"][0]["name"] == "rank01-trial0000"
    assert written["caveats"][:2] == ["tau over 3 networks is coarse: one swapped pair moves it by 0.67",
                                      "the ground truth's noise is unmeasured: train the reference with --seeds 2 or "
                                      "more, or networks with --noise-networks 1 or more"]
    assert "! tau over 3 networks is coarse" in v.format()
    assert "Plotly.newPlot" in paths["html"].read_text()
    # No reference, but the most accurate and the fastest retrained with seed 1: the noise is measured on them
    # (the three seed-0 trainings come back from their checkpoints).
    again = verify(study, top=3, settings=TrainSettings(epochs=1, batch_size=128, random_subnets=0), device="cpu",
                   out_dir=tmp_path / "verify", progress=False, noise_networks=2)
    assert [r.standalone_accuracy for r in again.rows] == standalone
    assert [name for name, _ in again.network_seed_accuracies] == ["rank01-trial0000", "rank03-trial0002"]
    assert [a[0] for _, a in again.network_seed_accuracies] == [standalone[0], standalone[2]]
    assert again.noise_dof == 2 and again.noise_std == pytest.approx(pooled_std(
        [a for _, a in again.network_seed_accuracies])) and not any("unmeasured" in c for c in again.caveats)
    assert "2 networks retrained with a second seed (rank01-trial0000" in again.format()
    with pytest.raises(nas.SpecError, match=r"^noise_networks: -1 must not be negative$"):
        verify(study, top=3, settings=TrainSettings(), out_dir=tmp_path / "v", progress=False, noise_networks=-1)


def _study_of(points: list[tuple[float, float]], limit: float = 10.0, repeat: dict[int, int] | None = None
              ) -> optuna.Study:
    """A study whose trial i has (accuracy, latency) points[i]; trial j repeats trial repeat[j]'s architecture."""
    space = load_space("mobilenetv3_compact")
    study = optuna.create_study(directions=["maximize", "minimize"])
    rng, specs = random.Random(0), []
    for i, (acc, ms) in enumerate(points):
        specs.append(specs[(repeat or {})[i]] if i in (repeat or {}) else space.sample(rng))
        study.add_trial(optuna.trial.create_trial(values=[acc, ms], user_attrs={"spec": spec_to_dict(specs[-1])},
                                                  constraints={CONSTRAINT: ms - limit}))
    return study


def test_select_networks_spreads_a_large_front_evenly() -> None:
    front = [(0.9 - 0.01 * i, 9.0 - 0.5 * i) for i in range(9)]  # 9 Pareto-optimal trials, most accurate first
    study = _study_of([*front, (0.5, 9.5), (0.99, 11.0)])  # one dominated, one over the limit
    chosen = select_networks(study, {i: i + 1 for i in range(9)}, 5)
    assert [name for name, *_ in chosen] == ["rank01-trial0000", "rank03-trial0002", "rank05-trial0004",
                                             "rank07-trial0006", "rank09-trial0008"]
    assert chosen[0][2] == 0.9 and math.isnan(chosen[0][3]) and chosen[0][4] == 9.0  # no log-likelihood stored


def test_select_networks_fills_a_small_front_from_the_next_layers_without_repeats() -> None:
    # front: trials 0, 1; second layer: 2, 3 (3 repeats trial 0's architecture, so it is skipped); third: 4
    study = _study_of([(0.9, 3.0), (0.8, 2.0), (0.85, 3.5), (0.75, 2.5), (0.7, 4.0)], repeat={3: 0})
    chosen = select_networks(study, {0: 1, 1: 2}, 10)
    assert [name for name, *_ in chosen] == ["rank01-trial0000", "rank02-trial0001", "front2-trial0002",
                                             "front3-trial0004"]
    assert [name for name, *_ in select_networks(study, {0: 1, 1: 2}, 3)] == \
        ["rank01-trial0000", "rank02-trial0001", "front2-trial0002"]


def test_verify_measures_the_ground_truths_own_noise_on_the_reference(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import nas.report
    timed = []

    def spy(reference: object, specs: list, **kw: object) -> object:
        timed.append((reference, specs, kw["copies"]))
        return time_beside_reference(reference, specs, **kw)

    time_beside_reference = nas.report.time_beside_reference
    monkeypatch.setattr(nas.report, "time_beside_reference", spy)
    space = load_space("mobilenetv3_compact")
    study = optuna.create_study(study_name="ref", storage=f"sqlite:///{tmp_path / 'study.db'}",
                                directions=["maximize", "minimize"])
    reference = Reference(space.reference_member(), 0.75, 5.0, -0.7)
    StudyRecord(SearchConfig(), "mobilenetv3_compact", 10, 10.0, Fingerprint("cpu", "x", 1, 1, "x"), reference,
                proxy_images=359).save(study)
    for acc, ms in ((0.9, 3.0), (0.8, 2.0)):
        study.add_trial(optuna.trial.create_trial(
            values=[acc, ms], user_attrs={"spec": spec_to_dict(space.sample(random.Random(int(ms))))},
            constraints={CONSTRAINT: ms - 10.0}))
    v = verify(study, top=2, settings=TrainSettings(epochs=1, batch_size=128, random_subnets=0), device="cpu",
               out_dir=tmp_path / "verify", progress=False, seeds=2)
    ref_row = v.rows[-1]
    assert ref_row.name == "reference" and ref_row.proxy_log_likelihood == -0.7
    # Its latency is timed once, beside the found networks, pooled over its visits (as the front's in nas report)
    assert [(r, len(specs), copies) for r, specs, copies in timed] == [(reference.spec, 2, 3)]
    assert all(math.isfinite(r.measured_ms) and r.measured_ms > 0 for r in v.rows)
    assert len(v.reference_seed_accuracies) == 2 and v.reference_seed_accuracies[0] == ref_row.standalone_accuracy
    assert v.proxy_stderr == pytest.approx(math.sqrt(0.75 * 0.25 / 359))  # at the reference's proxy accuracy
    noisy = any("differ by little more than seed-to-seed noise" in c for c in v.caveats)
    assert noisy == (v.network_std <= 2 * v.noise_std) and "stand-alone seed-to-seed noise" in v.format()
    # The default: 2 of the 2 found networks retrained once more, pooled with the reference's 2 seeds.
    assert [name for name, _ in v.network_seed_accuracies] == [r.name for r in v.rows[:2]] and v.noise_dof == 3
    with pytest.raises(nas.SpecError, match=r"^seeds: 0 must be positive$"):
        verify(study, top=2, settings=TrainSettings(), out_dir=tmp_path / "v", progress=False, seeds=0)


def _verification(standalone: list[float], seeds: tuple[float, ...]) -> Verification:
    rows = tuple(VerifyRow(f"n{i}", a, -1.0, a, 1.0, 1.0) for i, a in enumerate(standalone))
    return Verification("s", "digits", {"epochs": 1}, rows, 1.0, 1.0, 1.0, 0.01, seeds)


def test_pooled_std_from_known_numbers() -> None:
    # Squared deviations 2 (1, 3 around 2) and 8 (4, 8 around 6) over 1 + 1 degrees of freedom; one seed adds none.
    assert pooled_std([(1.0, 3.0), (4.0, 8.0), (5.0,)]) == pytest.approx(math.sqrt(10 / 2))
    assert pooled_std([(1.0, 2.0, 3.0)]) == pytest.approx(statistics.stdev([1.0, 2.0, 3.0]))
    assert math.isnan(pooled_std([(1.0,), ()]))


def test_the_ceiling_reads_the_noise_pooled_over_every_reseeded_network() -> None:
    # The reference alone repeats exactly; a network that moves by 4 points between seeds says the recipe is noisy.
    exact = _verification([0.50, 0.51, 0.52], (0.6, 0.6))
    assert exact.tau_ceiling == (1.0, 1.0, 1.0) and exact.noise_std == 0.0
    pooled = dataclasses.replace(exact, network_seed_accuracies=(("n0", (0.50, 0.54)),))
    assert pooled.seed_std == 0.0 and pooled.noise_std == pytest.approx(0.02)  # sqrt((0 + 0.0008) / 2 dof)
    assert pooled.tau_ceiling == (0.0, 0.0, 0.0) and pooled.verdict.startswith("the ground truth is all noise")
    assert "pooled over all: std 2.00% (2 degrees of freedom)" in pooled.format()
    written = pooled.to_json()
    assert written["network_seed_accuracies"] == {"n0": (0.50, 0.54)} and written["noise_dof"] == 2


def test_tau_ceiling_is_what_a_perfect_proxy_scores_against_the_measured_noise() -> None:
    from scipy.stats import norm

    # Exact ground truth: a perfect proxy ranks it perfectly.
    assert _verification([0.5, 0.6, 0.7], (0.6, 0.6)).tau_ceiling == (1.0, 1.0, 1.0)
    # The networks spread no more than one network over seeds: nothing is left to rank.
    assert _verification([0.50, 0.51, 0.52], (0.50, 0.54)).tau_ceiling == (0.0, 0.0, 0.0)
    # ...so even a tau of -1 there says nothing about the proxy.
    all_noise = dataclasses.replace(_verification([0.50, 0.51, 0.52], (0.50, 0.54)), kendall_tau=-1.0)
    assert all_noise.verdict.startswith("the ground truth is all noise")
    unmeasured = _verification([0.5, 0.6, 0.7], (0.6,))
    assert all(math.isnan(t) for t in unmeasured.tau_ceiling) and "perfect proxy" not in unmeasured.format()
    # Against theory: for a normal true spread of variance 3 and noise of variance 1, a bivariate normal with
    # correlation r = sqrt(3 / 4), whose Kendall tau is (2 / pi) asin(r) = 2/3 (Greiner's relation).
    n, noise = 60, 0.01
    spread = math.sqrt(4) * noise  # observed = true + noise: variance 3 + 1 (noise^2 units)
    observed = [0.6 + spread * norm.ppf((i + 0.5) / n) / statistics.stdev(norm.ppf((k + 0.5) / n) for k in range(n))
                for i in range(n)]
    seeds = (0.6 - noise / math.sqrt(2), 0.6 + noise / math.sqrt(2))  # sample std exactly `noise`
    low, median, high = _verification(observed, seeds).tau_ceiling
    assert low < median < high and median == pytest.approx(2 / math.pi * math.asin(math.sqrt(3 / 4)), abs=0.03)
    # 1.5 times the noise: true variance 4 - 2.25, so r = sqrt(1.75 / 4).
    wider = (0.6 - 1.5 * noise / math.sqrt(2), 0.6 + 1.5 * noise / math.sqrt(2))
    assert _verification(observed, wider).tau_ceiling[1] == pytest.approx(2 / math.pi * math.asin(math.sqrt(1.75 / 4)),
                                                                          abs=0.03)
    assert "a perfect proxy would score Kendall tau" in _verification(observed, seeds).format()
    # tau read against that range: here the rows' tau is 1.0 (_verification), above any ceiling; then far below it.
    assert "within reach of a perfect one" in _verification(observed, seeds).verdict
    below = dataclasses.replace(_verification(observed, seeds), kendall_tau=low - 0.01)
    assert "the proxy, not the ground truth's noise, limits the ranking" in below.format()
    assert unmeasured.verdict == ""
    undefined = dataclasses.replace(_verification(observed, seeds), kendall_tau=math.nan)
    assert undefined.verdict == "" and f"to {high:.2f})\n" in undefined.format()  # the range, then no verdict


def test_verify_trains_in_worker_processes_to_the_same_accuracies(tmp_path: Path) -> None:
    import torch

    from nas.data import load_dataset
    from nas.standalone import checkpoint_for
    from nas.verify import train_all

    space = load_space("mobilenetv3_compact")
    rng = random.Random(3)
    settings = TrainSettings(epochs=1, batch_size=128, random_subnets=0)
    trainings = [(space.sample(rng), settings), (space.sample(rng), settings),
                 (space.sample(rng), TrainSettings(epochs=1, batch_size=128, random_subnets=0, seed=1))]
    dataset = ("digits", space.input.resolution, 0, str(tmp_path / "data"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the threads each of 2 workers gets on this 2-core machine: the same arithmetic
    try:
        alone = train_all(trainings, dataset, device="cpu", out_dir=tmp_path / "alone", progress=False)
    finally:
        torch.set_num_threads(threads)
    together = train_all(trainings, dataset, device="cpu", out_dir=tmp_path / "together", jobs=2, progress=False)
    assert together == alone and all(0 < a <= 1 for a in alone)
    assert len(list((tmp_path / "together" / "checkpoints").glob("*.pt"))) == 3  # a later run reuses them

    # A worker's error reaches the caller whole, without waiting for the trainings not begun: a corrupt
    # checkpoint, named with its file.
    data = load_dataset(*dataset[:2], seed=0, data_dir=dataset[3])
    bad = checkpoint_for(trainings[0][0], data, trainings[0][1], None, tmp_path / "bad" / "checkpoints")
    bad.parent.mkdir(parents=True)
    bad.write_text("not a checkpoint")
    with pytest.raises(nas.SpecError, match="not a readable supernet checkpoint") as e:
        train_all(trainings, dataset, device="cpu", out_dir=tmp_path / "bad", jobs=2, progress=False)
    assert e.value.source == str(bad)
    assert len(list(bad.parent.glob("*.pt"))) < 3  # the third never began
    with pytest.raises(nas.SpecError, match=r"^jobs: 0 must be positive$"):
        train_all(trainings, dataset, device="cpu", out_dir=tmp_path / "bad", jobs=0, progress=False)
    assert train_all([], dataset, device="cpu", out_dir=tmp_path / "none", jobs=2) == []
