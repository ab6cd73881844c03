#!/usr/bin/env bash
# Fuzzes torchlora's safetensors header reader with libFuzzer (+ASan/UBSan) for a given time
# and prints the number of executions and findings. Exit status 1 if anything was found.
#   scripts/fuzz-safetensors.sh [SECONDS=60]
#   PYTHON=...   interpreter with torch (to locate its headers and libc10) and safetensors (seeds)
#   CLANGXX=...  clang++ with libFuzzer (default: clang++-14, /usr/lib/llvm-14/bin/clang++ or clang++;
#                Debian: apt install clang-14 libclang-rt-14-dev)
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_TO_RUN=${1:-60}
PYTHON=${PYTHON:-python3}
OUT=${FUZZ_DIR:-build/fuzz}
CLANGXX=${CLANGXX:-$(command -v clang++-14 || command -v /usr/lib/llvm-14/bin/clang++ || command -v clang++ || true)}
if [[ -z "$CLANGXX" ]]; then
  echo "fuzz-safetensors: no clang++ found (Debian: apt install clang-14 libclang-rt-14-dev)" >&2
  exit 2
fi
TORCH_ROOT=$("$PYTHON" -c 'import os, torch; print(os.path.dirname(torch.__file__))')
# nlohmann/json.hpp: NLOHMANN_INC=<folder holding nlohmann/>, else the PyPI package
# nlohmann-json of $PYTHON, else the system one
NLOHMANN_INC=${NLOHMANN_INC:-$("$PYTHON" -c 'import os, nlohmann_json; print(os.path.join(os.path.dirname(nlohmann_json.__file__), "include"))' 2>/dev/null || true)}
EXTRA_INC=()
if [[ -n "${NLOHMANN_INC:-}" ]]; then EXTRA_INC=(-isystem "$NLOHMANN_INC"); fi
mkdir -p "$OUT/corpus" "$OUT/artifacts"

BIN="$OUT/fuzz_safetensors"
if [[ ! -x "$BIN" || tests/fuzz/fuzz_safetensors.cpp -nt "$BIN" || csrc/torchlora/io/safetensors_header.cpp -nt "$BIN" \
      || csrc/torchlora/include/torchlora/io/safetensors_header.h -nt "$BIN" ]]; then
  echo "fuzz-safetensors: building $BIN with $CLANGXX" >&2
  "$CLANGXX" -std=c++20 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize=vptr -fno-sanitize-recover=undefined \
    -D_GLIBCXX_USE_CXX11_ABI=1 -Icsrc/torchlora/include -isystem "$TORCH_ROOT/include" "${EXTRA_INC[@]}" \
    tests/fuzz/fuzz_safetensors.cpp csrc/torchlora/io/safetensors_header.cpp \
    -L"$TORCH_ROOT/lib" -lc10 -Wl,-rpath,"$TORCH_ROOT/lib" -o "$BIN"
fi

# Seeds: real files from the safetensors package (every dtype, metadata, empty tensors).
"$PYTHON" - "$OUT/corpus" <<'PY'
import sys, torch
from safetensors.torch import save_file
out = sys.argv[1]
seeds = {
    "adapter": {"base_model.model.fc.lora_A.weight": torch.randn(2, 3), "base_model.model.fc.lora_B.weight": torch.randn(4, 2)},
    "dtypes": {"a": torch.ones(2, dtype=torch.float16), "b": torch.ones(1, dtype=torch.bfloat16),
               "c": torch.arange(3), "d": torch.ones(2, dtype=torch.bool), "e": torch.zeros(0, 5)},
    "empty": {},
}
for name, tensors in seeds.items():
    save_file(tensors, f"{out}/seed_{name}.safetensors", metadata={"format": "pt"})
PY

LOG="$OUT/fuzz.log"
set +e
"$BIN" "$OUT/corpus" -dict=tests/fuzz/safetensors.dict -max_total_time="$SECONDS_TO_RUN" -max_len=4096 \
  -timeout=5 -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix="$OUT/artifacts/" >"$LOG" 2>&1
RC=$?
set -e
EXECS=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$LOG" | grep -oE '[0-9]+$' || echo "?")
FINDINGS=$(find "$OUT/artifacts" -type f \( -name 'crash-*' -o -name 'leak-*' -o -name 'timeout-*' -o -name 'oom-*' \) | wc -l)
COVERAGE=$(grep -oE 'cov: [0-9]+' "$LOG" | tail -1 || true)
echo "fuzz-safetensors: ${SECONDS_TO_RUN}s, executions: ${EXECS}, ${COVERAGE:-cov: ?}, findings: ${FINDINGS} (libFuzzer exit ${RC}; log ${LOG})"
if [[ $RC -ne 0 || $FINDINGS -ne 0 ]]; then
  tail -40 "$LOG" >&2
  exit 1
fi
