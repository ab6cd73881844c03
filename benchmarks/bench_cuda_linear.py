"""GPU benchmark of the LoRA linear layer: the frozen base ``nn.Linear`` alone, PEFT's LoRA
``Linear`` and torchlora's ``LoraLinear``, forward and forward+backward (frozen base, input
requiring grad), with and without dropout.

Reports median times (CUDA events, warm-up, variants interleaved within each repetition),
ratios over the base layer, peak memory and the bytes saved for backward (through
``torch.autograd.graph.saved_tensors_hooks``: an unfused dropout keeps [T, d] tensors, the
fused kernels keep none). Prints a markdown table and writes it to ``--out``.

    python benchmarks/bench_cuda_linear.py --out bench.md
    python benchmarks/bench_cuda_linear.py --dry-run        # the plan only
    python benchmarks/bench_cuda_linear.py --cpu-smoke      # every code path, tiny, on the CPU

Without the ``peft`` package the PEFT column is the same unfused computation written out
(dropout, lora_A, lora_B, scaling, add) and is labelled so.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

VARIANTS = ("base", "peft", "torchlora")
MODES = ("fwd", "fwd+bwd")


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def float_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc
    if not values or any(not 0.0 <= v < 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"dropout values must be in [0, 1), got {text!r}")
    return values


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the markdown report here")
    parser.add_argument("--tokens", type=int_list, default=[1, 16, 64, 512, 8192], help="T values (default %(default)s)")
    parser.add_argument("--dim", type=int, default=4096, help="d_in = d_out (default %(default)s)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (default %(default)s)")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument("--dropout", type=float_list, default=[0.0, 0.1], help="lora_dropout values (default 0,0.1)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed repetitions (default %(default)s)")
    parser.add_argument("--reps", type=int, default=50, help="timed repetitions (default %(default)s)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="run every case on the CPU with tiny sizes (checks the script, times mean nothing)")
    args = parser.parse_args(argv)
    if args.dim <= 0 or args.rank <= 0 or args.reps <= 0 or args.warmup < 0:
        parser.error("--dim, --rank and --reps must be positive, --warmup non-negative")
    if args.cpu_smoke:
        args.dim, args.rank, args.tokens, args.warmup, args.reps = 64, 4, [1, 8], 1, 3
    return args


@dataclass
class Measurement:
    times_ms: dict[str, float] = field(default_factory=dict)
    peak_mib: dict[str, float] = field(default_factory=dict)
    saved_mib: dict[str, float] = field(default_factory=dict)
    saved_td: dict[str, int] = field(default_factory=dict)  # saved [T, d]-sized tensors besides x


class UnfusedLora(nn.Module):
    """PEFT's LoRA Linear forward written out, for machines without the peft package."""

    def __init__(self, base: nn.Linear, r: int, lora_alpha: float, dropout: float) -> None:
        super().__init__()
        self.base_layer = base
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.scaling = lora_alpha / r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling


def make_peft_layer(base: nn.Linear, r: int, lora_alpha: float, dropout: float) -> tuple[nn.Module, str]:
    try:
        from peft import LoraConfig
        from peft.tuners.lora.layer import Linear as PeftLinear
    except ImportError:
        return UnfusedLora(base, r, lora_alpha, dropout), "unfused PEFT formula (peft not installed)"
    options = {"lora_dropout": dropout, "init_lora_weights": False}
    config = LoraConfig(r=r, lora_alpha=lora_alpha, **options)
    return PeftLinear(base, "default", config=config, r=r, lora_alpha=lora_alpha, **options), "peft"


def make_layers(args: argparse.Namespace, dropout: float, device: torch.device, dtype: torch.dtype):
    import torchlora

    torch.manual_seed(0)
    base = nn.Linear(args.dim, args.dim, bias=False, device=device, dtype=dtype).requires_grad_(False)
    alpha = 2 * args.rank
    peft_layer, peft_label = make_peft_layer(copy.deepcopy(base), args.rank, alpha, dropout)
    ours = torchlora.LoraLinear(copy.deepcopy(base), "default", r=args.rank, lora_alpha=alpha, lora_dropout=dropout,
                                init_lora_weights=False)
    layers = {"base": base, "peft": peft_layer.to(device, dtype), "torchlora": ours.to(device, dtype)}
    for layer in layers.values():
        layer.train()  # dropout active
    return layers, peft_label


class Timer:
    """CUDA events on the GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.pending: list[tuple[str, object, object]] = []

    def time(self, name: str, fn: Callable[[], None]) -> None:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            self.pending.append((name, start, end))
        else:
            t0 = time.perf_counter()
            fn()
            self.pending.append((name, t0, time.perf_counter()))

    def collect(self) -> dict[str, list[float]]:
        if self.cuda:
            torch.cuda.synchronize()
        out: dict[str, list[float]] = {}
        for name, start, end in self.pending:
            ms = start.elapsed_time(end) if self.cuda else (end - start) * 1e3
            out.setdefault(name, []).append(ms)
        self.pending.clear()
        return out


def step_fn(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor, mode: str) -> Callable[[], None]:
    params = [p for p in layer.parameters() if p.requires_grad]

    def forward() -> None:
        with torch.no_grad():
            layer(x)

    def forward_backward() -> None:
        x.grad = None
        for p in params:
            p.grad = None
        layer(x).backward(grad)

    return forward if mode == "fwd" else forward_backward


def saved_and_peak(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor, device: torch.device):
    """(saved MiB, saved [T, d]-sized tensors other than x, peak MiB over the start) of one fwd+bwd."""
    params = {p.data_ptr() for p in layer.parameters()}
    seen: dict[int, int] = {}
    big = 0
    td = x.numel()

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal big
        ptr = t.data_ptr()
        if ptr not in params and ptr != x.data_ptr() and ptr not in seen:
            seen[ptr] = t.numel() * t.element_size()
            big += int(t.numel() >= td)
        return t

    x.grad = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
    out.backward(grad)
    peak = math.nan
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - start) / 2**20
    return sum(seen.values()) / 2**20, big, peak


def measure(args, layers, tokens: int, mode: str, device, dtype) -> Measurement:
    x = torch.randn(tokens, args.dim, device=device, dtype=dtype, requires_grad=(mode != "fwd"))
    grad = torch.randn(tokens, args.dim, device=device, dtype=dtype)
    steps = {name: step_fn(layer, x, grad, mode) for name, layer in layers.items()}
    timer = Timer(device)
    names = list(steps)
    for rep in range(args.warmup + args.reps):
        order = names[rep % len(names):] + names[: rep % len(names)]  # interleaved, rotating
        for name in order:
            timer.time(name, steps[name])
        if rep < args.warmup:
            timer.collect()
    result = Measurement()
    for name, values in timer.collect().items():
        result.times_ms[name] = statistics.median(values)
    if mode != "fwd":
        for name, layer in layers.items():
            saved, big, peak = saved_and_peak(layer, x, grad, device)
            result.saved_mib[name], result.saved_td[name], result.peak_mib[name] = saved, big, peak
    return result


def fmt(v: float, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def render(args, rows, header_lines: list[str], peft_label: str) -> str:
    lines = [*header_lines, ""]
    lines.append(
        "| T | dropout | mode | base ms | peft ms | torchlora ms | peft/base | torchlora/base | peft/torchlora "
        "| peak MiB base/peft/torchlora | saved MiB peft/torchlora | [T,d] saved peft/torchlora |"
    )
    lines.append("|---:|---:|---|---:|---:|---:|---:|---:|---:|---|---|---|")
    for tokens, p, mode, m in rows:
        t = m.times_ms
        peak = "/".join(fmt(m.peak_mib.get(v, math.nan), 1) for v in VARIANTS) if m.peak_mib else "-"
        saved = f"{fmt(m.saved_mib['peft'], 2)}/{fmt(m.saved_mib['torchlora'], 2)}" if m.saved_mib else "-"
        td = f"{m.saved_td['peft']}/{m.saved_td['torchlora']}" if m.saved_td else "-"
        lines.append(
            f"| {tokens} | {p:g} | {mode} | {fmt(t['base'])} | {fmt(t['peft'])} | {fmt(t['torchlora'])} "
            f"| {fmt(t['peft'] / t['base'], 2)} | {fmt(t['torchlora'] / t['base'], 2)} "
            f"| {fmt(t['peft'] / t['torchlora'], 2)} | {peak} | {saved} | {td} |"
        )
    lines += ["", f"peft column: {peft_label}", "", "Targets:", ""]
    for tokens, p, mode, m in rows:
        t = m.times_ms
        ratio = t["torchlora"] / t["base"]
        if mode == "fwd+bwd" and tokens == 8192:
            lines.append(f"- fwd+bwd T=8192 p={p:g}: torchlora/base {ratio:.3f} (target <= 1.05): "
                         f"{'met' if ratio <= 1.05 else 'MISSED'}")
        if mode == "fwd" and tokens <= 64:
            lines.append(f"- fwd T={tokens} p={p:g}: torchlora/base {ratio:.3f} (target <= 1.10): "
                         f"{'met' if ratio <= 1.10 else 'MISSED'}")
        if mode == "fwd+bwd" and p > 0:
            speedup = t["peft"] / t["torchlora"]
            lines.append(f"- fwd+bwd T={tokens} p={p:g}: peft/torchlora {speedup:.2f}x (target >= 1.3x): "
                         f"{'met' if speedup >= 1.3 else 'MISSED'}")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    dtype = getattr(torch, args.dtype)
    plan = [(t, p, mode) for p in args.dropout for t in args.tokens for mode in MODES]
    if args.dry_run:
        print(f"d={args.dim} r={args.rank} dtype={args.dtype} warmup={args.warmup} reps={args.reps}")
        for tokens, p, mode in plan:
            print(f"  T={tokens:<6} dropout={p:<4g} {mode}: {', '.join(VARIANTS)}")
        return 0
    if args.cpu_smoke:
        device, dtype = torch.device("cpu"), torch.float32
    else:
        if not torch.cuda.is_available():
            print("bench_cuda_linear: no CUDA GPU (use --cpu-smoke to exercise the script on the CPU)", file=sys.stderr)
            return 2
        device = torch.device("cuda")
    import torchlora

    info = torchlora.build_info()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU smoke run (times meaningless)"
    header = [
        f"## LoRA linear: d_in = d_out = {args.dim}, r = {args.rank}, {dtype}".replace("torch.", ""),
        "",
        f"device: {gpu}; torch {torch.__version__}; torchlora {info['version']} (CUDA kernels: {info['cuda']}, "
        f"arch {info.get('cuda_architectures', '')}); median of {args.reps} interleaved repetitions after "
        f"{args.warmup} warm-up, {'CUDA events' if device.type == 'cuda' else 'perf_counter'}",
    ]
    rows = []
    peft_label = ""
    for p in args.dropout:
        layers, peft_label = make_layers(args, p, device, dtype)
        for tokens in args.tokens:
            for mode in MODES:
                rows.append((tokens, p, mode, measure(args, layers, tokens, mode, device, dtype)))
                print(f"done T={tokens} dropout={p:g} {mode}", file=sys.stderr, flush=True)
        del layers
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report = render(args, rows, header, peft_label)
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
