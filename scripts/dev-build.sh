#!/usr/bin/env bash
# Incremental developer build into this checkout: configures build/dev once, compiles,
# installs the native parts into python/torchlora (so PYTHONPATH=python works) and runs ctest.
#   PYTHON=...            interpreter with torch, cmake, ninja (default: python3)
#   TORCHLORA_CUDA=0/1    CUDA kernels off/on (default: AUTO; read by cmake/TorchLoraCuda.cmake)
#   JOBS=N                parallel compile jobs (default: all cores)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
BUILD=${BUILD_DIR:-build/dev}
JOBS=${JOBS:-$(nproc)}
BIN=$(dirname "$("$PYTHON" -c 'import sys; print(sys.executable)')")
export PATH="$BIN:$PATH"
TORCH_ROOT=$("$PYTHON" -c 'import os, torch; print(os.path.dirname(torch.__file__))')
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DTORCH_ROOT="$TORCH_ROOT" \
  -DPython3_EXECUTABLE="$("$PYTHON" -c 'import sys; print(sys.executable)')" \
  -DTORCHLORA_CUDA="${TORCHLORA_CUDA:-AUTO}" -DTORCHLORA_PYTHON_PACKAGE_LAYOUT=ON -DTORCHLORA_BUILD_TESTS=ON >/dev/null
cmake --build "$BUILD" --parallel "$JOBS"
cmake --install "$BUILD" --prefix python/torchlora >/dev/null
if [[ "${SKIP_CTEST:-0}" != 1 ]]; then (cd "$BUILD" && ctest --output-on-failure); fi
