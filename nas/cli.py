"""The ``nas`` command line: parse, call the library, print, return an exit code.

Commands are registered in :data:`COMMANDS`, each with ``add_arguments`` and ``run``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NoReturn

from nas._schema import SpecError

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
                              "and measure it for real (twice, for the noise floor), and report the predictor's "
                              "error. Writes the report as JSON under results/latency/.")
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
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report.to_json(), indent=2))
    print(f"report: {out}")
    return 0


COMMANDS: dict[str, Command] = {
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
