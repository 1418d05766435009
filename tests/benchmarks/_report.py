"""Shared by the benchmark scripts: the machine's description and writing a section of BENCHMARKS.md."""

from __future__ import annotations

import datetime
import os
import platform
import re
from pathlib import Path

import torch

from nas.latency import Fingerprint

BENCHMARKS = Path(__file__).resolve().parents[2] / "results" / "BENCHMARKS.md"


def machine() -> str:
    cpu = Fingerprint.current().processor  # the name the latency tables are keyed on
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, "
            f"Python {platform.python_version()}")


def write_section(name: str, title: str, body: str) -> None:
    """Replace (or append) the section ``name`` of results/BENCHMARKS.md, stamped with date and machine."""
    stamp = f"Measured {datetime.date.today().isoformat()} on {machine()}."
    section = f"<!-- bench:{name} -->\n## {title}\n\n{stamp}\n\n{body.strip()}\n<!-- /bench:{name} -->"
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"<!-- bench:{name} -->.*?<!-- /bench:{name} -->", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    BENCHMARKS.write_text(text)
    print(section)
