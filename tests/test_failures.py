"""Clean failures: write errors are one line naming the file, nothing half-written stays, nothing expensive runs
before a results folder is known to be writable."""

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

import nas
from nas._schema import ensure_writable, sweep_temp, write_atomic


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64"),
                                   PermissionError(errno.EACCES, "Permission denied")])
def test_a_failed_write_is_one_line_naming_the_file_and_leaves_no_temp(error: Exception, tmp_path: Path) -> None:
    def write(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise error

    with pytest.raises(nas.SpecError) as info:
        write_atomic(tmp_path / "out.json", write)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'out.json'}: cannot write it: ") and "\n" not in message
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temporary


def test_an_unwritable_results_folder_is_refused_before_any_work(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(nas.SpecError, match=r"file/results: cannot write the results there: Not a directory"):
        ensure_writable(blocker / "results", "results")
    r = subprocess.run([sys.executable, "-m", "nas", "search", "--budget", "1", "--results", str(blocker / "r"),
                        "--device", "cpu"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Not a directory" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "nas", "search", "--budget", "1", "--storage",
                        f"sqlite:///{blocker / 'x' / 'study.db'}", "--device", "cpu"], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path)
    assert r.returncode == 2 and "cannot write the study database there: Not a directory" in r.stderr, r.stderr
    assert not (tmp_path / "results").exists()  # nothing trained, nothing written


def test_temp_files_of_killed_runs_are_swept(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a PID that has exited
    (tmp_path / "a").mkdir()
    stale = tmp_path / "a" / f".trials.csv.{dead}.tmp"
    live = tmp_path / f".study.json.{os.getpid()}.tmp"  # a running process's: kept
    stale.write_text("half")
    live.write_text("half")
    assert sweep_temp(tmp_path) == 1 and not stale.exists() and live.exists()
