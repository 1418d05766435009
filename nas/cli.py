"""The ``nas`` command line: parse, call the library, print, return an exit code.

Commands are registered in :data:`COMMANDS`, each with ``add_arguments`` and ``run``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from nas._schema import SpecError, write_json_atomic

EXIT_USAGE = 2  # bad input of any kind: flags, files, specs


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump); ``--help`` still shows everything."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"error: {self.prog}: {message}\n")


@dataclass(frozen=True)
class Command:
    help: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be positive")
    return value


def _add_build(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="a built-in spec name (mobilenet_v3_large, mobilenet_v3_small) or a YAML spec path")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="intra-op CPU threads for the latency measurement (default: torch's default)")
    p.add_argument("--repeats", type=_positive_int, default=30, help="timed runs for the latency median (default 30)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurement")


def _run_build(args: argparse.Namespace) -> int:
    from nas.spec import load_spec
    from nas.summary import format_summary, summarize

    spec = load_spec(args.spec)
    summary = summarize(spec, source=args.spec, latency=not args.no_latency, device=args.device,
                        threads=args.threads, repeats=args.repeats)
    print(json.dumps(summary.to_json(), indent=2) if args.json else format_summary(summary))
    return 0


def _add_train_supernet(p: argparse.ArgumentParser) -> None:
    from nas.train import TrainSettings

    d = TrainSettings()
    p.add_argument("--space", default="mobilenetv3_compact",
                   help="a built-in search space (mobilenetv3_compact, mobilenetv3_small, mobilenetv3_large) or a "
                        "YAML path (default mobilenetv3_compact)")
    p.add_argument("--dataset", default="digits",
                   help="digits (embedded, default), cifar10, flowers102 or folder:PATH (ImageFolder layout)")
    p.add_argument("--data-dir", default="data", help="where cifar10 and flowers102 are downloaded (default data/)")
    p.add_argument("--epochs", type=_positive_int, default=d.epochs, help=f"default {d.epochs}")
    p.add_argument("--batch-size", type=_positive_int, default=d.batch_size, help=f"default {d.batch_size}")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak SGD learning rate, cosine decay (default {d.lr})")
    p.add_argument("--random-subnets", type=int, default=d.random_subnets,
                   help=f"random subnets per step besides the largest and smallest (default {d.random_subnets})")
    p.add_argument("--seed", type=int, default=d.seed, help="seeds data split, sampling and init (default 0)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default auto: cuda when available)")
    p.add_argument("--out", default=None,
                   help="checkpoint path (default: results/supernets/<space>-<data>-<settings hash>.pt); an "
                        "unfinished one is resumed, a finished one reused")


def _run_train_supernet(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from nas.data import load_dataset
    from nas.latency import resolve_device
    from nas.space import load_space
    from nas.train import TrainSettings, calibration_batches, score_subnet, train_supernet

    space = load_space(args.space)
    device = resolve_device(args.device)
    settings = TrainSettings(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                             random_subnets=args.random_subnets, seed=args.seed)
    data = load_dataset(args.dataset, space.input.resolution, seed=args.seed, data_dir=args.data_dir)
    start = time.perf_counter()
    try:
        result = train_supernet(space, data, settings, checkpoint=Path(args.out) if args.out else None,
                                device=device)
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same command to resume from the last finished epoch", file=sys.stderr)
        return 130
    seconds = time.perf_counter() - start
    calib = calibration_batches(data, device=device)
    space = result.supernet.space
    for name, spec in (("largest", space.largest()), ("smallest", space.smallest())):
        acc = score_subnet(result.supernet, spec, data, calib, device=device)
        print(f"{name:8s} subnet: {acc:.2%} validation accuracy ({len(data.val)} images, BN recalibrated)")
    how = "reused finished checkpoint" if result.reused else f"trained in {seconds:.0f} s on {device}"
    print(f"supernet: {result.checkpoint} ({how})")
    return 0


def _add_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--space", default="mobilenetv3_compact",
                   help="a built-in search space or a YAML path (default mobilenetv3_compact)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="intra-op CPU threads to measure under (default: torch's default on this machine)")
    p.add_argument("--batch", type=_positive_int, default=1, help="batch size to measure at (default 1)")
    p.add_argument("--table", default=None,
                   help="use this latency table file instead of the one for this device under results/latency/")
    p.add_argument("--force", action="store_true",
                   help="accept a table made on another device or for another space")


def _add_latency(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="latency_command", required=True, metavar="{build,validate}", parser_class=_Parser)
    build = sub.add_parser("build", help="measure every layer of a space on this device (once)",
                           description="Measure every distinct layer a search space can hold on this device, "
                           "fit the whole-network correction, and write the table under results/latency/.")
    _add_device_args(build)
    build.add_argument("--rebuild", action="store_true", help="measure again even if a table exists")
    validate = sub.add_parser("validate", help="compare predictions with real measurements",
                              description="Sample random architectures of a space, build each with nas.build_model "
                              "and measure it for real (4 interleaved rounds; their two halves give the noise "
                              "floor), and report the predictor's error. Writes the report as JSON under "
                              "results/latency/.")
    _add_device_args(validate)
    validate.add_argument("--n", type=_positive_int, default=100, help="architectures to measure (default 100)")
    validate.add_argument("--seed", type=int, default=1, help="sampling seed (default 1)")


def _run_latency(args: argparse.Namespace) -> int:
    import time

    from nas.latency import load_predictor, table_path, validate
    from nas.space import load_space

    space = load_space(args.space)
    start = time.perf_counter()
    predictor = load_predictor(space, device=args.device, threads=args.threads, batch_size=args.batch,
                               table=args.table, force=args.force, rebuild=getattr(args, "rebuild", False))
    fp = predictor.fingerprint
    if args.latency_command == "build":
        print(f"latency table: {predictor.path} ({len(predictor.table)} layers, {fp.describe()}; "
              f"{time.perf_counter() - start:.0f} s)")
        print(f"correction: predicted = {predictor.scale:.3f} x sum of layers + {predictor.offset:.3f} ms")
        ref = space.reference_spec()
        if ref is not None and space.contains(ref):
            print(f"reference {space.reference}: {predictor.predict(ref):.3f} ms predicted")
        for name, spec in (("largest", space.largest()), ("smallest", space.smallest())):
            print(f"{name}: {predictor.predict(spec):.3f} ms predicted")
        return 0
    report = validate(predictor, space, n=args.n, seed=args.seed)
    print(report.format())
    table = predictor.path or table_path(space, fp)
    out = table.with_name(f"validate-{table.stem}-n{args.n}.json")
    write_json_atomic(report.to_json(), out)
    print(f"report: {out}")
    return 0


def _add_search(p: argparse.ArgumentParser) -> None:
    from nas.search import DEFAULT_SAMPLER, SAMPLERS, SearchConfig

    d = SearchConfig()
    p.add_argument("--budget", type=int, default=d.budget,
                   help=f"total COMPLETE trials in the study (default {d.budget}); a rerun continues to it")
    p.add_argument("--space", default=d.space, help=f"search space, built-in name or YAML path (default {d.space})")
    p.add_argument("--dataset", default=d.dataset, help="digits (default), cifar10, flowers102 or folder:PATH")
    p.add_argument("--data-dir", default=d.data_dir, help="where cifar10/flowers102 are downloaded (default data/)")
    p.add_argument("--latency-ms", type=float, default=None,
                   help="latency limit in ms on the latency device (default: the predicted latency of the "
                        "space's MobileNetV3 reference member, i.e. 'no slower than MobileNetV3')")
    p.add_argument("--sampler", choices=SAMPLERS, default=DEFAULT_SAMPLER,
                   help=f"Optuna sampler (default {DEFAULT_SAMPLER}, chosen by the hypervolume benchmark)")
    p.add_argument("--seed", type=int, default=d.seed, help="seeds data split, supernet and sampler (default 0)")
    p.add_argument("--study-name", default=None, help="default: <space>-<dataset>")
    p.add_argument("--storage", default=None,
                   help="Optuna storage URL: sqlite:///PATH or postgresql://USER@HOST/DB; workers on several "
                        "machines share one budget through one --storage and --study-name (default: "
                        "sqlite:///results/<study>/study.db)")
    p.add_argument("--device", default=d.device, help="supernet training and scoring: cpu, cuda or auto (default)")
    p.add_argument("--latency-device", default=d.latency_device,
                   help="the device the network will run on, where latency is measured (default cpu)")
    p.add_argument("--latency-table", default=None,
                   help="use this latency table file as is, even from another machine (workers of one distributed "
                        "search should all use the table of the device the network is for)")
    p.add_argument("--supernet-epochs", type=_positive_int, default=d.supernet_epochs,
                   help=f"supernet training epochs when no cached supernet exists (default {d.supernet_epochs})")
    p.add_argument("--supernet-batch-size", type=_positive_int, default=d.supernet_batch_size,
                   help=f"supernet training batch size (default {d.supernet_batch_size}; 128 suits CIFAR-10)")
    p.add_argument("--results", default=d.results, help="results folder (default results/)")


def _run_search(args: argparse.Namespace) -> int:
    from nas.report import build_report, format_summary, write_report
    from nas.search import SearchConfig, run_search

    config = SearchConfig(space=args.space, dataset=args.dataset, budget=args.budget, latency_ms=args.latency_ms,
                          sampler=args.sampler, seed=args.seed, study_name=args.study_name, storage=args.storage,
                          device=args.device, latency_device=args.latency_device, data_dir=args.data_dir,
                          results=args.results, supernet_epochs=args.supernet_epochs,
                          supernet_batch_size=args.supernet_batch_size,
                          latency_table=args.latency_table)
    try:
        outcome = run_search(config)
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same command to continue (finished trials and checkpoints are kept)",
              file=sys.stderr)
        return 130
    report = build_report(outcome.study)
    paths = write_report(report, outcome.study, config.study_dir)
    print(format_summary(report, paths))
    rate = outcome.trials_run / outcome.seconds if outcome.seconds > 0 else 0.0
    print(f"this run: {outcome.trials_run} trials in {outcome.seconds:.1f} s ({rate:.1f} trials/s)")
    if outcome.interrupted:
        print(f"stopped early at {outcome.completed}/{config.budget} trials; rerun the same command to continue",
              file=sys.stderr)
        return 130
    return 0


def _add_study_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--study", required=True, help="the study name (as given to or printed by 'nas search')")
    p.add_argument("--storage", default=None, help="storage URL (default: sqlite:///results/<study>/study.db)")
    p.add_argument("--results", default="results", help="results folder (default results/)")


def _add_report(p: argparse.ArgumentParser) -> None:
    _add_study_args(p)
    p.add_argument("--out", default=None, help="where to write (default results/<study>/)")


def _run_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from nas.report import build_report, format_summary, load_study, write_report

    study = load_study(args.study, args.storage, args.results)
    report = build_report(study)
    paths = write_report(report, study, args.out or Path(args.results) / args.study)
    print(format_summary(report, paths))
    return 0


def _add_export(p: argparse.ArgumentParser) -> None:
    _add_study_args(p)
    p.add_argument("--top", type=_positive_int, default=None, help="the K best (by accuracy) Pareto specs")
    p.add_argument("--out", required=True, help="folder to write the YAML specs to (replaced)")


def _run_export(args: argparse.Namespace) -> int:
    from nas.report import build_report, export_specs, load_study

    report = build_report(load_study(args.study, args.storage, args.results))
    for path in export_specs(report, args.out, args.top):
        print(path)
    return 0


def _add_recipe(p: argparse.ArgumentParser, epochs: int | None) -> None:
    p.add_argument("--epochs", type=_positive_int, required=epochs is None, default=epochs,
                   help="training epochs" + ("" if epochs is None else f" (default {epochs})"))
    p.add_argument("--batch-size", type=_positive_int, default=64, help="default 64")
    p.add_argument("--lr", type=float, default=0.05, help="peak SGD learning rate, cosine decay (default 0.05)")
    p.add_argument("--seed", type=int, default=0, help="default 0")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default auto)")


def _recipe(args: argparse.Namespace) -> Any:
    from nas.train import TrainSettings

    return TrainSettings(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, random_subnets=0,
                         seed=args.seed)


def _add_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="a spec: built-in name (mobilenet_v3_small, ...), exported or hand-written YAML")
    p.add_argument("--dataset", default="digits", help="digits (default), cifar10, flowers102 or folder:PATH")
    p.add_argument("--data-dir", default="data", help="where cifar10/flowers102 are downloaded (default data/)")
    p.add_argument("--init", choices=("scratch", "torchvision"), default="scratch",
                   help="scratch (default), or torchvision: its ImageNet weights for the mobilenet_v3_* specs, "
                        "from the local torch hub cache, with frozen features and a new last layer")
    _add_recipe(p, None)


def _run_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from nas.data import load_dataset
    from nas.latency import resolve_device
    from nas.spec import builtin_spec_names, load_spec
    from nas.standalone import checkpoint_for, train_network

    spec = load_spec(args.spec)
    settings = _recipe(args)
    device = resolve_device(args.device)
    data = load_dataset(args.dataset, spec.input.resolution, seed=args.seed, data_dir=args.data_dir)
    init = None if args.init == "scratch" else args.init
    builtin = args.spec in builtin_spec_names() and not Path(args.spec).exists()
    out = Path("results/train") if builtin else Path(args.spec).parent
    stem = args.spec if builtin else Path(args.spec).stem
    try:
        trained = train_network(spec, data, settings, device=device, init=init,
                                checkpoint=checkpoint_for(spec, data, settings, init, Path("results/train")))
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same command to resume from the last finished epoch", file=sys.stderr)
        return 130
    metrics = out / f"{stem}.{data.key()}.metrics.json"
    write_json_atomic(trained.metrics(args.spec, data.name, settings, init), metrics)
    lat = trained.latency
    print(f"validation accuracy: {trained.val_accuracy:.2%} ({len(data.val)} images of {data.name})")
    print(f"latency: {lat.median_ms:.3f} ms median on {lat.device}, batch 1, {lat.threads} threads")
    print(f"metrics: {metrics}\ncheckpoint: {trained.checkpoint}")
    return 0


def _add_verify(p: argparse.ArgumentParser) -> None:
    _add_study_args(p)
    p.add_argument("--top", type=_positive_int, default=10,
                   help="distinct architectures to retrain, spanning the feasible front (default 10)")
    _add_recipe(p, 10)


def _run_verify(args: argparse.Namespace) -> int:
    from pathlib import Path

    from nas.latency import resolve_device
    from nas.report import load_study
    from nas.verify import verify, write_verification

    study = load_study(args.study, args.storage, args.results)
    out = Path(args.results) / args.study
    v = verify(study, top=args.top, settings=_recipe(args), device=str(resolve_device(args.device)),
               out_dir=out / "verify")
    paths = write_verification(v, out)
    print(v.format())
    print(f"report: {paths['json']}, {paths['html']}")
    return 0


COMMANDS: dict[str, Command] = {
    "search": Command(
        "search architectures under a latency limit (the main job)",
        "Train (or reuse) the supernet, build (or reuse) this device's latency table, then run an Optuna "
        "study: accuracy up, predicted latency down, latency <= the limit as an Optuna constraint. Writes "
        "ranked YAML specs, trials.csv, pareto.html and history.html under results/<study>/. Ctrl-C stops "
        "after the current trial; rerunning continues to the budget.",
        _add_search, _run_search),
    "report": Command(
        "regenerate a study's specs, CSV and plots from its storage",
        "Rebuild results/<study>/ (specs/, trials.csv, pareto.html, history.html) and the summary from the "
        "study's storage alone.", _add_report, _run_report),
    "export": Command(
        "write a study's best specs to a folder",
        "Write the feasible Pareto-optimal specs of a study, best accuracy first, as YAML files that rebuild "
        "with nas.build_model(nas.load_spec(PATH)).", _add_export, _run_export),
    "train": Command(
        "train a spec stand-alone and measure it",
        "Train any spec from scratch (or fine-tune torchvision's MobileNetV3 with --init torchvision), resumable "
        "from per-epoch checkpoints; report validation accuracy and measured latency, and write a metrics JSON "
        "beside the spec (results/train/ for built-in specs).", _add_train, _run_train),
    "verify": Command(
        "retrain a study's best specs: does the supernet rank them truthfully?",
        "Retrain K distinct architectures spanning a study's feasible front (filled from the next non-dominated "
        "layers when the front is smaller) and the space's MobileNetV3 reference with one recipe, and "
        "report Kendall tau and Spearman rho between proxy (supernet) and stand-alone accuracy, a table, and "
        "results/<study>/verify.html.", _add_verify, _run_verify),
    "build": Command(
        "build a network from a spec and summarise it",
        "Build the network a spec describes and print a per-layer table, its parameters, MACs and FLOPs at the "
        "spec's resolution, and its measured latency at batch 1.",
        _add_build, _run_build),
    "train-supernet": Command(
        "train a weight-sharing supernet of a search space",
        "Train the supernet of a search space with the sandwich rule and in-place distillation. Checkpoints are "
        "written after every epoch; rerunning the same command resumes an interrupted run or reuses a finished one.",
        _add_train_supernet, _run_train_supernet),
    "latency": Command(
        "build and validate this device's latency predictor",
        "Latency on your own device: 'latency build' measures every layer a search space can hold and fits a "
        "predictor; 'latency validate' checks its predictions against real measurements of real networks.",
        _add_latency, _run_latency),
}


def make_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nas", description="Hardware-aware neural architecture search over MobileNetV3-style "
                     "networks. Run 'nas COMMAND --help' for each command.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for name, cmd in COMMANDS.items():
        cmd.add_arguments(sub.add_parser(name, help=cmd.help, description=cmd.description))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        return COMMANDS[args.command].run(args)
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
