"""The search: an Optuna multi-objective study over a space, scored through the supernet, constrained by latency.

Each trial samples one architecture with ``trial.suggest_categorical`` (parameter names such as
``stage3.block1.kernel``), predicts its latency on the user's device, and scores its accuracy through the
supernet with BN recalibrated. Objectives: accuracy up, predicted latency down; the latency limit is an
Optuna constraint (``trial.set_constraint``), so Optuna's samplers, ``study.best_trials`` and
optuna-dashboard all know which trials are infeasible.

The budget counts COMPLETE trials of the study, whoever ran them: a rerun continues to it, and workers
sharing a storage reserve trials under a lock (a file lock for SQLite, an advisory lock for PostgreSQL),
so together they finish exactly the budget.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import hashlib
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch
from tqdm import tqdm

from nas._schema import SpecError, cut, ensure_writable
from nas.data import DataSplit, load_for
from nas.latency import Predictor, calibrate, load_predictor, resolve_device
from nas.space import SearchSpace, load_space
from nas.spec import NetworkSpec
from nas.study import (
    DEFAULT_SAMPLER,
    HEARTBEAT_S,
    LOG_LIKELIHOOD_ATTR,
    METRIC_NAMES,
    SAMPLERS,
    Reference,
    SearchConfig,
    StudyRecord,
    config_defining,
    feasible,
    open_storage,
    record_trial,
    sqlite_path,
    trial_spec,
    within_limit,
)
from nas.supernet import Supernet
from nas.train import calibration_batches, checkpoint_path, proxy_calibration_batches, score_subnet, train_supernet

__all__ = ["DEFAULT_SAMPLER", "SAMPLERS", "Prepared", "SearchConfig", "SearchOutcome", "choose", "prepare",
           "run_search"]


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=20)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=20)
    return optuna.samplers.RandomSampler(seed=seed)


@contextlib.contextmanager
def budget_lock(storage: optuna.storages.RDBStorage, url: str, study_name: str) -> Iterator[None]:
    """Serialise 'count the trials, then create one' across workers, so the budget is never overshot."""
    db = sqlite_path(url)
    if db is not None:
        with open(db.with_name(f"{db.name}.{study_name}.lock"), "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
        return
    from sqlalchemy import text

    key = int.from_bytes(hashlib.sha256(study_name.encode()).digest()[:8], "big", signed=True)
    with storage.engine.connect() as conn:
        conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
        try:
            yield
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            conn.commit()


class _Heartbeat:
    """Records a trial's heartbeat every HEARTBEAT_S seconds while it runs (Optuna does this only inside
    ``study.optimize``; the exact budget needs ask/tell)."""

    def __init__(self, storage: optuna.storages.RDBStorage, trial_id: int):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(storage, trial_id), daemon=True)

    def _beat(self, storage: optuna.storages.RDBStorage, trial_id: int) -> None:
        while True:
            storage.record_heartbeat(trial_id)
            if self._stop.wait(HEARTBEAT_S):
                return

    def __enter__(self) -> None:
        self._thread.start()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Prepared:
    space: SearchSpace  # with the data set's number of classes
    data: DataSplit
    supernet: Supernet
    predictor: Predictor
    calibration: list[torch.Tensor]
    device: torch.device
    limit_ms: float
    reference: NetworkSpec | None
    val_images: int | None  # None: the whole validation split

    @property
    def proxy_images(self) -> int:
        return proxy_images(self.data, self.val_images)


def proxy_images(data: DataSplit, val_images: int | None) -> int:
    """How many validation images the proxy scores each trial on: the first ``val_images``, or all."""
    return len(data.val) if val_images is None else min(val_images, len(data.val))


def prepare(config: SearchConfig, *, progress: bool = True) -> Prepared:
    """Load the space and data, train or reuse the supernet, build or reuse the latency table."""
    device = resolve_device(config.device, "device")
    resolve_device(config.latency_device, "latency_device")  # fail now, naming the right field
    space, data = load_for(load_space(config.space), config.dataset, seed=config.seed, data_dir=config.data_dir)
    settings = config.supernet_settings
    # The same cache file as 'nas train-supernet' with these settings, so either reuses the other's.
    checkpoint = checkpoint_path(space, data, settings, root=config.results_dir / "supernets")
    trained = train_supernet(space, data, settings, checkpoint=checkpoint, device=device, progress=progress)
    # An explicit table is the user's choice, even from another machine: distributed workers must all
    # predict with the table of the device the network is for.
    predictor = load_predictor(space, device=config.latency_device, root=config.results_dir / "latency",
                               table=config.latency_table, force=config.latency_table is not None,
                               progress=progress, runtime=config.runtime)
    if config.latency_table is None:  # this machine's own table: follow its drift since the table was built
        drift = calibrate(predictor)
        if progress:
            print(drift.describe(), file=sys.stderr)
        predictor = predictor.with_drift(drift.factor)
    reference = space.reference_member()
    if config.latency_ms is not None:
        limit = config.latency_ms
    elif reference is not None:
        limit = predictor.predict(reference)
    else:
        raise SpecError("latency_ms", f"space {space.name!r} has no reference member; give a limit in ms")
    calibration = calibration_batches(data, batches=proxy_calibration_batches(proxy_images(data, config.val_images)),
                                      device=device)
    return Prepared(space, data, trained.supernet, predictor, calibration, device, limit, reference, config.val_images)


def choose(trial: optuna.trial.Trial, space: SearchSpace) -> NetworkSpec:
    """The architecture of ``trial``: one ``suggest_categorical`` per choice, named like ``stage2.block1.se``."""
    return space.build(lambda name, options: trial.suggest_categorical(name, list(options)))


@dataclass
class SearchOutcome:
    study: optuna.Study
    record: StudyRecord
    config: SearchConfig
    completed: int
    interrupted: bool
    seconds: float
    trials_run: int


@contextlib.contextmanager
def _quiet_optuna() -> Iterator[None]:
    """Optuna's per-trial INFO lines off (the progress bar reports trials), and its warnings about the deliberate
    use of experimental heartbeats with ask/tell (the exact budget needs ask/tell); both restored after."""
    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
            yield
    finally:
        optuna.logging.set_verbosity(before)


def run_search(config: SearchConfig, *, progress: bool = True, prepared: Prepared | None = None,
               stop: threading.Event | None = None) -> SearchOutcome:
    """Run (or continue) the study until it holds ``config.budget`` COMPLETE trials, or until ``stop`` is set
    (checked between trials: the trial in flight is finished; the command line sets it on Ctrl-C)."""
    with _quiet_optuna():
        return _run_search(config, progress, prepared, stop or threading.Event())


def _run_search(config: SearchConfig, progress: bool, prepared: Prepared | None, stop: threading.Event
                ) -> SearchOutcome:
    db = sqlite_path(config.storage_url)
    if config.budget == 0 and db is not None and not db.exists():  # refused before a database file is made
        raise _nothing_to_do(config)
    if prepared is None:
        load_space(config.space)  # a bad space fails here, before a database is made for it
    new_db = db is not None and not db.exists()
    try:
        return _search(config, progress, prepared, stop)
    except BaseException:
        if new_db and db is not None:  # no stub study.db from a start that failed before any trial
            _remove_if_empty(db, config.name)
        raise


def _remove_if_empty(db: Path, study_name: str) -> None:
    try:
        storage = open_storage(f"sqlite:///{db}")
        study = optuna.load_study(study_name=study_name, storage=storage)
        if study.get_trials(deepcopy=False):
            return
    except (KeyError, SpecError):
        pass  # no study made yet
    else:
        storage.engine.dispose()
    with contextlib.suppress(OSError):  # cleaning up after a failure must not hide the failure
        for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm"),
                     db.with_name(f"{db.name}.{study_name}.lock")):
            path.unlink(missing_ok=True)
        db.parent.rmdir()  # only when empty


def _search(config: SearchConfig, progress: bool, prepared: Prepared | None, stop: threading.Event
            ) -> SearchOutcome:
    storage = open_storage(config.storage_url)  # first: a bad URL or an unreachable server fails fast
    stored = _stored_record(storage, config.name)
    if stored is not None:  # a continued study with other settings is refused before the supernet trains
        study, existing = stored
        existing.refuse_mismatch(config.name, config_defining(config))
        done = _count(study, (optuna.trial.TrialState.COMPLETE,))
        if done >= config.budget:  # nothing to run: no supernet, data or table is loaded
            return SearchOutcome(study, existing, config, done, False, 0.0, 0)
    elif config.budget == 0:
        raise _nothing_to_do(config)
    ensure_writable(config.results_dir, "results")  # before the supernet trains, not after
    p = prepared or prepare(config, progress=progress)
    study = optuna.create_study(study_name=config.name, storage=storage, directions=["maximize", "minimize"],
                                sampler=make_sampler(config.sampler, config.seed), load_if_exists=True)
    if study.metric_names is None:
        study.set_metric_names(list(METRIC_NAMES))
    with budget_lock(storage, config.storage_url, config.name):  # workers starting together agree on one record
        record = _record(study, config, p)
    if (record.latency_drift, record.latency_limit_ms) != (p.predictor.drift, p.limit_ms):
        if progress:
            print(f"this study continues with its recorded latency drift x{record.latency_drift:.3f} and limit "
                  f"{record.latency_limit_ms:.3f} ms (this run measured x{p.predictor.drift:.3f})", file=sys.stderr)
        p = dataclasses.replace(p, predictor=p.predictor.with_drift(record.latency_drift),
                                limit_ms=record.latency_limit_ms)
    if record.calibration_batches != len(p.calibration):  # a study of an older version: score as its trials were
        p = dataclasses.replace(p, calibration=calibration_batches(p.data, batches=record.calibration_batches,
                                                                   device=p.device))
    study_id = storage.get_study_id_from_name(config.name)
    study.sampler = make_sampler(config.sampler, _worker_seed(storage, study_id, config))
    scored = _Scored()
    optuna.storages.fail_stale_trials(study)
    completed = _count(study, (optuna.trial.TrialState.COMPLETE,))
    bar = tqdm(total=config.budget, initial=min(completed, config.budget), desc=f"search {config.name}",
               unit="trial", disable=not progress, dynamic_ncols=True)
    start, ran, adopted = time.perf_counter(), 0, set[int]()
    # The best feasible accuracy for the bar, kept here: study.best_trials per trial would cost as much as
    # scoring the architecture.
    done = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)) if feasible(t)]
    top = max(done, key=lambda t: t.values[0], default=None)
    best = None if top is None else (top.values[0], top.values[1], top.number)
    try:
        while not stop.is_set():
            if ran % 10 == 0:  # a killed worker's trial frees its budget slot within a few trials
                optuna.storages.fail_stale_trials(study)
            with budget_lock(storage, config.storage_url, config.name):
                # One read for both counts: another worker's trial finishing between two reads would be counted
                # in neither, and its slot given out twice (CI once ended a 20-trial budget with 21).
                counted = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,
                                                                   optuna.trial.TrialState.RUNNING,
                                                                   optuna.trial.TrialState.WAITING))
                complete = sum(t.state == optuna.trial.TrialState.COMPLETE for t in counted)
                trial = None if len(counted) >= config.budget else study.ask()  # complete + in flight
                if trial is not None:  # a heartbeat at once, in the lock: a worker killed from here on is failed
                    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
                    storage.record_heartbeat(trial_id)
            if trial is None:
                if complete >= config.budget:
                    break
                # Other workers hold the last slots. Stay until they finish them, or until a dead one's trial is
                # failed (after its missed heartbeats) and frees its slot: survivors end with exactly the budget.
                time.sleep(HEARTBEAT_S / 2)
                _adopt_orphans(study, storage, adopted)
                optuna.storages.fail_stale_trials(study)
                continue
            with _Heartbeat(storage, trial_id):
                try:
                    values = _evaluate(trial, p, scored)
                except Exception as e:  # failed, not left RUNNING; and the run says why it cannot reach the budget
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                    raise SpecError("", f"trial {trial.number} failed ({type(e).__name__}: {cut(str(e))}), so this "
                                        f"run stops at {complete} of {config.budget} complete trials; rerun to "
                                        "continue once the cause is fixed", source=f"study {config.name}") from e
            study.tell(trial, values)
            ran += 1
            bar.update()
            if within_limit(values[1] - p.limit_ms) and (best is None or values[0] > best[0]):
                best = (values[0], values[1], trial.number)
            if best is not None:
                bar.set_postfix(best=f"{best[0]:.3f} acc @ {best[1]:.2f} ms (trial {best[2]})")
    finally:
        bar.close()
    # Other workers may still be running their last trials; wait for them so the report is complete.
    _wait_for_running(study)
    completed = _count(study, (optuna.trial.TrialState.COMPLETE,))
    return SearchOutcome(study, record, config, completed, stop.is_set(), time.perf_counter() - start, ran)


def _worker_seed(storage: optuna.storages.RDBStorage, study_id: int, config: SearchConfig) -> int:
    """The sampler seed of this run: ``config.seed`` for the study's first, a seed derived from it for each later
    run or concurrent worker (numbered in the storage under the budget lock), so no two draw the same stream."""
    with budget_lock(storage, config.storage_url, config.name):
        n = storage.get_study_system_attrs(study_id).get(_WORKERS_ATTR, 0)
        storage.set_study_system_attr(study_id, _WORKERS_ATTR, n + 1)
    return config.seed + 1_000_003 * n


_WORKERS_ATTR = "nas:workers"


class _Scored:
    """The architectures already scored in the study (by any worker) and their values, so a repeat is not scored
    again. Indexed incrementally: only trials not seen before are read."""

    def __init__(self) -> None:
        self._values: dict[NetworkSpec, tuple[int, tuple[float, float], float | None]] = {}
        self._seen: set[int] = set()

    def get(self, study: optuna.Study, spec: NetworkSpec) -> tuple[int, tuple[float, float], float | None] | None:
        """(trial number, values, log-likelihood) of the trial that scored ``spec`` first, if any."""
        if spec not in self._values:
            for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
                if t.number not in self._seen:
                    self._seen.add(t.number)
                    self._values.setdefault(trial_spec(t), (t.number, (t.values[0], t.values[1]),
                                                            t.user_attrs.get(LOG_LIKELIHOOD_ATTR)))
        return self._values.get(spec)


def _evaluate(trial: optuna.trial.Trial, p: Prepared, scored: _Scored) -> tuple[float, float]:
    spec = choose(trial, p.space)
    latency = p.predictor.predict(spec)
    record_trial(trial, spec, latency, p.limit_ms)
    earlier = scored.get(trial.study, spec)
    if earlier is not None:  # TPE revisits architectures, and workers may meet: reuse, do not score again
        trial.set_user_attr("duplicate_of", earlier[0])
        if earlier[2] is not None:
            trial.set_user_attr(LOG_LIKELIHOOD_ATTR, earlier[2])
        return earlier[1][0], latency
    score = score_subnet(p.supernet, spec, p.data, p.calibration, device=p.device, max_images=p.val_images)
    trial.set_user_attr(LOG_LIKELIHOOD_ATTR, score.log_likelihood)
    return score.accuracy, latency


def _nothing_to_do(config: SearchConfig) -> SpecError:
    return SpecError("budget", f"0, and there is no study {config.name!r} to report: nothing to do")


def _stored_record(storage: optuna.storages.RDBStorage, name: str) -> tuple[optuna.Study, StudyRecord] | None:
    """Study ``name`` and its record, if it exists and has one (a study without is judged by _record)."""
    try:
        study = optuna.load_study(study_name=name, storage=storage)
        return study, StudyRecord.load(study)
    except (KeyError, SpecError):
        return None


def _record(study: optuna.Study, config: SearchConfig, p: Prepared) -> StudyRecord:
    """The study's record: this run's when the study is new (with the reference scored), else the stored one,
    refusing a run whose defining settings differ."""
    mine = StudyRecord(config, p.space.name, p.space.num_classes, p.limit_ms, p.predictor.fingerprint,
                       latency_drift=p.predictor.drift, proxy_images=p.proxy_images,
                       calibration_batches=len(p.calibration))
    try:
        record = StudyRecord.load(study)
    except SpecError:
        if study.get_trials(deepcopy=False):
            raise  # trials without a record: another program's study, or an older nas's
        record = mine
    else:
        record.refuse_mismatch(study.study_name, mine.defining())
        if record.reference is not None or p.reference is None:
            return record
    if p.reference is not None:
        score = score_subnet(p.supernet, p.reference, p.data, p.calibration, device=p.device, max_images=p.val_images)
        predicted = p.predictor.with_drift(record.latency_drift).predict(p.reference)
        record = dataclasses.replace(record, reference=Reference(p.reference, score.accuracy, predicted,
                                                                 score.log_likelihood))
    record.save(study)
    return record


def _adopt_orphans(study: optuna.Study, storage: optuna.storages.RDBStorage, adopted: set[int]) -> None:
    """Give one heartbeat to each trial RUNNING for longer than the grace period, once. Optuna fails only trials whose
    heartbeat went stale, never one without any (a worker killed between ask and its first beat, or by an older nas);
    after this beat such a trial goes stale and is failed. A live trial is unharmed: its own thread beats on."""
    oldest = datetime.datetime.now() - datetime.timedelta(seconds=2 * HEARTBEAT_S)
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if t._trial_id not in adopted and t.datetime_start is not None and t.datetime_start < oldest:
            storage.record_heartbeat(t._trial_id)
            adopted.add(t._trial_id)


def _count(study: optuna.Study, states: tuple[optuna.trial.TrialState, ...]) -> int:
    return len(study.get_trials(deepcopy=False, states=states))


def _wait_for_running(study: optuna.Study, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while _count(study, (optuna.trial.TrialState.RUNNING,)) and time.monotonic() < deadline:
        time.sleep(0.2)
        optuna.storages.fail_stale_trials(study)
