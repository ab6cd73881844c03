"""Per-layer benchmarks: the bare frozen base layer, PEFT's LoRA layer and torchlora's, side by
side in one process: eval forward, training forward+backward (dropout 0 and 0.05), and the
activation memory each one saves for backward beyond what the base layer saves. A case may run
under ``torch.autocast`` (bfloat16), all three contenders alike."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from timing import interleaved

BASE, PEFT, TORCHLORA = "base", "peft", "torchlora"


@dataclass(frozen=True)
class LayerCase:
    """One layer shape; ``label`` names it in the report."""

    kind: str  # "linear" | "embedding" | "conv2d"
    label: str
    make_base: Callable[[], nn.Module]
    make_input: Callable[[], Tensor]
    r: int
    dropouts: tuple[float, ...] = (0.0, 0.05)
    autocast: torch.dtype | None = None  # run every contender under torch.autocast("cpu", dtype)

    def context(self) -> contextlib.AbstractContextManager:
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast("cpu", dtype=self.autocast)


def linear_case(tokens: int, dim: int, r: int, autocast: torch.dtype | None = None) -> LayerCase:
    suffix = f" {str(autocast).removeprefix('torch.')} autocast" if autocast is not None else ""
    return LayerCase(
        "linear", f"linear T={tokens} d={dim} r={r}{suffix}",
        lambda: nn.Linear(dim, dim), lambda: torch.randn(tokens, dim), r, autocast=autocast,
    )


def embedding_case(tokens: int, vocab: int, dim: int, r: int) -> LayerCase:
    # PEFT applies no dropout to embeddings; the low-rank path is a gather plus one GEMM.
    return LayerCase(
        "embedding", f"embedding T={tokens} V={vocab} d={dim} r={r}",
        lambda: nn.Embedding(vocab, dim), lambda: torch.randint(0, vocab, (tokens,)), r, dropouts=(0.0,),
    )


def conv2d_case(batch: int, channels: int, size: int, r: int) -> LayerCase:
    return LayerCase(
        "conv2d", f"conv2d N={batch} C={channels} HW={size} k=3 r={r}",
        lambda: nn.Conv2d(channels, channels, 3, padding=1), lambda: torch.randn(batch, channels, size, size), r,
    )


def default_cases(quick: bool) -> list[LayerCase]:
    if quick:
        return [linear_case(64, 32, 4), linear_case(64, 32, 4, torch.bfloat16), embedding_case(64, 100, 16, 4),
                conv2d_case(2, 8, 8, 4)]
    return [
        linear_case(2048, 1024, 16),
        linear_case(2048, 1024, 16, torch.bfloat16),
        linear_case(512, 1024, 16),
        linear_case(2048, 768, 8),
        linear_case(2048, 1024, 64),
        embedding_case(4096, 30522, 384, 16),
        conv2d_case(8, 64, 32, 16),
    ]


def _peft_layer(base: nn.Module, r: int, dropout: float) -> nn.Module:
    """PEFT's LoRA layer around ``base``, made through get_peft_model as users make it."""
    from peft import LoraConfig, get_peft_model

    holder = nn.Module()
    holder.layer = base
    model = get_peft_model(holder, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=["layer"]))
    return model.base_model.model.layer


def _torchlora_layer(base: nn.Module, r: int, dropout: float) -> nn.Module:
    from torchlora.nn import LoraConv2d, LoraEmbedding, LoraLinear

    cls = {nn.Linear: LoraLinear, nn.Embedding: LoraEmbedding, nn.Conv2d: LoraConv2d}[type(base)]
    return cls(base, r=r, lora_alpha=2 * r, lora_dropout=dropout)


def _nonzero_adapters(layer: nn.Module) -> None:
    """Both libraries start with B = 0; give every LoRA parameter values so no path is trivial."""
    with torch.no_grad():
        for name, param in layer.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, 0.02)


def build_layers(case: LayerCase, dropout: float) -> dict[str, nn.Module]:
    """The frozen base layer and both LoRA layers around identical copies of it."""
    torch.manual_seed(0)
    base = case.make_base().requires_grad_(False)
    layers = {BASE: base, PEFT: _peft_layer(copy.deepcopy(base), case.r, dropout),
              TORCHLORA: _torchlora_layer(copy.deepcopy(base), case.r, dropout)}
    for name in (PEFT, TORCHLORA):
        _nonzero_adapters(layers[name])
    return layers


def _eval_step(case: LayerCase, layer: nn.Module, x: Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.no_grad(), case.context():
            return layer(x)

    return run


def _train_step(case: LayerCase, layer: nn.Module, x: Tensor, grad: Tensor) -> Callable[[], object]:
    params = [p for p in layer.parameters() if p.requires_grad]

    def run() -> object:
        for p in params:
            p.grad = None
        x.grad = None
        with case.context():
            out = layer(x)
        if out.requires_grad:  # a frozen embedding has nothing to differentiate
            out.backward(grad)
        return None

    return run


def _input_for_training(case: LayerCase, x: Tensor) -> Tensor:
    # "frozen base forward+backward" = the frozen layer with its input requiring grad (dx only)
    return x.clone().requires_grad_(x.is_floating_point())


def saved_activation_bytes(layer: nn.Module, x: Tensor, case: LayerCase | None = None) -> int:
    """Bytes of distinct storages the forward saves for backward, excluding parameters and the
    layer's input (grad_A needs the input in every LoRA implementation, and it is the previous
    layer's output: what a LoRA layer adds is what it creates and keeps)."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    param_ptrs |= {b.untyped_storage().data_ptr() for b in layer.buffers()}
    param_ptrs.add(x.untyped_storage().data_ptr())
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in param_ptrs and ptr != 0:
            seen[ptr] = max(seen.get(ptr, 0), storage.nbytes())
        return t

    layer.train()
    context = case.context() if case is not None else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), context:
        out = layer(x)
    del out
    return sum(seen.values())


def run_case(case: LayerCase, rounds: int) -> list[dict]:
    """Rows of results for one layer shape: one per (mode, dropout)."""
    rows = []
    x = case.make_input()
    for dropout in case.dropouts:
        layers = build_layers(case, dropout)
        modes = [("train fwd+bwd", True)] if dropout > 0 else [("eval fwd", False), ("train fwd+bwd", True)]
        for mode, training in modes:
            if training:
                xs = {name: _input_for_training(case, x) for name in layers}
                with case.context():
                    grad = torch.randn_like(layers[BASE](x).detach())
                steps = {name: _train_step(case, layer.train(), xs[name], grad) for name, layer in layers.items()}
            else:
                steps = {name: _eval_step(case, layer.eval(), x) for name, layer in layers.items()}
            timings = interleaved(steps, rounds)
            row = {
                "kind": case.kind, "case": case.label, "mode": mode, "dropout": dropout,
                "autocast": str(case.autocast).removeprefix("torch.") if case.autocast is not None else None,
                **{f"{name}_ms": 1e3 * timings.median(name) for name in layers},
                "peft_ratio": timings.ratio(PEFT, BASE), "torchlora_ratio": timings.ratio(TORCHLORA, BASE),
            }
            if training:
                base_bytes = saved_activation_bytes(layers[BASE], _input_for_training(case, x), case)
                for name in (PEFT, TORCHLORA):
                    extra = saved_activation_bytes(layers[name], _input_for_training(case, x), case) - base_bytes
                    row[f"{name}_saved_extra_bytes"] = extra
            rows.append(row)
    return rows
