"""Shared by the benchmark scripts: the machine's description and writing a section of BENCHMARKS.md."""

from __future__ import annotations

import datetime
import os
import platform
import re
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from nas.latency import Fingerprint, Predictor, Validation

T = TypeVar("T")
BENCHMARKS = Path(__file__).resolve().parents[2] / "results" / "BENCHMARKS.md"
# ../shared beside the checkout here; shared/ inside it on the device machine (see DEVELOPERS.md).
_REPO = Path(__file__).resolve().parents[2]
CIFAR = next((p for p in (_REPO.parent / "shared" / "data" / "cifar10-jpeg-train.tar.gz",
                          _REPO / "shared" / "data" / "cifar10-jpeg-train.tar.gz") if p.exists()),
             _REPO.parent / "shared" / "data" / "cifar10-jpeg-train.tar.gz")


def cifar_images(work: Path) -> Path | None:
    """The shared CIFAR-10 JPEG archive extracted under ``work`` (once): its ImageFolder root, with ``train/``.
    None, after saying so, when the archive is absent."""
    if not CIFAR.exists():
        print(f"skipped: {CIFAR} is absent")
        return None
    images = work / "cifar10-jpeg"
    if not (images / "train").is_dir():
        images.mkdir(parents=True, exist_ok=True)
        with tarfile.open(CIFAR, "r:gz") as tar:
            tar.extractall(images, filter="data")
    return images


def retrying(build: Callable[[], T], label: str, refusals: list[str], attempts: int = 3) -> tuple[T, float] | None:
    """``build()`` (a latency table) and the seconds it took, tried again a minute later when it refuses on a busy
    machine (its job); each refusal is added to ``refusals`` with ``label``. None when every attempt refused."""
    from nas import SpecError

    for attempt in range(1, attempts + 1):
        start = time.perf_counter()
        try:
            return build(), time.perf_counter() - start
        except SpecError as e:
            print(f"attempt {attempt}: {e}", flush=True)
            refusals.append(f"{label}: {e}")
            if attempt < attempts:
                time.sleep(60)
    return None


def refused(refusals: list[str]) -> str:
    """The refusals :func:`retrying` met, as paragraphs for a BENCHMARKS section."""
    return "".join(f"\n\nRefused and retried a minute later: {r}" for r in refusals)


def reference_anchors(predictor: Predictor, validation: Validation) -> str:
    """A table cell: the share of ``validation``'s networks within +-10% relative to the reference had the table
    predicted it by its own measurement in the build alone, then by the fitted model alone, with the model's error
    against that measurement; from the same timings (every relative error moves by the same factor). The table
    predicts it by their geometric mean (Predictor.predict), which ``validation`` itself reports."""
    used = predictor.predict(predictor.reference_spec) / predictor.drift  # all three at the table's speed
    measured, modelled = predictor.reference_ms, predictor.modelled(predictor.reference_spec)

    def share(anchor: float) -> str:
        moved = [(1 + e) * used / anchor - 1 for e in validation.relative_errors]
        return f"{sum(abs(e) <= 0.10 for e in moved) / len(moved):.0%}"

    return f"{share(measured)} / {share(modelled)} ({modelled / measured - 1:+.1%})"


ANCHORS_HEADER = ("within +-10% relative to the reference (noise floor) | the same had the table predicted the "
                  "reference by its measurement in the build alone / by the model alone (the model's error on it)")


def machine() -> str:
    cpu = Fingerprint.current().processor  # the name the latency tables are keyed on
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{cpu}, {os.cpu_count()} cores{gpu}, torch {torch.__version__}, {torch.get_num_threads()} intra-op "
            f"threads, Python {platform.python_version()}")


_SECTION = re.compile(r"<!-- bench:([\w.-]+) -->.*?<!-- /bench:\1 -->", re.S)


def _put(section: str) -> None:
    """Replace (or append) ``section`` in results/BENCHMARKS.md, by the name in its markers."""
    name = _SECTION.fullmatch(section).group(1)
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    BENCHMARKS.write_text(text)


def recorded_sections(pattern: str) -> dict[str, str]:
    """The sections of results/BENCHMARKS.md whose whole name matches the regex ``pattern``: name -> text."""
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else ""
    return {m.group(1): m.group(0) for m in _SECTION.finditer(text) if re.fullmatch(pattern, m.group(1))}


def write_section(name: str, title: str, body: str, *, record: bool = True) -> None:
    """Replace (or append) the section ``name`` of results/BENCHMARKS.md (unless not ``record``: a trial run),
    stamped with date and machine. On the device machine ($OUT set) also into $OUT/bench-NAME.md: only $OUT comes
    back from there (`splice` below)."""
    stamp = f"Measured {datetime.date.today().isoformat()} on {machine()}."
    section = f"<!-- bench:{name} -->\n## {title}\n\n{stamp}\n\n{body.strip()}\n<!-- /bench:{name} -->"
    if record:
        _put(section)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], f"bench-{name}.md").write_text(section + "\n")
    print(section)


def splice(paths: list[str]) -> None:
    """Put the sections a device machine wrote ($OUT/bench-NAME.md, fetched here) into results/BENCHMARKS.md."""
    for path in paths:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise SystemExit(f"{path}: {e.strerror}") from None
        sections = [m.group(0) for m in _SECTION.finditer(text)]
        if not sections:
            raise SystemExit(f"{path}: no <!-- bench:NAME --> section in it")
        for section in sections:
            _put(section)
            print(f"{path}: {section.splitlines()[0]} spliced into {BENCHMARKS}")


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] != ["splice"] or len(sys.argv) < 3:
        raise SystemExit("usage: python tests/benchmarks/_report.py splice FILE... (sections written on a device "
                         "machine into $OUT/bench-NAME.md)")
    splice(sys.argv[2:])
