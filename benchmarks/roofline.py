"""Roofline of a LoRA linear training step on the CPU: each pass over memory that the step needs,
with the bytes it must move, its flops, its measured time, the time it would take at this
machine's read bandwidth (measured in the same run, STREAM-like) and at the flop rate the base GEMM
reaches in the same run; the larger of the two is the pass's floor, so the table shows how far each
pass, and the whole fused operator, is from it.

    PYTHONPATH=python python benchmarks/roofline.py --threads 2 [--tokens 2048 --dim 1024 --r 16]

The passes are timed one by one with plain ATen calls (the floor of each, not torchlora's kernels);
the last rows time the frozen base layer's forward+backward and torchlora's ``linear_with_lora``
forward+backward, interleaved in the same rounds, so their ratio is the overhead users pay.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _paths import ensure_torchlora_importable  # noqa: E402
from report import print_and_save, require_positive  # noqa: E402
from timing import interleaved  # noqa: E402

ensure_torchlora_importable()

FLOAT_BYTES = 4


@dataclass
class PassRow:
    """One pass of the step: what it must read and write, and how long it took."""

    name: str
    bytes_moved: int
    flops: int
    measured_ms: float
    bandwidth_ms: float  # bytes_moved at the measured read bandwidth
    compute_ms: float  # flops at the rate the base GEMM reached in this run

    @property
    def floor_ms(self) -> float:
        return max(self.bandwidth_ms, self.compute_ms)

    @property
    def over_floor(self) -> float:
        return self.measured_ms / self.floor_ms if self.floor_ms > 0 else float("nan")


def read_bandwidth(threads: int, mib: int = 256, rounds: int = 7) -> float:
    """Bytes per second of a parallel read (a sum over a float32 buffer larger than the caches)."""
    torch.set_num_threads(threads)
    buffer = torch.ones(mib * 2**20 // FLOAT_BYTES)
    timings = interleaved({"read": lambda: buffer.sum()}, rounds=rounds, warmup=2)
    return buffer.numel() * FLOAT_BYTES / statistics.median(timings.samples["read"])


def step_passes(T: int, d_in: int, d_out: int, r: int,
                dtype: torch.dtype = torch.float32) -> dict[str, tuple[Callable[[], object], int, int]]:
    """The passes of one training step of ``y = x W^T + s (x A^T) B^T`` with a dense upstream
    gradient g, in ``dtype``: name -> (callable, minimal bytes moved, flops)."""
    x, g = torch.randn(T, d_in, dtype=dtype), torch.randn(T, d_out, dtype=dtype)
    W, A, B = (torch.randn(d_out, d_in, dtype=dtype), torch.randn(r, d_in, dtype=dtype),
               torch.randn(d_out, r, dtype=dtype))
    h, gh = torch.randn(T, r, dtype=dtype), torch.randn(T, r, dtype=dtype)
    y = torch.empty(T, d_out, dtype=dtype)
    dx = torch.empty(T, d_in, dtype=dtype)
    f = dtype.itemsize
    return {
        # the frozen layer's own passes (its floor is the base's cost)
        "base fwd GEMM x W^T": (lambda: torch.mm(x, W.t(), out=y),
                                f * (T * d_in + d_out * d_in + T * d_out), 2 * T * d_in * d_out),
        "base bwd GEMM g W": (lambda: torch.mm(g, W, out=dx),
                              f * (T * d_out + d_out * d_in + T * d_in), 2 * T * d_in * d_out),
        # the low-rank passes: each streams a [T, d] matrix for 2r flops per element
        "shrink h = x A^T": (lambda: torch.mm(x, A.t()), f * (T * d_in + T * r), 2 * T * d_in * r),
        "expand y += s h B^T": (lambda: torch.addmm(y, h, B.t(), alpha=0.5, out=y),
                                f * (2 * T * d_out + T * r), 2 * T * d_out * r),
        "grad_h = g B": (lambda: torch.mm(g, B), f * (T * d_out + T * r), 2 * T * d_out * r),
        "grad_B = g^T h": (lambda: torch.mm(g.t(), h), f * (T * d_out + T * r), 2 * T * d_out * r),
        "grad_A = grad_h^T x": (lambda: torch.mm(gh.t(), x), f * (T * d_in + T * r), 2 * T * d_in * r),
        "dx += grad_h A": (lambda: torch.addmm(dx, gh, A, out=dx), f * (2 * T * d_in + T * r), 2 * T * d_in * r),
        # dropout: one pass that reads x and writes its masked copy (torchlora keeps a bit mask instead)
        "dropout x * mask": (lambda: torch.nn.functional.dropout(x, 0.05, training=True),
                             f * 2 * T * d_in, T * d_in),
    }


def fused_step(T: int, d_in: int, d_out: int, r: int, dropout: float,
               dtype: torch.dtype = torch.float32) -> dict[str, Callable[[], object]]:
    """The frozen base layer's forward+backward and torchlora's ``linear_with_lora`` forward+backward."""
    import torchlora

    x = torch.randn(T, d_in, dtype=dtype, requires_grad=True)
    g = torch.randn(T, d_out, dtype=dtype)
    W = torch.randn(d_out, d_in, dtype=dtype) / d_in**0.5
    A = (torch.randn(r, d_in, dtype=dtype) / d_in**0.5).requires_grad_()
    B = (torch.randn(d_out, r, dtype=dtype) / r**0.5).requires_grad_()

    def base() -> None:
        torch.nn.functional.linear(x, W).backward(g)

    def lora() -> None:
        seed = torchlora.ops.make_seed() if dropout > 0 else None
        torchlora.ops.linear_with_lora(x, W, None, A, B, None, 2.0, dropout, seed).backward(g)

    return {"base fwd+bwd": base, f"torchlora fwd+bwd (dropout {dropout})": lora}


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    bandwidth = read_bandwidth(args.threads, mib=args.stream_mib)
    dtype = getattr(torch, args.dtype)
    passes = step_passes(args.tokens, args.dim, args.dim, args.r, dtype)
    timings = interleaved({name: fn for name, (fn, _, _) in passes.items()}, rounds=args.rounds)
    gemm_name = "base fwd GEMM x W^T"
    flop_rate = passes[gemm_name][2] / timings.median(gemm_name)  # this machine's practical peak
    rows = []
    for name, (_, nbytes, flops) in passes.items():
        rows.append(PassRow(name, nbytes, flops, 1e3 * timings.median(name), 1e3 * nbytes / bandwidth,
                            1e3 * flops / flop_rate))
    totals = {}
    for dropout in (0.0, 0.05):
        steps = fused_step(args.tokens, args.dim, args.dim, args.r, dropout, dtype)
        t = interleaved(steps, rounds=args.rounds)
        name = f"torchlora fwd+bwd (dropout {dropout})"
        totals[name] = {"ms": 1e3 * t.median(name), "base_ms": 1e3 * t.median("base fwd+bwd"),
                        "ratio_to_base": t.ratio(name, "base fwd+bwd")}
    return {"threads": args.threads, "tokens": args.tokens, "dim": args.dim, "r": args.r, "dtype": args.dtype,
            "read_bandwidth_gb_s": bandwidth / 1e9, "gemm_gflop_s": flop_rate / 1e9,
            "passes": [asdict(row) | {"floor_ms": row.floor_ms, "over_floor": row.over_floor} for row in rows],
            "fused": totals}


def markdown(result: dict) -> str:
    lines = [
        f"T={result['tokens']} d={result['dim']} r={result['r']}, {result['dtype']}, {result['threads']} threads, "
        f"measured read bandwidth {result['read_bandwidth_gb_s']:.1f} GB/s, "
        f"base GEMM {result['gemm_gflop_s']:.0f} GFLOP/s",
        "",
        "| pass | MiB moved | MFLOP | measured ms | ms at read bandwidth | ms at GEMM rate | measured / floor |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["passes"]:
        lines.append(f"| {row['name']} | {row['bytes_moved'] / 2**20:.1f} | {row['flops'] / 1e6:.0f} | "
                     f"{row['measured_ms']:.2f} | {row['bandwidth_ms']:.2f} | {row['compute_ms']:.2f} | "
                     f"{row['over_floor']:.1f} |")
    lines += ["", "| whole step | ms | base ms | / base |", "|---|---:|---:|---:|"]
    for name, total in result["fused"].items():
        lines.append(f"| {name} | {total['ms']:.1f} | {total['base_ms']:.1f} | {total['ratio_to_base']:.3f} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="bfloat16 times the passes and the op as bfloat16 autocast runs them")
    p.add_argument("--stream-mib", type=int, default=256, help="size of the bandwidth probe's buffer")
    p.add_argument("--json", type=Path, default=None, help="also write the raw numbers here")
    args = p.parse_args(argv)
    require_positive(p, args, ("threads", "tokens", "dim", "r", "rounds", "stream_mib"))
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    result = run(args)
    return print_and_save(result, markdown(result), args.json)


if __name__ == "__main__":
    main()
