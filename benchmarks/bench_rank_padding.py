"""What zero-padding costs when adapters of different ranks share one slot stack.

A mixed batch stacks a layer's adapters zero-padded to the largest rank, and the kernels run
every row at that rank. This compares, side by side in one process (interleaved rounds), a
LoraLinear whose 8 adapters have ranks 4, 4, 8, 8, 16, 16, 32, 64 (padded to 64) with layers
whose 8 adapters all have rank 64 (the padded cost, an upper bound) and all have the mean rank
19 (what a kernel that skipped the padding would do at best), and with the base nn.Linear.

    PYTHONPATH=python python benchmarks/bench_rank_padding.py [--d 1024] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _paths import ensure_torchlora_importable  # noqa: E402

ensure_torchlora_importable()

import torch  # noqa: E402
from torch import nn  # noqa: E402

from timing import interleaved  # noqa: E402

MIXED_RANKS = (4, 4, 8, 8, 16, 16, 32, 64)


def _layer(base: nn.Linear, ranks) -> nn.Module:
    from torchlora.nn import LoraLinear

    layer = LoraLinear(base, "a0", r=ranks[0], init_lora_weights=False)
    for i, r in enumerate(ranks[1:], start=1):
        layer.update_layer(f"a{i}", r, 2 * r, init_lora_weights=False)
    return layer.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = nn.Linear(args.d, args.d)
    mean_rank = round(sum(MIXED_RANKS) / len(MIXED_RANKS))
    layers = {
        "mixed ranks (padded to 64)": _layer(nn.Linear(args.d, args.d), MIXED_RANKS),
        "all rank 64": _layer(nn.Linear(args.d, args.d), (64,) * 8),
        f"all rank {mean_rank} (no padding)": _layer(nn.Linear(args.d, args.d), (mean_rank,) * 8),
    }
    print(f"d={args.d}, 8 adapters, {args.threads} threads; times relative to the base nn.Linear")
    for shape, (batch, length) in {"prefill": (32, 64), "decode": (32, 1)}.items():
        x = torch.randn(batch, length, args.d) if length > 1 else torch.randn(batch, args.d)
        names = [f"a{i % 8}" for i in range(batch)]
        contenders = {"base": lambda: base(x)}
        for label, layer in layers.items():
            contenders[label] = lambda layer=layer: layer(x, adapter_names=names)
        with torch.no_grad():
            t = interleaved(contenders, rounds=args.rounds if length > 1 else 10 * args.rounds)
        print(f"  {shape} (B={batch}, L={length}): base {t.median('base') * 1e3:.2f} ms")
        for label in layers:
            print(f"    {label:32s} {t.ratio(label, 'base'):.3f}x")


if __name__ == "__main__":
    main()
