#!/usr/bin/env bash
# Run on a lent GPU machine (no package registry there; torch, triton, numba, scikit-build-core,
# pybind11 are installed): builds the CUDA extension, runs the GPU tests and the GPU benchmarks,
# and writes logs and tables under $OUT (default ./gpu_out). Budget: under 8 minutes.
#
#   bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
log() { echo "[gpu_check $(date +%T)] $*" | tee -a "$OUT/summary.txt"; }

log "machine: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null)"
# sm_90 only: the lent machines are H100/H200; halves the compile time
export FASTINTEREST_WITH_CUDA=ON
start=$(date +%s)
python3 -m pip install --no-build-isolation --no-deps -q -C cmake.define.FASTINTEREST_CUDA_ARCHS=90 -e . \
  > "$OUT/build.log" 2>&1 || { log "BUILD FAILED"; tail -50 "$OUT/build.log"; exit 1; }
log "built in $(( $(date +%s) - start )) s"
python3 -m fastinterest.info > "$OUT/info.txt" 2>&1; head -5 "$OUT/info.txt"

log "GPU tests"
timeout 240 python3 -m pytest -q -x tests/test_embedding_cuda.py $(ls tests/test_lstm_cuda*.py 2>/dev/null) \
  -p no:cacheprovider > "$OUT/tests.log" 2>&1
log "tests rc=$? : $(tail -1 "$OUT/tests.log")"

log "GPU benchmarks"
mkdir -p "$OUT/results"
timeout 200 python3 benchmarks/bench_embedding.py --device cuda --no-sweep --out "$OUT/results" \
  > "$OUT/bench_embedding.log" 2>&1
log "bench_embedding rc=$?"
if [ -f benchmarks/bench_lstm.py ]; then
  timeout 150 python3 benchmarks/bench_lstm.py --device cuda --out "$OUT/results" > "$OUT/bench_lstm.log" 2>&1
  log "bench_lstm rc=$?"
fi
tar -C "$OUT" -czf "$OUT/results.tgz" results 2>/dev/null && rm -rf "$OUT/results"
log "done in $(( $(date +%s) - start )) s"
