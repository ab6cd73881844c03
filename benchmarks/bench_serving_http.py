"""Throughput and latency of the example HTTP server (examples/cpp, lora_server): the exported
model with the adapter pool (requests for different adapters batched into one forward) against
the TorchScript merge-swap backend (one request at a time, weights swapped per adapter), in the
same process tree, in interleaved rounds, with every answer checked against PEFT.

    python benchmarks/bench_serving_http.py [--seconds 8] [--rounds 2] [--clients 32] [--hidden 256]

Prints the export and AOTInductor compile times, each round's req/s and p50/p99 latencies, and
the throughput ratio exported / merge-swap per round and overall. Absolute figures depend on the
machine and its load; the ratio is what to read."""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _paths import ensure_torchlora_importable  # noqa: E402

ensure_torchlora_importable()

import numpy as np  # noqa: E402
import torch  # noqa: E402

import serving_load  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RANKS = [1, 2, 3, 4, 5, 6, 7, 8]
TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


def build_server() -> Path:
    env = dict(os.environ, PYTHON=sys.executable)
    out = subprocess.run([str(ROOT / "scripts" / "build-cpp-example.sh")], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=1800)
    if out.returncode != 0:
        raise SystemExit(f"building examples/cpp failed:\n{out.stderr[-4000:]}")
    return ROOT / out.stdout.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per backend, interleaved")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="AOTInductor cpp.threads of the export")
    parser.add_argument("--binary", type=Path, help="a built lora_server (default: build it)")
    args = parser.parse_args()

    import peft

    from torchlora.export import export_for_serving

    binary = args.binary or build_server()
    root = Path(tempfile.mkdtemp(prefix="bench_serving_"))
    base = serving_load.tiny_llama(hidden=args.hidden)
    torch.manual_seed(1)
    inputs = [torch.randint(0, 64, (1, args.seq)) for _ in range(4)]
    refs: dict[tuple[str | None, int], np.ndarray] = {}
    folders: dict[str, Path] = {}
    with torch.no_grad():
        for i, x in enumerate(inputs):
            refs[(None, i)] = base(x).numpy()
        for seed, r in enumerate(RANKS):
            name = f"a{r}"
            torch.manual_seed(100 + seed)
            config = peft.LoraConfig(r=r, lora_alpha=2 * r + 1, target_modules=TARGETS, init_lora_weights=False)
            peft.get_peft_model(copy.deepcopy(base), config).save_pretrained(str(root / name))
            folders[name] = root / name
            model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(root / name)).eval()
            for i, x in enumerate(inputs):
                refs[(name, i)] = model(x).numpy()
        with warnings.catch_warnings():  # TorchScript is deprecated upstream; this is its baseline
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
            torch.jit.trace(copy.deepcopy(base), torch.cat(inputs[:2]), check_trace=False).save(str(root / "model.pt"))
    exported = export_for_serving(peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folders["a8"])).eval(),
                                  (torch.cat(inputs[:2]),), str(root / "model.pt2"), max_loras=len(RANKS),
                                  max_lora_rank=max(RANKS), inductor_configs={"cpp.threads": args.threads})
    print(f"export {exported.export_seconds:.1f} s, AOTInductor compile {exported.compile_seconds:.1f} s "
          f"({len(exported.layers)} LoRA layers, hidden {args.hidden}, seq {args.seq})")

    names = [None, *folders]
    bodies = {}
    for n in names:
        for i, x in enumerate(inputs):
            body = {"input": x.tolist(), "dtype": "int64"}
            if n is not None:
                body["adapter"] = n
            bodies[(n, i)] = json.dumps(body).encode()

    def check(key, raw: bytes):
        answer = json.loads(raw)
        got = np.asarray(answer.get("output"), dtype=np.float32)
        want = refs[key]
        if got.shape != want.shape or not np.allclose(got, want, atol=1e-4, rtol=1e-4):
            return f"output differs from PEFT's (max {np.abs(got - want).max() if got.shape == want.shape else 'shape'})"
        return None

    ratios = []
    totals = {"exported": serving_load.LoadResult(), "merge-swap": serving_load.LoadResult()}
    for round_ in range(args.rounds):
        results = {}
        for backend, model in (("exported", root / "model.pt2"), ("merge-swap", root / "model.pt")):
            with serving_load.Server(binary, model, folders) as server:
                result = serving_load.run_load(server.port, args.seconds, bodies, check, clients=args.clients)
                server.terminate()
            if result.failures:
                raise SystemExit(f"{backend}: {len(result.failures)} failures, e.g. {result.failures[:3]}")
            print(result.summary(f"round {round_ + 1} {backend}"))
            results[backend] = result
            total = totals[backend]
            total.requests += result.requests
            total.seconds += result.seconds
            total.latencies += result.latencies
        ratios.append(results["exported"].throughput / results["merge-swap"].throughput)
        print(f"round {round_ + 1} throughput ratio exported / merge-swap: {ratios[-1]:.2f}x")
    for backend, total in totals.items():
        print(total.summary(f"all rounds {backend}"))
    print(f"throughput ratio exported / merge-swap: {totals['exported'].throughput / totals['merge-swap'].throughput:.2f}x "
          f"(rounds: {', '.join(f'{r:.2f}x' for r in ratios)}; target >= 3x)")


if __name__ == "__main__":
    main()
