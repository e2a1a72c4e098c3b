#!/usr/bin/env bash
# Run on a lent GPU machine (no package registry there; torch, triton, numba, scikit-build-core,
# pybind11 are installed): builds the extension with CUDA, runs the GPU tests, the GPU benchmarks and
# compute-sanitizer over every ext CUDA kernel, and writes logs and tables under $OUT (default ./gpu_out).
#
#   bash benchmarks/gpu_check.sh [STAGE ...]     STAGE: build tests sanitize bench profile (default: all,
#                                                in this order: the most telling first)
#
# The machine has no ../shared: the Taobao length mix for bench_lstm comes from
# .gpu_carry/taobao_lengths.txt (per-user event counts; .gpu_carry is git-ignored and travels as a
# `carry` path). Before the device call, here:
#   python benchmarks/bench_lstm.py --write-lengths .gpu_carry/taobao_lengths.txt
# then run this script there with carry [".gpu_carry"] and timeout_s 560 (stage caps add up to ~600 s; the
# first run, cut short by a crash, took 136 s).
# Modules found in .gpu_carry/prebuilt/ (an earlier run's prebuilt.tgz, unpacked there) are used when
# its stamp matches the current csrc/ and CMakeLists.txt; the others are built with the same CMakeLists.txt that pip uses, for sm_90 only (H100/H200).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 PYTHONPATH=$ROOT/python${PYTHONPATH:+:$PYTHONPATH}
stages=${*:-build tests sanitize bench profile}
has() { [[ " $stages " == *" $1 "* ]]; }
log() { echo "[gpu_check $(date +%T)] $*" | tee -a "$OUT/summary.txt"; }
start=$(date +%s)

log "machine: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null)"
log "$(python3 -c 'import sys, torch, triton; print("python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__)' 2>&1 | tail -1); $(nvcc --version | tail -1)"

if has build; then
  targets=""
  # a carried module is used only if it was built from these very sources (its stamp says which)
  stamp=$(cat CMakeLists.txt $(find csrc -type f | sort) | sha256sum | cut -c1-16)
  [ "$(cat .gpu_carry/prebuilt/stamp 2>/dev/null)" = "$stamp" ] || rm -f .gpu_carry/prebuilt/*.so
  for m in _C_cpu _C_cuda; do
    if ls .gpu_carry/prebuilt/$m.*.so >/dev/null 2>&1; then
      cp .gpu_carry/prebuilt/$m.*.so python/fastinterest/ && log "$m: carried prebuilt"
    else
      targets="$targets $m"
    fi
  done
  if [ -n "$targets" ]; then
    B=/tmp/fi_build
    { cmake -S . -B $B -G Ninja -DFASTINTEREST_WITH_CUDA=ON -DFASTINTEREST_CUDA_ARCHS=90 \
        -DPython_EXECUTABLE="$(command -v python3)" -Dpybind11_DIR="$(python3 -m pybind11 --cmakedir)" &&
      ninja -C $B $targets; } > "$OUT/build.log" 2>&1 || { log "BUILD FAILED"; tail -60 "$OUT/build.log"; exit 1; }
    for m in $targets; do cp $B/$m.*.so python/fastinterest/; done
    mkdir -p /tmp/fi_prebuilt && cp python/fastinterest/_C_*.so /tmp/fi_prebuilt/ && echo "$stamp" > /tmp/fi_prebuilt/stamp
    tar -C /tmp/fi_prebuilt -czf "$OUT/prebuilt.tgz" . && log "built$targets in $(( $(date +%s) - start )) s"
  fi
  python3 -m fastinterest.info > /tmp/fi_info.txt 2>&1   # $OUT holds at most 8 files: into the summary
  head -30 /tmp/fi_info.txt | tee -a "$OUT/summary.txt"
fi

if has tests; then
  log "GPU tests"
  timeout 150 python3 -m pytest -q -rfE --tb=short --timeout 120 -n 3 -p no:cacheprovider \
    tests/test_embedding_cuda.py tests/test_lstm_cuda.py > "$OUT/tests.log" 2>&1
  log "tests rc=$? : $(tail -1 "$OUT/tests.log")"
  grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -30
fi

if has sanitize; then
  log "compute-sanitizer memcheck"
  timeout 90 compute-sanitizer --tool memcheck --error-exitcode 9 python3 benchmarks/gpu_sanitize.py \
    > "$OUT/sanitize.log" 2>&1
  log "sanitize rc=$? : $(grep -c 'Invalid\|out of bounds' "$OUT/sanitize.log") errors reported"
  tail -15 "$OUT/sanitize.log"
fi

if has bench; then
  log "GPU benchmarks"
  mkdir -p "$OUT/results"
  timeout 80 python3 benchmarks/bench_embedding.py --device cuda --no-sweep --out "$OUT/results" \
    > "$OUT/bench.log" 2>&1
  log "bench_embedding rc=$?"
  timeout 150 python3 benchmarks/bench_lstm.py --device cuda --fallbacks triton \
    --lengths-file .gpu_carry/taobao_lengths.txt --out "$OUT/results" >> "$OUT/bench.log" 2>&1
  log "bench_lstm rc=$?"
  grep -E "^\|" "$OUT/bench.log" | head -80
  tar -C "$OUT" -czf "$OUT/results.tgz" results && rm -rf "$OUT/results"
fi

if has profile; then
  log "profile (torch.profiler: kernel time against wall time per call; ncu on the fused LSTM kernel)"
  timeout 60 python3 benchmarks/gpu_profile.py > "$OUT/profile.log" 2>&1
  log "gpu_profile rc=$?"
  grep -E "^## " "$OUT/profile.log"
  timeout 60 ncu --clock-control none --kernel-name regex:fused_fwd --launch-skip 3 --launch-count 1 \
    --section SpeedOfLight --section WarpStateStats --section Occupancy \
    python3 -c "
import sys; sys.path.insert(0, 'python')
import torch, fastinterest.nn as fnn
m = fnn.LSTM.from_torch(torch.nn.LSTM(64, 128, batch_first=True)).cuda()
x = torch.randn(64, 50, 64, device='cuda')
with torch.no_grad():
    for _ in range(5): m(x, lengths=torch.full((64,), 50))
torch.cuda.synchronize()" >> "$OUT/profile.log" 2>&1
  log "ncu rc=$?"
fi
log "done in $(( $(date +%s) - start )) s"
