#!/usr/bin/env bash
# A benchmark on the device machine (DEVELOPERS.md; /work/.library/device/README.md), in two steps.
#
# Here, once:   bash tests/benchmarks/on_device.sh prepare
#   puts the CIFAR-10 archive into shared/data/ (../shared does not travel; shared/ in the checkout does) and the
#   wheels the device's python3 lacks into .whl/ (optuna, alembic, SQLAlchemy for cp312, Mako, colorlog, plotly;
#   the versions installed here). Both are ignored by git.
# There:        run(command="bash tests/benchmarks/on_device.sh run python3 tests/benchmarks/bench_verify.py
#                   --size gpu", carry=[".whl", "shared"], timeout_s=600)
#   installs the wheels into /tmp/site, runs the benchmark from this source checkout (PYTHONPATH, no pip install)
#   and keeps its whole output in $OUT/device.log. The figures come back in $OUT: splice the section into
#   results/BENCHMARKS.md here with `python tests/benchmarks/_report.py splice <files_at>/bench-*.md`.
set -euo pipefail
cd "$(dirname "$0")/../.."

case "${1:-}" in
prepare)
    mkdir -p shared/data .whl
    cp -u ../shared/data/cifar10-jpeg-train.tar.gz ../shared/data/README.md shared/data/
    python=${PYTHON:-.venv/bin/python}
    pins=$("$python" -m pip list --format=freeze 2>/dev/null |
        grep -iE '^(optuna|alembic|sqlalchemy|mako|colorlog|plotly)==' || true)
    [ "$(echo "$pins" | grep -c .)" = 6 ] || { echo "on_device.sh: $python lacks one of optuna, alembic, SQLAlchemy," \
        "Mako, colorlog, plotly (set PYTHON to the interpreter nas is installed in)" >&2; exit 2; }
    # shellcheck disable=SC2086 - one argument a pin
    "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl $pins
    ls .whl
    ;;
run)
    shift
    [ $# -gt 0 ] || { echo "on_device.sh run: name the command to run" >&2; exit 2; }
    out=${OUT:?on_device.sh run: OUT is unset (it is set on the device machine)}
    if compgen -G ".whl/*.whl" >/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl
        export PYTHONPATH=/tmp/site
    fi
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$out/device.log" || true
    # Progress bars dropped from the log; the command's own exit status is the script's (pipefail).
    "$@" 2>&1 | stdbuf -oL tr '\r' '\n' | { grep --line-buffered -vE '[0-9]+/[0-9]+ \[' || true; } |
        tee -a "$out/device.log"
    ;;
*)
    echo "usage: bash tests/benchmarks/on_device.sh prepare | run COMMAND..." >&2
    exit 2
    ;;
esac
