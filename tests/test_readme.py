"""The README's promises: its Python blocks run as written, and the package runs from a plain source checkout."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
# Pretrained weights cannot be downloaded here: the block that fetches them gets a randomly initialised
# torchvision state dict of the same model instead (MobileNet_V2_Weights... -> mobilenet_v2().state_dict()).
DOWNLOAD = re.compile(r"torchvision\.models\.(\w+)_Weights\.\w+\.get_state_dict\([^)]*\)")


def test_the_readme_has_python_blocks() -> None:
    assert len(BLOCKS) >= 3 and any(DOWNLOAD.search(b) for b in BLOCKS)


@pytest.mark.parametrize("block", BLOCKS, ids=[b.splitlines()[0] for b in BLOCKS])
def test_every_readme_python_block_runs(block: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = DOWNLOAD.sub(lambda m: f"torchvision.models.{m.group(1).lower()}().state_dict()", block)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NAS_RESULTS", str(tmp_path / "results"))
    exec(compile(code, "README.md", "exec"), {})


def test_runs_from_a_source_checkout_without_installing(tmp_path: Path) -> None:
    checkout = tmp_path / "checkout"
    for folder in ("nas", "search_spaces"):
        shutil.copytree(ROOT / folder, checkout / folder, ignore=shutil.ignore_patterns("__pycache__"))
    # This test suite runs in an editable install; drop its import hook so only PYTHONPATH can find nas.
    prelude = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in type(f).__module__]; "
               "import nas; assert nas.__file__.startswith(sys.argv[1]), nas.__file__; ")
    main = "import runpy; sys.argv = ['nas', *sys.argv[2:]]; runpy.run_module('nas', run_name='__main__')"
    space = "print(nas.load_space('mobilenetv3_small').name)"  # built-in spaces live in search_spaces/ here

    def run(code: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", prelude + code, str(checkout), *args], cwd=checkout,
                              env={**os.environ, "PYTHONPATH": "."}, capture_output=True, text=True, timeout=300)

    r = run(main, "build", "mobilenet_v3_small", "--no-latency")
    assert r.returncode == 0 and "parameters: 2,542,856" in r.stdout, r.stderr
    r = run(space)
    assert r.returncode == 0 and r.stdout.strip() == "mobilenetv3_small", r.stderr
