"""LoRA fine-tuning with tensor parallelism (DTensor): the base layers and their adapters are
sharded over the processes, every process sees the whole batch.

    torchrun --nproc-per-node=2 examples/distributed/train_tp.py
    torchrun --nproc-per-node=2 examples/distributed/train_tp.py --model mlp --plan peft-style
    torchrun --nproc-per-node=2 examples/distributed/train_tp.py --model path/to/llama --plan hf-auto

``--model``: ``llama`` (default), ``opt`` or ``mlp`` build a tiny model from a config (no
download); a folder is loaded with transformers. ``--plan``:

- ``torchlora``: ``torchlora.distributed.parallelize_lora(model, mesh, styles)``, e.g.
  ``{"q_proj": "colwise", "o_proj": "rowwise", ...}``;
- ``peft-style``: torch's ``parallelize_module`` with a plan on the LoRA submodules, as written
  for PEFT (``ColwiseParallel`` on ``<layer>.base_layer`` and ``<layer>.lora_B.default``,
  ``RowwiseParallel`` on ``<layer>.base_layer`` and ``<layer>.lora_A.default``);
- ``hf-auto``: ``from_pretrained(folder, tp_plan="auto")`` (the model's own plan), then
  ``get_peft_model``, which shards the adapters like their base layers.

``--target-embeddings`` also adapts ``embed_tokens`` (sharded on the vocabulary under the
``torchlora`` and ``hf-auto`` plans). Dropout (``--lora-dropout``) draws the masks of one
process: the seed is rank 0's, and a rowwise layer gathers its input first.

Rank 0 writes ``<output-dir>/losses.json``, ``<output-dir>/eval_outputs.pt`` (the trained
model's outputs on the first batch in eval mode) and ``<output-dir>/adapter`` (PEFT's files);
every rank takes part in gathering the sharded adapter weights for it. Run without torchrun, the
script trains the same model in one process (the reference the parallel run must equal).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

import torchlora
from torchlora.utils.distributed import end_process_group

MLP_STYLES = {"up": "colwise", "down": "rowwise"}
LLAMA_STYLES = {"q_proj": "colwise", "k_proj": "colwise", "v_proj": "colwise", "o_proj": "rowwise",
                "gate_proj": "colwise", "up_proj": "colwise", "down_proj": "rowwise"}
# OPT's attention reshapes q/k/v with the model's whole head count, so it cannot run on a shard of
# the heads (transformers gives OPT no tensor-parallel plan): its MLP is sharded, the attention's
# adapters stay replicated.
OPT_STYLES = {"fc1": "colwise", "fc2": "rowwise"}
OPT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
VOCAB = 64


class TinyMLP(nn.Module):
    """``down(gelu(up(x)))``: the two-layer block tensor parallelism splits without communication
    between the layers."""

    def __init__(self, dim: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(nn.functional.gelu(self.up(x)))


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama", help="llama, opt, mlp (tiny, from a config) or a model folder")
    parser.add_argument("--plan", default="torchlora", choices=("torchlora", "peft-style", "hf-auto"))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--distinct-batches", type=int, default=None,
                        help="cycle over this many random batches (default: a new one every step)")
    parser.add_argument("--seq-len", type=int, default=8)
    parser.add_argument("--r", type=int, default=4)
    parser.add_argument("--lora-dropout", type=float, default=0.0)
    parser.add_argument("--lora-bias", action="store_true", help="train a bias in lora_B (LoraConfig.lora_bias)")
    parser.add_argument("--target-embeddings", action="store_true",
                        help="also adapt the input embeddings (embed_tokens; vocabulary-sharded under hf-auto)")
    parser.add_argument("--init-lora-weights", default="true", choices=("true", "false", "gaussian"),
                        help="false: both factors random, so the adapter changes the output from the first step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="train_tp_out")
    args = parser.parse_args(argv)
    if args.plan == "hf-auto" and not os.path.isdir(args.model):
        parser.error("--plan hf-auto loads a model folder with tp_plan='auto': pass --model <folder>")
    return args


def build_base(args: argparse.Namespace, tp_plan: Optional[str] = None) -> nn.Module:
    """The base model, seeded so that every process and the one-process run build the same."""
    torch.manual_seed(args.seed)
    if args.model == "mlp":
        return TinyMLP()
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM
    if args.model == "llama":
        return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                            tie_word_embeddings=False))
    if args.model == "opt":
        return OPTForCausalLM(OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=48, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
                                        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0))
    kwargs: dict[str, Any] = {}
    if tp_plan:
        try:  # transformers >= 5.18 takes the plan in a DistributedConfig
            from transformers import DistributedConfig
            kwargs["distributed_config"] = DistributedConfig(tp_plan=tp_plan)
        except ImportError:
            kwargs["tp_plan"] = tp_plan
    return AutoModelForCausalLM.from_pretrained(args.model, **kwargs)


def styles_for(model: nn.Module) -> dict[str, str]:
    """colwise / rowwise per target module name: the Megatron split of attention and MLP."""
    if isinstance(model, TinyMLP):
        return dict(MLP_STYLES)
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    return dict(OPT_STYLES) if "fc1" in names else dict(LLAMA_STYLES)


def build_peft_model(args: argparse.Namespace, base: Optional[nn.Module] = None) -> torchlora.PeftModel:
    base = build_base(args) if base is None else base
    init = {"true": True, "false": False, "gaussian": "gaussian"}[args.init_lora_weights]
    targets = OPT_TARGETS if styles_for(base) == OPT_STYLES else sorted(styles_for(base))
    targets = targets + (["embed_tokens"] if args.target_embeddings else [])
    config = torchlora.LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=args.lora_dropout,
                                  lora_bias=args.lora_bias, target_modules=targets,
                                  init_lora_weights=init)
    torch.manual_seed(args.seed + 1)  # the adapter's initial weights: the same in every process
    return torchlora.get_peft_model(base, config)


def batches(args: argparse.Namespace) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input, target) of every step; every process sees the whole batch under tensor parallelism."""
    generator = torch.Generator().manual_seed(args.seed + 2)
    out = []
    for _ in range(args.distinct_batches or args.steps):
        if args.model == "mlp":
            x = torch.randn(args.batch_size, args.seq_len, 16, generator=generator)
            out.append((x, torch.randn(x.shape, generator=generator)))
        else:
            ids = torch.randint(0, VOCAB, (args.batch_size, args.seq_len), generator=generator)
            out.append((ids, ids))
    return [out[step % len(out)] for step in range(args.steps)]


def outputs_of(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    if isinstance(model.get_base_model(), TinyMLP):
        return model(inputs)
    return model(input_ids=inputs).logits


def loss_of(model: nn.Module, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if isinstance(model.get_base_model(), TinyMLP):
        return nn.functional.mse_loss(model(inputs), target)
    return model(input_ids=inputs, labels=target).loss


def eval_outputs(model: nn.Module, args: argparse.Namespace) -> torch.Tensor:
    """The trained model's outputs on the first batch, in eval mode without autograd (the
    inference paths of the parallel layers)."""
    model.eval()
    with torch.no_grad():
        return outputs_of(model, batches(args)[0][0])


def train(model: torchlora.PeftModel, args: argparse.Namespace) -> list[float]:
    """AdamW on the adapter's weights (plain or DTensor); the loss of every step."""
    torch.manual_seed(args.seed + 3)  # dropout seeds: drawn in the same order in every run
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    losses = []
    for inputs, target in batches(args):
        loss = loss_of(model, inputs, target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def peft_style_plan(model: nn.Module, styles: dict[str, str]) -> dict[str, Any]:
    """The plan a PEFT user writes: torch's styles on the base layer and the sharded factor."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
    plan: dict[str, Any] = {}
    for name, module in model.named_modules():
        style = styles.get(name.rsplit(".", 1)[-1])
        if style is None or not isinstance(module, torchlora.LoraLinear):
            continue
        if style == "colwise":
            plan[f"{name}.base_layer"] = ColwiseParallel()
            plan[f"{name}.lora_B.default"] = ColwiseParallel()
        else:
            plan[f"{name}.base_layer"] = RowwiseParallel()
            plan[f"{name}.lora_A.default"] = RowwiseParallel()
    return plan


def build_parallel_model(args: argparse.Namespace, world_size: int) -> torchlora.PeftModel:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    import torchlora.distributed as tl_dist

    if args.plan == "hf-auto":
        # transformers shards the base layers; torchlora shards the adapters like them when injecting
        return build_peft_model(args, build_base(args, tp_plan="auto"))
    model = build_peft_model(args)
    mesh = init_device_mesh("cpu", (world_size,))
    styles = styles_for(model.get_base_model())
    if args.target_embeddings:
        styles["embed_tokens"] = "rowwise"  # the vocabulary sharded, the output reduced
    if args.plan == "torchlora":
        tl_dist.parallelize_lora(model, mesh, styles)
    else:
        parallelize_module(model, mesh, peft_style_plan(model, styles))
    return model


def main(argv: Optional[Sequence[str]] = None) -> list[float]:
    args = parse_args(argv)
    distributed = "RANK" in os.environ
    started = distributed and not dist.is_initialized()
    if started:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    try:
        model = build_parallel_model(args, dist.get_world_size()) if distributed else build_peft_model(args)
        if rank == 0:
            sharded = [n for n, p in model.named_parameters() if "lora_" in n and hasattr(p, "placements")]
            print(f"sharded LoRA tensors: {len(sharded)}")
        losses = train(model, args)
        outputs = eval_outputs(model, args)
        os.makedirs(args.output_dir, exist_ok=True)
        model.save_pretrained(os.path.join(args.output_dir, "adapter"), is_main_process=rank == 0)
        if rank == 0:
            with open(os.path.join(args.output_dir, "losses.json"), "w") as f:
                json.dump(losses, f)
            torch.save(outputs, os.path.join(args.output_dir, "eval_outputs.pt"))
            print(f"world size {dist.get_world_size() if distributed else 1}: losses {losses}")
        return losses
    finally:
        if started:
            end_process_group(completed=sys.exc_info()[0] is None)


if __name__ == "__main__":
    main()
