#!/usr/bin/env bash
# Sets up a virtual environment with torch and the test/example dependencies, then builds and
# installs torchlora into it (CUDA kernels included when nvcc is present).
#   TORCHLORA_VENV   environment folder (default .venv)
#   TORCH_VERSION    torch release (default 2.14.1)
#   TORCHLORA_BUILD_DIR, TORCHLORA_CUDA, TORCH_CUDA_ARCH_LIST, MAX_JOBS: see setup.py
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${TORCHLORA_VENV:-.venv}
if [[ ! -x "$VENV/bin/python" ]]; then
  "${PYTHON:-python3}" -m venv "$VENV"
fi
PY="$VENV/bin/python"
pip_install() { "$PY" -m pip install --quiet --disable-pip-version-check "$@" 2>&1 | grep -v "is ignored: it is neither" || true; }
echo "== torch ${TORCH_VERSION:-2.14.1} and dependencies into $VENV"
pip_install "torch==${TORCH_VERSION:-2.14.1}"
pip_install -r requirements/build.txt -r requirements/test.txt
"$PY" -c "import torch, peft, transformers, cmake" # fail loudly if an install did not take

echo "== building torchlora"
start=$(date +%s)
export TORCHLORA_BUILD_DIR=${TORCHLORA_BUILD_DIR:-build/venv}
"$PY" -m pip install --no-build-isolation --no-deps --disable-pip-version-check . 2>&1 \
  | grep -v "is ignored: it is neither" | tail -n 3
echo "== build and install took $(( $(date +%s) - start )) s"
"$PY" -c "import torchlora; print('torchlora', torchlora.__version__, torchlora.build_info())"
