#!/usr/bin/env bash
# The main job on a fresh machine: set up the environment, build torchlora, and run it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-env.sh
PY=${TORCHLORA_VENV:-.venv}/bin/python
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
"$PY" examples/quickstart.py "$@"
