"""End-to-end search: outputs, resume, Ctrl-C, kill -9, reports from storage, and distributed workers."""

import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pandas as pd
import pytest

import nas
from nas.report import hypervolume
from nas.study import CONSTRAINT, StudyRecord, open_storage, stored_measurements, trial_spec
from nas.train import TrainSettings

# Small and fast: a 1-epoch supernet (cached in one results folder for the whole module) and few trials.
FAST = ["--supernet-epochs", "1", "--device", "cpu"]


def nas_cmd(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: int = 600
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nas", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def start(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "nas", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def states(db: Path, study: str) -> list[tuple[int, str]]:
    s = optuna.load_study(study_name=study, storage=open_storage(f"sqlite:///{db}"))
    return [(t.number, t.state.name) for t in s.get_trials(deepcopy=False)]


def wait_for_complete(db: Path, study: str, n: int, proc: subprocess.Popen[str], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if db.exists():
            try:
                if sum(s == "COMPLETE" for _, s in states(db, study)) >= n:
                    return
            except KeyError:  # the study is not created yet
                pass
        time.sleep(0.3)
    raise AssertionError("timed out waiting for trials")


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder whose results/ holds one small search (12 trials), shared by the tests below."""
    work = tmp_path_factory.mktemp("search")
    r = nas_cmd("search", "--budget", "12", *FAST, cwd=work)
    assert r.returncode == 0, r.stderr
    (work / "first_stdout.txt").write_text(r.stdout)
    return work


def test_search_writes_specs_csv_and_plots(work: Path) -> None:
    out = work / "results" / "mobilenetv3_compact-digits"
    stdout = (work / "first_stdout.txt").read_text()
    assert "feasible Pareto-optimal architectures" in stdout and "specs:" in stdout
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 12 and set(trials["state"]) == {"COMPLETE"}
    assert {"accuracy", "predicted_latency_ms", "feasible", "pareto", "params_stage3.block1.kernel"} <= set(
        trials.columns)
    specs = sorted((out / "specs").glob("*.yaml"))
    assert specs and len(specs) == int((trials["pareto"] & trials["feasible"]).sum())
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "specs").stat().st_mode & 0o777 == 0o777 & ~umask  # a normal folder, not mkdtemp's 0700
    accs = []
    for path in specs:
        spec = nas.load_spec(path)
        assert nas.build_model(spec) is not None
        meta = spec.metadata
        assert meta["search_space"] == "mobilenetv3_compact" and meta["dataset"] == "digits"
        assert meta["predicted_latency_ms"] <= meta["latency_limit_ms"] and meta["measured_latency_ms"] > 0
        assert meta["measured_latency_vs_reference"] > 0  # timed beside the reference
        accs.append(meta["proxy_accuracy"])
    assert accs == sorted(accs, reverse=True)
    for page in ("pareto.html", "history.html"):
        html = (out / page).read_text()
        assert "Plotly.newPlot" in html and 'src="https://cdn.plot.ly' not in html and len(html) > 1_000_000
    assert "MobileNetV3 reference" in (out / "pareto.html").read_text()


def test_trials_carry_spec_latency_and_optuna_constraints(work: Path) -> None:
    study = optuna.load_study(study_name="mobilenetv3_compact-digits",
                              storage=f"sqlite:///{work / 'results/mobilenetv3_compact-digits/study.db'}")
    record = StudyRecord.load(study)
    limit = record.latency_limit_ms
    assert record.reference is not None and limit == pytest.approx(record.reference.predicted_latency_ms)
    assert record.config.budget == 12 and record.space_name == "mobilenetv3_compact" and record.num_classes == 10
    for t in study.trials:
        assert "stage1.block1.kernel" in t.params and "spec" in t.user_attrs
        assert t.constraints[CONSTRAINT] == pytest.approx(t.values[1] - limit)
        assert nas.spec.spec_from_dict(t.user_attrs["spec"]).blocks[0].kernel == t.params["stage1.block1.kernel"]
    feasible_numbers = {t.number for t in study.trials if t.values[1] <= limit}
    assert {t.number for t in study.best_trials} <= feasible_numbers  # Optuna itself excludes infeasible ones


def test_optuna_dashboard_sees_metric_names_and_feasibility(work: Path) -> None:
    from optuna_dashboard._named_objectives import get_objective_names
    from optuna_dashboard._serializer import serialize_frozen_trial
    study = optuna.load_study(study_name="mobilenetv3_compact-digits",
                              storage=f"sqlite:///{work / 'results/mobilenetv3_compact-digits/study.db'}")
    system_attrs = study._storage.get_study_system_attrs(study._study_id)
    assert get_objective_names(system_attrs) == ["proxy_accuracy", "predicted_latency_ms"]
    limit = StudyRecord.load(study).latency_limit_ms
    for t in study.trials:
        shown = serialize_frozen_trial(study._study_id, t, system_attrs)["constraints"]
        assert shown == [pytest.approx(t.values[1] - limit)]  # what the dashboard judges feasibility by


def test_a_rerun_continues_to_the_budget_and_repeats_nothing(work: Path) -> None:
    r = nas_cmd("search", "--budget", "15", *FAST, cwd=work)
    assert r.returncode == 0, r.stderr
    assert "this run: 3 trials" in r.stdout
    got = states(work / "results/mobilenetv3_compact-digits/study.db", "mobilenetv3_compact-digits")
    assert sorted(n for n, _ in got) == list(range(15)) and {s for _, s in got} == {"COMPLETE"}


def test_report_and_export_from_the_storage_alone(work: Path) -> None:
    out = work / "results" / "mobilenetv3_compact-digits"
    for name in ("trials.csv", "pareto.html", "history.html"):
        (out / name).unlink()
    study = optuna.load_study(study_name="mobilenetv3_compact-digits", storage=f"sqlite:///{out / 'study.db'}")
    before = stored_measurements(study)
    ranked = {t.number for t in study.best_trials if "duplicate_of" not in t.user_attrs}  # a repeat is ranked once
    # Measured by the searches (an earlier run's front may hold trials since dominated: their figures stay).
    assert before and ranked <= set(before)
    r = nas_cmd("report", "--study", "mobilenetv3_compact-digits", cwd=work)
    assert r.returncode == 0, r.stderr
    assert (out / "trials.csv").exists() and (out / "pareto.html").exists() and (out / "history.html").exists()
    assert stored_measurements(study) == before  # the report reused them instead of measuring again
    specs = {nas.load_spec(p).metadata["trial"]: nas.load_spec(p).metadata for p in (out / "specs").glob("*.yaml")}
    assert set(specs) == ranked
    assert {n: m["measured_latency_ms"] for n, m in specs.items()} == {n: round(before[n].ms, 4) for n in ranked}
    # Each batch of the front is timed with the reference in the same rounds, so ratios to it survive drift.
    assert all(m.reference_ms is not None and m.reference_ms > 0 for m in before.values())
    assert {n: m["measured_latency_vs_reference"] for n, m in specs.items()} == {
        n: round(before[n].ms / before[n].reference_ms, 4) for n in ranked}
    r = nas_cmd("report", "--study", "mobilenetv3_compact-digits", "--remeasure", cwd=work)
    assert r.returncode == 0 and stored_measurements(study) != before, r.stderr
    r = nas_cmd("export", "--study", "mobilenetv3_compact-digits", "--top", "1", "--out", str(work / "best"),
                cwd=work)
    assert r.returncode == 0, r.stderr
    exported = list((work / "best").glob("*.yaml"))
    assert len(exported) == 1 and exported[0].name.startswith("rank01-")
    bad = nas_cmd("report", "--study", "nope", cwd=work)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --study: no study 'nope'")


def test_a_run_with_another_seed_is_refused_before_training(work: Path) -> None:
    supernets = set((work / "results" / "supernets").iterdir())
    r = nas_cmd("search", "--budget", "15", "--seed", "1", *FAST, cwd=work)
    assert r.returncode == 2 and r.stderr.startswith(
        "error: --study-name: study 'mobilenetv3_compact-digits' was run with seed 0, this run has 1"), r.stderr
    assert set((work / "results" / "supernets").iterdir()) == supernets  # no supernet trained for seed 1
    r = nas_cmd("search", "--dataset", "nope", "--study-name", "stub", *FAST, cwd=work)
    assert r.returncode == 2 and r.stderr.startswith("error: --dataset: 'nope' is not one of"), r.stderr
    assert not (work / "results" / "stub").exists()  # no stub study.db left by the failed start
    r = nas_cmd("search", "--budget", "0", "--study-name", "nothing", *FAST, cwd=work)
    assert r.returncode == 2 and r.stderr == ("error: --budget: 0, and there is no study 'nothing' to report: nothing "
                                              "to do\n")
    assert not (work / "results" / "nothing").exists()


def test_repeated_architectures_reuse_their_values_and_workers_draw_their_own_streams(tmp_path: Path) -> None:
    from nas.search import _Scored, _worker_seed
    from nas.study import SearchConfig
    space = nas.load_space("mobilenetv3_compact")
    config = SearchConfig(study_name="dups", storage=f"sqlite:///{tmp_path / 'study.db'}", seed=5)
    storage = open_storage(config.storage_url)
    study = optuna.create_study(study_name="dups", storage=storage, directions=["maximize", "minimize"])
    from nas.spec import spec_to_dict
    specs = [space.sample(random.Random(i)) for i in range(3)]
    for i, (spec, acc) in enumerate([(specs[0], 0.5), (specs[1], 0.6), (specs[0], 0.7)]):
        study.add_trial(optuna.trial.create_trial(values=[acc, 1.0 + i], user_attrs={
            "spec": spec_to_dict(spec), "proxy_log_likelihood": -acc}))
    scored = _Scored()
    assert scored.get(study, specs[0].with_metadata(anything=1)) == (0, (0.5, 1.0), -0.5)  # the first scoring wins
    assert scored.get(study, specs[2]) is None
    study_id = storage.get_study_id_from_name("dups")
    seeds = [_worker_seed(storage, study_id, config) for _ in range(3)]
    assert seeds[0] == 5 and len(set(seeds)) == 3  # the first run keeps --seed: a lone search is reproducible


def test_bn_calibration_grows_with_the_images_scored_and_a_study_keeps_its_own(work: Path, tmp_path: Path) -> None:
    import dataclasses
    import shutil

    from nas.search import prepare, run_search
    from nas.study import LOG_LIKELIHOOD_ATTR, SearchConfig, load_study
    from nas.train import calibration_batches, proxy_calibration_batches, score_subnet
    assert [proxy_calibration_batches(n) for n in (1, 359, 960, 10_000)] == [1, 1, 2, 16]
    shutil.copytree(work / "results", tmp_path / "results")  # the module's study, supernet and table
    name, results = "mobilenetv3_compact-digits", tmp_path / "results"
    study, record = load_study(name, results=results)
    assert record.calibration_batches == 1  # digits: 359 validation images scored
    # As if its trials had been scored on 2 batches: a rerun must score new trials as they were.
    StudyRecord.save(dataclasses.replace(record, calibration_batches=2), study)
    config = SearchConfig(budget=len(study.trials) + 1, sampler="random", device="cpu", results=str(results),
                          supernet=TrainSettings(epochs=1))
    p = prepare(config, progress=False)
    assert len(p.calibration) == 1  # what a new study of these settings would use
    run_search(config, prepared=p, progress=False)
    trial = load_study(name, results=results)[0].trials[-1]
    assert "duplicate_of" not in trial.user_attrs
    spec = trial_spec(trial)
    two, one = (score_subnet(p.supernet, spec, p.data, calibration_batches(p.data, batches=n)) for n in (2, 1))
    assert trial.user_attrs[LOG_LIKELIHOOD_ATTR] == pytest.approx(two.log_likelihood, abs=1e-6)
    assert two.log_likelihood != pytest.approx(one.log_likelihood, abs=1e-6)


def test_ctrl_c_stops_after_the_current_trial(work: Path) -> None:
    db = work / "results" / "sigint" / "study.db"
    proc = start("search", "--budget", "500", "--study-name", "sigint", *FAST, cwd=work)
    wait_for_complete(db, "sigint", 2, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "rerun the same command to continue" in err
    assert {s for _, s in states(db, "sigint")} == {"COMPLETE"}  # the trial in flight was finished


def test_a_search_killed_mid_trial_resumes_to_its_budget(work: Path) -> None:
    db = work / "results" / "killed" / "study.db"
    proc = start("search", "--budget", "30", "--study-name", "killed", *FAST, cwd=work)
    wait_for_complete(db, "killed", 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    running = [n for n, s in states(db, "killed") if s == "RUNNING"]
    r = nas_cmd("search", "--budget", "30", "--study-name", "killed", *FAST, cwd=work)
    assert r.returncode == 0, r.stderr
    after = dict(states(db, "killed"))
    assert sum(s == "COMPLETE" for s in after.values()) == 30
    assert all(after[n] == "FAIL" for n in running) and "RUNNING" not in after.values()


def test_a_trial_orphaned_before_its_first_heartbeat_is_failed_and_the_budget_is_exact(work: Path) -> None:
    db = work / "results" / "orphan" / "study.db"
    r = nas_cmd("search", "--budget", "3", "--study-name", "orphan", *FAST, cwd=work)
    assert r.returncode == 0, r.stderr
    # A worker killed between study.ask() and its first heartbeat leaves exactly this: a RUNNING trial, no beat.
    study = optuna.load_study(study_name="orphan", storage=open_storage(f"sqlite:///{db}"))
    orphan = study.ask()
    r = nas_cmd("search", "--budget", "6", "--study-name", "orphan", *FAST, cwd=work)
    assert r.returncode == 0, r.stderr
    after = dict(states(db, "orphan"))
    assert after[orphan.number] == "FAIL" and sum(s == "COMPLETE" for s in after.values()) == 6
    assert "RUNNING" not in after.values()


def test_a_failing_trial_is_failed_and_the_run_says_why_it_stops(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import nas.search as search_module
    from nas.search import SearchConfig, run_search
    real, calls = search_module.score_subnet, []

    def failing(*args: object, **kwargs: object) -> float:
        calls.append(1)
        if len(calls) == 2:  # the reference scores first; the first trial fails
            raise RuntimeError("out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(search_module, "score_subnet", failing)
    config = SearchConfig(budget=3, study_name="boom", results=str(work / "results"), supernet=TrainSettings(epochs=1),
                          device="cpu")
    with pytest.raises(nas.SpecError, match=r"^study boom: trial 0 failed \(RuntimeError: out of memory\), so this run "
                                            r"stops at 0 of 3 complete trials; rerun to continue"):
        run_search(config, progress=False)
    assert dict(states(work / "results" / "boom" / "study.db", "boom")) == {0: "FAIL"}


def test_bad_search_flags_are_one_line_errors(work: Path) -> None:
    for args, expected in ((["--sampler", "cmaes"], "error: nas search: argument --sampler: invalid choice"),
                           (["--storage", "mysql://x"], "error: --storage: 'mysql://x': only sqlite"),
                           (["--latency-ms", "-1"], "error: --latency-ms: -1.0 must be positive"),
                           # validated by the library (SearchConfig), named by the flag generated from the field
                           (["--supernet-epochs", "0"], "error: --supernet-epochs: 0 must be positive"),
                           (["--val-images", "0"], "error: --val-images: 0 must be positive"),
                           (["--supernet-label-smoothing", "1.5"],
                            "error: --supernet-label-smoothing: 1.5 must be at least 0 and below 1"),
                           (["--latency-device", "tpu"], "error: --latency-device: 'tpu' is not one of"),
                           # a Literal field's flag takes its choices from the type
                           (["--supernet-distillation", "kd"],
                            "error: nas search: argument --supernet-distillation: invalid choice: 'kd'"),
                           (["--space", "nope.yaml"], "error: nope.yaml: no such file")):
        r = nas_cmd("search", *args, cwd=work)
        assert r.returncode == 2 and r.stderr.startswith(expected) and r.stderr.count("\n") == 1, r.stderr


def test_library_errors_name_the_field_and_flags_come_from_the_fields() -> None:
    import dataclasses

    from nas.cli import field_values, make_parser
    from nas.study import SearchConfig
    with pytest.raises(nas.SpecError, match=r"^epochs: 0 must be positive$"):
        SearchConfig(supernet=TrainSettings(epochs=0))
    with pytest.raises(nas.SpecError, match=r"^supernet.seed: 3: the supernet is seeded by seed \(0\)$"):
        SearchConfig(supernet=TrainSettings(seed=3))
    args = make_parser().parse_args(["search"])
    assert SearchConfig(**field_values(args, SearchConfig)) == SearchConfig()
    plain = {f.name for f in dataclasses.fields(SearchConfig)} - {"supernet"}
    nested = {f"supernet_{f.name}" for f in dataclasses.fields(TrainSettings)} - {"supernet_seed"}
    assert plain | nested <= set(vars(args))  # a flag for every field, and every supernet setting but its seed


def test_every_supernet_setting_reaches_search_and_the_supernet_cache_key(tmp_path: Path) -> None:
    import dataclasses

    from nas.cli import field_values, make_parser
    from nas.data import load_for
    from nas.study import SearchConfig
    from nas.train import checkpoint_path
    args = make_parser().parse_args(["search", "--supernet-lr", "0.05", "--supernet-label-smoothing", "0.1",
                                     "--no-supernet-augment", "--supernet-random-subnets", "2",
                                     "--supernet-sampling", "fair", "--supernet-distillation", "alpha",
                                     "--seed", "4"])
    config = SearchConfig(**field_values(args, SearchConfig))
    assert config.supernet == TrainSettings(lr=0.05, label_smoothing=0.1, augment=False, random_subnets=2,
                                            sampling="fair", distillation="alpha")
    settings = config.supernet_settings
    assert settings.seed == 4
    space, data = load_for(nas.load_space("mobilenetv3_compact"), "digits")
    paths = {checkpoint_path(space, data, dataclasses.replace(settings, **{f.name: value}), root=tmp_path)
             for f, value in zip(dataclasses.fields(TrainSettings),
                                 (6, 64, 0.1, 1e-4, 1, "sandwich", "kl", True, 0.0, 5), strict=True)}
    assert len(paths | {checkpoint_path(space, data, settings, root=tmp_path)}) == 11  # each setting changes the key


def test_latency_gaps_over_25_percent_are_flagged() -> None:
    from nas.report import ParetoEntry
    spec = nas.load_spec("mobilenet_v3_compact")
    entry = ParetoEntry(1, 7, 0.9, predicted_ms=2.0, measured_ms=2.6, params=1, spec=spec)
    assert entry.latency_gap == pytest.approx(0.3) and entry.flagged
    assert not ParetoEntry(1, 7, 0.9, 2.0, 2.4, 1, spec).flagged  # 20%: within
    assert not ParetoEntry(1, 7, 0.9, 2.0, None, 1, spec).flagged  # not measured
    # Timed beside the reference, the gap is the ratio to it against the predicted ratio: a machine running 1.5x
    # slower than when the study was calibrated slows both, and flags neither.
    slow = ParetoEntry(1, 7, 0.9, 2.0, 3.0, 1, spec, reference_measured_ms=6.0, reference_predicted_ms=4.0)
    assert slow.relative and slow.measured_vs_reference == pytest.approx(0.5)
    assert slow.latency_gap == pytest.approx(0.0) and not slow.flagged
    off = ParetoEntry(1, 7, 0.9, 2.0, 3.0, 1, spec, reference_measured_ms=4.0, reference_predicted_ms=4.0)
    assert off.latency_gap == pytest.approx(0.5) and off.flagged


def test_measurements_of_older_studies_still_load(tmp_path: Path) -> None:
    from nas.study import MEASURED_ATTR, Measured, store_measurements
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'old.db'}", study_name="old")
    study.set_user_attr(MEASURED_ATTR, {"3": 2.5})  # before the reference was timed beside the front
    assert stored_measurements(study) == {3: Measured(2.5)}
    store_measurements(study, {3: Measured(2.5), 4: Measured(1.5, 3.0)})
    assert stored_measurements(study) == {3: Measured(2.5), 4: Measured(1.5, 3.0)}


@pytest.mark.parametrize(("stored", "expected"), [
    ([2.5], "nas_measured: expected a mapping of trial numbers, got list"),
    ({"x": 2.5}, "nas_measured.x: is not a trial number"),
    ({"3": -1.0}, "nas_measured.3.ms: -1.0 must be positive"),
    ({"3": {"ms": 2.0, "reference_ms": None}, "4": {"ms": "fast"}}, "nas_measured.4.ms: expected a number"),
    ({"3": {"ms": 2.0, "reference": 3.0}}, "nas_measured.3.reference: unknown key"),
])
def test_unreadable_measurements_are_a_one_line_error_that_names_them(stored: object, expected: str,
                                                                     tmp_path: Path) -> None:
    from nas.study import MEASURED_ATTR
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'bad.db'}", study_name="bad")
    study.set_user_attr(MEASURED_ATTR, stored)
    with pytest.raises(nas.SpecError, match=rf"^study: 'bad' has unreadable measured latencies \({expected}.*\): "
                                            r"rerun 'nas report --remeasure'$"):
        stored_measurements(study)


def test_proxy_accuracies_at_chance_or_within_their_noise_are_called_out() -> None:
    from nas.report import proxy_caveats
    at_chance = proxy_caveats([0.11, 0.12, 0.14, 0.13], num_classes=10, images=2000)  # a 1-epoch CIFAR supernet
    assert at_chance == ("every proxy accuracy (best 14.0%) is within 5.0% of chance (10.0% for 10 classes): the "
                         "supernet has learnt next to nothing; train it longer",)
    narrow = proxy_caveats([0.80, 0.803, 0.806], num_classes=10, images=2000)  # SE of 80% on 2000 images: 0.9 points
    assert len(narrow) == 1 and narrow[0].startswith("proxy accuracies span 0.60%") and "ranking is noise" in narrow[0]
    assert proxy_caveats([0.70, 0.80, 0.90], num_classes=10, images=2000) == ()
    assert proxy_caveats([0.5, 0.6], num_classes=10, images=None) == ()  # a study recorded no image count


def test_the_proxys_standard_error_is_printed_plotted_and_in_the_specs() -> None:
    import math

    from nas.latency import Fingerprint
    from nas.report import build_report, format_summary, pareto_figure
    from nas.spec import spec_to_dict
    from nas.study import Reference, SearchConfig
    space = nas.load_space("mobilenetv3_compact")
    study = optuna.create_study(directions=["maximize", "minimize"])
    ref = Reference(space.reference_member(), 0.8, 2.0, -0.6)
    StudyRecord(SearchConfig(), space.name, 10, 3.0, Fingerprint("cpu", "x", 1, 1, "x"), ref,
                proxy_images=400).save(study)
    for i, (acc, ms) in enumerate(((0.9, 2.5), (0.5, 1.0), (0.95, 4.0))):  # the last is over the limit
        study.add_trial(optuna.trial.create_trial(
            values=[acc, ms], user_attrs={"spec": spec_to_dict(space.sample(random.Random(i))),
                                          "proxy_log_likelihood": -1 + acc}, constraints={CONSTRAINT: ms - 3.0}))
    report = build_report(study, measure_latency=False)
    assert "standard error +-0.0200 (at accuracy 0.8000)" in format_summary(report)  # sqrt(0.8 * 0.2 / 400)
    assert report.pareto[0].spec.metadata["proxy_accuracy_stderr"] == pytest.approx(math.sqrt(0.9 * 0.1 / 400))
    assert list(report.trials["log_likelihood"]) == pytest.approx([-0.1, -0.5, -0.05])
    bars = {t.name: list(t.error_y.array) for t in pareto_figure(report, study).data}
    assert bars["MobileNetV3 reference"] == pytest.approx([0.02])
    assert bars["Pareto-optimal (exported)"] == pytest.approx([math.sqrt(a * (1 - a) / 400) for a in (0.5, 0.9)])


def test_a_repeated_architecture_is_ranked_once() -> None:
    from nas.latency import Fingerprint
    from nas.report import build_report
    from nas.spec import spec_to_dict
    from nas.study import SearchConfig
    study = optuna.create_study(directions=["maximize", "minimize"])
    StudyRecord(SearchConfig(), "mobilenetv3_compact", 10, 3.0, Fingerprint("cpu", "x", 1, 1, "x")).save(study)
    spec = spec_to_dict(nas.load_space("mobilenetv3_compact").sample(random.Random(0)))
    for attrs in ({"spec": spec}, {"spec": spec, "duplicate_of": 0}):
        study.add_trial(optuna.trial.create_trial(values=[0.9, 2.0], user_attrs=attrs, constraints={CONSTRAINT: -1.0}))
    assert [e.trial for e in build_report(study, measure_latency=False).pareto] == [0]


def test_hypervolume_is_the_dominated_area() -> None:
    assert hypervolume([], 1.0) == 0.0
    assert hypervolume([(0.5, 0.5)], 1.0) == pytest.approx(0.25)
    assert hypervolume([(0.5, 0.5), (0.9, 1.0), (0.9, 2.0)], 2.0) == pytest.approx(0.5 * 0.75 + 0.9 * 0.5 - 0.5 * 0.5)


POSTGRES = os.environ.get("NAS_TEST_POSTGRES_URL")


@pytest.mark.skipif(not POSTGRES, reason="NAS_TEST_POSTGRES_URL is not set (.ci/run starts PostgreSQL and sets it)")
def test_two_postgres_workers_share_one_budget_exactly(work: Path) -> None:
    assert POSTGRES is not None
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two workers on two cores: one thread each
    prep = nas_cmd("search", "--budget", "1", "--study-name", "prep-1thread", *FAST, cwd=work, env=env)
    assert prep.returncode == 0, prep.stderr  # caches the 1-thread latency table; the supernet is cached already
    name = f"dist-{uuid.uuid4().hex[:8]}"
    args = ["search", "--budget", "20", "--study-name", name, "--storage", POSTGRES, *FAST]
    workers = [start(*args, cwd=work, env=env) for _ in range(2)]
    for w in workers:
        _, err = w.communicate(timeout=600)
        assert w.returncode == 0, err
    study = optuna.load_study(study_name=name, storage=POSTGRES)
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 20 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert sorted(t.number for t in trials) == list(range(20))
    # Each worker drew its own sampler stream, and a repeat reused the values instead of being scored again.
    scored = [trial_spec(t) for t in trials if "duplicate_of" not in t.user_attrs]
    assert len(scored) - len(set(scored)) <= 1  # only a race (two workers meeting one new architecture) repeats


@pytest.mark.skipif(not POSTGRES, reason="NAS_TEST_POSTGRES_URL is not set (.ci/run starts PostgreSQL and sets it)")
def test_three_postgres_workers_one_killed_end_with_exactly_the_budget(work: Path) -> None:
    assert POSTGRES is not None
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    prep = nas_cmd("search", "--budget", "1", "--study-name", "prep-1thread", *FAST, cwd=work, env=env)
    assert prep.returncode == 0, prep.stderr
    name = f"kill-{uuid.uuid4().hex[:8]}"
    storage = open_storage(POSTGRES)
    args = ["search", "--budget", "60", "--study-name", name, "--storage", POSTGRES, *FAST]
    workers = [start(*args, cwd=work, env=env) for _ in range(3)]
    # Kill one worker at a random point of the search, once the study holds a few trials.
    rng = random.Random()
    deadline, victim, when = time.monotonic() + 300, workers[rng.randrange(3)], rng.randint(5, 40)
    while time.monotonic() < deadline:
        try:
            trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
        except KeyError:
            trials = []
        if len(trials) >= when:
            break
        time.sleep(0.2)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    # And leave a trial exactly as a worker killed between ask() and its first heartbeat would.
    orphan = optuna.load_study(study_name=name, storage=storage).ask()
    for w in workers:
        if w is not victim:
            _, err = w.communicate(timeout=600)
            assert w.returncode == 0, err
    trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    by_state = {s: [t for t in trials if t.state.name == s] for s in ("COMPLETE", "FAIL", "RUNNING")}
    assert len(by_state["COMPLETE"]) == 60 and not by_state["RUNNING"]
    assert orphan.number in {t.number for t in by_state["FAIL"]}
    scored = [trial_spec(t) for t in by_state["COMPLETE"] if "duplicate_of" not in t.user_attrs]
    assert len(scored) - len(set(scored)) <= 1  # three workers, budget 60: at most one architecture scored twice
