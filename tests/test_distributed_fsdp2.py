"""LoRA under FSDP2 (``fully_shard``): 2 CPU processes on gloo (tests/distributed/fsdp2_worker.py
runs examples/distributed/train_fsdp2.py) against one process on the same global batches, in
float32, bf16 mixed precision and with the frozen base offloaded to the CPU; the adapter gathered
from the shards and saved by rank 0 against the real PEFT; adapters loaded into sharded models."""

from __future__ import annotations

import os

import pytest
import torch

import distributed_reference as ref
from distributed_launch import ROOT, torchrun

if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch is built without gloo", allow_module_level=True)
if not hasattr(pytest.importorskip("torch.distributed.fsdp"), "fully_shard"):
    pytest.skip("FSDP2 (torch.distributed.fsdp.fully_shard) needs torch >= 2.6", allow_module_level=True)

import train_fsdp2  # noqa: E402  (examples/distributed is on sys.path through distributed_reference)

WORKER = os.path.join(ROOT, "tests", "distributed", "fsdp2_worker.py")
COMMON = ["--steps", "4", "--global-batch-size", "4", "--seq-len", "12", "--r", "5",
          "--target-modules", "q_proj,k_proj,v_proj,out_proj,fc1,fc2"]
LLAMA = ["--model", "tiny-llama", "--target-modules", "all-linear"]

# float32: the runs differ only in the order of the sums (gradients reduce-scattered over 2
# processes, the batch split in two)
LOSS_TOL = dict(rtol=1e-5, atol=1e-6)
# AdamW divides each gradient element by its own running magnitude: the rounding of an element
# that is nearly zero can move its step by a small fraction of lr = 1e-2
WEIGHT_TOL = dict(rtol=1e-4, atol=2e-5)
BF16 = ["--mixed-precision", "bf16", "--optimizer", "sgd", "--lr", "0.5"]
# bf16 mixed precision against one process with the same mixed precision: the losses come from
# bf16 logits, rounded to 2**-9 relative; 2e-3 is one such rounding of each logit
BF16_LOSS_TOL = dict(rtol=2e-3, atol=0.0)
# the bf16 gradients of a half batch differ from those of the whole batch by bf16 rounding (and
# the CPU kernels may block a half-size GEMM differently), which moves the SGD update of each
# adapter tensor by a few percent of its size (measured: at most 8%)
BF16_UPDATE_RTOL = 0.15


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("fsdp2"))
    torchrun(WORKER, [out], nproc=2, timeout=300)
    return out


@pytest.fixture(scope="module")
def single_process():
    return ref.train_single_process(train_fsdp2.parse_args, COMMON)


def test_worker_options_are_the_tests():
    import importlib.util

    spec = importlib.util.spec_from_file_location("fsdp2_worker", WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    assert worker.COMMON == COMMON
    assert worker.RUNS["bf16"] == BF16
    assert worker.RUNS["llama_cpu_offload"][:4] == LLAMA


def _assert_matches(folder: str, single_process) -> None:
    losses, saved = ref.read_run(folder)
    expected_losses, model = single_process
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected_losses), **LOSS_TOL)
    expected = ref.adapter_state(model)
    ref.assert_same_adapter(saved, expected, **WEIGHT_TOL)
    assert max(v.abs().max().item() for k, v in expected.items() if "lora_B" in k) > 1e-3


@pytest.mark.parametrize("run", ["fp32", "cpu_offload"])
def test_fsdp2_matches_one_process_on_the_global_batch(runs, single_process, run):
    _assert_matches(os.path.join(runs, run), single_process)


def test_fsdp2_llama_all_linear_with_cpu_offload(runs):
    single_process = ref.train_single_process(train_fsdp2.parse_args, [*COMMON, *LLAMA])
    _assert_matches(os.path.join(runs, "llama_cpu_offload"), single_process)
    adapter_dir = os.path.join(runs, "llama_cpu_offload", "adapter")
    torch.testing.assert_close(ref.peft_logits(adapter_dir, "tiny-llama"), ref.logits(single_process[1]),
                               rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def single_process_bf16():
    return ref.train_single_process_bf16(train_fsdp2.parse_args, [*COMMON, *BF16])


@pytest.mark.parametrize("run", ["bf16", "bf16_cpu_offload"])
def test_fsdp2_bf16_mixed_precision_matches_one_process(runs, single_process_bf16, run):
    losses, saved = ref.read_run(os.path.join(runs, run))
    expected_losses, model = single_process_bf16
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected_losses), **BF16_LOSS_TOL)
    # the sharded weights (and so the saved adapter) stay float32 under mixed precision
    assert all(v.dtype == torch.float32 for v in saved.values())
    expected = ref.adapter_state(model)
    initial = ref.initial_adapter(train_fsdp2.parse_args, [*COMMON, *BF16])
    assert sorted(saved) == sorted(expected)
    for key, value in expected.items():
        update = value - initial[key]
        assert update.norm() > 0, key
        error = ((saved[key] - value).norm() / update.norm()).item()
        assert error < BF16_UPDATE_RTOL, f"{key}: the update differs by {error:.3f} of its size"


def test_fsdp2_checkpointing_regenerates_the_dropout_masks(runs):
    """The recomputed forward (parameters gathered again by FSDP) draws the same dropout seeds,
    so the weights equal those of the run without checkpointing."""
    losses, saved = ref.read_run(os.path.join(runs, "dropout"))
    ckpt_losses, ckpt_saved = ref.read_run(os.path.join(runs, "dropout_ckpt_reentrant"))
    torch.testing.assert_close(torch.tensor(ckpt_losses), torch.tensor(losses), rtol=1e-6, atol=1e-7)
    ref.assert_same_adapter(ckpt_saved, saved, rtol=1e-5, atol=1e-7)
    _, plain = ref.read_run(os.path.join(runs, "fp32"))
    assert max((saved[k] - plain[k]).abs().max().item() for k in plain) > 1e-4


def test_saved_adapter_loads_in_peft(runs, single_process):
    _, model = single_process
    adapter_dir = os.path.join(runs, "fp32", "adapter")
    assert sorted(os.listdir(adapter_dir)) == ["adapter_config.json", "adapter_model.safetensors"]
    torch.testing.assert_close(ref.peft_logits(adapter_dir), ref.logits(model), rtol=1e-4, atol=1e-5)


def test_only_the_main_process_writes(runs):
    """save_pretrained(is_main_process=rank == 0) on every rank: the gathering is collective
    (a rank that skipped it would leave the other waiting until the worker's timeout), and
    rank 1 writes nothing."""
    assert not os.path.exists(os.path.join(runs, "probe_rank1"))
    written = ref.load_file(os.path.join(runs, "probe_rank0", "adapter_model.safetensors"))
    _, saved = ref.read_run(os.path.join(runs, "fp32"))
    ref.assert_same_adapter(written, saved, rtol=0, atol=0)


@pytest.fixture(scope="module")
def load_checks(runs) -> dict:
    import json

    with open(os.path.join(runs, "load_checks.json"), encoding="utf-8") as f:
        return json.load(f)


@pytest.mark.parametrize("case", ["from_pretrained_then_shard", "set_state_dict_into_shards",
                                  "load_adapter_into_sharded", "from_pretrained_on_sharded_base"])
def test_loaded_adapter_in_a_sharded_model_gives_the_unsharded_outputs(load_checks, case):
    assert load_checks[case] < 1e-5, load_checks


def test_set_state_dict_fills_the_shards(load_checks):
    assert load_checks["set_state_dict_changed_outputs"] > 1e-3  # the fresh adapter differed before loading
    assert load_checks["set_state_dict_missing"] == []
    assert load_checks["set_state_dict_kept_dtensors"] is True
    assert load_checks["sharded_adapter_is_dtensor"] is True
    assert load_checks["state_dict_round_trip"] == 0.0


def test_mixed_batch_cache_sees_optimizer_steps(load_checks):
    """FSDP2 refills the gathered parameters without moving their version counters; the cached
    adapter stacks of mixed-batch inference must not outlive an optimizer step."""
    assert load_checks["mixed_batch_step_moved"] > 1e-3
    assert load_checks["mixed_batch_after_a_step"] < 1e-5, load_checks


def test_trainable_adapters_added_after_sharding_are_refused(load_checks):
    for case in ("load_trainable_into_sharded", "get_peft_model_on_sharded_base"):
        assert "fully_shard" in load_checks[case] and "synchronise" in load_checks[case], load_checks[case]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason=(
    "CPUOffloadPolicy(pin_memory=True), its default, pins the CPU shards with Tensor.pin_memory() in "
    "FSDPParam._init_sharded_param, which needs a CUDA driver; on CPU the offload runs with pin_memory=False "
    "(test_fsdp2_matches_one_process_on_the_global_batch[cpu_offload])"))
def test_pinned_cpu_offload_on_gpus(tmp_path, single_process):
    out = str(tmp_path)
    torchrun(os.path.join(ROOT, "examples", "distributed", "train_fsdp2.py"),
             ["--output-dir", out, "--cpu-offload", *COMMON], nproc=2, timeout=300)
    losses, saved = ref.read_run(out)
    expected_losses, model = single_process
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected_losses), rtol=1e-4, atol=1e-5)
    ref.assert_same_adapter(saved, ref.adapter_state(model), rtol=1e-3, atol=1e-5)
