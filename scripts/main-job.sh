#!/usr/bin/env bash
# The main job on a fresh machine: set up the environment, build and install torchlora, then
# fine-tune the real all-MiniLM-L6-v2 with LoRA on the packaged text-classification data set
# (`torchlora finetune --nproc 2`: two data-parallel processes; pass other options after the
# script name, see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
"${TORCHLORA_VENV:-.venv}/bin/torchlora" finetune --nproc 2 "$@"
