#!/usr/bin/env bash
# Builds the C++ example server (examples/cpp) against an installed torchlora, through
# find_package(TorchLora) exactly as a user project would, and prints the binary's path.
#   PYTHON=...                      interpreter with torch and torchlora importable (default: python3;
#                                   without an installed torchlora, python/ of this checkout is used)
#   TORCHLORA_CMAKE_PREFIX_PATH=... folder holding TorchLora/ (default: torchlora.cmake_prefix_path)
#   EXAMPLE_BUILD_DIR=...           build folder (default: build/example)
#   JOBS=N                          parallel compile jobs (default: all cores)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
BUILD=${EXAMPLE_BUILD_DIR:-build/example}
JOBS=${JOBS:-$(nproc)}
PY_EXE=$("$PYTHON" -c 'import sys; print(sys.executable)')
export PATH="$(dirname "$PY_EXE"):$PATH"
PRINT_PREFIX='import torchlora; print(torchlora.cmake_prefix_path)'
PREFIX=${TORCHLORA_CMAKE_PREFIX_PATH:-$("$PY_EXE" -c "$PRINT_PREFIX" 2>/dev/null ||
  PYTHONPATH="python${PYTHONPATH:+:$PYTHONPATH}" "$PY_EXE" -c "$PRINT_PREFIX")}
GENERATOR=()
if command -v ninja >/dev/null; then GENERATOR=(-G Ninja); fi
# configure again when a previous configure stopped half-way (a cache but no build files)
if [[ ! -f "$BUILD/CMakeCache.txt" || ! ( -f "$BUILD/build.ninja" || -f "$BUILD/Makefile" ) ]]; then
  cmake -S examples/cpp -B "$BUILD" "${GENERATOR[@]}" -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_PREFIX_PATH="$PREFIX" -DPython3_EXECUTABLE="$PY_EXE" >&2
fi
cmake --build "$BUILD" --parallel "$JOBS" >&2
echo "$BUILD/lora_server"
