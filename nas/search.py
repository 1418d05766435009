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
import fcntl
import hashlib
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import optuna
import torch
from tqdm import tqdm

from nas._schema import SpecError
from nas.data import DataSplit, load_dataset
from nas.latency import Predictor, load_predictor, resolve_device
from nas.space import SearchSpace, load_space
from nas.spec import NetworkSpec, spec_to_dict
from nas.supernet import Supernet
from nas.train import TrainSettings, calibration_batches, checkpoint_path, score_subnet, train_supernet

SAMPLERS = ("tpe", "nsga2", "random")
DEFAULT_SAMPLER = "tpe"  # best median hypervolume in tests/benchmarks/bench_search.py (3 seeds); BENCHMARKS.md
HEARTBEAT_S = 2  # a worker killed mid-trial leaves a RUNNING trial; after 2 missed beats it is failed


@dataclass(frozen=True)
class SearchConfig:
    """Everything a search depends on; stored in the study so ``nas report`` needs only the storage."""

    space: str = "mobilenetv3_compact"
    dataset: str = "digits"
    budget: int = 200
    latency_ms: float | None = None  # None: the reference member's predicted latency (MobileNetV3's)
    sampler: str = DEFAULT_SAMPLER
    seed: int = 0
    study_name: str | None = None
    storage: str | None = None
    device: str = "auto"  # supernet training and scoring
    latency_device: str = "cpu"  # where the network will run: the latency table's device
    data_dir: str = "data"
    results: str = "results"
    supernet_epochs: int = TrainSettings.epochs
    supernet_batch_size: int = TrainSettings.batch_size
    val_images: int = 2000  # validation images per trial (digits has 359; CIFAR-10's split is capped here)
    latency_table: str | None = None  # a table file to use as is (workers on other machines share the first's)

    def __post_init__(self) -> None:
        if self.budget < 0:
            raise SpecError("--budget", f"{self.budget} must be zero or more")
        if self.sampler not in SAMPLERS:
            raise SpecError("--sampler", f"{self.sampler!r} is not one of {', '.join(SAMPLERS)}")
        if self.latency_ms is not None and self.latency_ms <= 0:
            raise SpecError("--latency-ms", f"{self.latency_ms} must be positive")
        if self.supernet_batch_size < 1:
            raise SpecError("--supernet-batch-size", f"{self.supernet_batch_size} must be positive")
        if self.val_images < 1:
            raise SpecError("--val-images", f"{self.val_images} must be positive")

    @property
    def name(self) -> str:
        return self.study_name or f"{Path(self.space).stem}-{self.dataset.replace(':', '-').replace('/', '_')}"

    @property
    def study_dir(self) -> Path:
        return Path(self.results) / self.name

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{self.study_dir / 'study.db'}"


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=20)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=20)
    return optuna.samplers.RandomSampler(seed=seed)


def sqlite_path(url: str) -> Path | None:
    """The database file of a ``sqlite:///PATH`` URL; None for other storages."""
    return Path(url[len("sqlite:///"):]) if url.startswith("sqlite:///") else None


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """An Optuna RDB storage with heartbeats (for failing trials of killed workers)."""
    db = sqlite_path(url)
    if db is None and not url.startswith("postgresql"):
        raise SpecError("--storage", f"{url!r}: only sqlite:///PATH and postgresql://... are supported")
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    from sqlalchemy.exc import DBAPIError

    for attempt in range(6):
        try:
            with warnings.catch_warnings():  # heartbeats are 'experimental' in Optuna 5 and warn on every start
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_S,
                                                     grace_period=2 * HEARTBEAT_S)
            if db is not None:
                _fast_sqlite(storage)
            return storage
        except DBAPIError as e:
            # Workers starting together on a new database race to create Optuna's tables; the loser retries
            # and finds them made. A server that stays unreachable fails after the last attempt.
            if attempt == 5:
                raise SpecError("--storage", f"cannot open {url!r}: {str(e).splitlines()[0]}") from None
            time.sleep(0.2 * (attempt + 1))
        except Exception as e:  # SQLAlchemy raises many types for a bad URL or a missing driver
            raise SpecError("--storage", f"cannot open {url!r}: {str(e).splitlines()[0]}") from None
    raise AssertionError("unreachable")


def _fast_sqlite(storage: optuna.storages.RDBStorage) -> None:
    """WAL journal with synchronous=NORMAL: every suggest is a transaction, and a full fsync on each halves
    the search's speed. A killed process loses nothing committed; a power cut may lose the last trials."""
    from sqlalchemy import event

    def pragmas(dbapi_conn: Any, _record: Any) -> None:
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    event.listen(storage.engine, "connect", pragmas)
    storage.engine.dispose()  # reconnect with the pragmas


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
    val_images: int


def prepare(config: SearchConfig, *, progress: bool = True) -> Prepared:
    """Load the space and data, train or reuse the supernet, build or reuse the latency table."""
    base = load_space(config.space)
    device = resolve_device(config.device)
    data = load_dataset(config.dataset, base.input.resolution, seed=config.seed, data_dir=config.data_dir)
    settings = TrainSettings(epochs=config.supernet_epochs, batch_size=config.supernet_batch_size, seed=config.seed)
    # The same cache file as 'nas train-supernet' with these settings, so either reuses the other's.
    checkpoint = checkpoint_path(base.with_num_classes(data.num_classes), data, settings,
                                 root=Path(config.results) / "supernets")
    trained = train_supernet(base, data, settings, checkpoint=checkpoint, device=device, progress=progress)
    space = trained.supernet.space
    # An explicit table is the user's choice, even from another machine: distributed workers must all
    # predict with the table of the device the network is for.
    predictor = load_predictor(space, device=config.latency_device, root=Path(config.results) / "latency",
                               table=config.latency_table, force=config.latency_table is not None,
                               progress=progress)
    reference = base.reference_spec()
    if reference is not None:
        reference = dataclasses.replace(reference, num_classes=space.num_classes)
        if not space.contains(reference):
            reference = None
    if config.latency_ms is not None:
        limit = config.latency_ms
    elif reference is not None:
        limit = predictor.predict(reference)
    else:
        raise SpecError("--latency-ms", f"space {space.name!r} has no reference member; give a limit in ms")
    # One batch of 128 training images re-estimates BN statistics as well as two on digits and CIFAR-10,
    # at half the cost per trial.
    return Prepared(space, data, trained.supernet, predictor, calibration_batches(data, batches=1, device=device),
                    device, limit, reference, config.val_images)


def choose(trial: optuna.trial.Trial, space: SearchSpace) -> NetworkSpec:
    """The architecture of ``trial``: one ``suggest_categorical`` per choice, named like ``stage2.block1.se``."""
    return space.build(lambda name, options: trial.suggest_categorical(name, list(options)))


@dataclass
class SearchOutcome:
    study: optuna.Study
    config: SearchConfig
    completed: int
    interrupted: bool
    seconds: float
    trials_run: int


def run_search(config: SearchConfig, *, progress: bool = True, prepared: Prepared | None = None) -> SearchOutcome:
    """Run (or continue) the study until it holds ``config.budget`` COMPLETE trials."""
    with warnings.catch_warnings():
        # Heartbeats and fail_stale_trials are 'experimental' in Optuna 5, and it warns that heartbeats are
        # meant for study.optimize; here ask/tell with our own heartbeat thread is deliberate (exact budget).
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
        return _run_search(config, progress, prepared)


def _run_search(config: SearchConfig, progress: bool, prepared: Prepared | None) -> SearchOutcome:
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress bar reports trials, not a log line each
    storage = open_storage(config.storage_url)  # first: a bad URL or an unreachable server fails fast
    p = prepared or prepare(config, progress=progress)
    study = optuna.create_study(study_name=config.name, storage=storage, directions=["maximize", "minimize"],
                                sampler=make_sampler(config.sampler, config.seed), load_if_exists=True)
    _record_config(study, config, p)
    study_id = storage.get_study_id_from_name(config.name)
    optuna.storages.fail_stale_trials(study)

    stop = {"requested": False}

    def on_sigint(_sig: int, _frame: FrameType | None) -> None:
        if stop["requested"]:
            raise KeyboardInterrupt
        stop["requested"] = True

    previous = signal.signal(signal.SIGINT, on_sigint) if threading.current_thread() is threading.main_thread() \
        else None
    completed = _count(study, (optuna.trial.TrialState.COMPLETE,))
    bar = tqdm(total=config.budget, initial=min(completed, config.budget), desc=f"search {config.name}",
               unit="trial", disable=not progress, dynamic_ncols=True)
    start, ran = time.perf_counter(), 0
    # The best feasible accuracy for the bar, kept here: study.best_trials per trial would cost as much as
    # scoring the architecture.
    done = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)) if feasible(t)]
    top = max(done, key=lambda t: t.values[0], default=None)
    best = None if top is None else (top.values[0], top.values[1], top.number)
    try:
        while not stop["requested"]:
            if ran % 10 == 0:  # a killed worker's trial frees its budget slot within a few trials
                optuna.storages.fail_stale_trials(study)
            with budget_lock(storage, config.storage_url, config.name):
                states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING,
                          optuna.trial.TrialState.WAITING)
                if _count(study, states) >= config.budget:
                    break
                trial = study.ask()
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
            with _Heartbeat(storage, trial_id):
                values = _evaluate(trial, p)
            study.tell(trial, values)
            ran += 1
            bar.update()
            if values[1] <= p.limit_ms and (best is None or values[0] > best[0]):
                best = (values[0], values[1], trial.number)
            if best is not None:
                bar.set_postfix(best=f"{best[0]:.3f} acc @ {best[1]:.2f} ms (trial {best[2]})")
    finally:
        bar.close()
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    # Other workers may still be running their last trials; wait for them so the report is complete.
    _wait_for_running(study)
    completed = _count(study, (optuna.trial.TrialState.COMPLETE,))
    return SearchOutcome(study, config, completed, stop["requested"], time.perf_counter() - start, ran)


def _evaluate(trial: optuna.trial.Trial, p: Prepared) -> tuple[float, float]:
    spec = choose(trial, p.space)
    latency = p.predictor.predict(spec)
    trial.set_user_attr("predicted_latency_ms", latency)
    trial.set_user_attr("spec", spec_to_dict(spec))
    trial.set_constraint("latency_ms", latency - p.limit_ms)
    accuracy = score_subnet(p.supernet, spec, p.data, p.calibration, device=p.device, max_images=p.val_images)
    return accuracy, latency


# What makes two trials comparable: a run that differs in any of these must use another study.
_STUDY_DEFINING = ("space_name", "dataset", "num_classes", "latency_limit_ms", "latency_fingerprint",
                   "supernet_epochs", "supernet_batch_size", "val_images")


def _record_config(study: optuna.Study, config: SearchConfig, p: Prepared) -> None:
    attrs = study.user_attrs
    mine = {**dataclasses.asdict(config), "latency_limit_ms": p.limit_ms, "space_name": p.space.name,
            "num_classes": p.space.num_classes, "latency_fingerprint": dataclasses.asdict(p.predictor.fingerprint)}
    if "config" not in attrs:
        study.set_user_attr("config", mine)
    else:
        theirs = attrs["config"]
        for key in _STUDY_DEFINING:
            if theirs.get(key) != mine[key]:
                raise SpecError("--study-name", f"study {study.study_name!r} was run with {key} {theirs.get(key)!r}, "
                                f"this run has {mine[key]!r}; use another --study-name (or, for a latency table "
                                f"from another machine, --latency-table)")
    if "reference" not in attrs and p.reference is not None:
        acc = score_subnet(p.supernet, p.reference, p.data, p.calibration, device=p.device, max_images=p.val_images)
        study.set_user_attr("reference", {"spec": spec_to_dict(p.reference), "accuracy": acc,
                                          "predicted_latency_ms": p.predictor.predict(p.reference)})


def _count(study: optuna.Study, states: tuple[optuna.trial.TrialState, ...]) -> int:
    return len(study.get_trials(deepcopy=False, states=states))


def _wait_for_running(study: optuna.Study, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while _count(study, (optuna.trial.TrialState.RUNNING,)) and time.monotonic() < deadline:
        time.sleep(0.2)
        optuna.storages.fail_stale_trials(study)


def feasible(trial: optuna.trial.FrozenTrial) -> bool:
    return all(v <= 0 for v in trial.constraints.values())


def trial_spec(trial: optuna.trial.FrozenTrial) -> NetworkSpec:
    from nas.spec import spec_from_dict

    return spec_from_dict(trial.user_attrs["spec"])


def study_config(study: optuna.Study) -> dict[str, Any]:
    config = study.user_attrs.get("config")
    if not isinstance(config, dict):
        raise SpecError("--study", f"{study.study_name!r} was not made by 'nas search' (no config attribute)")
    return config
