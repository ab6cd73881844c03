"""DeepSpeed ZeRO-2 and ZeRO-3 through transformers' Trainer on a torchlora model, two CPU
processes (DeepSpeed's CPU accelerator over gloo): the checkpoints hold the adapter files, and
the runs end with the losses and adapter of one process without DeepSpeed (the same global
batches, examples/distributed/train_trainer.py). ZeRO-3 also resumes from its own checkpoint.

DeepSpeed compiles its shared-memory collective on the first run of a machine (a C++
compiler, about two minutes), hence the longer first timeout.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

import tiny_models as tm
from distributed_launch import ROOT, run_bounded, torchrun, worker_env
from test_distributed_trainer import (SCRIPT, STEPS, _adapter, _assert_same_adapter, _logged_steps, _losses,
                                      _script_args)

pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                reason="deepspeed is not installed (pip install deepspeed)")

CONFIGS = {stage: os.path.join(ROOT, "examples", "distributed", f"ds_zero{stage}.json") for stage in (2, 3)}
FIRST_RUN_TIMEOUT = 480
CPU_ONLY = {"CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("tiny_opt"))
    tm.opt().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def reference_run(base_dir, tmp_path_factory) -> str:
    """One process, no DeepSpeed."""
    output_dir = str(tmp_path_factory.mktemp("one_process"))
    done = run_bounded([sys.executable, SCRIPT, *_script_args(base_dir, output_dir)], 300,
                       env=worker_env(CPU_ONLY), cwd=ROOT)
    assert done.returncode == 0, done.stdout[-6000:]
    return output_dir


@pytest.fixture(scope="module")
def zero_runs(base_dir, tmp_path_factory) -> dict[int, str]:
    runs = {}
    for stage, config in CONFIGS.items():
        output_dir = str(tmp_path_factory.mktemp(f"zero{stage}"))
        out = torchrun(SCRIPT, _script_args(base_dir, output_dir, "--deepspeed", config), nproc=2,
                       timeout=FIRST_RUN_TIMEOUT, env=CPU_ONLY)
        assert "world size 2: 8 steps" in out, out[-3000:]
        runs[stage] = output_dir
    return runs


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_trains_as_one_process_and_saves_adapter_files(stage, zero_runs, reference_run):
    output_dir = zero_runs[stage]
    checkpoint = set(os.listdir(os.path.join(output_dir, f"checkpoint-{STEPS}")))
    assert {"adapter_config.json", "adapter_model.safetensors", f"global_step{STEPS}"} <= checkpoint, checkpoint
    assert not checkpoint & {"model.safetensors", "pytorch_model.bin"}, checkpoint
    assert _losses(output_dir) == pytest.approx(_losses(reference_run), rel=1e-5)
    _assert_same_adapter(_adapter(os.path.join(reference_run, "adapter")), _adapter(os.path.join(output_dir, "adapter")))


def test_zero3_resumes_from_its_checkpoint(base_dir, zero_runs, tmp_path):
    resumed_dir = str(tmp_path / "resumed")
    torchrun(SCRIPT, _script_args(base_dir, resumed_dir, "--deepspeed", CONFIGS[3], "--resume-from-checkpoint",
                                  os.path.join(zero_runs[3], "checkpoint-4")), nproc=2, timeout=300, env=CPU_ONLY)
    assert _logged_steps(resumed_dir) == list(range(1, STEPS + 1))  # 1..4 from the checkpoint's state
    assert _losses(resumed_dir) == pytest.approx(_losses(zero_runs[3]), rel=1e-5)
    _assert_same_adapter(_adapter(os.path.join(zero_runs[3], "adapter")), _adapter(os.path.join(resumed_dir, "adapter")))
