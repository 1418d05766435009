"""``nas verify``: retrain a study's top Pareto specs and its MobileNetV3 reference with one recipe, and
measure how well the supernet's proxy accuracy ranks them (Kendall tau, Spearman rho)."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import itertools
import math
import multiprocessing
import os
import statistics
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots
from scipy.stats import kendalltau
from tqdm import tqdm

from nas._schema import SpecError, to_data, write_atomic, write_json_atomic
from nas.data import DataSplit, load_dataset
from nas.report import Report, build_report, time_beside_study_reference
from nas.space import load_space
from nas.spec import NetworkSpec
from nas.standalone import checkpoint_for, rank_agreement, train_network
from nas.study import LOG_LIKELIHOOD_ATTR, feasible, trial_spec
from nas.train import TrainSettings


@dataclass(frozen=True)
class VerifyRow:
    name: str  # "rank01-trial0042" or "reference"
    proxy_accuracy: float
    proxy_log_likelihood: float  # NaN where the study did not record it
    standalone_accuracy: float
    predicted_ms: float
    measured_ms: float


CEILING_DRAWS = 2000  # simulated retrainings behind Verification.tau_ceiling


def pooled_std(groups: Iterable[Sequence[float]]) -> float:
    """The pooled within-group standard deviation of ``groups`` (each one network's accuracies over seeds): their
    squared deviations from their own means summed, over their degrees of freedom summed; NaN with none. One
    network's seeds measure its noise alone, and networks differ in it (on CIFAR-10 at 6 epochs the reference's
    alone put a perfect proxy's tau below what the supernet scored). Written out: numpy, scipy and pandas have
    no pooled variance."""
    squares = dof = 0.0
    for g in groups:
        if len(g) > 1:
            mean = statistics.fmean(g)
            squares += sum((x - mean) ** 2 for x in g)
            dof += len(g) - 1
    return math.sqrt(squares / dof) if dof else math.nan


def seed_pairs_text(pairs: Iterable[tuple[str, Sequence[float]]]) -> str:
    """Re-seeded networks as verify prints them: "rank01-trial0042 55.10% then 54.30%, ..."."""
    return ", ".join(f"{name} {a[0]:.2%} then {a[1]:.2%}" for name, a in pairs)


def tau_ceiling(standalone: list[float], seed_std: float) -> tuple[float, float, float]:
    """The Kendall tau a perfect proxy would score against stand-alone accuracies whose retraining noise has std
    ``seed_std``: (10th percentile, median, 90th) over simulated retrainings; NaN while the noise is unmeasured.

    Model: each network's true accuracy is its stand-alone one shrunk toward their mean until their variance is
    the between-network variance less the seed-to-seed variance (one noise for every network, best measured on
    several: :func:`pooled_std`); a retraining adds Gaussian noise of that std. No true spread left: 0, nothing
    to rank.
    Simulated because no closed form covers a handful of networks with ties; seeded, so it is reproducible.
    """
    if len(standalone) < 2 or math.isnan(seed_std):  # one network, or one seed
        return (math.nan,) * 3
    seed_var, spread = seed_std ** 2, statistics.variance(standalone)
    if spread <= seed_var:
        return (0.0,) * 3
    a = np.array(standalone)
    true = a.mean() + (a - a.mean()) * math.sqrt((spread - seed_var) / spread)
    noisy = true + np.random.default_rng(0).normal(0.0, math.sqrt(seed_var), (CEILING_DRAWS, len(a)))
    low, median, high = np.percentile([kendalltau(true, draw).statistic for draw in noisy], [10, 50, 90])
    return float(low), float(median), float(high)


@dataclass(frozen=True)
class Verification:
    study: str
    dataset: str
    settings: dict[str, Any]
    rows: tuple[VerifyRow, ...]
    kendall_tau: float
    spearman_rho: float
    kendall_tau_log_likelihood: float  # the same ranking by the proxy's log-likelihood instead of its accuracy
    proxy_stderr: float  # the binomial standard error of a proxy accuracy (at the reference's accuracy)
    # The ground truth's own noise: the reference trained with seeds seed, seed + 1, ... (its row is the first).
    reference_seed_accuracies: tuple[float, ...]
    # ...and found networks spread over the front, each trained once more with seed + 1: (name, (its row's, then
    # the retraining's)).
    network_seed_accuracies: tuple[tuple[str, tuple[float, ...]], ...] = ()

    @property
    def seed_std(self) -> float:
        """Sample standard deviation of the reference's stand-alone accuracy over seeds (NaN with one seed)."""
        a = self.reference_seed_accuracies
        return statistics.stdev(a) if len(a) > 1 else math.nan

    @property
    def noise_groups(self) -> list[tuple[float, ...]]:
        """Each network trained with more than one seed: its accuracies over them (the reference first)."""
        return [g for g in (self.reference_seed_accuracies, *(a for _, a in self.network_seed_accuracies))
                if len(g) > 1]

    @property
    def noise_std(self) -> float:
        """The stand-alone recipe's seed-to-seed noise pooled over every network trained with several seeds (the
        reference and the re-seeded networks): what the ceiling, the verdict and the caveats read."""
        return pooled_std(self.noise_groups)

    @property
    def noise_dof(self) -> int:
        """Degrees of freedom behind :attr:`noise_std`."""
        return sum(len(g) - 1 for g in self.noise_groups)

    @property
    def network_std(self) -> float:
        """Standard deviation of stand-alone accuracy between the ranked networks."""
        return statistics.stdev(r.standalone_accuracy for r in self.rows) if len(self.rows) > 1 else math.nan

    @functools.cached_property  # simulated: computed once (a frozen dataclass still has a __dict__ to cache in)
    def tau_ceiling(self) -> tuple[float, float, float]:
        """The Kendall tau a perfect proxy would score against this noisy ground truth (see :func:`tau_ceiling`)."""
        return tau_ceiling([r.standalone_accuracy for r in self.rows], self.noise_std)

    @property
    def verdict(self) -> str:
        """Which limits the ranking, read from tau against the ceiling: the proxy, or the ground truth's noise."""
        low = self.tau_ceiling[0]
        if math.isnan(low) or math.isnan(self.kendall_tau):
            return ""
        if self.network_std <= self.noise_std:  # the ceiling's own test: no true spread, so no tau blames the proxy
            return "the ground truth is all noise: only a less noisy one (more epochs) can rank these networks"
        if self.kendall_tau < low:
            return ("this proxy ranks below that range: the proxy, not the ground truth's noise, limits the ranking "
                    "(train the supernet longer)")
        return ("this proxy ranks within reach of a perfect one: only a less noisy ground truth (more epochs) can "
                "tell them apart")

    def to_json(self) -> dict[str, Any]:
        """The fields and the figures derived from them, as verify.json holds them."""
        return {**dataclasses.asdict(self), "network_seed_accuracies": dict(self.network_seed_accuracies),
                "seed_std": self.seed_std, "noise_std": self.noise_std, "noise_dof": self.noise_dof,
                "network_std": self.network_std,
                "tau_ceiling": list(self.tau_ceiling), "verdict": self.verdict, "caveats": list(self.caveats)}

    def format(self) -> str:
        table = pd.DataFrame([{"network": r.name, "proxy acc": f"{r.proxy_accuracy:.4f}",
                               "proxy log-lik": f"{r.proxy_log_likelihood:.4f}",
                               "stand-alone acc": f"{r.standalone_accuracy:.4f}",
                               "predicted ms": f"{r.predicted_ms:.3f}", "measured ms": f"{r.measured_ms:.3f}"}
                              for r in self.rows])
        low, median, high = self.tau_ceiling
        return "\n".join([
            f"verify {self.study}: {len(self.rows)} networks retrained on {self.dataset} for "
            f"{self.settings['epochs']} epochs each", "", table.to_string(index=False), "",
            f"rank agreement of proxy vs stand-alone accuracy: Kendall tau {self.kendall_tau:.3f}, "
            f"Spearman rho {self.spearman_rho:.3f} (by proxy log-likelihood: tau "
            f"{self.kendall_tau_log_likelihood:.3f})",
            f"proxy accuracy standard error: {self.proxy_stderr:.2%}",
            f"stand-alone seed-to-seed noise: reference over {len(self.reference_seed_accuracies)} seeds "
            f"{', '.join(f'{a:.2%}' for a in self.reference_seed_accuracies)}: std {self.seed_std:.2%}; "
            + (f"{len(self.network_seed_accuracies)} network{'s' * (len(self.network_seed_accuracies) != 1)} "
               "retrained with a second seed ("
               + seed_pairs_text(self.network_seed_accuracies)
               + f"); pooled over all: std {self.noise_std:.2%} ({self.noise_dof} degrees of freedom); "
               if self.network_seed_accuracies else "")
            + f"between the networks: std {self.network_std:.2%}",
            *([] if math.isnan(low) else [f"with that noise a perfect proxy would score Kendall tau {median:.2f} "
                                          f"(10-90%: {low:.2f} to {high:.2f})"
                                          + (f"; {self.verdict}" if self.verdict else "")]),
            *(f"! {c}" for c in self.caveats)])

    @property
    def caveats(self) -> tuple[str, ...]:
        """Why the rank agreement may say little."""
        n, found = len(self.rows), []
        if n < 6:
            found.append(f"tau over {n} networks is coarse: one swapped pair moves it by {4 / (n * (n - 1)):.2f}")
        if math.isnan(self.kendall_tau):
            found.append("tau is undefined: all proxy or all stand-alone accuracies are equal")
        if math.isnan(self.noise_std):
            found.append("the ground truth's noise is unmeasured: train the reference with --seeds 2 or more, or "
                         "networks with --noise-networks 1 or more")
        elif self.network_std <= 2 * self.noise_std:
            found.append(f"the networks differ by little more than seed-to-seed noise (std {self.network_std:.2%} "
                         f"between them, {self.noise_std:.2%} between seeds): their stand-alone order is partly "
                         "chance, and so is tau")
        return tuple(found)


def _fronts(trials: list[optuna.trial.FrozenTrial]) -> Iterator[list[optuna.trial.FrozenTrial]]:
    """Successive non-dominated layers of (accuracy up, latency down), each most accurate first. Written out
    because Optuna's non-dominated sort is private; with two objectives one sorted sweep finds a layer."""
    rest = sorted(trials, key=lambda t: (-t.values[0], t.values[1]))
    while rest:
        layer, others, fastest = [], [], math.inf
        for t in rest:
            (layer if t.values[1] < fastest else others).append(t)
            fastest = min(fastest, t.values[1])
        yield layer
        rest = others


def _spread(items: list[Any], k: int) -> list[Any]:
    """``k`` of ``items`` evenly spaced, both ends included (all of them when there are no more than ``k``)."""
    if len(items) <= k:
        return items
    return [items[0]] if k == 1 else [items[round(i * (len(items) - 1) / (k - 1))] for i in range(k)]


def select_networks(study: optuna.Study, ranks: dict[int, int], top: int
                    ) -> list[tuple[str, NetworkSpec, float, float, float]]:
    """Up to ``top`` distinct feasible architectures spanning the front: (name, spec, proxy accuracy, proxy
    log-likelihood, predicted ms). A front larger than ``top`` is sampled evenly from most accurate to fastest
    (the most accurate always in); a smaller one is filled from the next non-dominated layers, so the ranking is
    checked over ``top`` networks whenever the study holds that many distinct ones. ``ranks`` maps trial numbers
    to report ranks."""
    unique: dict[NetworkSpec, optuna.trial.FrozenTrial] = {}
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if feasible(t):
            unique.setdefault(trial_spec(t).without_metadata(), t)  # TPE revisits architectures: train each once
    chosen: list[tuple[str, NetworkSpec, float, float, float]] = []
    for depth, layer in enumerate(_fronts(list(unique.values())), start=1):
        for t in _spread(layer, top - len(chosen)):
            name = f"rank{ranks[t.number]:02d}" if t.number in ranks else f"front{depth}"
            chosen.append((f"{name}-trial{t.number:04d}", trial_spec(t), t.values[0],
                           t.user_attrs.get(LOG_LIKELIHOOD_ATTR, math.nan), t.values[1]))
        if len(chosen) >= top:
            break
    return chosen


def verified_networks(study: optuna.Study, report: Report, top: int
                      ) -> list[tuple[str, NetworkSpec, float, float, float]]:
    """The networks verify retrains, as :func:`select_networks` gives them, then the reference (named
    "reference") when the study has one."""
    networks = select_networks(study, {e.trial: e.rank for e in report.pareto}, top)
    if (ref := report.reference) is not None:
        ll = math.nan if ref.log_likelihood is None else ref.log_likelihood
        networks.append(("reference", ref.spec, ref.accuracy, ll, ref.predicted_latency_ms))
    return networks


def reseeded_networks(networks: list[tuple[str, NetworkSpec, float, float, float]], k: int) -> list[int]:
    """Which of ``networks`` (as verified_networks gives them) to train with a second seed: the indices of ``k``
    spread evenly over them, the reference left out (its seeds are trained apart)."""
    return _spread([i for i, (name, *_) in enumerate(networks) if name != "reference"], k)


# One stand-alone training: (spec, its recipe with its seed).
Training = tuple[NetworkSpec, TrainSettings]


def _job_device(device: str, k: int) -> str:
    """Training ``k``'s device: plain "cuda" on a machine with several GPUs deals the trainings out among them."""
    count = torch.cuda.device_count() if device == "cuda" else 0
    return f"cuda:{k % count}" if count > 1 else device


_WORKER_DATA: DataSplit | None = None  # a worker process's data set, loaded once (from the decoded cache)


def _load(dataset: tuple[str, int, int, str]) -> DataSplit:
    name, resolution, seed, data_dir = dataset
    return load_dataset(name, resolution, seed=seed, data_dir=data_dir)


def _worker_start(dataset: tuple[str, int, int, str], threads: int) -> None:
    global _WORKER_DATA
    torch.set_num_threads(threads)
    _WORKER_DATA = _load(dataset)


def _accuracy(training: Training, data: DataSplit, device: str, root: Path, progress: bool) -> float:
    spec, settings = training
    return train_network(spec, data, settings, device=device, progress=progress, measure_latency=False,
                         checkpoint=checkpoint_for(spec, data, settings, None, root)).val_accuracy


def _worker_accuracy(training: Training, device: str, root: Path) -> float:
    assert _WORKER_DATA is not None
    return _accuracy(training, _WORKER_DATA, device, root, False)


def train_all(trainings: list[Training], dataset: tuple[str, int, int, str], *, device: str,
              out_dir: str | os.PathLike[str], jobs: int = 1, progress: bool = True) -> list[float]:
    """Stand-alone validation accuracy of each training, ``jobs`` at a time. ``dataset`` is load_dataset's (name,
    resolution, seed, data_dir). Checkpoints under ``out_dir/checkpoints``: a cut run resumes, a repeated one reuses.

    With ``jobs`` > 1 each runs in a process of its own (spawned: CUDA cannot be forked), the CPU's threads shared
    out among them, and plain "cuda" deals them out over the GPUs. Small networks use threads poorly, so on a CPU
    N processes of fewer threads each beat one of all (1.2-1.4x, 2 at a time on 2 cores; results/BENCHMARKS.md).
    Each training is seeded by its own recipe, so ``jobs`` changes no result bit for bit at equal threads per
    training; other threads change the order of floating-point sums, and so a short training's accuracy.
    """
    if jobs < 1:
        raise SpecError("jobs", f"{jobs} must be positive")
    root = Path(out_dir) / "checkpoints"
    if jobs == 1 or len(trainings) <= 1:  # no pool of one worker, nor of none
        data = _load(dataset)
        return [_accuracy(t, data, device, root, progress) for t in trainings]
    jobs = min(jobs, len(trainings))
    threads = max(1, torch.get_num_threads() // jobs)
    context = multiprocessing.get_context("spawn")
    results: list[float] = [math.nan] * len(trainings)
    queue = iter(enumerate(trainings))
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context, initializer=_worker_start,
                                                initargs=(dataset, threads)) as pool, \
            tqdm(total=len(trainings), disable=not progress, desc=f"training, {jobs} at a time", unit="network",
                 dynamic_ncols=True) as bar:
        # At most ``jobs`` handed out at once (the pool would queue more ahead), so an error stops the rest at once.
        running = {pool.submit(_worker_accuracy, t, _job_device(device, k), root): k
                   for k, t in itertools.islice(queue, jobs)}
        while running:
            done, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                results[running.pop(future)] = future.result()  # a worker's error: raised here, the rest unbegun
                bar.update()
                for k, t in itertools.islice(queue, 1):
                    running[pool.submit(_worker_accuracy, t, _job_device(device, k), root)] = k
    return results


def seed_accuracies_of(spec: NetworkSpec, data: DataSplit, settings: TrainSettings, seeds: Iterable[int], *,
                       device: str, out_dir: str | os.PathLike[str], progress: bool = True) -> list[float]:
    """Stand-alone validation accuracy of ``spec`` trained with ``settings`` under each of ``seeds`` (no latency
    measured): the ground truth's own noise. Checkpoints under ``out_dir/checkpoints``, shared with verify."""
    root = Path(out_dir) / "checkpoints"
    return [_accuracy((spec, dataclasses.replace(settings, seed=seed)), data, device, root, progress)
            for seed in seeds]


def verify(study: optuna.Study, *, top: int, settings: TrainSettings, device: str = "cpu",
           out_dir: str | os.PathLike[str], progress: bool = True, seeds: int = 3, noise_networks: int = 2,
           jobs: int = 1) -> Verification:
    """Retrain ``top`` networks spanning the front and the reference with ``settings``; to measure the ground
    truth's own noise, the reference ``seeds`` times (seeds ``settings.seed``, +1, ...) and ``noise_networks``
    of the others, spread over the front, once more with seed + 1; ``jobs`` trainings at a time (``train_all``)."""
    if seeds < 1:
        raise SpecError("seeds", f"{seeds} must be positive")
    if noise_networks < 0:
        raise SpecError("noise_networks", f"{noise_networks} must not be negative")
    report = build_report(study, measure_latency=False)  # only its ranks: verify measures what it trains
    record, ref = report.record, report.reference
    networks = verified_networks(study, report, top)
    # The study's specs carry the data set's class count already (nas.data.load_for at search time).
    c = record.config
    trainings = [(spec, settings) for _, spec, *_ in networks]
    if ref is not None:
        trainings += [(ref.spec, dataclasses.replace(settings, seed=settings.seed + k)) for k in range(1, seeds)]
    reseeded = reseeded_networks(networks, noise_networks)
    trainings += [(networks[k][1], dataclasses.replace(settings, seed=settings.seed + 1)) for k in reseeded]
    results = train_all(trainings, (c.dataset, load_space(c.space).input.resolution, c.seed, c.data_dir),
                        device=device, out_dir=out_dir, jobs=jobs, progress=progress)
    accuracies, n = results[:len(networks)], len(results) - len(reseeded)
    seed_accuracies = [accuracies[-1], *results[len(networks):n]] if ref is not None else []
    network_seeds = tuple((networks[k][0], (accuracies[k], again)) for k, again in zip(reseeded, results[n:],
                                                                                       strict=True))
    # Latency once all are trained, as the study's table was timed (its threads, batch and runtime), every network
    # beside the reference in interleaved rounds: timed one by one between trainings, minutes apart, each would carry
    # the machine's drift of that moment into "no slower than the reference".
    found = [spec for name, spec, *_ in networks if name != "reference"]
    ref_ms, found_ms = time_beside_study_reference(found, record, desc="measuring latency", progress=progress)
    measured = iter(found_ms)
    rows = [VerifyRow(name, proxy, ll, accuracy, predicted, ref_ms if name == "reference" else next(measured))
            for (name, _, proxy, ll, predicted), accuracy in zip(networks, accuracies, strict=True)]
    proxy, standalone = [r.proxy_accuracy for r in rows], [r.standalone_accuracy for r in rows]
    tau, rho = rank_agreement(proxy, standalone)
    tau_ll = rank_agreement([r.proxy_log_likelihood for r in rows], standalone)[0]
    stderr = record.proxy_stderr(ref.accuracy if ref is not None else statistics.fmean(proxy))
    return Verification(study.study_name, c.dataset, to_data(settings), tuple(rows), tau, rho, tau_ll,
                        stderr, tuple(seed_accuracies), network_seeds)


def verify_figure(v: Verification) -> go.Figure:
    fig = make_subplots(rows=1, cols=2, subplot_titles=(
        f"proxy vs stand-alone accuracy (tau {v.kendall_tau:.2f}, rho {v.spearman_rho:.2f})",
        "stand-alone accuracy vs measured latency"))
    found = [r for r in v.rows if r.name != "reference"]
    ref = [r for r in v.rows if r.name == "reference"]
    for rows, label, marker in ((found, "found", {"color": "#e45756", "size": 10}),
                                (ref, "MobileNetV3 reference", {"color": "black", "symbol": "star", "size": 16})):
        names = [r.name for r in rows]
        fig.add_trace(go.Scatter(x=[r.proxy_accuracy for r in rows], y=[r.standalone_accuracy for r in rows],
                                 mode="markers", name=label, marker=marker, text=names, legendgroup=label,
                                 hovertemplate="%{text}<br>proxy %{x:.4f}<br>stand-alone %{y:.4f}<extra></extra>"),
                      row=1, col=1)
        fig.add_trace(go.Scatter(x=[r.measured_ms for r in rows], y=[r.standalone_accuracy for r in rows],
                                 mode="markers", name=label, marker=marker, text=names, legendgroup=label,
                                 showlegend=False,
                                 hovertemplate="%{text}<br>%{x:.3f} ms<br>stand-alone %{y:.4f}<extra></extra>"),
                      row=1, col=2)
    fig.update_xaxes(title_text="proxy accuracy (supernet)", row=1, col=1)
    fig.update_xaxes(title_text="measured latency, ms", row=1, col=2)
    fig.update_yaxes(title_text="stand-alone validation accuracy", row=1, col=1)
    fig.update_layout(title=f"{v.study}: verification on {v.dataset}", template="plotly_white")
    return fig


def write_verification(v: Verification, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "verify.json", "html": out / "verify.html"}
    write_json_atomic(v.to_json(), paths["json"])
    write_atomic(paths["html"], lambda p: verify_figure(v).write_html(p, include_plotlyjs=True))
    return paths
