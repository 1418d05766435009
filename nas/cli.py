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


COMMANDS: dict[str, Command] = {
    "build": Command(
        "build a network from a spec and summarise it",
        "Build the network a spec describes and print a per-layer table, its parameters, MACs and FLOPs at the "
        "spec's resolution, and its measured latency at batch 1.",
        _add_build, _run_build),
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
