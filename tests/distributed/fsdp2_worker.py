"""Runs examples/distributed/train_fsdp2.py (its ``main``) in one process group, once per
configuration the FSDP2 tests compare (``<out>/<configuration>/``), then loads the float32 run's
adapter into sharded models every way there is and records how far their outputs are from the
unsharded model's (``<out>/load_checks.json``, written by rank 0)."""

from __future__ import annotations

import json
import os
import sys
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "examples", "distributed"))

import train_fsdp2  # noqa: E402
import training_setup  # noqa: E402
import torchlora  # noqa: E402
from torchlora.utils.distributed import end_process_group, gather_full_tensors, is_dtensor  # noqa: E402

# model and data options shared by every run (the tests build the single-process reference from
# them); r=5 shards unevenly over 2 processes
COMMON = ["--steps", "4", "--global-batch-size", "4", "--seq-len", "12", "--r", "5",
          "--target-modules", "q_proj,k_proj,v_proj,out_proj,fc1,fc2"]

# bf16 runs step with SGD, whose update is proportional to the gradient: AdamW would turn the
# bf16 rounding of nearly-zero gradient elements into whole steps of either sign
BF16 = ["--mixed-precision", "bf16", "--optimizer", "sgd", "--lr", "0.5"]

RUNS = {
    "fp32": [],
    "cpu_offload": ["--cpu-offload"],
    "bf16": BF16,
    "bf16_cpu_offload": [*BF16, "--cpu-offload"],
    "llama_cpu_offload": ["--model", "tiny-llama", "--target-modules", "all-linear", "--cpu-offload"],
    "dropout": ["--lora-dropout", "0.1"],
    "dropout_ckpt_reentrant": ["--lora-dropout", "0.1", "--gradient-checkpointing", "reentrant"],
}


def eval_ids() -> torch.Tensor:
    return torch.randint(1, training_setup.TINY_VOCAB, (2, 10), generator=torch.Generator().manual_seed(7))


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=eval_ids()).logits.float()


def shard_base(model: torch.nn.Module, mesh) -> torch.nn.Module:
    """``fully_shard`` a transformers model without adapters: its decoder layers, then itself."""
    names = set(model._no_split_modules or ())
    for module in model.modules():
        if type(module).__name__ in names:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def max_over_ranks(value: float) -> float:
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.item()


def load_checks(out: str, rank: int, mesh) -> dict:
    """Every way of putting the saved adapter into a sharded model, against the unsharded model."""
    adapter_dir = os.path.join(out, "fp32", "adapter")
    saved = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    args = train_fsdp2.parse_args(["--output-dir", out, *COMMON])
    base = lambda: training_setup.build_base_model(args.model, args.seed)  # noqa: E731
    expected = logits(torchlora.PeftModel.from_pretrained(base(), adapter_dir))
    checks: dict = {}

    # PeftModel.from_pretrained, then fully_shard (the way to train a loaded adapter)
    model = torchlora.PeftModel.from_pretrained(base(), adapter_dir, is_trainable=True)
    train_fsdp2.shard_model(model, mesh)
    checks["from_pretrained_then_shard"] = (logits(model.eval()) - expected).abs().max().item()
    checks["sharded_adapter_is_dtensor"] = all(
        is_dtensor(p) for n, p in model.named_parameters() if "lora_" in n)

    # set_peft_model_state_dict into the DTensor shards of a fresh adapter
    model = training_setup.build_peft_model(args)
    train_fsdp2.shard_model(model, mesh)
    before = (logits(model.eval()) - expected).abs().max().item()
    result = torchlora.set_peft_model_state_dict(model, saved)
    checks["set_state_dict_missing"] = list(result.missing_keys)
    checks["set_state_dict_changed_outputs"] = before
    checks["set_state_dict_into_shards"] = (logits(model) - expected).abs().max().item()
    checks["set_state_dict_kept_dtensors"] = all(
        is_dtensor(p) for n, p in model.named_parameters() if "lora_" in n)
    # and back: the shards gathered equal the file
    state = gather_full_tensors(torchlora.get_peft_model_state_dict(model))
    checks["state_dict_round_trip"] = max((state[k] - v).abs().max().item() for k, v in saved.items())

    # is_main_process: every rank gathers, rank 0 alone writes
    model.save_pretrained(os.path.join(out, f"probe_rank{rank}"), is_main_process=rank == 0)

    # load_adapter into the sharded model, for inference
    model.load_adapter(adapter_dir, "loaded")
    model.set_adapter("loaded", inference_mode=True)
    checks["load_adapter_into_sharded"] = (logits(model) - expected).abs().max().item()
    try:
        model.load_adapter(adapter_dir, "trainable", is_trainable=True)
        checks["load_trainable_into_sharded"] = "accepted"
    except ValueError as error:
        checks["load_trainable_into_sharded"] = str(error)

    # PeftModel.from_pretrained around an already sharded base model, for inference
    model = torchlora.PeftModel.from_pretrained(shard_base(base(), mesh), adapter_dir)
    checks["from_pretrained_on_sharded_base"] = (logits(model) - expected).abs().max().item()
    try:
        torchlora.get_peft_model(shard_base(base(), mesh), training_setup.lora_config(args))
        checks["get_peft_model_on_sharded_base"] = "accepted"
    except ValueError as error:
        checks["get_peft_model_on_sharded_base"] = str(error)
    return {k: max_over_ranks(v) if isinstance(v, float) else v for k, v in checks.items()}


def mixed_batch_after_a_step(mesh) -> dict:
    """Mixed-batch inference (``adapter_names``, no autograd: the layers cache their stacked
    adapters) on a sharded model, one optimizer step, then again: the cache must see the step."""
    # OPT's fc1/fc2 see the batch flattened into tokens, which mixed batches cannot split by sample
    args = train_fsdp2.parse_args(["--output-dir", "unused", *COMMON, "--target-modules", "q_proj,v_proj"])
    model = training_setup.build_peft_model(args)
    train_fsdp2.shard_model(model, mesh)
    optimizer = training_setup.make_optimizer(args, (p for p in model.parameters() if p.requires_grad))
    ids = eval_ids()
    names = ["default", "__base__"]
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids, adapter_names=names).logits
    model.train()
    for _ in range(2):  # the first step only moves lora_B away from zero
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
        plain = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    return {"mixed_batch_step_moved": (before[0] - plain[0]).abs().max().item(),
            "mixed_batch_after_a_step": max((mixed[0] - plain[0]).abs().max().item(),
                                            (mixed[1] - base[1]).abs().max().item())}


def main() -> None:
    out = sys.argv[1]
    warnings.simplefilter("ignore", FutureWarning)
    # a rank that skipped a collective makes the others fail within this time, not hang
    dist.init_process_group("gloo", timeout=timedelta(seconds=90))
    try:
        for name, extra in RUNS.items():
            train_fsdp2.main(["--output-dir", os.path.join(out, name), *COMMON, *extra])
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        checks = load_checks(out, dist.get_rank(), mesh)
        checks.update({k: max_over_ranks(v) for k, v in mixed_batch_after_a_step(mesh).items()})
        if dist.get_rank() == 0:
            with open(os.path.join(out, "load_checks.json"), "w", encoding="utf-8") as f:
                json.dump(checks, f, indent=1)
    finally:
        end_process_group(completed=sys.exc_info()[0] is None)


if __name__ == "__main__":
    main()
