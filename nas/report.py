"""Reports of a study, computed from its storage alone: a plain object first, files and figures second.

``build_report`` reads the study; ``write_report`` writes ``specs/`` (one YAML per feasible Pareto-optimal
architecture, ranked by accuracy), ``trials.csv``, ``pareto.html`` and ``history.html`` (plotly, with
plotly.js embedded so they open offline).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import statistics
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
import plotly.graph_objects as go
import torch

from nas._schema import SpecError, ensure_writable, write_atomic
from nas.latency import median_of_rounds, time_beside_reference
from nas.model import build_model
from nas.registry import ACTIVATIONS
from nas.spec import NetworkSpec, save_spec
from nas.study import (
    LOG_LIKELIHOOD_ATTR,
    Measured,
    Reference,
    StudyRecord,
    feasible,
    store_measurements,
    stored_measurements,
    trial_spec,
)
from nas.train import binomial_stderr

FLAG_GAP = 0.25  # a measured-vs-predicted gap beyond this is flagged in the summary, the specs and the plot
CHANCE_MARGIN = 0.05  # proxy accuracies all this close to chance: the supernet has not learnt (1-epoch CIFAR: 11-14%)


@dataclass(frozen=True)
class ParetoEntry:
    rank: int
    trial: int
    accuracy: float  # proxy accuracy through the supernet
    predicted_ms: float
    measured_ms: float | None  # nas.build_model(spec) timed for real on the table's device, when available
    params: int
    spec: NetworkSpec
    # The space's reference, timed in the same rounds as measured_ms and predicted like the trials (None without one)
    reference_measured_ms: float | None = None
    reference_predicted_ms: float | None = None

    @property
    def relative(self) -> bool:
        """Whether the gap is taken relative to the reference timed beside this network."""
        return self.reference_measured_ms is not None and self.reference_predicted_ms is not None

    @property
    def measured_vs_reference(self) -> float | None:
        """Measured latency over the reference's, in the same rounds: below 1, really faster than MobileNetV3."""
        return self.measured_ms / self.reference_measured_ms if self.relative and self.measured_ms is not None else None

    @property
    def latency_gap(self) -> float | None:
        """measured / predicted - 1, each relative to the reference when it was timed beside this network (what the
        default limit depends on; a shared machine's speed of the moment cancels out), else absolute."""
        if self.measured_ms is None:
            return None
        if self.relative:
            return self.measured_vs_reference / (self.predicted_ms / self.reference_predicted_ms) - 1
        return self.measured_ms / self.predicted_ms - 1

    @property
    def flagged(self) -> bool:
        """The measurement and the prediction disagree by more than FLAG_GAP: trust neither without a look."""
        return self.latency_gap is not None and abs(self.latency_gap) > FLAG_GAP


@dataclass(frozen=True)
class Report:
    study: str
    record: StudyRecord
    trials: pd.DataFrame  # one row per trial: number, state, objectives, feasibility, Pareto flag, choices
    pareto: tuple[ParetoEntry, ...]
    hypervolume: float
    caveats: tuple[str, ...] = ()  # reasons to distrust the proxy ranking (see proxy_caveats)

    @property
    def limit_ms(self) -> float:
        return self.record.latency_limit_ms

    @property
    def reference(self) -> Reference | None:
        """The space's MobileNetV3 member, scored like the trials."""
        return self.record.reference


def hypervolume(points: list[tuple[float, float]], limit_ms: float) -> float:
    """Area dominated by the (accuracy, latency) points of feasible trials inside accuracy [0, 1] x latency
    [0, limit], normalised so 1.0 is a perfect network at zero latency."""
    from optuna._hypervolume import compute_hypervolume  # Optuna's exact WFG; no public alias in 5.x

    # min(): a feasible point can only lie beyond the limit if a study's runs disagreed on it (workers of older
    # versions stored records concurrently); it counts as at the limit rather than breaking the report.
    losses = np.array([(-a, min(ms / limit_ms, 1.0)) for a, ms in points], dtype=float)
    if len(losses) == 0:
        return 0.0
    return float(compute_hypervolume(losses, np.array([0.0, 1.0])))


def build_report(study: optuna.Study, *, measure_latency: bool = True, remeasure: bool = False,
                 progress: bool = False) -> Report:
    """The report of ``study``. The Pareto architectures' real latency is measured once (with the table's device,
    threads and batch size) and stored in the study; later reports reuse it unless ``remeasure``."""
    record = StudyRecord.load(study)
    limit = record.latency_limit_ms
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    best = {t.number for t in study.best_trials}
    rows = []
    for t in study.get_trials(deepcopy=False):
        done = t.state == optuna.trial.TrialState.COMPLETE
        rows.append({"number": t.number, "state": t.state.name,
                     "accuracy": t.values[0] if done else None, "predicted_latency_ms": t.values[1] if done else None,
                     "log_likelihood": t.user_attrs.get(LOG_LIKELIHOOD_ATTR),
                     "feasible": feasible(t) if t.constraints else None, "pareto": t.number in best,
                     "duration_s": t.duration.total_seconds() if t.duration else None,
                     **{f"params_{k}": v for k, v in t.params.items()}})
    trials = pd.DataFrame(rows, columns=None if rows else ["number", "state", "accuracy", "predicted_latency_ms",
                                                           "log_likelihood", "feasible", "pareto", "duration_s"])
    fp = record.fingerprint
    can_measure = measure_latency and (fp.device == "cpu" or torch.cuda.is_available())
    # A repeat of an architecture (duplicate_of) shares its values, so both are Pareto-optimal: rank the first only.
    ranked = sorted((t for t in complete if t.number in best and "duplicate_of" not in t.user_attrs),
                    key=lambda t: (-t.values[0], t.values[1]))
    stored = {} if remeasure else stored_measurements(study)
    todo = [t for t in ranked if t.number not in stored] if can_measure else []
    if todo:
        stored.update(measure_front(todo, record, progress))
        store_measurements(study, stored)
    ref = record.reference
    pareto = []
    for rank, t in enumerate(ranked, start=1):
        spec = trial_spec(t)
        m = stored.get(t.number)
        entry = ParetoEntry(rank, t.number, t.values[0], t.values[1], None if m is None else m.ms,
                            sum(p.numel() for p in build_model(spec).parameters()), spec,
                            None if m is None else m.reference_ms, None if ref is None else ref.predicted_latency_ms)
        gap, vs_ref = entry.latency_gap, entry.measured_vs_reference
        pareto.append(dataclasses.replace(entry, spec=spec.with_metadata(
            origin=f"nas search, study {study.study_name}, trial {t.number}", search_space=record.space_name,
            dataset=record.config.dataset, trial=t.number, rank=rank, proxy_accuracy=round(t.values[0], 6),
            proxy_accuracy_stderr=round(record.proxy_stderr(t.values[0]), 6), proxy_images=record.proxy_images,
            predicted_latency_ms=round(t.values[1], 4),
            measured_latency_ms=None if m is None else round(m.ms, 4),
            measured_latency_vs_reference=None if vs_ref is None else round(vs_ref, 4),
            latency_device=fp.processor, latency_limit_ms=round(limit, 4),
            latency_gap=None if gap is None else round(gap, 4),
            latency_flag=f"measured {gap:+.0%} off predicted{' relative to the reference' if entry.relative else ''}"
                         ": the machine was busy, or the table is stale" if entry.flagged else None)))
    hv = hypervolume([(t.values[0], t.values[1]) for t in complete if feasible(t)], limit)
    caveats = proxy_caveats([t.values[0] for t in complete], record.num_classes, record.proxy_images)
    return Report(study.study_name, record, trials, tuple(pareto), hv, caveats)


FRONT_ROUNDS = 4  # interleaved rounds of 10 timed runs each, as latency validation measures
# Visits of the reference per round: fewer than validation's 8 among 100 networks, since a front of a few networks
# would spend most of its time on them (the main command has a 180 s budget); 3 still outvote one unlucky visit.
FRONT_REFERENCE_COPIES = 3


def time_beside_study_reference(specs: list[NetworkSpec], record: StudyRecord, *, desc: str, progress: bool
                                ) -> tuple[float | None, list[float]]:
    """Median latency (ms) of the study's reference (None where its space has none) and of each of ``specs``, timed
    for real with the table's device, threads, batch and runtime, in FRONT_ROUNDS interleaved rounds, the reference
    visited FRONT_REFERENCE_COPIES times a round among them."""
    ref = None if record.reference is None else record.reference.spec
    ref_times, times = time_beside_reference(ref, specs, copies=FRONT_REFERENCE_COPIES, **record.fingerprint.timing,
                                             rounds=FRONT_ROUNDS, warmup=3, repeats=10, desc=desc, progress=progress)
    return (None if ref_times is None else median_of_rounds(ref_times)), [median_of_rounds(t) for t in times]


def measure_front(trials: list[optuna.trial.FrozenTrial], record: StudyRecord, progress: bool) -> dict[int, Measured]:
    """The trials' networks timed beside the study's reference (:func:`time_beside_study_reference`)."""
    ref_ms, ms = time_beside_study_reference([trial_spec(t) for t in trials], record,
                                             desc="measuring the Pareto front", progress=progress)
    return {t.number: Measured(m, ref_ms) for t, m in zip(trials, ms, strict=True)}


def proxy_caveats(accuracies: list[float], num_classes: int, images: int | None) -> tuple[str, ...]:
    """Warnings when proxy accuracies cannot rank anything: all within CHANCE_MARGIN (or two standard errors, if
    more) of chance, or spanning less than one standard error of a proxy on ``images`` validation images."""
    if not accuracies or not images:
        return ()
    chance = 1 / num_classes
    found = []
    margin = max(2 * binomial_stderr(chance, images), CHANCE_MARGIN)
    if max(accuracies) <= chance + margin:
        found.append(f"every proxy accuracy (best {max(accuracies):.1%}) is within {margin:.1%} of chance "
                     f"({chance:.1%} for {num_classes} classes): the supernet has learnt next to nothing; train it "
                     "longer")
    p = statistics.median(accuracies)
    se = binomial_stderr(p, images)
    if len(accuracies) > 1 and max(accuracies) - min(accuracies) < se:
        found.append(f"proxy accuracies span {max(accuracies) - min(accuracies):.2%}, less than their standard error "
                     f"({se:.2%} on {images} images): the ranking is noise")
    return tuple(found)


def _architecture(spec: NetworkSpec) -> str:
    blocks = spec.blocks
    return (f"{len(blocks)} blocks<br>k {' '.join(str(b.kernel) for b in blocks)}"
            f"<br>exp {' '.join(str(b.expanded_channels) for b in blocks)}"
            f"<br>out {' '.join(str(b.out_channels) for b in blocks)}"
            f"<br>se {''.join('+' if b.se else '-' for b in blocks)}"
            f"<br>act {' '.join(ACTIVATIONS[b.activation].label for b in blocks)}")


def pareto_figure(report: Report, study: optuna.Study) -> go.Figure:
    complete = {t.number: t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))}
    fig = go.Figure()
    df = report.trials[report.trials["state"] == "COMPLETE"]
    for label, mask, style in (
            ("infeasible (over the latency limit)", df["feasible"] == False,  # noqa: E712 - pandas mask
             {"color": "lightgray", "symbol": "x"}),
            ("feasible", (df["feasible"] == True) & ~df["pareto"], {"color": "#4c78a8"})):  # noqa: E712
        part = df[mask]
        fig.add_trace(go.Scatter(
            x=part["predicted_latency_ms"], y=part["accuracy"], mode="markers", name=label, marker=style,
            error_y=_stderr_bars(report.record, part["accuracy"], style["color"]),
            text=[f"trial {n}<br>{_architecture(trial_spec(complete[n]))}" for n in part["number"]],
            hovertemplate="%{text}<br>%{x:.3f} ms, acc %{y:.4f}<extra></extra>"))
    front = sorted(report.pareto, key=lambda e: e.predicted_ms)
    fig.add_trace(go.Scatter(
        x=[e.predicted_ms for e in front], y=[e.accuracy for e in front], mode="lines+markers",
        name="Pareto-optimal (exported)", line={"shape": "hv"},
        error_y=_stderr_bars(report.record, [e.accuracy for e in front], "#e45756"),
        marker={"color": "#e45756", "size": 10, "symbol": ["x-open" if e.flagged else "circle" for e in front]},
        text=[f"rank {e.rank}, trial {e.trial}"
              + ("" if e.measured_ms is None else f"<br>measured {e.measured_ms:.3f} ms"
                 + ("" if e.measured_vs_reference is None else f", x{e.measured_vs_reference:.3f} the reference")
                 + f" ({e.latency_gap:+.0%}{' relative' if e.relative else ''})"
                 + (f": over {FLAG_GAP:.0%} off, flagged" if e.flagged else ""))
              + f"<br>{_architecture(e.spec)}" for e in front],
        hovertemplate="%{text}<br>%{x:.3f} ms, acc %{y:.4f}<extra></extra>"))
    if report.reference is not None:
        ref = report.reference
        fig.add_trace(go.Scatter(
            x=[ref.predicted_latency_ms], y=[ref.accuracy], mode="markers", name="MobileNetV3 reference",
            marker={"color": "black", "symbol": "star", "size": 16},
            error_y=_stderr_bars(report.record, [ref.accuracy], "black"),
            text=[_architecture(ref.spec)], hovertemplate="reference<br>%{text}<br>%{x:.3f} ms, "
                                                             "acc %{y:.4f}<extra></extra>"))
    fig.add_vline(x=report.limit_ms, line_dash="dash", line_color="gray",
                  annotation_text=f"limit {report.limit_ms:.2f} ms")
    r = report.record
    fig.update_layout(title=f"{report.study}: proxy accuracy vs predicted latency ({r.space_name}, "
                            f"{r.config.dataset}, {r.config.sampler})",
                      xaxis_title=f"predicted latency, ms ({r.fingerprint.processor})",
                      yaxis_title="validation accuracy through the supernet (bars: +- 1 standard error)",
                      template="plotly_white")
    return fig


def _stderr_bars(record: StudyRecord, accuracies: Iterable[float], color: str) -> dict[str, Any]:
    """Plotly error bars of one binomial standard error of each proxy accuracy."""
    return {"type": "data", "array": [record.proxy_stderr(a) for a in accuracies], "color": color, "thickness": 1,
            "width": 2, "visible": record.proxy_images is not None}


def history_figure(report: Report) -> go.Figure:
    df = report.trials[report.trials["state"] == "COMPLETE"].sort_values("number")
    ok = df[df["feasible"] == True]  # noqa: E712 - pandas mask
    best = ok["accuracy"].cummax()
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=df["number"], y=df["accuracy"], mode="markers", name="trial accuracy",
                             marker={"color": ["#4c78a8" if f else "lightgray" for f in df["feasible"]]}))
    fig.add_trace(go.Scatter(x=ok["number"], y=best, mode="lines", name="best feasible so far",
                             line={"color": "#e45756", "shape": "hv"}))
    fig.update_layout(title=f"{report.study}: search progress (gray: over the latency limit)",
                      xaxis_title="trial", yaxis_title="validation accuracy through the supernet",
                      template="plotly_white")
    return fig


def export_specs(report: Report, out: str | os.PathLike[str], top: int | None = None) -> list[Path]:
    """Write the ranked Pareto specs to ``out`` (replacing its YAML files as a whole)."""
    out = Path(out)
    ensure_writable(out.parent, "specs")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it 0700; the specs are for everyone who can read the results
    names = []
    for e in report.pareto[:top]:
        name = f"rank{e.rank:02d}-trial{e.trial:04d}.yaml"
        save_spec(e.spec, tmp / name)
        names.append(out / name)
    # Swap folders by renames, so readers (and a second worker reporting at the same moment) never see a
    # half-written one; the loser of a race simply retries.
    for _ in range(10):
        old = out.with_name(f".{out.name}.old.{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except OSError:
            continue
        finally:
            shutil.rmtree(old, ignore_errors=True)
        return names
    raise SpecError("", "could not replace it: another process keeps writing there", source=str(out))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_report(report: Report, study: optuna.Study, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"specs": out / "specs", "trials": out / "trials.csv", "pareto": out / "pareto.html",
             "history": out / "history.html"}
    export_specs(report, paths["specs"])
    write_atomic(paths["trials"], lambda p: report.trials.to_csv(p, index=False))
    write_atomic(paths["pareto"], lambda p: pareto_figure(report, study).write_html(p, include_plotlyjs=True))
    write_atomic(paths["history"], lambda p: history_figure(report).write_html(p, include_plotlyjs=True))
    return paths


def format_summary(report: Report, paths: dict[str, Path] | None = None, top: int = 10) -> str:
    counts = report.trials["state"].value_counts().to_dict()
    done = report.trials[report.trials["state"] == "COMPLETE"]
    lines = [f"study {report.study}: {counts.get('COMPLETE', 0)} complete trials"
             + "".join(f", {n} {s.lower()}" for s, n in counts.items() if s != "COMPLETE")
             + f"; {int((done['feasible'] == True).sum())} within the {report.limit_ms:.3f} ms limit; "  # noqa: E712
             f"hypervolume {report.hypervolume:.4f}"]
    if report.reference is not None:
        r = report.reference
        lines.append(f"reference (MobileNetV3 member): accuracy {r.accuracy:.4f}, predicted "
                     f"{r.predicted_latency_ms:.3f} ms")
    images = report.record.proxy_images
    if images:
        at = report.reference.accuracy if report.reference is not None else float(done["accuracy"].median())
        lines.append(f"proxy: accuracy through the supernet on {images} validation images, standard error "
                     f"+-{report.record.proxy_stderr(at):.4f} (at accuracy {at:.4f}); differences below two standard "
                     "errors are not significant")
    table = pd.DataFrame([{"rank": e.rank, "trial": e.trial, "accuracy": f"{e.accuracy:.4f}",
                           "predicted ms": f"{e.predicted_ms:.3f}",
                           "measured ms": "" if e.measured_ms is None else f"{e.measured_ms:.3f}"
                           + (" !" if e.flagged else ""),
                           **({"measured / ref": "" if e.measured_vs_reference is None
                               else f"{e.measured_vs_reference:.3f}"} if report.reference is not None else {}),
                           "blocks": len(e.spec.blocks), "params": f"{e.params:,}"} for e in report.pareto[:top]])
    lines += ["", "feasible Pareto-optimal architectures (best accuracy first):",
              table.to_string(index=False) if len(table) else "  none: no trial met the latency limit"]
    lines += [f"! {c}" for c in report.caveats]
    beside = [e for e in report.pareto if e.relative and e.measured_ms is not None]
    if beside:
        e = beside[0]
        lines.append(f"measured beside the reference (it measured {e.reference_measured_ms:.3f} ms, predicted "
                     f"{e.reference_predicted_ms:.3f} ms): 'measured / ref' below 1 is faster than it, and a gap is "
                     "that ratio against the predicted one")
    flagged = [e for e in report.pareto if e.flagged]
    if flagged:
        lines.append(f"! measured more than {FLAG_GAP:.0%} off predicted for {len(flagged)} of {len(report.pareto)} "
                     "(the machine was busy, or the table is stale): rerun 'nas report --remeasure' when it is quiet, "
                     "or rebuild the table")
    if paths:
        lines += ["", f"specs:   {paths['specs']}/ (rebuild with nas.build_model(nas.load_spec(PATH)))",
                  f"trials:  {paths['trials']}", f"plots:   {paths['pareto']}, {paths['history']}"]
    return "\n".join(lines)
