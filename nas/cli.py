"""The ``nas`` command line: parse, call the library, print, return an exit code.

Commands are registered in :data:`COMMANDS`, each with ``add_arguments`` and ``run``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from nas._schema import SpecError, choices_of, results_root, sweep_temp

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


def add_fields(p: argparse.ArgumentParser, cls: type, *, only: Sequence[str] | None = None,
               defaults: dict[str, Any] | None = None, prefix: str = "", exclude: Sequence[str] = ()) -> None:
    """One flag per field of dataclass ``cls`` (``--batch-size`` for ``batch_size``), typed by its annotation, with
    the field's default (or ``defaults``) and its ``help`` metadata, a ``Literal``'s values as its choices: options
    are declared once, in the library. A field that is itself a dataclass gives one flag per field of it, prefixed
    (``--supernet-lr``); a boolean gives ``--name`` and ``--no-name``."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if (only is not None and f.name not in only) or f.name in exclude:
            continue
        tp = hints[f.name]
        if typing.get_origin(tp) in (typing.Union, types.UnionType):  # X | None
            (tp,) = [a for a in typing.get_args(tp) if a is not type(None)]
        default = (defaults or {}).get(f.name, f.default)
        if dataclasses.is_dataclass(tp):
            group = p.add_argument_group(f.metadata.get("help") or f.name)
            add_fields(group, tp, prefix=f"{prefix}{f.name}_", exclude=f.metadata.get("exclude", ()),
                       defaults=dataclasses.asdict(default))
            continue
        shown = "" if default is None else f" (default {default})"
        flag, dest = "--" + (prefix + f.name).replace("_", "-"), prefix + f.name
        choices = choices_of(tp)  # a Literal field's values
        kind = ({"action": argparse.BooleanOptionalAction} if tp is bool else
                {"type": type(choices[0]), "choices": choices} if choices else {"type": tp})
        p.add_argument(flag, dest=dest, default=default, help=f.metadata.get("help", "") + shown, **kind)


def field_values(args: argparse.Namespace, cls: type, prefix: str = "", **overrides: Any) -> dict[str, Any]:
    """The keyword arguments of ``cls`` that ``args`` holds (see :func:`add_fields`), nested dataclasses built."""
    hints, values = typing.get_type_hints(cls), vars(args)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            try:
                out[f.name] = hints[f.name](**field_values(args, hints[f.name], prefix=f"{prefix}{f.name}_"))
            except SpecError as e:  # name the nested field (supernet.epochs), so main() shows its flag
                raise SpecError(f"{f.name}.{e.path}", e.message) from None
        elif prefix + f.name in values:
            out[f.name] = values[prefix + f.name]
    return out | overrides


def _flags(p: argparse.ArgumentParser) -> dict[str, str]:
    """Field name -> flag, so a library error naming a field (``budget: -1 ...``) shows the flag (``--budget``).
    argparse keeps its actions in a private list; it has no public accessor."""
    return {a.dest: a.option_strings[0] for a in p._actions if a.option_strings and a.dest != "help"}


def _results_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", default=None, help="results folder (default: $NAS_RESULTS, else ./results)")


def _int_from(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"{value} must be {'positive' if least == 1 else 'zero or more'}")
    return value


def _positive_int(text: str) -> int:
    return _int_from(text, 1)


def _non_negative_int(text: str) -> int:
    return _int_from(text, 0)


def _add_build(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="a built-in spec name (mobilenet_v3_large, mobilenet_v3_small, mobilenet_v2, ...) "
                                "or a YAML spec path")
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


def _add_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="digits",
                   help="digits (embedded, default), cifar10, flowers102 or folder:PATH (ImageFolder layout)")
    p.add_argument("--data-dir", default="data", help="where cifar10 and flowers102 are downloaded, and decoded "
                                                      "images cached (default data/)")


def _add_train_supernet(p: argparse.ArgumentParser) -> None:
    from nas.train import TrainSettings

    p.add_argument("--space", default="mobilenetv3_compact",
                   help="a built-in search space (mobilenetv3_compact, mobilenetv3_small, mobilenetv3_large) or a "
                        "YAML path (default mobilenetv3_compact)")
    _add_data(p)
    add_fields(p, TrainSettings)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default auto: cuda when available)")
    _results_arg(p)
    p.add_argument("--out", default=None,
                   help="checkpoint path (default: <results>/supernets/<space>-<data>-<settings hash>.pt); an "
                        "unfinished one is resumed, a finished one reused")


def _run_train_supernet(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from nas.data import load_for
    from nas.distributed import world
    from nas.latency import resolve_device
    from nas.space import load_space
    from nas.train import TrainSettings, calibration_batches, checkpoint_path, score_subnet, train_supernet

    device = resolve_device(args.device)
    settings = TrainSettings(**field_values(args, TrainSettings))
    space, data = load_for(load_space(args.space), args.dataset, seed=args.seed, data_dir=args.data_dir)
    out = Path(args.out) if args.out else checkpoint_path(space, data, settings, results_root(args.results) /
                                                          "supernets")
    start = time.perf_counter()
    try:
        result = train_supernet(space, data, settings, checkpoint=out, device=device)
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same command to resume from the last finished epoch", file=sys.stderr)
        return 130
    seconds = time.perf_counter() - start
    if not world().main:  # under torchrun: the main process reports
        return 0
    calib = calibration_batches(data, device=device)
    for name, spec in (("largest", space.largest()), ("smallest", space.smallest())):
        score = score_subnet(result.supernet, spec, data, calib, device=device)
        print(f"{name:8s} subnet: {score.accuracy:.2%} +- {score.stderr:.2%} validation accuracy "
              f"({score.images} images, BN recalibrated)")
    how = "reused finished checkpoint" if result.reused else f"trained in {seconds:.0f} s on {device}"
    print(f"supernet: {result.checkpoint} ({how})")
    return 0


def _add_device_args(p: argparse.ArgumentParser) -> None:
    from nas.runtime import RUNTIMES

    p.add_argument("--space", default="mobilenetv3_compact",
                   help="a built-in search space or a YAML path (default mobilenetv3_compact)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="intra-op CPU threads to measure under (default: torch's default on this machine)")
    p.add_argument("--batch", dest="batch_size", type=_positive_int, default=1,
                   help="batch size to measure at (default 1)")
    p.add_argument("--runtime", default="torch", choices=RUNTIMES,
                   help="the runtime the network will run in: torch (eager, default), onnxruntime or onnxruntime-int8 "
                        "(those two need the deploy extra), executorch (XNNPACK, the phone path; the executorch "
                        "extra; its table lowers each layer once, 1-2 s each here)")
    p.add_argument("--table", default=None,
                   help="use this latency table file instead of the one for this device under <results>/latency/")
    p.add_argument("--force", action="store_true",
                   help="accept a table made on another device or for another space")
    _results_arg(p)


def _add_latency(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="latency_command", required=True, metavar="{build,validate}", parser_class=_Parser)
    build = sub.add_parser("build", help="measure every layer of a space on this device (once)",
                           description="Measure every distinct layer a search space can hold on this device, "
                           "fit the whole-network correction, and write the table under <results>/latency/.")
    _add_device_args(build)
    build.add_argument("--rebuild", action="store_true", help="measure again even if a table exists")
    validate = sub.add_parser("validate", help="compare predictions with real measurements",
                              description="Calibrate the table's drift on a few fixed members, then sample random "
                              "architectures of a space, build each with nas.build_model and measure it for real "
                              "beside the space's reference (4 interleaved rounds; their two halves give the noise "
                              "floor), and report the predictor's error, absolute and relative to the reference. "
                              "Writes the report as JSON under <results>/latency/.")
    _add_device_args(validate)
    validate.add_argument("--n", type=_positive_int, default=100, help="architectures to measure (default 100)")
    validate.add_argument("--seed", type=int, default=1, help="sampling seed (default 1)")
    for leaf in (build, validate):
        leaf.set_defaults(_flags=_flags(leaf))


def _run_latency(args: argparse.Namespace) -> int:
    import time

    from nas.latency import calibrate, load_predictor, validate
    from nas.space import load_space

    space = load_space(args.space)
    start = time.perf_counter()
    predictor = load_predictor(space, device=args.device, threads=args.threads, batch_size=args.batch_size,
                               table=args.table, force=args.force, rebuild=getattr(args, "rebuild", False),
                               root=results_root(args.results) / "latency", runtime=args.runtime)
    fp = predictor.fingerprint
    if args.latency_command == "build":
        print(f"latency table: {predictor.path} ({len(predictor.table)} layers, {fp.describe()}; "
              f"{time.perf_counter() - start:.0f} s)")
        print(f"correction: {predictor.formula()}")
        ref = space.reference_member()
        if ref is not None and ref == predictor.reference_spec:
            print(f"reference {space.reference}: {predictor.predict(ref):.3f} ms predicted, between its measurement "
                  f"in the fit ({predictor.reference_ms:.3f} ms) and the model ({predictor.modelled(ref):.3f} ms)")
        elif ref is not None:
            print(f"reference {space.reference}: {predictor.predict(ref):.3f} ms predicted (the model: the table "
                  "did not measure this reference)")
        for name, spec in (("largest", space.largest()), ("smallest", space.smallest())):
            print(f"{name}: {predictor.predict(spec):.3f} ms predicted")
        return 0
    drift = calibrate(predictor)  # the machine's speed now against the table's, as a search calibrates it
    print(drift.describe())
    report = validate(predictor.with_drift(drift.factor), space, n=args.n, seed=args.seed)
    print(report.format())
    print(f"report: {report.save(predictor)}")
    return 0


def _add_search(p: argparse.ArgumentParser) -> None:
    from nas.study import SearchConfig

    add_fields(p, SearchConfig)


def _run_search(args: argparse.Namespace) -> int:
    import signal
    import threading

    from nas.report import build_report, format_summary, write_report
    from nas.search import run_search
    from nas.study import SearchConfig

    config = SearchConfig(**field_values(args, SearchConfig))
    stop = threading.Event()

    def on_sigint(_sig: int, _frame: object) -> None:
        if stop.is_set():  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        stop.set()  # the first: finish the trial in flight, then stop

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        outcome = run_search(config, stop=stop)
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same command to continue (finished trials and checkpoints are kept)",
              file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, previous)
    report = build_report(outcome.study, progress=True)
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
    p.add_argument("--storage", default=None, help="storage URL (default: sqlite:///<results>/<study>/study.db)")
    _results_arg(p)


def _add_report(p: argparse.ArgumentParser) -> None:
    _add_study_args(p)
    p.add_argument("--out", default=None, help="where to write (default <results>/<study>/)")
    p.add_argument("--remeasure", action="store_true",
                   help="measure the Pareto architectures' latency again (default: reuse the study's measurements)")


def _run_report(args: argparse.Namespace) -> int:
    from nas.report import build_report, format_summary, write_report
    from nas.study import load_study

    study, _ = load_study(args.study, args.storage, args.results)
    report = build_report(study, remeasure=args.remeasure, progress=True)
    paths = write_report(report, study, args.out or results_root(args.results) / args.study)
    print(format_summary(report, paths))
    return 0


def _add_export(p: argparse.ArgumentParser) -> None:
    _add_study_args(p)
    p.add_argument("--top", type=_positive_int, default=None, help="the K best (by accuracy) Pareto specs")
    p.add_argument("--out", required=True, help="folder to write the YAML specs to (replaced)")


def _run_export(args: argparse.Namespace) -> int:
    from nas.report import build_report, export_specs
    from nas.study import load_study

    study, _ = load_study(args.study, args.storage, args.results)
    for path in export_specs(build_report(study), args.out, args.top):
        print(path)
    return 0


# Stand-alone training's recipe: TrainSettings' fields with defaults for one network (no sandwich subnets).
_RECIPE = ("epochs", "batch_size", "lr", "weight_decay", "augment", "label_smoothing", "seed")
_RECIPE_DEFAULTS = {"batch_size": 64, "lr": 0.05}


def _add_recipe(p: argparse.ArgumentParser, epochs: int | None) -> None:
    from nas.train import TrainSettings

    add_fields(p, TrainSettings, only=_RECIPE, defaults={**_RECIPE_DEFAULTS, "epochs": epochs})
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default auto)")


def _recipe(args: argparse.Namespace) -> Any:
    from nas.train import TrainSettings

    return TrainSettings(**field_values(args, TrainSettings, random_subnets=0))


def _add_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="a spec: built-in name (mobilenet_v3_small, ...), exported or hand-written YAML")
    _add_data(p)
    p.add_argument("--init", choices=("scratch", "torchvision"), default="scratch",
                   help="scratch (default), or torchvision: its ImageNet weights for the mobilenet_v3_* specs, "
                        "from the local torch hub cache, with frozen features and a new last layer")
    _add_recipe(p, None)
    _results_arg(p)


def _run_train(args: argparse.Namespace) -> int:
    from nas.data import load_for
    from nas.distributed import world
    from nas.latency import resolve_device
    from nas.spec import load_spec
    from nas.standalone import checkpoint_for, metrics_path, train_network

    settings = _recipe(args)
    device = resolve_device(args.device)
    spec, data = load_for(load_spec(args.spec), args.dataset, seed=args.seed, data_dir=args.data_dir)
    init = None if args.init == "scratch" else args.init
    try:
        trained = train_network(spec, data, settings, device=device, init=init,
                                checkpoint=checkpoint_for(spec, data, settings, init,
                                                          results_root(args.results) / "train"))
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same command to resume from the last finished epoch", file=sys.stderr)
        return 130
    if not world().main:  # under torchrun: the main process evaluates, measures and writes
        return 0
    metrics = trained.save_metrics(metrics_path(args.spec, data, args.results), args.spec, data.name, settings, init)
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
    p.add_argument("--seeds", type=_positive_int, default=3,
                   help="train the reference this many times (seeds --seed, +1, ...) to measure the stand-alone "
                        "recipe's seed-to-seed noise (default 3)")
    p.add_argument("--noise-networks", type=_non_negative_int, default=2,
                   help="train this many of the retrained networks, spread over the front, once more (seed "
                        "--seed + 1): networks differ in their noise, and the ceiling pools it over all of them "
                        "(default 2)")
    p.add_argument("--jobs", type=_positive_int, default=1,
                   help="trainings at a time, each in a process of its own, sharing the CPU's threads; with "
                        "--device cuda dealt out over the GPUs (default 1)")


def _run_verify(args: argparse.Namespace) -> int:
    from nas.latency import resolve_device
    from nas.study import load_study
    from nas.verify import verify, write_verification

    study, _ = load_study(args.study, args.storage, args.results)
    out = results_root(args.results) / args.study
    v = verify(study, top=args.top, settings=_recipe(args), device=str(resolve_device(args.device)),
               out_dir=out / "verify", seeds=args.seeds, noise_networks=args.noise_networks, jobs=args.jobs)
    paths = write_verification(v, out)
    print(v.format())
    print(f"report: {paths['json']}, {paths['html']}")
    return 0


def _add_deploy(p: argparse.ArgumentParser) -> None:
    from nas.deploy import FORMATS

    p.add_argument("spec", nargs="?", default=None,
                   help="a spec (built-in name or YAML path); omit it with --study S --rank K")
    p.add_argument("--weights", required=True,
                   help="a 'nas train' checkpoint, or 'supernet': the weights the spec inherits from the study's "
                        "supernet (--study), BN recalibrated as in the search")
    p.add_argument("--format", dest="fmt", choices=FORMATS, default="onnx",
                   help="what to write (default onnx); executorch writes an ExecuTorch program (.pte, XNNPACK "
                        "delegate, batch 1) for phones")
    p.add_argument("--out", required=True, help="the folder to write (replaced): model, spec.yaml, manifest.json")
    p.add_argument("--quantize", choices=("int8",), default=None,
                   help="int8: also write model.int8.onnx, statically quantised with onnxruntime (--format onnx)")
    p.add_argument("--calibration-images", type=_positive_int, default=512,
                   help="training images that calibrate int8 activation ranges (default 512)")
    p.add_argument("--study", default=None, help="the study whose supernet (--weights supernet) or ranking "
                                                 "(--rank) to use")
    p.add_argument("--rank", type=_positive_int, default=None,
                   help="deploy the study's K-th Pareto architecture (nas report's ranking) instead of a spec")
    p.add_argument("--storage", default=None, help="the study's storage URL (default: its sqlite file)")
    p.add_argument("--dataset", default=None, help="the data set the checkpoint was trained on (default: the "
                                                   "study's, else digits); its validation split checks the export")
    p.add_argument("--data-dir", default="data", help="where data sets are downloaded and cached (default data/)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="intra-op CPU threads for the latency measurement (default: torch's default)")
    _results_arg(p)


def _run_deploy(args: argparse.Namespace) -> int:
    from nas.deploy import deploy, from_checkpoint, from_study, ranked_spec
    from nas.spec import load_spec
    from nas.study import load_study

    spec = None if args.spec is None else load_spec(args.spec)
    if args.weights == "supernet" or args.rank is not None:
        if args.study is None:
            raise SpecError("study", "is needed with --weights supernet and with --rank")
        if args.spec is not None and args.rank is not None:
            raise SpecError("rank", "give a spec or --rank, not both")
    if args.weights == "supernet":
        weights = from_study(args.study, spec=spec, rank=args.rank, storage=args.storage, results=args.results)
        if args.dataset is not None and args.dataset != weights.data.name:
            raise SpecError("dataset", f"{args.dataset!r}, but the study searched on {weights.data.name!r}")
    else:
        dataset = args.dataset or "digits"
        if args.rank is not None:  # the study's ranking only: the checkpoint has the weights
            study, record = load_study(args.study, args.storage, args.results)
            spec, dataset = ranked_spec(study, args.rank), args.dataset or record.config.dataset
        if spec is None:
            raise SpecError("spec", "give a spec (or --study S --rank K) to rebuild the checkpoint's network")
        weights = from_checkpoint(spec, args.weights, dataset, data_dir=args.data_dir)
    m = deploy(weights, args.out, fmt=args.fmt, quantize=args.quantize, threads=args.threads,
               calibration_images=args.calibration_images)
    lat, acc, check = m["latency"], m["accuracy"], m["check"]
    print(f"{args.out}/{m['model']}: checked against PyTorch on {check['images']} validation images (max abs "
          f"logit difference {check['max_abs_diff']:.1e}, top-1 agreement {check['top1_agreement']:.2%})")
    print(f"  accuracy {acc['top1']:.2%} on {acc['images']} validation images of {m['dataset']}; latency "
          f"{lat['median_ms']:.3f} ms median in {lat['runtime']} ({lat['threads']} threads, batch 1)")
    if "quantization" in m:
        q = m["quantization"]
        int8_ms, fp32_ms = q["latency"]["median_ms"], q["latency_fp32"]["median_ms"]
        print(f"{args.out}/{q['model']}: accuracy {q['top1']:.2%} (fp32 {q['top1_fp32']:.2%}, "
              f"{q['top1'] - q['top1_fp32']:+.2%}); latency {int8_ms:.3f} ms (fp32 {fp32_ms:.3f} ms, "
              f"x{int8_ms / fp32_ms:.2f})")
    print(f"manifest: {args.out}/manifest.json")
    return 0


COMMANDS: dict[str, Command] = {
    "search": Command(
        "search architectures under a latency limit (the main job)",
        "Train (or reuse) the supernet, build (or reuse) this device's latency table, then run an Optuna "
        "study: accuracy up, predicted latency down, latency <= the limit as an Optuna constraint. Writes "
        "ranked YAML specs, trials.csv, pareto.html and history.html under <results>/<study>/. Ctrl-C stops "
        "after the current trial; rerunning continues to the budget.",
        _add_search, _run_search),
    "report": Command(
        "regenerate a study's specs, CSV and plots from its storage",
        "Rebuild <results>/<study>/ (specs/, trials.csv, pareto.html, history.html) and the summary from the "
        "study's storage alone.", _add_report, _run_report),
    "export": Command(
        "write a study's best specs to a folder",
        "Write the feasible Pareto-optimal specs of a study, best accuracy first, as YAML files that rebuild "
        "with nas.build_model(nas.load_spec(PATH)).", _add_export, _run_export),
    "train": Command(
        "train a spec stand-alone and measure it",
        "Train any spec from scratch (or fine-tune torchvision's MobileNetV3 with --init torchvision), resumable "
        "from per-epoch checkpoints; report validation accuracy and measured latency, and write a metrics JSON "
        "beside the spec (<results>/train/ for built-in specs).", _add_train, _run_train),
    "verify": Command(
        "retrain a study's best specs: does the supernet rank them truthfully?",
        "Retrain K distinct architectures spanning a study's feasible front (filled from the next non-dominated "
        "layers when the front is smaller) and the space's MobileNetV3 reference with one recipe (the reference "
        "with --seeds seeds and --noise-networks of the others with a second, to measure the recipe's own noise), "
        "and report Kendall tau and Spearman rho between "
        "proxy (supernet) and stand-alone accuracy, a table, and <results>/<study>/verify.html.",
        _add_verify, _run_verify),
    "deploy": Command(
        "write a network with its weights as ONNX (optionally int8), TorchScript, torch.export or a state dict",
        "Export a spec with trained weights (a 'nas train' checkpoint, or the study's supernet), check the file "
        "against PyTorch on real validation images (max abs logit difference <= 1e-4, identical top-1) or fail, and "
        "write the model, its spec and a manifest (input shape and normalisation, classes, weights' origin, "
        "accuracy, latency in the target runtime) to a folder.", _add_deploy, _run_deploy),
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
        p = sub.add_parser(name, help=cmd.help, description=cmd.description)
        cmd.add_arguments(p)
        p.set_defaults(_flags=_flags(p))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        if "results" in vars(args) and results_root(args.results).is_dir():
            sweep_temp(results_root(args.results))  # what killed runs left half-written
        return COMMANDS[args.command].run(args)
    except SpecError as e:
        dest = e.path.replace(".", "_")  # supernet.lr is set by --supernet-lr (see add_fields)
        if not e.source and dest in args._flags:  # a field of a library call: show the flag that set it
            e = SpecError(args._flags[dest], e.message)
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:  # one not caught where it happened: still one line, naming the file
        print(f"error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if "nas.distributed" in sys.modules:  # only training imports it; under torchrun it joined a group
            sys.modules["nas.distributed"].leave()
