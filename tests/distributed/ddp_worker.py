"""Runs examples/distributed/train_ddp.py (its ``main``) in one process group, once per
configuration the DDP tests compare: ``<out>/<configuration>/`` gets the adapter and the losses."""

from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "examples", "distributed"))

import train_ddp  # noqa: E402

from torchlora.utils.distributed import end_process_group  # noqa: E402

# model and data options shared by every run; the tests build the single-process reference from them
COMMON = ["--steps", "4", "--global-batch-size", "4", "--seq-len", "12",
          "--target-modules", "q_proj,k_proj,v_proj,out_proj,fc1,fc2"]

RUNS = {
    "plain": [],
    "ckpt_non_reentrant": ["--gradient-checkpointing", "non-reentrant"],
    "ckpt_reentrant": ["--gradient-checkpointing", "reentrant"],
    "dropout": ["--lora-dropout", "0.1"],
    "dropout_ckpt_non_reentrant": ["--lora-dropout", "0.1", "--gradient-checkpointing", "non-reentrant"],
    "dropout_ckpt_reentrant": ["--lora-dropout", "0.1", "--gradient-checkpointing", "reentrant"],
    "llama_ckpt_reentrant": ["--model", "tiny-llama", "--target-modules", "all-linear",
                             "--gradient-checkpointing", "reentrant"],
}


def main() -> None:
    out = sys.argv[1]
    # a rank that skipped a collective makes the others fail within this time, not hang
    dist.init_process_group("gloo", timeout=timedelta(seconds=90))
    try:
        for name, extra in RUNS.items():
            train_ddp.main(["--output-dir", os.path.join(out, name), *COMMON, *extra])
    finally:
        end_process_group(completed=sys.exc_info()[0] is None)


if __name__ == "__main__":
    main()
