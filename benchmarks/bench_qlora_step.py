"""QLoRA training step (forward + backward) on one bitsandbytes nf4 base: torchlora vs PEFT.

A Llama built from a config (no download) has its Linear layers, all but the head, quantized to
4-bit nf4 with double quantization; LoRA goes on every attention and MLP projection.

Step time: both models live in one process and are timed interleaved (``timing.interleaved``),
with the paired ratio PEFT / torchlora. Peak memory: on CUDA, ``torch.cuda.max_memory_allocated``
above the memory allocated before the step, measured in this process; on the CPU, each variant
runs alone in a fresh subprocess and reports its peak RSS (``VmHWM``) minus its RSS just before
the first step (what the steps added).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from minilm_step import current_rss_bytes, peak_rss_bytes  # noqa: E402
from timing import interleaved  # noqa: E402

PEFT, TORCHLORA = "peft", "torchlora"
VARIANTS = (PEFT, TORCHLORA)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_base(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    from torchlora.utils import quantize_linear_layers

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                         num_key_value_heads=max(1, args.hidden // 64), max_position_embeddings=max(64, args.seq),
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(args.device)
    quantize_linear_layers(model, 4, quant_type="nf4", double_quant=True, compute_dtype=torch.float32,
                           skip_modules=["lm_head"])
    return model.train()


def build_variant(name: str, args: argparse.Namespace) -> torch.nn.Module:
    import peft

    import torchlora

    lib = peft if name == PEFT else torchlora
    config = lib.LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=args.dropout, target_modules=TARGETS)
    model = lib.get_peft_model(build_base(args), config)
    return model.train()


def make_batch(args: argparse.Namespace) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(1, args.vocab, (args.batch, args.seq), generator=g).to(args.device)


def make_step(model: torch.nn.Module, ids: torch.Tensor) -> Callable[[], float]:
    params = [p for p in model.parameters() if p.requires_grad]
    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)

    def step() -> float:
        for p in params:
            p.grad = None
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        sync()
        return float(loss.detach())

    return step


def check_same_loss(models: dict[str, torch.nn.Module], ids: torch.Tensor) -> float:
    """Both models start from the same adapter (PEFT's copied into torchlora): their losses agree."""
    import peft

    import torchlora

    torchlora.set_peft_model_state_dict(models[TORCHLORA], peft.get_peft_model_state_dict(models[PEFT]))
    with torch.no_grad():
        losses = [float(models[name](input_ids=ids, labels=ids).loss) for name in VARIANTS]
    return abs(losses[0] - losses[1]) / max(abs(losses[0]), 1e-12)


def measure_memory_in_this_process(variant: str, args: argparse.Namespace) -> dict:
    """Peak memory the steps add: CUDA allocator peak, or peak RSS on the CPU."""
    model = build_variant(variant, args)
    step = make_step(model, make_batch(args))
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        for _ in range(args.steps):
            step()
        added = torch.cuda.max_memory_allocated() - before
        return {"variant": variant, "measure": "cuda max_memory_allocated", "step_added_mb": added / 2**20}
    before = current_rss_bytes()
    for _ in range(args.steps):
        step()
    peak = peak_rss_bytes()
    return {"variant": variant, "measure": "peak RSS (VmHWM) - RSS before", "rss_before_steps_mb": before / 2**20,
            "peak_rss_mb": peak / 2**20, "step_added_mb": max(0, peak - before) / 2**20}


def measure_memory(args: argparse.Namespace) -> dict[str, dict]:
    if args.device.startswith("cuda"):
        results = {}
        for variant in VARIANTS:
            results[variant] = measure_memory_in_this_process(variant, args)
            torch.cuda.empty_cache()
        return results
    results = {}
    here = Path(__file__).resolve()
    for variant in VARIANTS:
        cmd = [sys.executable, str(here), "--memory-variant", variant, *_shared_flags(args)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=os.environ.copy(), timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"memory run of {variant} failed:\n{proc.stderr[-4000:]}")
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    return results


def _shared_flags(args: argparse.Namespace) -> list[str]:
    return ["--hidden", str(args.hidden), "--layers", str(args.layers), "--vocab", str(args.vocab), "--batch",
            str(args.batch), "--seq", str(args.seq), "--r", str(args.r), "--dropout", str(args.dropout),
            "--steps", str(args.steps), "--threads", str(args.threads), "--device", args.device]


def run(args: argparse.Namespace) -> dict:
    models = {name: build_variant(name, args) for name in VARIANTS}
    ids = make_batch(args)
    loss_rel_diff = check_same_loss(models, ids)
    steps = {name: make_step(model, ids) for name, model in models.items()}
    timings = interleaved(steps, args.rounds, warmup=1)
    result = {
        "device": args.device, "hidden": args.hidden, "layers": args.layers, "batch": args.batch, "seq": args.seq,
        "r": args.r, "rounds": args.rounds, "quantization": "bitsandbytes nf4, double quant, compute float32",
        "loss_rel_diff": loss_rel_diff,
        **{f"{name}_s": timings.median(name) for name in VARIANTS},
        "peft_over_torchlora": timings.ratio(PEFT, TORCHLORA),
    }
    del models, steps
    result["memory"] = measure_memory(args)
    mem = result["memory"]
    result["memory_peft_over_torchlora"] = (mem[PEFT]["step_added_mb"] / mem[TORCHLORA]["step_added_mb"]
                                            if mem[TORCHLORA]["step_added_mb"] > 0 else float("nan"))
    return result


def table(result: dict) -> str:
    mem = result["memory"]
    lines = [
        f"QLoRA step, Llama h={result['hidden']} x{result['layers']} layers, nf4 base, r={result['r']}, "
        f"batch {result['batch']} x {result['seq']} tokens, {result['device']}",
        "| | PEFT | torchlora | PEFT / torchlora |",
        "|---|---|---|---|",
        f"| step time (ms, median) | {1e3 * result['peft_s']:.1f} | {1e3 * result['torchlora_s']:.1f} | "
        f"{result['peft_over_torchlora']:.2f} |",
        f"| memory added by the step (MiB, {mem[TORCHLORA]['measure']}) | {mem[PEFT]['step_added_mb']:.1f} | "
        f"{mem[TORCHLORA]['step_added_mb']:.1f} | {result['memory_peft_over_torchlora']:.2f} |",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    parser.add_argument("--memory-variant", choices=VARIANTS, help="internal: measure one variant's memory")
    parser.add_argument("--hidden", type=int, default=None, help="hidden size (default 512; --quick: 64)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 4; --quick: 1)")
    parser.add_argument("--vocab", type=int, default=None, help="vocabulary (default 1024; --quick: 64)")
    parser.add_argument("--batch", type=int, default=None, help="(default 4; --quick: 2)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sample (default 128; --quick: 16)")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 7; --quick: 2)")
    parser.add_argument("--steps", type=int, default=2, help="steps per memory measurement")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="folder for qlora_step.json and qlora_step.md")
    args = parser.parse_args()
    sizes = dict(hidden=(512, 64), layers=(4, 1), vocab=(1024, 64), batch=(4, 2), seq=(128, 16), rounds=(7, 2))
    for name, (full, quick) in sizes.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    torch.set_num_threads(args.threads)
    if args.memory_variant:
        print(json.dumps(measure_memory_in_this_process(args.memory_variant, args)))
        return
    result = run(args)
    text = table(result)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "qlora_step.json").write_text(json.dumps(result, indent=2))
        (out / "qlora_step.md").write_text(text + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _paths import ensure_torchlora_importable

    ensure_torchlora_importable()
    main()
