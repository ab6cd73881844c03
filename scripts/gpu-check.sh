#!/usr/bin/env bash
# GPU check of torchlora's CUDA kernels, for a machine with an NVIDIA GPU, PyTorch and no
# network: builds torchlora with all cores for the detected GPU architecture, runs the CUDA
# tests, the linear-layer benchmark and the mixed-batch benchmark, and writes report.md (test summary, benchmark table,
# build time, nvidia-smi line) plus the full logs into <report-dir>.
#
#   scripts/gpu-check.sh <report-dir>
#
# Environment:
#   PYTHON=...            interpreter with torch (default: python3)
#   TORCH_CUDA_ARCH_LIST  architectures to build (default: the GPU's, e.g. 9.0)
#   BENCH_ARGS="..."      extra benchmark arguments (e.g. "--reps 30")
#   GPU_CHECK_BUILD_DIR   CMake build folder (default build/gpu-check; reused when present)
#   GPU_CHECK_CPU=1       try the script on a machine without a GPU: the build still compiles the
#                         kernels (for TORCH_CUDA_ARCH_LIST, default 9.0), the tests skip, the
#                         benchmark runs --cpu-smoke
#
# Nothing is installed from the network. Needed on the machine: nvcc (CUDA_HOME or PATH), CMake
# >= 3.26 (the `cmake` wheel or the system's), pytest. Ninja is used when present. (pybind11
# comes with torch's headers.)
# Exit status: 0 when the build and every test pass; non-zero otherwise (the report says why).
set -euo pipefail

if [[ $# -ne 1 || "$1" == -* ]]; then
  echo "usage: $0 <report-dir>" >&2
  exit 2
fi
mkdir -p "$1"
REPORT=$(cd "$1" && pwd)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PYTHON=${PYTHON:-python3}
CPU_TRY=${GPU_CHECK_CPU:-0}
MD="$REPORT/report.md"
: >"$REPORT/gpu-check.log"
STARTED=$(date +%s)

log() { echo "[gpu-check] $*" | tee -a "$REPORT/gpu-check.log" >&2; }
fail() {
  log "FAILED: $*"
  printf '\n**FAILED: %s**\n' "$*" >>"$MD"
  exit 1
}

printf '# torchlora GPU check\n\n' >"$MD"
printf -- '- date: %s\n- commit: %s\n' "$(date -u +%FT%TZ)" "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" >>"$MD"

# ---- the machine -------------------------------------------------------------------------
"$PYTHON" -c 'import torch' 2>/dev/null || fail "$PYTHON cannot import torch"
TORCH_INFO=$("$PYTHON" -c 'import sys, torch; print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), Python {sys.version.split()[0]}")')
if [[ "$CPU_TRY" != 1 ]]; then
  command -v nvidia-smi >/dev/null || fail "nvidia-smi not found: no NVIDIA driver (GPU_CHECK_CPU=1 tries the script without a GPU)"
  SMI_LINE=$(nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader 2>/dev/null | head -n1 || true)
  [[ -n "$SMI_LINE" ]] || SMI_LINE=$(nvidia-smi -L | head -n1)
  "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' ||
    fail "torch does not see a GPU (torch.cuda.is_available() is False)"
  DETECTED=$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
else
  SMI_LINE="no GPU: CPU try-out (GPU_CHECK_CPU=1)"
  DETECTED=9.0
fi
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$DETECTED}
printf -- '- GPU: %s\n- %s\n- TORCH_CUDA_ARCH_LIST: %s\n' "$SMI_LINE" "$TORCH_INFO" "$TORCH_CUDA_ARCH_LIST" >>"$MD"
log "GPU: $SMI_LINE; $TORCH_INFO; architectures $TORCH_CUDA_ARCH_LIST"

# ---- tools (no network: detect, never download) ------------------------------------------
version_ok() {  # cmake executable -> 0 when >= 3.26
  local v
  v=$("$1" --version 2>/dev/null | sed -n 's/^cmake version \([0-9]*\)\.\([0-9]*\).*/\1 \2/p')
  [[ -n "$v" ]] && read -r major minor <<<"$v" && ((major > 3 || (major == 3 && minor >= 26)))
}
CMAKE=""
for candidate in "$("$PYTHON" -c 'import cmake, os; print(os.path.join(cmake.CMAKE_BIN_DIR, "cmake"))' 2>/dev/null || true)" \
  "$(command -v cmake || true)"; do
  if [[ -n "$candidate" && -x "$candidate" ]] && version_ok "$candidate"; then CMAKE=$candidate; break; fi
done
[[ -n "$CMAKE" ]] || fail "CMake >= 3.26 not found (PATH: $(command -v cmake || echo none)); carry the 'cmake' wheel"
GENERATOR="Unix Makefiles"
NINJA=$("$PYTHON" -c 'import ninja, os; print(os.path.join(ninja.BIN_DIR, "ninja"))' 2>/dev/null || command -v ninja || true)
if [[ -n "$NINJA" && -x "$NINJA" ]]; then GENERATOR=Ninja; fi
"$PYTHON" -c 'import pytest' 2>/dev/null || fail "pytest is not installed for $PYTHON; carry its wheel"
if [[ -z "${CUDACXX:-}" ]] && ! command -v nvcc >/dev/null; then
  for home in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda; do
    if [[ -n "$home" && -x "$home/bin/nvcc" ]]; then export CUDACXX="$home/bin/nvcc"; break; fi
  done
fi
NVCC=${CUDACXX:-$(command -v nvcc || true)}
[[ -n "$NVCC" ]] || fail "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
NVCC_VERSION=$("$NVCC" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')
log "cmake $CMAKE ($GENERATOR), nvcc $NVCC_VERSION"

# ---- build (all cores, CUDA kernels required) --------------------------------------------
BUILD=${GPU_CHECK_BUILD_DIR:-build/gpu-check}
TORCH_ROOT=$("$PYTHON" -c 'import os, torch; print(os.path.dirname(torch.__file__))')
JOBS=$(nproc)
BUILD_START=$(date +%s)
log "building into $BUILD with $JOBS jobs"
if ! {
  "$CMAKE" -S . -B "$BUILD" -G "$GENERATOR" -DCMAKE_BUILD_TYPE=Release -DTORCH_ROOT="$TORCH_ROOT" \
    -DPython3_EXECUTABLE="$("$PYTHON" -c 'import sys; print(sys.executable)')" \
    -DTORCHLORA_CUDA=ON -DTORCH_CUDA_ARCH_LIST="$TORCH_CUDA_ARCH_LIST" -DTORCHLORA_PYTHON_PACKAGE_LAYOUT=ON \
    -DTORCHLORA_BUILD_TESTS=OFF -DCMAKE_CUDA_COMPILER="$NVCC" &&
    "$CMAKE" --build "$BUILD" --parallel "$JOBS" &&
    "$CMAKE" --install "$BUILD" --prefix python/torchlora
} >"$REPORT/build.log" 2>&1; then
  tail -n 40 "$REPORT/build.log" >&2
  fail "the build failed (log: $REPORT/build.log)"
fi
BUILD_SECONDS=$(($(date +%s) - BUILD_START))
export PYTHONPATH="$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"
BUILD_INFO=$("$PYTHON" -c 'import torchlora; print(torchlora.build_info())') || fail "the built torchlora does not import"
grep -q "'cuda': True" <<<"$BUILD_INFO" || fail "torchlora was built without CUDA kernels: $BUILD_INFO"
printf -- '- build: %ss with %s jobs (nvcc %s, %s); %s\n' "$BUILD_SECONDS" "$JOBS" "$NVCC_VERSION" "$GENERATOR" "$BUILD_INFO" >>"$MD"
log "built in ${BUILD_SECONDS}s: $BUILD_INFO"

# ---- tests -------------------------------------------------------------------------------
CUDA_TESTS=(tests/test_cuda_kernels.py tests/test_cuda_multi_lora.py tests/test_ops_dora.py
            tests/test_serving_pool.py::test_cuda_pool_serves_what_the_cpu_pool_serves)
log "running ${CUDA_TESTS[*]}"
TEST_STATUS=0
timeout 300 "$PYTHON" -m pytest "${CUDA_TESTS[@]}" -q -rfEs -p no:cacheprovider \
  --junitxml="$REPORT/tests.xml" >"$REPORT/tests.log" 2>&1 || TEST_STATUS=$?
{
  printf '\n## Tests (%s, exit %s)\n\n```\n' "${CUDA_TESTS[*]}" "$TEST_STATUS"
  grep -E "^(FAILED|ERROR)" "$REPORT/tests.log" | head -n 40 || true
  tail -n 1 "$REPORT/tests.log"
  printf '```\n'
} >>"$MD"
log "tests: $(tail -n 1 "$REPORT/tests.log") (exit $TEST_STATUS)"

# ---- benchmark ---------------------------------------------------------------------------
BENCH_STATUS=0
BENCH_MODE=()
[[ "$CPU_TRY" == 1 ]] && BENCH_MODE=(--cpu-smoke)
log "running benchmarks/bench_cuda_linear.py ${BENCH_MODE[*]} ${BENCH_ARGS:-}"
# shellcheck disable=SC2086
timeout 240 "$PYTHON" benchmarks/bench_cuda_linear.py "${BENCH_MODE[@]}" --out "$REPORT/bench.md" ${BENCH_ARGS:-} \
  >"$REPORT/bench.log" 2>&1 || BENCH_STATUS=$?
printf '\n## Benchmark (exit %s)\n\n' "$BENCH_STATUS" >>"$MD"
if [[ -s "$REPORT/bench.md" ]]; then cat "$REPORT/bench.md" >>"$MD"; else tail -n 20 "$REPORT/bench.log" >>"$MD"; fi

# ---- mixed batches of many adapters (the multi-adapter kernels against PEFT's loop) ---------
MIXED_STATUS=0
MIXED_ARGS=(--device cuda --dtype bfloat16 --rounds 20 --case-seconds 10)
[[ "$CPU_TRY" == 1 ]] && MIXED_ARGS=(--quick)
if "$PYTHON" -c 'import peft, transformers' 2>/dev/null; then
  log "running benchmarks/bench_mixed_batch.py ${MIXED_ARGS[*]}"
  timeout 300 "$PYTHON" benchmarks/bench_mixed_batch.py "${MIXED_ARGS[@]}" --out "$REPORT/mixed" \
    >"$REPORT/mixed.log" 2>&1 || MIXED_STATUS=$?
else
  # it compares against PEFT: without peft/transformers (carry their wheels) it cannot run
  echo "skipped: peft and transformers are not installed for $PYTHON" >"$REPORT/mixed.log"
fi
printf '\n## Mixed batches (exit %s)\n\n' "$MIXED_STATUS" >>"$MD"
if [[ -s "$REPORT/mixed/mixed_batch.md" ]]; then cat "$REPORT/mixed/mixed_batch.md" >>"$MD"; else tail -n 20 "$REPORT/mixed.log" >>"$MD"; fi

printf '\n- total: %ss\n' "$(($(date +%s) - STARTED))" >>"$MD"
log "report: $MD"
if [[ "$TEST_STATUS" != 0 || "$BENCH_STATUS" != 0 || "$MIXED_STATUS" != 0 ]]; then
  fail "tests exit $TEST_STATUS, benchmark exit $BENCH_STATUS, mixed-batch benchmark exit $MIXED_STATUS (see $REPORT)"
fi
log "all good"
