"""Mixed batches of many adapters: every sample names its own adapter (``adapter_names=[...]``),
PEFT against torchlora against the model without adapters, side by side in one process.

    PYTHONPATH=python python benchmarks/bench_mixed_batch.py --out benchmarks/results        # full grid
    PYTHONPATH=python python benchmarks/bench_mixed_batch.py --quick --out /tmp/lora-bench   # smoke test
    PYTHONPATH=python python benchmarks/bench_mixed_batch.py --device cuda --dtype bfloat16 --out DIR

Model level: a LlamaForCausalLM built from a config (hidden 512, intermediate 1376, 4 layers,
8 heads, vocabulary 1000), LoRA r=16 on q_proj/k_proj/v_proj/o_proj, N adapters loaded (random
non-zero weights, the same in PEFT and torchlora), eval-mode ``torch.no_grad()`` forward of
input_ids. Layer level: one ``nn.Linear(d, d)`` with N adapters of r=16, PEFT's ``lora.Linear``
(made by ``get_peft_model`` on a one-layer module) against ``torchlora.nn.LoraLinear``, both
called with ``adapter_names``. Shapes: prefill, B = max(32, N) samples of L = 64 tokens, and
decode, B samples of one token. The N adapters are assigned round-robin over the B samples.

Writes ``mixed_batch.md`` (the table, also printed) and ``mixed_batch.json`` (raw numbers) into
--out. Before timing, every case checks that torchlora's output equals PEFT's.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _paths import ensure_torchlora_importable  # noqa: E402

ensure_torchlora_importable()

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from timing import interleaved  # noqa: E402

BASE, PEFT, TORCHLORA = "base", "peft", "torchlora"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
BASE_MODEL_NOTE = "base = the plain LlamaForCausalLM (a separate copy without LoRA layers)"
BASE_LAYER_NOTE = "base = the plain nn.Linear"


@dataclass(frozen=True)
class Grid:
    """What is measured; ``rounds`` timed rounds per case at most, fewer (but at least
    ``min_rounds``) where one round takes longer than ``case_seconds / rounds``."""

    adapters: tuple[int, ...]
    min_batch: int
    seq_len: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    layer_dims: tuple[int, ...]
    rank: int
    rounds: int
    min_rounds: int
    case_seconds: float


FULL = Grid(adapters=(1, 8, 32, 128), min_batch=32, seq_len=64, hidden=512, intermediate=1376, layers=4, heads=8,
            vocab=1000, layer_dims=(1024, 4096), rank=16, rounds=30, min_rounds=3, case_seconds=20.0)
QUICK = Grid(adapters=(1, 4), min_batch=4, seq_len=8, hidden=64, intermediate=172, layers=2, heads=4, vocab=128,
             layer_dims=(64,), rank=4, rounds=2, min_rounds=2, case_seconds=1.0)


def int_tuple(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, N in (1, 4), 2 rounds (smoke test)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on the CPU (default 2)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="default float32 on the CPU, bfloat16 on CUDA")
    parser.add_argument("--adapters", type=int_tuple, help="N values, e.g. 1,8,32,128 (default: the grid's)")
    parser.add_argument("--layer-dims", type=int_tuple, help="d values of the layer cases (default: the grid's)")
    parser.add_argument("--rounds", type=int, help="timed rounds per case at most (default: the grid's)")
    parser.add_argument("--case-seconds", type=float, help="time budget of one case (default: the grid's)")
    parser.add_argument("--max-call-seconds", type=float, default=120.0,
                        help="a contender whose first call takes longer is left out of that case (default 120)")
    parser.add_argument("--skip-model", action="store_true", help="only the layer cases")
    parser.add_argument("--skip-layers", action="store_true", help="only the model cases")
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    grid = QUICK if args.quick else FULL
    overrides = {"adapters": args.adapters, "layer_dims": args.layer_dims, "rounds": args.rounds,
                 "case_seconds": args.case_seconds}
    args.grid = Grid(**{**asdict(grid), **{k: v for k, v in overrides.items() if v is not None}})
    if args.grid.rounds < 1 or args.threads < 1:
        parser.error("--rounds and --threads must be positive")
    return args


# ---------------------------------------------------------------------- adapters
def lora_config(lib, r: int):
    return lib.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, init_lora_weights=False)


def randomize_lora(module: nn.Module, seed: int) -> None:
    """Seeded random factors for every LoRA parameter (A ~ N(0, 1/in), B ~ N(0, 0.02^2)):
    non-zero, far from denormals, and the adapter term well visible in the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "lora_A" in name:
                param.copy_(torch.randn(param.shape, generator=g) * param.shape[-1] ** -0.5)
            elif "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.02)


def copy_weights(src: nn.Module, dst: nn.Module) -> None:
    """Every tensor of PEFT's model into torchlora's (both use PEFT's state-dict names)."""
    src_state, dst_state = src.state_dict(), dst.state_dict()
    if set(src_state) != set(dst_state):
        only = sorted(set(src_state) ^ set(dst_state))[:5]
        raise RuntimeError(f"PEFT and torchlora state dicts differ, e.g. {only}")
    dst.load_state_dict(src_state, strict=True)


def names_for(batch: int, n_adapters: int) -> list[str]:
    return [f"a{i % n_adapters}" for i in range(batch)]


def grow(peft_model, ours, start: int, stop: int, make_config: Callable) -> None:
    """Add adapters a<start>..a<stop-1> to both (PEFT's add_adapter, torchlora's add_adapter)."""
    import peft

    import torchlora

    for i in range(start, stop):
        peft_model.add_adapter(f"a{i}", make_config(peft))
        ours.add_adapter(f"a{i}", make_config(torchlora))


# ---------------------------------------------------------------------- timing
def _synced(fn: Callable[[], Tensor], device: torch.device) -> Callable[[], Tensor]:
    def run() -> Tensor:
        with torch.no_grad():
            out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    return run


def rel_diff(got: Tensor, want: Tensor) -> float:
    """max |got - want| / max |want|, in float32."""
    got, want = got.float(), want.float()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def check_tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype == torch.float32 else 5e-2


def time_case(contenders: dict[str, Callable[[], Tensor]], args, device: torch.device, dtype: torch.dtype) -> dict:
    """One call each whose outputs are compared, warm-up rounds (the last one's time sets the
    number of rounds; none for slow CPU cases), then interleaved rounds. Returns medians,
    ratios and what was left out."""
    grid = args.grid
    outputs: dict[str, Tensor] = {}
    first: dict[str, float] = {}
    for name, fn in contenders.items():
        start = time.perf_counter()
        outputs[name] = fn()
        first[name] = time.perf_counter() - start
    check = rel_diff(outputs[TORCHLORA], outputs[PEFT])
    if not check <= check_tolerance(dtype):
        raise RuntimeError(f"torchlora's output differs from PEFT's: max |diff| / max |peft| = {check:.3g}")
    del outputs
    skipped = [n for n in (PEFT, TORCHLORA) if first[n] > args.max_call_seconds]
    timed = {n: fn for n, fn in contenders.items() if n not in skipped}
    per_round = sum(first[n] for n in timed)
    if device.type == "cuda" or per_round < 1.0:
        # CUDA's first calls pay for initialisation; on the CPU a call of a second or more is
        # warm after the checking call
        warmup = interleaved(timed, rounds=3 if device.type == "cuda" else 1, warmup=0)
        per_round = sum(samples[-1] for samples in warmup.samples.values())
    rounds = max(grid.min_rounds, min(grid.rounds, int(grid.case_seconds / max(per_round, 1e-9))))
    timings = interleaved(timed, rounds, warmup=0)
    row: dict = {"rounds": rounds, "check_rel_diff": check, "skipped": skipped}
    for name in contenders:
        row[f"{name}_ms"] = 1e3 * timings.median(name) if name in timed else None
    for name in (PEFT, TORCHLORA):
        row[f"{name}_ratio"] = timings.ratio(name, BASE) if name in timed else None
    row["peft_over_torchlora"] = timings.ratio(PEFT, TORCHLORA) if not skipped else None
    notes = [f"{name} left out: its first call took {first[name]:.1f} s" for name in skipped]
    row["note"] = "; ".join(notes)
    return row


# ---------------------------------------------------------------------- model level
def build_llama(grid: Grid):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=grid.vocab, hidden_size=grid.hidden, intermediate_size=grid.intermediate,
                         num_hidden_layers=grid.layers, num_attention_heads=grid.heads,
                         num_key_value_heads=grid.heads, max_position_embeddings=max(128, 2 * grid.seq_len),
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def model_rows(args, device: torch.device, dtype: torch.dtype) -> list[dict]:
    import peft

    import torchlora

    grid = args.grid
    base = build_llama(grid)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.get_peft_model(copy.deepcopy(base), lora_config(peft, grid.rank), adapter_name="a0")
        ours = torchlora.get_peft_model(copy.deepcopy(base), lora_config(torchlora, grid.rank), adapter_name="a0")
    base = base.to(device, dtype)
    rows, loaded = [], 1
    for n in sorted(grid.adapters):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            grow(ref, ours, loaded, n, lambda lib: lora_config(lib, grid.rank))
        loaded = n
        # weights are set in float32 on the CPU, then both models go to the device and dtype
        ref.to("cpu", torch.float32), ours.to("cpu", torch.float32)
        randomize_lora(ref, seed=n)
        copy_weights(ref, ours)
        ref.to(device, dtype).eval(), ours.to(device, dtype).eval()
        batch = max(grid.min_batch, n)
        names = names_for(batch, n)
        g = torch.Generator().manual_seed(n)
        ids_prefill = torch.randint(0, grid.vocab, (batch, grid.seq_len), generator=g).to(device)
        for shape, ids in (("prefill", ids_prefill), ("decode", ids_prefill[:, :1].contiguous())):
            contenders = {
                BASE: _synced(lambda ids=ids: base(input_ids=ids, use_cache=False).logits, device),
                PEFT: _synced(lambda ids=ids: ref(input_ids=ids, adapter_names=names, use_cache=False).logits, device),
                TORCHLORA: _synced(lambda ids=ids: ours(input_ids=ids, adapter_names=names, use_cache=False).logits,
                                   device),
            }
            row = {"level": "model", "case": f"Llama h={grid.hidden} {grid.layers} layers, r={grid.rank} on q/k/v/o",
                   "shape": shape, "adapters": n, "batch": batch, "tokens": ids.numel(),
                   **time_case(contenders, args, device, dtype)}
            print(line(row), flush=True)
            rows.append(row)
    return rows


# ---------------------------------------------------------------------- layer level
def layer_rows(args, device: torch.device, dtype: torch.dtype) -> list[dict]:
    import peft

    import torchlora

    grid = args.grid
    rows = []
    for dim in grid.layer_dims:
        torch.manual_seed(0)
        base = nn.Linear(dim, dim).requires_grad_(False).eval()
        holder = nn.Module()
        holder.layer = copy.deepcopy(base)

        def make_config(lib):
            return lib.LoraConfig(r=grid.rank, lora_alpha=2 * grid.rank, target_modules=["layer"],
                                  init_lora_weights=False)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref_model = peft.get_peft_model(holder, make_config(peft), adapter_name="a0")
        theirs = ref_model.base_model.model.layer
        ours = torchlora.nn.LoraLinear(copy.deepcopy(base), "a0", r=grid.rank, lora_alpha=2 * grid.rank,
                                       init_lora_weights=False)
        base = base.to(device, dtype)
        loaded = 1
        for n in sorted(grid.adapters):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for i in range(loaded, n):
                    ref_model.add_adapter(f"a{i}", make_config(peft))
                    ours.update_layer(f"a{i}", grid.rank, 2 * grid.rank, init_lora_weights=False)
            loaded = n
            theirs.to("cpu", torch.float32), ours.to("cpu", torch.float32)
            randomize_lora(theirs, seed=n)
            copy_weights(theirs, ours)
            theirs.to(device, dtype).eval(), ours.to(device, dtype).eval()
            batch = max(grid.min_batch, n)
            names = names_for(batch, n)
            g = torch.Generator().manual_seed(n)
            x_prefill = torch.randn(batch, grid.seq_len, dim, generator=g).to(device, dtype)
            for shape, x in (("prefill", x_prefill), ("decode", x_prefill[:, 0].contiguous())):
                contenders = {
                    BASE: _synced(lambda x=x: base(x), device),
                    PEFT: _synced(lambda x=x: theirs(x, adapter_names=names), device),
                    TORCHLORA: _synced(lambda x=x: ours(x, adapter_names=names), device),
                }
                row = {"level": "layer", "case": f"Linear d={dim}, r={grid.rank}", "shape": shape, "adapters": n,
                       "batch": batch, "tokens": x.numel() // dim, **time_case(contenders, args, device, dtype)}
                print(line(row), flush=True)
                rows.append(row)
            del x_prefill
        del ref_model, theirs, ours, base
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------- report
def _ms(value: float | None) -> str:
    return "left out" if value is None else f"{value:.2f}"


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def _timed(row: dict, name: str) -> str:
    if row[f"{name}_ms"] is None:
        return f"{name} left out"
    ratio = f" ({row[f'{name}_ratio']:.2f}x)" if name != BASE else ""
    return f"{name} {row[f'{name}_ms']:9.2f} ms{ratio}"


def line(row: dict) -> str:
    return (f"{row['level']:<5} {row['case']:<38} {row['shape']:<7} N={row['adapters']:<4} B={row['batch']:<4} "
            f"T={row['tokens']:<6} " + " | ".join(_timed(row, name) for name in (BASE, PEFT, TORCHLORA)))


def markdown(results: dict) -> str:
    info, grid = results["machine"], results["grid"]
    setting = [info["device"], info["dtype"], f"torch {info['torch']}", f"torchlora {info['torchlora']}",
               f"peft {info['peft']}", f"transformers {info['transformers']}"]
    if info["device_type"] == "cpu":
        setting.append(f"{info['threads']} threads (`torch.set_num_threads`), {info['cores']} cores")
    setting += [info["date"], f"load average {info['load_avg_start']:.1f} at start / {info['load_avg_end']:.1f} at end",
                f"{info['seconds']:.0f} s in all"]
    quick = " (quick mode: smoke-test sizes, not meaningful)" if results["quick"] else ""
    lines = [
        "# Mixed batches of many adapters",
        "",
        ", ".join(setting) + quick + ".",
        "",
        "Every sample names its adapter (`adapter_names=[...]`, N adapters round-robin over the B samples), "
        "eval mode, `torch.no_grad()`. Prefill: B samples of "
        f"{grid['seq_len']} tokens; decode: B samples of one token (no KV cache). "
        f"Model: {BASE_MODEL_NOTE}; PEFT's and torchlora's PeftModel, LoRA r={grid['rank']} (alpha {2 * grid['rank']}) "
        f"on q_proj/k_proj/v_proj/o_proj. Layer: {BASE_LAYER_NOTE}; PEFT's `lora.Linear` (from `get_peft_model`) "
        "and `torchlora.nn.LoraLinear`, input [B, L, d] (prefill) or [B, d] (decode), one adapter name per sample. "
        "Times are medians over interleaved rounds (each round runs every contender once, in a fresh random "
        "order); ratios are medians of the per-round ratios. Before timing, torchlora's output is checked "
        "against PEFT's (check = max |diff| / max |PEFT|).",
        "",
        "| level | case | shape | N | B | tokens | base ms | PEFT ms | torchlora ms | PEFT / base | torchlora / base "
        "| PEFT / torchlora | rounds | check | note |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in results["rows"]:
        lines.append(
            f"| {row['level']} | {row['case']} | {row['shape']} | {row['adapters']} | {row['batch']} | "
            f"{row['tokens']} | {_ms(row['base_ms'])} | {_ms(row['peft_ms'])} | {_ms(row['torchlora_ms'])} | "
            f"{_ratio(row['peft_ratio'])} | {_ratio(row['torchlora_ratio'])} | {_ratio(row['peft_over_torchlora'])} | "
            f"{row['rounds']} | {row['check_rel_diff']:.1e} | {row['note']} |"
        )
    return "\n".join(lines) + "\n"


def machine_info(args, device: torch.device) -> dict:
    import peft
    import transformers

    import torchlora

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor()
                                                                              or platform.machine())
    return {
        "device": f"{device.type.upper()} {name}", "device_type": device.type, "dtype": args.dtype,
        "torch": torch.__version__, "torchlora": torchlora.build_info()["version"], "peft": peft.__version__,
        "transformers": transformers.__version__, "threads": torch.get_num_threads(), "cores": os.cpu_count(),
        "load_avg_start": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_mixed_batch: --device cuda, but torch sees no CUDA GPU")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    info = machine_info(args, device)
    started = time.perf_counter()
    rows = []
    if not args.skip_model:
        rows += model_rows(args, device, dtype)
    if not args.skip_layers:
        rows += layer_rows(args, device, dtype)
    info["load_avg_end"] = os.getloadavg()[0]
    info["seconds"] = time.perf_counter() - started
    results = {"machine": info, "grid": asdict(args.grid), "rows": rows, "quick": args.quick}
    table = markdown(results)
    print()
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mixed_batch.json").write_text(json.dumps(results, indent=2))
    (args.out / "mixed_batch.md").write_text(table)
    print(f"wrote {args.out / 'mixed_batch.md'} and {args.out / 'mixed_batch.json'} in {info['seconds']:.0f} s")
    return results


if __name__ == "__main__":
    main()
