"""A ``nas search`` study: its configuration, its typed record, its storage, the feasibility rule and trial access.

The record (:class:`StudyRecord`) is stored in the Optuna study as one user attribute, written and read through
``nas._schema`` like specs, so ``nas report`` and ``nas verify`` need only the storage and read typed fields,
never string keys. Nothing here runs a search (that is :mod:`nas.search`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import optuna

from nas._schema import SpecError, check_choices, check_positive, ensure_writable, from_data, results_root, to_data
from nas.latency import Fingerprint, check_device
from nas.runtime import Runtime
from nas.spec import NetworkSpec, spec_from_dict, spec_to_dict
from nas.train import TrainSettings, binomial_stderr

Sampler = Literal["tpe", "nsga2", "random"]
SAMPLERS: tuple[str, ...] = get_args(Sampler)
DEFAULT_SAMPLER = "tpe"  # best median hypervolume in tests/benchmarks/bench_search.py (3 seeds); BENCHMARKS.md
HEARTBEAT_S = 2  # a worker killed mid-trial leaves a RUNNING trial; after 2 missed beats it is failed
RECORD_ATTR = "nas"  # the study user attribute holding the record
MEASURED_ATTR = "nas_measured"  # ... and the one holding measured latencies of trials' networks
# Optuna's constraint: predicted latency minus the limit, so <= 0 is feasible (Optuna's own convention).
CONSTRAINT = "latency_slack_ms"


def _help(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


@dataclass(frozen=True)
class SearchConfig:
    """Everything a search depends on. The ``nas search`` flags are generated from these fields (``--budget`` for
    ``budget``), with each field's ``help``; errors name the field, and the command line shows its flag."""

    space: str = field(default="mobilenetv3_compact", metadata=_help(
        "search space: a built-in name (mobilenetv3_compact, mobilenetv3_small, mobilenetv3_large) or a YAML path"))
    dataset: str = field(default="digits", metadata=_help(
        "digits (embedded), cifar10, flowers102 or folder:PATH (ImageFolder layout)"))
    budget: int = field(default=200, metadata=_help(
        "total COMPLETE trials in the study; a rerun continues to it"))
    latency_ms: float | None = field(default=None, metadata=_help(
        "latency limit in ms on the latency device (default: the predicted latency of the space's MobileNetV3 "
        "reference member, i.e. 'no slower than MobileNetV3')"))
    sampler: Sampler = field(default=DEFAULT_SAMPLER, metadata=_help(
        "Optuna sampler (tpe was chosen by the hypervolume benchmark)"))
    seed: int = field(default=0, metadata=_help("seeds data split, supernet and sampler"))
    study_name: str | None = field(default=None, metadata=_help("default: <space>-<dataset>"))
    storage: str | None = field(default=None, metadata=_help(
        "Optuna storage URL: sqlite:///PATH or postgresql://USER@HOST/DB; workers on several machines share one "
        "budget through one --storage and --study-name (default: sqlite:///<results>/<study>/study.db)"))
    device: str = field(default="auto", metadata=_help(
        "supernet training and scoring: cpu, cuda, cuda:N or auto (cuda when available)"))
    latency_device: str = field(default="cpu", metadata=_help(
        "the device the network will run on, where latency is measured: cpu, cuda or cuda:N"))
    runtime: Runtime = field(default="torch", metadata=_help(
        "the runtime the network will be deployed in, whose latency the table predicts: torch (eager), onnxruntime, "
        "onnxruntime-int8 (these two need the deploy extra) or executorch (XNNPACK; the executorch extra)"))
    data_dir: str = field(default="data", metadata=_help(
        "where cifar10 and flowers102 are downloaded, and decoded images cached"))
    results: str | None = field(default=None, metadata=_help(
        "results folder (default: $NAS_RESULTS, else ./results)"))
    # Every supernet training setting, as --supernet-<setting> flags (--supernet-lr); its seed is ``seed``'s.
    supernet: TrainSettings = field(default=TrainSettings(), metadata=_help("supernet training, when no cached "
                                                                             "supernet exists", exclude=("seed",)))
    val_images: int | None = field(default=None, metadata=_help(
        "validation images scored per trial (default: the whole validation split; fewer is faster but noisier)"))
    latency_table: str | None = field(default=None, metadata=_help(
        "use this latency table file as is, even from another machine (workers of one distributed search should "
        "all use the table of the device the network is for)"))

    def __post_init__(self) -> None:
        if self.budget < 0:
            raise SpecError("budget", f"{self.budget} must be zero or more")
        if self.latency_ms is not None and not self.latency_ms > 0:
            raise SpecError("latency_ms", f"{self.latency_ms} must be positive")
        if self.val_images is not None and self.val_images < 1:
            raise SpecError("val_images", f"{self.val_images} must be positive")
        if self.supernet.seed not in (0, self.seed):
            raise SpecError("supernet.seed", f"{self.supernet.seed}: the supernet is seeded by seed ({self.seed})")
        check_choices(self)  # sampler, runtime
        check_device(self.device, "device")
        check_device(self.latency_device, "latency_device")

    @property
    def name(self) -> str:
        return self.study_name or f"{Path(self.space).stem}-{self.dataset.replace(':', '-').replace('/', '_')}"

    @property
    def supernet_settings(self) -> TrainSettings:
        return dataclasses.replace(self.supernet, seed=self.seed)

    @property
    def results_dir(self) -> Path:
        return results_root(self.results)

    @property
    def study_dir(self) -> Path:
        return self.results_dir / self.name

    @property
    def storage_url(self) -> str:
        return self.storage or default_storage_url(self.name, self.results)


def config_defining(c: SearchConfig) -> dict[str, Any]:
    """The defining fields a configuration alone gives: checked before any expensive step."""
    return {"dataset": c.dataset, "latency_ms": c.latency_ms, "seed": c.seed, "supernet": c.supernet_settings,
            "val_images": c.val_images}


@dataclass(frozen=True)
class Reference:
    """The space's hand-designed member (MobileNetV3) scored like every trial."""

    spec: NetworkSpec
    accuracy: float
    predicted_latency_ms: float
    log_likelihood: float | None = None  # the proxy's mean log-likelihood (None in studies of older versions)


@dataclass(frozen=True)
class StudyRecord:
    """What a study was run with; a run that differs in a defining field must use another study."""

    config: SearchConfig
    space_name: str
    num_classes: int
    latency_limit_ms: float  # in ms on the latency device now (the reference's prediction after drift, by default)
    fingerprint: Fingerprint  # the device the latency table was measured on
    reference: Reference | None = None
    # This machine's speed against the table when the study began (nas.latency.calibrate); every run of the study
    # predicts with it, so its trials stay comparable (1.0: not calibrated, a table from another machine).
    latency_drift: float = 1.0
    proxy_images: int | None = None  # validation images each trial is scored on (None: not recorded)
    # batches of training images each trial's BN statistics are re-estimated on (1: studies of older versions)
    calibration_batches: int = 1

    def proxy_stderr(self, accuracy: float) -> float:
        """The binomial standard error of a proxy accuracy of this study (NaN when the image count is unknown)."""
        return binomial_stderr(accuracy, self.proxy_images) if self.proxy_images else math.nan

    def defining(self) -> dict[str, Any]:
        """The fields two runs of one study must share (their trials would not be comparable otherwise). The
        limit is compared as configured: a default limit (None) is the reference's prediction, which the study's
        recorded drift fixes for every later run."""
        return {"space_name": self.space_name, "num_classes": self.num_classes,
                "latency_fingerprint": self.fingerprint, **config_defining(self.config)}

    def refuse_mismatch(self, study_name: str, mine: dict[str, Any]) -> None:
        """A SpecError naming the first of ``mine`` (defining fields of another run) that differs from this study's."""
        theirs = self.defining()
        for key, value in mine.items():
            if theirs[key] != value:
                raise SpecError("study_name", f"study {study_name!r} was run with {key} {theirs[key]!r}, this run has "
                                              f"{value!r}; use another --study-name (or, for a latency table from "
                                              "another machine, --latency-table)")

    def save(self, study: optuna.Study) -> None:
        study.set_user_attr(RECORD_ATTR, to_data(self))

    @classmethod
    def load(cls, study: optuna.Study) -> StudyRecord:
        data = study.user_attrs.get(RECORD_ATTR)
        if data is None:
            raise SpecError("study", f"{study.study_name!r} was not made by this version of 'nas search' "
                                     "(no record attribute)")
        try:
            return from_data(cls, data)
        except SpecError as e:
            raise SpecError("study", f"{study.study_name!r} has an unreadable record ({e})") from None


@dataclass(frozen=True)
class Measured:
    """A trial's network timed for real, with the space's reference timed in the same interleaved rounds: their
    ratio is free of how fast this shared machine happened to run at that moment, which the absolute time is not."""

    ms: float
    reference_ms: float | None = None  # None: the space has no reference, or a study of an older version

    def __post_init__(self) -> None:
        check_positive("ms", self.ms)
        if self.reference_ms is not None:
            check_positive("reference_ms", self.reference_ms)


def stored_measurements(study: optuna.Study) -> dict[int, Measured]:
    """Measured latencies of trials' networks, by trial number, as ``nas report`` stored them; an unreadable entry is
    a one-line error naming it (``nas report --remeasure`` replaces them all)."""
    stored = study.user_attrs.get(MEASURED_ATTR, {})
    out = {}
    try:
        if not isinstance(stored, dict):
            raise SpecError(MEASURED_ATTR, f"expected a mapping of trial numbers, got {type(stored).__name__}")
        for k, v in stored.items():
            if not k.isdigit():
                raise SpecError(f"{MEASURED_ATTR}.{k}", "is not a trial number")
            if isinstance(v, int | float) and not isinstance(v, bool):  # older versions stored the time alone
                v = {"ms": v}
            out[int(k)] = from_data(Measured, v, f"{MEASURED_ATTR}.{k}")
    except SpecError as e:
        raise SpecError("study", f"{study.study_name!r} has unreadable measured latencies ({e}): rerun "
                                 "'nas report --remeasure'") from None
    return out


def store_measurements(study: optuna.Study, measured: dict[int, Measured]) -> None:
    # A study attribute: Optuna does not let finished trials change.
    study.set_user_attr(MEASURED_ATTR, {str(k): dataclasses.asdict(v) for k, v in sorted(measured.items())})


LOG_LIKELIHOOD_ATTR = "proxy_log_likelihood"  # a trial's mean log-likelihood of the true class, beside accuracy


def record_trial(trial: optuna.trial.Trial, spec: NetworkSpec, predicted_ms: float, limit_ms: float) -> None:
    """Store a trial's architecture, predicted latency and latency constraint (see :func:`trial_spec`)."""
    trial.set_user_attr("predicted_latency_ms", predicted_ms)
    trial.set_user_attr("spec", spec_to_dict(spec))
    trial.set_constraint(CONSTRAINT, predicted_ms - limit_ms)
    # optuna-dashboard (0.21) reads only the older list form, the one Optuna's constraints_func stores; the same
    # slack there, so the dashboard shows which trials are infeasible. Trial has no public setter for it.
    trial.storage.set_trial_system_attr(trial._trial_id, "constraints", [predicted_ms - limit_ms])


def within_limit(slack_ms: float) -> bool:
    """The one feasibility rule: a trial is feasible when its latency slack is zero or less."""
    return slack_ms <= 0


METRIC_NAMES = ("proxy_accuracy", "predicted_latency_ms")  # the objectives, named for Optuna's tools and dashboard


def feasible(trial: optuna.trial.FrozenTrial) -> bool:
    return all(within_limit(v) for v in trial.constraints.values())


def trial_spec(trial: optuna.trial.FrozenTrial) -> NetworkSpec:
    """The architecture a trial scored."""
    return spec_from_dict(trial.user_attrs["spec"])


# -- storage ------------------------------------------------------------------------------------------------------

def default_storage_url(study_name: str, results: str | os.PathLike[str] | None = None) -> str:
    return f"sqlite:///{results_root(results) / study_name / 'study.db'}"


def sqlite_path(url: str) -> Path | None:
    """The database file of a ``sqlite:///PATH`` URL; None for other storages."""
    return Path(url[len("sqlite:///"):]) if url.startswith("sqlite:///") else None


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """An Optuna RDB storage with heartbeats (for failing trials of killed workers)."""
    db = sqlite_path(url)
    if db is None and not url.startswith("postgresql"):
        raise SpecError("storage", f"{url!r}: only sqlite:///PATH and postgresql://... are supported")
    if db is not None:
        ensure_writable(db.parent, "study database")
        if db.exists() and not os.access(db, os.W_OK):
            raise SpecError("", "cannot write the study database: it is read-only", source=str(db))
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
                raise SpecError("storage", f"cannot open {url!r}: {str(e).splitlines()[0]}") from None
            time.sleep(0.2 * (attempt + 1))
        except Exception as e:  # SQLAlchemy raises many types for a bad URL or a missing driver
            raise SpecError("storage", f"cannot open {url!r}: {str(e).splitlines()[0]}") from None
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


def load_study(study_name: str, storage: str | None = None, results: str | os.PathLike[str] | None = None
               ) -> tuple[optuna.Study, StudyRecord]:
    """An existing study and its record."""
    url = storage or default_storage_url(study_name, results)
    db = sqlite_path(url)
    if db is not None and not db.exists():
        raise SpecError("study", f"no study {study_name!r}: {db} does not exist")
    try:
        study = optuna.load_study(study_name=study_name, storage=open_storage(url))
    except KeyError:
        raise SpecError("study", f"no study {study_name!r} in {url}") from None
    return study, StudyRecord.load(study)
