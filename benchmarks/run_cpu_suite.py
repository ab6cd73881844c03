"""torchlora vs PEFT vs the bare base layer on the CPU, side by side in one process.

    python benchmarks/run_cpu_suite.py --out benchmarks/results          # full suite
    python benchmarks/run_cpu_suite.py --quick --out /tmp/lora-bench     # smoke test

Layers (float32 and under bfloat16 autocast), a model step (``get_peft_model`` on a small Llama,
dense upstream gradient) and the all-MiniLM-L6-v2 step; then every row that has a target, against
it. Writes ``cpu.md`` (tables), ``cpu.json`` (raw numbers) and ``cpu.png`` (chart) into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _paths import ensure_torchlora_importable  # noqa: E402

ensure_torchlora_importable()

import torch  # noqa: E402

import cpu_layers  # noqa: E402
import minilm_step  # noqa: E402
import model_step  # noqa: E402
import report  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--quick", action="store_true")
    quick = pre.parse_known_args(argv)[0].quick  # --quick changes the defaults below
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few rounds (smoke test)")
    # 25: with 15 the ratios of one run spread by +-0.03 on this 2-core machine, as wide as the
    # targets' margins
    parser.add_argument("--layer-rounds", type=int, default=2 if quick else 25)
    parser.add_argument("--skip-e2e", action="store_true", help="skip the all-MiniLM-L6-v2 step")
    parser.add_argument("--skip-model", action="store_true", help="skip the get_peft_model Llama step")
    minilm_step.add_arguments(parser, quick=quick)
    return parser.parse_args(argv)


def machine_info(threads: int) -> dict:
    return {
        "torch": torch.__version__, "threads": threads, "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(), "load_avg_start": os.getloadavg()[0],
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    info = machine_info(args.threads)
    info["layer_rounds"] = args.layer_rounds
    started = time.perf_counter()
    layer_rows = []
    for case in cpu_layers.default_cases(args.quick):
        rows = cpu_layers.run_case(case, args.layer_rounds)
        for row in rows:
            print(report.layer_line(row), flush=True)
        layer_rows.extend(rows)
    model = None
    if not args.skip_model:
        sizes = ["--hidden", "64", "--layers", "1", "--batch", "1", "--seq", "16", "--rounds", "2"] if args.quick else []
        model = model_step.run(model_step.parse_args(["--threads", str(args.threads), *sizes]))
        print(model_step.markdown(model), flush=True)
    e2e = None
    if not args.skip_e2e:
        e2e = minilm_step.run(args)
        print(report.e2e_line(e2e), flush=True)
    info["load_avg_end"] = os.getloadavg()[0]
    info["seconds"] = time.perf_counter() - started
    results = {"machine": info, "layers": layer_rows, "model_step": model, "minilm": e2e, "quick": args.quick}
    print(report.targets_table(results), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cpu.json").write_text(json.dumps(results, indent=2))
    (args.out / "cpu.md").write_text(report.markdown(results))
    report.chart(results, args.out / "cpu.png")
    print(f"wrote {args.out / 'cpu.md'}, {args.out / 'cpu.png'} in {info['seconds']:.0f} s")
    return results


if __name__ == "__main__":
    main()
