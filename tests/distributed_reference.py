"""Single-process references for the distributed tests: the run of
examples/distributed/train_*.py on one process over the whole global batch (same model, same
initial adapter, same data, same optimizer), and what its files and outputs are compared by."""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections.abc import Sequence

import torch
from safetensors.torch import load_file

import torchlora

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples", "distributed")
if EXAMPLES not in sys.path:
    sys.path.insert(0, EXAMPLES)

import training_setup  # noqa: E402


def train_single_process(parse_args, argv: Sequence[str]) -> tuple[list[float], torchlora.PeftModel]:
    """(loss per step, trained model) of one process on every global batch, for the options
    ``argv`` of an example (``parse_args`` is the example's)."""
    args = parse_args(["--output-dir", "unused", *argv])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' deprecation notes about checkpointing
        model = training_setup.build_peft_model(args)
    model.train()
    optimizer = training_setup.make_optimizer(args, (p for p in model.parameters() if p.requires_grad))
    batches = training_setup.global_batches(args.steps, args.global_batch_size, args.seq_len,
                                            training_setup.vocab_size(model))
    losses = []
    for batch in batches:
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, model.eval()


def train_single_process_bf16(parse_args, argv: Sequence[str]) -> tuple[list[float], torchlora.PeftModel]:
    """:func:`train_single_process` with FSDP2's ``MixedPrecisionPolicy(param_dtype=bfloat16,
    reduce_dtype=float32)`` done by hand: a bfloat16 copy of the model computes the loss and the
    gradients, the optimizer steps float32 weights. Returns the float32 model."""
    args = parse_args(["--output-dir", "unused", *argv])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = training_setup.build_peft_model(args)
        compute = training_setup.build_peft_model(args).to(torch.bfloat16)  # the same seed: the same weights
    model.train()
    compute.train()
    pairs = [(param, dict(compute.named_parameters())[name]) for name, param in model.named_parameters()
             if param.requires_grad]
    optimizer = training_setup.make_optimizer(args, (param for param, _ in pairs))
    batches = training_setup.global_batches(args.steps, args.global_batch_size, args.seq_len,
                                            training_setup.vocab_size(model))
    losses = []
    for batch in batches:
        with torch.no_grad():
            for param, copy in pairs:
                copy.copy_(param)
        loss = compute(input_ids=batch, labels=batch).loss
        loss.backward()
        for param, copy in pairs:
            param.grad, copy.grad = copy.grad.float(), None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, model.eval()


def initial_adapter(parse_args, argv: Sequence[str]) -> dict[str, torch.Tensor]:
    """The adapter weights before training (every run starts from them)."""
    args = parse_args(["--output-dir", "unused", *argv])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return adapter_state(training_setup.build_peft_model(args))


def read_run(folder: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    """(losses, saved adapter tensors) written by rank 0 of a distributed run."""
    with open(os.path.join(folder, "losses.json"), encoding="utf-8") as f:
        record = json.load(f)
    assert record["world_size"] == 2, record
    return record["losses"], load_file(os.path.join(folder, "adapter", "adapter_model.safetensors"))


def adapter_state(model: torchlora.PeftModel) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in torchlora.get_peft_model_state_dict(model).items()}


def assert_same_adapter(saved: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], rtol: float,
                        atol: float) -> None:
    assert sorted(saved) == sorted(expected)
    for key, value in expected.items():
        torch.testing.assert_close(saved[key], value, rtol=rtol, atol=atol, msg=lambda m: f"{key}: {m}")


def eval_ids() -> torch.Tensor:
    return torch.randint(1, training_setup.TINY_VOCAB, (2, 10), generator=torch.Generator().manual_seed(7))


def peft_logits(adapter_dir: str, model_name: str = "tiny-opt") -> torch.Tensor:
    """The logits of the real PEFT with the saved adapter on the example's base model."""
    import peft

    base = training_setup.build_base_model(model_name, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        return model(input_ids=eval_ids()).logits


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=eval_ids()).logits
