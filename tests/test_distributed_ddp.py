"""LoRA under DistributedDataParallel: 2 CPU processes on gloo (tests/distributed/ddp_worker.py
runs examples/distributed/train_ddp.py) against one process on the same global batches, with
gradient checkpointing (reentrant and not) and dropout; the saved adapter against the real PEFT."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

import distributed_reference as ref
from distributed_launch import ROOT, torchrun

pytest.importorskip("torch.distributed")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch is built without gloo", allow_module_level=True)

import train_ddp  # noqa: E402  (examples/distributed is on sys.path through distributed_reference)

WORKER = os.path.join(ROOT, "tests", "distributed", "ddp_worker.py")
COMMON = ["--steps", "4", "--global-batch-size", "4", "--seq-len", "12",
          "--target-modules", "q_proj,k_proj,v_proj,out_proj,fc1,fc2"]
LLAMA = ["--model", "tiny-llama", "--target-modules", "all-linear"]

# float32 throughout; the runs differ only in the order of the sums (the gradient average over
# 2 processes, the batch split in two)
LOSS_TOL = dict(rtol=1e-5, atol=1e-6)
# AdamW divides each gradient element by its own running magnitude: the rounding of an element
# that is nearly zero can move its step by a small fraction of lr = 1e-2
WEIGHT_TOL = dict(rtol=1e-4, atol=2e-5)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("ddp"))
    torchrun(WORKER, [out], nproc=2, timeout=300)
    return out


@pytest.fixture(scope="module")
def single_process():
    return ref.train_single_process(train_ddp.parse_args, COMMON)


def test_worker_options_are_the_tests():
    import importlib.util

    spec = importlib.util.spec_from_file_location("ddp_worker", WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    assert worker.COMMON == COMMON
    assert worker.RUNS["llama_ckpt_reentrant"][:4] == LLAMA


def _assert_matches(folder: str, single_process) -> None:
    losses, saved = ref.read_run(folder)
    expected_losses, model = single_process
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected_losses), **LOSS_TOL)
    expected = ref.adapter_state(model)
    ref.assert_same_adapter(saved, expected, **WEIGHT_TOL)
    # the adapter trained: lora_B left zero by far more than the tolerance
    trained = max(v.abs().max().item() for k, v in expected.items() if "lora_B" in k)
    assert trained > 1e-3


@pytest.mark.parametrize("run", ["plain", "ckpt_non_reentrant", "ckpt_reentrant"])
def test_ddp_matches_one_process_on_the_global_batch(runs, single_process, run):
    _assert_matches(os.path.join(runs, run), single_process)


def test_ddp_llama_all_linear_with_reentrant_checkpointing(runs):
    single_process = ref.train_single_process(train_ddp.parse_args, [*COMMON, *LLAMA])
    _assert_matches(os.path.join(runs, "llama_ckpt_reentrant"), single_process)
    adapter_dir = os.path.join(runs, "llama_ckpt_reentrant", "adapter")
    torch.testing.assert_close(ref.peft_logits(adapter_dir, "tiny-llama"), ref.logits(single_process[1]),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("run", ["dropout_ckpt_non_reentrant", "dropout_ckpt_reentrant"])
def test_ddp_checkpointing_regenerates_the_dropout_masks(runs, run):
    """The recomputed forward draws the same dropout seeds (checkpoint restores the RNG state),
    so gradients, hence weights, equal the run without checkpointing."""
    losses, saved = ref.read_run(os.path.join(runs, "dropout"))
    ckpt_losses, ckpt_saved = ref.read_run(os.path.join(runs, run))
    torch.testing.assert_close(torch.tensor(ckpt_losses), torch.tensor(losses), rtol=1e-6, atol=1e-7)
    ref.assert_same_adapter(ckpt_saved, saved, rtol=1e-5, atol=1e-7)
    # dropout did act: the run differs from the one without it
    _, plain = ref.read_run(os.path.join(runs, "plain"))
    assert max((saved[k] - plain[k]).abs().max().item() for k in plain) > 1e-4


def test_saved_adapter_loads_in_peft(runs, single_process):
    _, model = single_process
    adapter_dir = os.path.join(runs, "plain", "adapter")
    assert sorted(os.listdir(adapter_dir)) == ["adapter_config.json", "adapter_model.safetensors"]
    torch.testing.assert_close(ref.peft_logits(adapter_dir), ref.logits(model), rtol=1e-4, atol=1e-5)


def _dropout_grads(mode: str, preserve_rng_state: bool = True) -> dict[str, torch.Tensor]:
    args = train_ddp.parse_args(["--output-dir", "unused", *COMMON, "--lora-dropout", "0.3"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ref.training_setup.build_peft_model(args)
        if mode != "off":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={
                "use_reentrant": mode == "reentrant", "preserve_rng_state": preserve_rng_state})
            model.enable_input_require_grads()
    model.train()
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B = 0 would hide A's gradient
            torch.nn.init.normal_(param, std=0.1)
    ids = ref.training_setup.global_batches(1, 4, 12, ref.training_setup.TINY_VOCAB)[0]
    torch.manual_seed(123)
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_checkpointed_forward_uses_the_same_dropout_mask():
    torch.manual_seed(0)
    plain = _dropout_grads("off")
    assert plain and all(v.abs().sum() > 0 for v in plain.values())
    for mode in ("non-reentrant", "reentrant"):
        torch.manual_seed(0)
        grads = _dropout_grads(mode)
        assert sorted(grads) == sorted(plain)
        for key, value in plain.items():
            torch.testing.assert_close(grads[key], value, rtol=1e-5, atol=1e-7, msg=lambda m: f"{mode} {key}: {m}")
    # the check can fail: a recomputation that draws new seeds gives other gradients
    torch.manual_seed(0)
    redrawn = _dropout_grads("non-reentrant", preserve_rng_state=False)
    assert any(not torch.allclose(redrawn[k], plain[k], rtol=1e-3, atol=1e-6) for k in plain)
