#!/usr/bin/env bash
# The project's one entry point for people and CI (the README's two commands use it):
#
#   bash scripts/dev.sh demo     # set up (first time), then run the main job: `fastinterest demo`
#   bash scripts/dev.sh test     # set up (first time), then run the test suite
#   bash scripts/dev.sh bench    # set up, then the CPU benchmark suite (writes benchmarks/results/)
#   bash scripts/dev.sh setup    # only set up
#
# Set-up makes ./.venv (or $FASTINTEREST_VENV), installs the CPU build of torch pinned to 2.13.0
# (an unpinned torch pulls a multi-GB CUDA build; the package itself declares torch>=2.4), and
# installs fastinterest editable with its test extras. The native extension is rebuilt only when
# csrc/, CMakeLists.txt or pyproject.toml change (a stamp in the venv records their hash).
set -euo pipefail
cd "$(dirname "$0")/.."
cmd=${1:-test}
shift || true
VENV=${FASTINTEREST_VENV:-.venv}
PY="$VENV/bin/python"
TORCH_PIN=${FASTINTEREST_TORCH_PIN:-torch==2.13.0}

setup() {
  if [ ! -x "$PY" ]; then
    python3 -m venv "$VENV"
  fi
  if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install -q --disable-pip-version-check --upgrade pip
    "$PY" -m pip install -q --disable-pip-version-check "$TORCH_PIN"
  fi
  local stamp_file="$VENV/.fastinterest-build-stamp"
  local stamp
  stamp=$(cat pyproject.toml CMakeLists.txt $(find csrc -type f | sort) | sha256sum | cut -c1-16)
  if [ ! -f "$stamp_file" ] || [ "$(cat "$stamp_file")" != "$stamp" ] || ! "$PY" -c "import fastinterest._C_cpu" 2>/dev/null; then
    echo "[dev.sh] building and installing fastinterest (C++ extension; CUDA too when nvcc is present)..." >&2
    "$PY" -m pip install -q --disable-pip-version-check -e ".[test]" "$TORCH_PIN"
    echo "$stamp" > "$stamp_file"
  fi
}

setup
export PATH="$PWD/$VENV/bin:$PATH"
case "$cmd" in
  setup) ;;
  demo) "$PY" -m fastinterest demo "$@" ;;
  test)
    set +e
    "$PY" -m pytest -q -p no:cacheprovider "$@"
    rc=$?
    set -e
    # pytest's 5 = no tests collected: a failure for us, never a silent pass
    exit $rc ;;
  bench)
    "$PY" benchmarks/bench_embedding.py "$@" ;;
  *) echo "usage: bash scripts/dev.sh demo|test|bench|setup [args]" >&2; exit 2 ;;
esac
