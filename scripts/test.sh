#!/usr/bin/env bash
# The full test suite on a fresh machine: environment, build (with the CUDA kernels when
# nvcc is present), the C++ tests (ctest) and the Python tests (pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
# GoogleTest for the C++ tests and cpp-httplib for the example server are the system packages
# (nlohmann_json comes from PyPI, requirements/build.txt).
for pkg in libgtest-dev libcpp-httplib-dev; do
  if ! dpkg -s "$pkg" >/dev/null 2>&1; then
    if [[ $(id -u) == 0 ]]; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >/dev/null
    else
      echo "note: install $pkg (Debian) for the C++ tests and the example server" >&2
    fi
  fi
done
export TORCHLORA_BUILD_TESTS=ON
scripts/setup-env.sh
PY=${TORCHLORA_VENV:-.venv}/bin/python
BUILD=${TORCHLORA_BUILD_DIR:-build/venv}
echo "== C++ tests"
"$PY" -c "import cmake, os, sys; os.execv(os.path.join(cmake.CMAKE_BIN_DIR, 'ctest'), ['ctest', '--test-dir', sys.argv[1], '--output-on-failure'])" "$BUILD"
echo "== Python tests"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
"$PY" -m pytest tests -q -p no:cacheprovider "$@"
