"""transformers' Trainer on a torchlora model with two CPU processes (gloo), started by torchrun
and by ``accelerate launch``: checkpoints hold the adapter files, resuming ends where an
uninterrupted run ends, two processes train exactly as one on the same global batches, and PEFT
loads the result.

The runs are examples/distributed/train_trainer.py on the tiny OPT of tiny_models (saved to a
folder): 32 fixed sequences, a global batch of 8, 2 epochs = 8 optimizer steps, a checkpoint
every 4 steps.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file

import tiny_models as tm
from distributed_launch import ROOT, free_port, run_bounded, torchrun, worker_env

SCRIPT = os.path.join(ROOT, "examples", "distributed", "train_trainer.py")
STEPS = 8
LAUNCH_TIMEOUT = 300
CPU_ONLY = {"CUDA_VISIBLE_DEVICES": ""}  # two processes on one GPU would clash: every host runs them on the CPU


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("tiny_opt"))
    tm.opt().save_pretrained(folder)
    return folder


def _script_args(base_dir: str, output_dir: str, *extra: str) -> list[str]:
    return ["--model", base_dir, "--output-dir", output_dir, *extra]


def _one_process(base_dir: str, output_dir: str) -> str:
    done = run_bounded([sys.executable, SCRIPT, *_script_args(base_dir, output_dir)], LAUNCH_TIMEOUT,
                       env=worker_env(CPU_ONLY), cwd=ROOT)
    assert done.returncode == 0, done.stdout[-6000:]
    return output_dir


@pytest.fixture(scope="module")
def one_process_run(base_dir, tmp_path_factory) -> str:
    return _one_process(base_dir, str(tmp_path_factory.mktemp("one_process")))


@pytest.fixture(scope="module")
def torchrun_run(base_dir, tmp_path_factory) -> str:
    output_dir = str(tmp_path_factory.mktemp("torchrun"))
    out = torchrun(SCRIPT, _script_args(base_dir, output_dir), nproc=2, timeout=LAUNCH_TIMEOUT, env=CPU_ONLY)
    assert "world size 2: 8 steps" in out, out[-3000:]
    return output_dir


def _loss_entries(output_dir: str) -> list[dict]:
    with open(os.path.join(output_dir, "log_history.json"), encoding="utf-8") as handle:
        return [entry for entry in json.load(handle) if "loss" in entry]


def _losses(output_dir: str) -> list[float]:
    return [entry["loss"] for entry in _loss_entries(output_dir)]


def _logged_steps(output_dir: str) -> list[int]:
    return [entry["step"] for entry in _loss_entries(output_dir)]


def _adapter(folder: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(folder, "adapter_model.safetensors"))


def _assert_same_adapter(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


def _assert_trained(adapter: dict[str, torch.Tensor]) -> None:
    """lora_B starts at zero: a trained adapter has moved it."""
    b_weights = [v for k, v in adapter.items() if k.endswith("lora_B.weight")]
    assert b_weights and all(v.abs().max() > 1e-3 for v in b_weights)


def test_checkpoints_hold_the_adapter_files_not_the_model(torchrun_run):
    for step in (4, STEPS):
        folder = os.path.join(torchrun_run, f"checkpoint-{step}")
        files = set(os.listdir(folder))
        assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt",
                "trainer_state.json", "rng_state_0.pth", "rng_state_1.pth"} <= files, files
        assert not files & {"model.safetensors", "pytorch_model.bin"}, files
        with open(os.path.join(folder, "adapter_config.json"), encoding="utf-8") as handle:
            config = json.load(handle)
        assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["r"] == 4
    adapter = _adapter(os.path.join(torchrun_run, "adapter"))
    assert all(k.startswith("base_model.model.") for k in adapter)
    _assert_trained(adapter)


def test_two_processes_train_as_one_on_the_same_global_batches(one_process_run, torchrun_run):
    one, two = _losses(one_process_run), _losses(torchrun_run)
    assert len(one) == len(two) == STEPS
    assert two == pytest.approx(one, rel=1e-5)
    assert one[-1] < one[0]
    _assert_same_adapter(_adapter(os.path.join(one_process_run, "adapter")),
                         _adapter(os.path.join(torchrun_run, "adapter")))


def test_resuming_from_a_checkpoint_ends_like_the_uninterrupted_run(base_dir, torchrun_run, tmp_path):
    resumed_dir = str(tmp_path / "resumed")
    checkpoint = os.path.join(torchrun_run, "checkpoint-4")
    torchrun(SCRIPT, _script_args(base_dir, resumed_dir, "--resume-from-checkpoint", checkpoint), nproc=2,
             timeout=LAUNCH_TIMEOUT, env=CPU_ONLY)
    # the history of steps 1..4 comes with the checkpoint's trainer state; 5..8 are new
    assert _logged_steps(resumed_dir) == list(range(1, STEPS + 1))
    assert _losses(resumed_dir) == pytest.approx(_losses(torchrun_run), rel=1e-5)
    _assert_same_adapter(_adapter(os.path.join(resumed_dir, "adapter")),
                         _adapter(os.path.join(torchrun_run, "adapter")))


def test_the_saved_adapter_loads_in_peft_with_equal_outputs(torchrun_run):
    import peft

    import torchlora

    folder = os.path.join(torchrun_run, "adapter")
    ids = tm.input_ids(batch=3, length=9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(tm.opt(), folder).eval()
    ours = torchlora.PeftModel.from_pretrained(tm.opt(), folder).eval()
    with torch.no_grad():
        expected, got, base = theirs(input_ids=ids).logits, ours(input_ids=ids).logits, tm.opt()(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - base).abs().max() > 1e-3  # the trained adapter changes the outputs


def test_accelerate_launch_trains_as_one_process(base_dir, one_process_run, tmp_path):
    # `accelerate launch --cpu` starts one process and expects MPI to start the others;
    # --multi_gpu is accelerate's torchrun launcher, which the script runs on the CPU over gloo
    output_dir = str(tmp_path / "accelerate")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), SCRIPT, *_script_args(base_dir, output_dir)]
    done = run_bounded(command, LAUNCH_TIMEOUT, env=worker_env({**CPU_ONLY, "ACCELERATE_USE_CPU": "true"}), cwd=ROOT)
    assert done.returncode == 0, done.stdout[-6000:]
    assert "world size 2: 8 steps" in done.stdout, done.stdout[-3000:]
    assert _losses(output_dir) == pytest.approx(_losses(one_process_run), rel=1e-5)
    _assert_same_adapter(_adapter(os.path.join(one_process_run, "adapter")),
                         _adapter(os.path.join(output_dir, "adapter")))
