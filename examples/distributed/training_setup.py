"""What ``train_ddp.py`` and ``train_fsdp2.py`` share: the command-line options, the model with
its LoRA adapter, the data (fixed random token sequences) and each process's share of a batch.

By default the model is a tiny OPT (or Llama) built from a config with random weights, so the
examples run offline; ``--model`` takes a local causal-LM folder instead.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from torchlora import LoraConfig, PeftModel, get_peft_model

TINY_VOCAB = 64


def tiny_opt() -> nn.Module:
    """A 2-layer OPT with 64-wide layers and no dropout."""
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(vocab_size=TINY_VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=64, word_embed_proj_dim=64, dropout=0.0, attention_dropout=0.0)
    return OPTForCausalLM(config)


def tiny_llama() -> nn.Module:
    """A 2-layer Llama with 32-wide layers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config)


TINY_MODELS = {"tiny-opt": tiny_opt, "tiny-llama": tiny_llama}


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny-opt",
                        help="a local causal-LM folder, or tiny-opt / tiny-llama (random weights, built offline)")
    parser.add_argument("--output-dir", required=True, help="where rank 0 writes adapter/ and losses.json")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--global-batch-size", type=int, default=4, help="sequences per step, over all processes")
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--lora-alpha", type=float, default=16)
    parser.add_argument("--lora-dropout", type=float, default=0.0)
    parser.add_argument("--target-modules", default=None,
                        help="comma-separated module names or all-linear (default: PEFT's choice for the architecture)")
    parser.add_argument("--gradient-checkpointing", choices=("off", "non-reentrant", "reentrant"), default="off")
    parser.add_argument("--seed", type=int, default=0)


def build_base_model(name: str, seed: int) -> nn.Module:
    """The base model, seeded so that every process (and a single-process run) builds the same one."""
    torch.manual_seed(seed)
    if name in TINY_MODELS:
        return TINY_MODELS[name]()
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(name)


def lora_config(args: argparse.Namespace) -> LoraConfig:
    targets = args.target_modules
    if targets and targets.lower() != "all-linear":
        targets = targets.split(",")
    return LoraConfig(r=args.r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, target_modules=targets,
                      task_type="CAUSAL_LM")


def build_peft_model(args: argparse.Namespace) -> PeftModel:
    """The base model with a fresh LoRA adapter (the same initial weights on every process)."""
    model = get_peft_model(build_base_model(args.model, args.seed), lora_config(args))
    enable_gradient_checkpointing(model, args.gradient_checkpointing)
    return model


def enable_gradient_checkpointing(model: PeftModel, mode: str) -> None:
    """transformers' gradient checkpointing; the reentrant kind needs inputs that require grad
    (the embeddings are frozen), hence ``enable_input_require_grads`` as PEFT users do."""
    if mode == "off":
        return
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": mode == "reentrant"})
    if mode == "reentrant":
        model.enable_input_require_grads()


def make_optimizer(args: argparse.Namespace, params) -> torch.optim.Optimizer:
    params = list(params)
    if args.optimizer == "sgd":
        return torch.optim.SGD(params, lr=args.lr)
    return torch.optim.AdamW(params, lr=args.lr)


def vocab_size(model: nn.Module) -> int:
    return int(model.get_base_model().config.vocab_size)


def global_batches(steps: int, global_batch_size: int, seq_len: int, vocab: int, seed: int = 1) -> torch.Tensor:
    """``[steps, global_batch_size, seq_len]`` random token ids (labels = inputs): fixed by the
    seed, the same on every process."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (steps, global_batch_size, seq_len), generator=generator)


def rank_share(batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This process's rows of a global batch. Every share has as many tokens, so the mean of
    the per-process mean losses (what DDP and FSDP average gradients of) is the global mean."""
    if batch.shape[0] % world_size:
        raise ValueError(f"the global batch ({batch.shape[0]}) must split evenly over {world_size} processes")
    size = batch.shape[0] // world_size
    return batch[rank * size:(rank + 1) * size]


def init_distributed() -> tuple[int, int, torch.device, bool]:
    """(rank, world size, device, whether this call started the process group): NCCL and one
    GPU per process where there are GPUs, gloo on the CPU otherwise."""
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device, started


def mean_over_ranks(value: torch.Tensor) -> float:
    value = value.detach().float().clone()
    dist.all_reduce(value)
    return value.item() / dist.get_world_size()


def write_losses(output_dir: str, losses: Sequence[float], extra: Optional[dict[str, Any]] = None) -> None:
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "losses.json"), "w", encoding="utf-8") as f:
        json.dump({"losses": list(losses), **(extra or {})}, f)
