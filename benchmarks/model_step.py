"""Model-level LoRA training step, as users pay it: ``get_peft_model`` (PEFT's and torchlora's) on a
small Llama built from a config, forward and backward with a dense upstream gradient on the last
hidden state, against the frozen model's forward+backward (input gradient through every layer).
The three run interleaved in one process; ratios are medians of per-round ratios to the frozen model.

    PYTHONPATH=python python benchmarks/model_step.py --threads 2 [--dropout 0.05] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _paths import ensure_torchlora_importable  # noqa: E402
from report import print_and_save, require_positive  # noqa: E402
from timing import interleaved  # noqa: E402

ensure_torchlora_importable()

FROZEN, PEFT, TORCHLORA = "frozen", "peft", "torchlora"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def small_llama(hidden: int, layers: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
                         max_position_embeddings=4096)
    return LlamaModel(config).train().requires_grad_(False)


def with_lora(base: nn.Module, library: str, r: int, dropout: float) -> nn.Module:
    """``get_peft_model`` of ``library`` on a copy of ``base``, adapters made non-trivial (B = 0 at init)."""
    if library == PEFT:
        from peft import LoraConfig, get_peft_model
    else:
        from torchlora import LoraConfig, get_peft_model
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout,
                                                           target_modules=TARGETS))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.02)
    return model.train()


def make_step(model: nn.Module, ids: torch.Tensor, grad: torch.Tensor, frozen: bool) -> Callable[[], None]:
    """Forward and backward with ``grad`` on the last hidden state; the frozen model's embeddings'
    output requires grad so that its backward also runs dx through every layer."""
    params = [p for p in model.parameters() if p.requires_grad]
    if frozen:
        model.embed_tokens.register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))

    def step() -> None:
        for p in params:
            p.grad = None
        model(input_ids=ids).last_hidden_state.backward(grad)

    return step


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    base = small_llama(args.hidden, args.layers)
    ids = torch.randint(0, 1024, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    grad = torch.randn(args.batch, args.seq, args.hidden, generator=torch.Generator().manual_seed(1))
    steps = {FROZEN: make_step(base, ids, grad, frozen=True)}
    for library in (PEFT, TORCHLORA):
        steps[library] = make_step(with_lora(base, library, args.r, args.dropout), ids, grad, frozen=False)
    timings = interleaved(steps, rounds=args.rounds)
    return {"threads": args.threads, "hidden": args.hidden, "layers": args.layers, "batch": args.batch,
            "seq": args.seq, "r": args.r, "dropout": args.dropout,
            "ms": {name: 1e3 * timings.median(name) for name in steps},
            "ratio_to_frozen": {name: timings.ratio(name, FROZEN) for name in (PEFT, TORCHLORA)}}


def markdown(result: dict) -> str:
    head = (f"Llama hidden {result['hidden']}, {result['layers']} layers, {result['batch']} x {result['seq']} tokens, "
            f"r={result['r']} on {len(TARGETS)} projections per layer, dropout {result['dropout']}, "
            f"{result['threads']} threads")
    lines = [head, "", "| model step | ms | / frozen |", "|---|---:|---:|",
             f"| frozen (dx only) | {result['ms'][FROZEN]:.1f} | 1.000 |"]
    for name in (PEFT, TORCHLORA):
        lines.append(f"| {name} get_peft_model | {result['ms'][name]:.1f} | {result['ratio_to_frozen'][name]:.3f} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--json", type=Path, default=None, help="also write the raw numbers here")
    args = p.parse_args(argv)
    require_positive(p, args, ("threads", "hidden", "layers", "batch", "seq", "r", "rounds"))
    if not 0.0 <= args.dropout < 1.0:
        p.error(f"--dropout must be in [0, 1), got {args.dropout}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    result = run(args)
    return print_and_save(result, markdown(result), args.json)


if __name__ == "__main__":
    main()
