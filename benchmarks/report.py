"""Markdown tables and the chart of the CPU suite's results."""

from __future__ import annotations

from pathlib import Path


def _mb(nbytes: float) -> str:
    return f"{nbytes / 2**20:.2f}"


def layer_line(row: dict) -> str:
    return (f"{row['case']:<40} {row['mode']:<14} p={row['dropout']:<4} base {row['base_ms']:8.2f} ms | "
            f"peft {row['peft_ms']:8.2f} ms ({row['peft_ratio']:.3f}x) | "
            f"torchlora {row['torchlora_ms']:8.2f} ms ({row['torchlora_ratio']:.3f}x)")


def e2e_line(e2e: dict) -> str:
    return (f"all-MiniLM-L6-v2 step: frozen fwd+bwd {e2e['frozen_s']:.3f} s | peft {e2e['peft_s']:.3f} s "
            f"({e2e['peft_ratio']:.3f}x) | torchlora {e2e['torchlora_s']:.3f} s ({e2e['torchlora_ratio']:.3f}x)")


# The targets of the CPU path (linear T=2048 d=1024 r=16; medians of interleaved rounds).
TARGET_CASE = "linear T=2048 d=1024 r=16"
LAYER_TARGETS = [  # (case suffix, mode, dropout, goal)
    ("", "eval fwd", 0.0, 1.03),
    ("", "train fwd+bwd", 0.0, 1.08),
    ("", "train fwd+bwd", 0.05, 1.12),
    (" bfloat16 autocast", "eval fwd", 0.0, 1.03),
    (" bfloat16 autocast", "train fwd+bwd", 0.0, 1.08),
    (" bfloat16 autocast", "train fwd+bwd", 0.05, 1.12),
]
MINILM_GOAL = 1.10


def target_rows(results: dict) -> list[tuple[str, float, float, float]]:
    """(what, goal, torchlora / base, PEFT / base) for every measured row that has a target."""
    rows = []
    for suffix, mode, dropout, goal in LAYER_TARGETS:
        for row in results["layers"]:
            if row["case"] == TARGET_CASE + suffix and row["mode"] == mode and row["dropout"] == dropout:
                what = f"{row['case']} {mode}, dropout {dropout}"
                rows.append((what, goal, row["torchlora_ratio"], row["peft_ratio"]))
    e2e = results.get("minilm")
    if e2e:
        rows.append(("all-MiniLM-L6-v2 step / frozen", MINILM_GOAL, e2e["torchlora_ratio"], e2e["peft_ratio"]))
    return rows


def targets_table(results: dict) -> str:
    lines = [f"Against the targets ({results['machine']['threads']} threads):", "",
             "| row | goal | torchlora | PEFT | met |", "|---|---:|---:|---:|---|"]
    for what, goal, ours, peft in target_rows(results):
        lines.append(f"| {what} | <= {goal:.2f} | {ours:.3f} | {peft:.3f} | {'yes' if ours <= goal else 'no'} |")
    model = results.get("model_step")
    if model:
        ratios = model["ratio_to_frozen"]
        lines.append(f"| model step (get_peft_model, Llama hidden {model['hidden']}, {model['layers']} layers) "
                     f"/ frozen | | {ratios['torchlora']:.3f} | {ratios['peft']:.3f} | |")
    return "\n".join(lines) + "\n"


def markdown(results: dict) -> str:
    info = results["machine"]
    lines = [
        "# torchlora CPU benchmarks",
        "",
        f"torch {info['torch']}, {info['threads']} threads (`torch.set_num_threads`), {info['cores']} cores, "
        f"{info['date']}, load average {info['load_avg_start']:.1f} at start / {info['load_avg_end']:.1f} at end, "
        f"{info['seconds']:.0f} s in all{' (quick mode: smoke-test sizes, not meaningful)' if results['quick'] else ''}.",
        "",
        f"Times are medians over {info.get('layer_rounds', 'the')} interleaved rounds; ratios are medians of the per-round ratio to the "
        "frozen base layer (eval: `torch.no_grad()` forward; train: forward + backward with the input "
        "requiring grad, i.e. dx only for the base). Saved extra = bytes the layer saves for backward "
        "beyond what the base layer saves (distinct storages; parameters and the layer input excluded).",
        "",
        "| layer | mode | dropout | base ms | PEFT ms | torchlora ms | PEFT / base | torchlora / base "
        "| PEFT saved extra MiB | torchlora saved extra MiB |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["layers"]:
        peft_saved = _mb(row["peft_saved_extra_bytes"]) if "peft_saved_extra_bytes" in row else ""
        tl_saved = _mb(row["torchlora_saved_extra_bytes"]) if "torchlora_saved_extra_bytes" in row else ""
        lines.append(
            f"| {row['case']} | {row['mode']} | {row['dropout']} | {row['base_ms']:.2f} | {row['peft_ms']:.2f} | "
            f"{row['torchlora_ms']:.2f} | {row['peft_ratio']:.3f} | {row['torchlora_ratio']:.3f} | "
            f"{peft_saved} | {tl_saved} |"
        )
    e2e = results.get("minilm")
    if e2e:
        mem = e2e["memory"]
        lines += [
            "",
            f"## all-MiniLM-L6-v2 LoRA fine-tuning step (batch {e2e['batch']} x {e2e['seq']} tokens, "
            f"targets query/key/value/dense, r={e2e['r']}, dropout {e2e['dropout']})",
            "",
            "Step = forward + loss + backward (the optimizer update is left out). *Frozen* is the model "
            "without adapters, its input embeddings requiring grad (dx through every layer). Step times: "
            f"the three models in one process, {e2e['rounds']} interleaved rounds, medians. Memory: each "
            "variant alone in a fresh subprocess; peak RSS (`VmHWM` of the fresh process; includes Python, torch "
            "and the weights), and what the training steps added over the RSS just before the first step.",
            "",
            "| variant | step s | / frozen | peak RSS MiB | added by steps MiB |",
            "|---|---:|---:|---:|---:|",
            f"| frozen fwd+bwd | {e2e['frozen_s']:.3f} | 1.000 | {mem['frozen']['peak_rss_mb']:.0f} | "
            f"{mem['frozen']['step_added_mb']:.0f} |",
            f"| PEFT | {e2e['peft_s']:.3f} | {e2e['peft_ratio']:.3f} | {mem['peft']['peak_rss_mb']:.0f} | "
            f"{mem['peft']['step_added_mb']:.0f} |",
            f"| torchlora | {e2e['torchlora_s']:.3f} | {e2e['torchlora_ratio']:.3f} | "
            f"{mem['torchlora']['peak_rss_mb']:.0f} | {mem['torchlora']['step_added_mb']:.0f} |",
            "",
            f"PEFT step / torchlora step: {e2e['peft_over_torchlora']:.2f}x.",
        ]
    if results.get("model_step"):
        from model_step import markdown as model_markdown

        lines += ["", "## Model step (`model_step.py`)", "", model_markdown(results["model_step"]).rstrip()]
    lines += ["", "## Against the targets", "", targets_table(results).rstrip()]
    return "\n".join(lines) + "\n"


def chart(results: dict, path: Path) -> None:
    """Bars of time / base for PEFT and torchlora, one group per (layer, mode, dropout)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, peft, ours = [], [], []
    for row in results["layers"]:
        labels.append(f"{row['case']}\n{row['mode']} p={row['dropout']}")
        peft.append(row["peft_ratio"])
        ours.append(row["torchlora_ratio"])
    e2e = results.get("minilm")
    if e2e:
        labels.append(f"all-MiniLM-L6-v2 step\nB={e2e['batch']} L={e2e['seq']} p={e2e['dropout']}")
        peft.append(e2e["peft_ratio"])
        ours.append(e2e["torchlora_ratio"])
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(labels) + 1.5))
    ys = range(len(labels))
    ax.barh([y + 0.2 for y in ys], peft, height=0.4, label="PEFT", color="#b0b0b0")
    ax.barh([y - 0.2 for y in ys], ours, height=0.4, label="torchlora", color="#2a6fb0")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(list(ys))
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("time / frozen base (lower is better; 1.0 = the base layer alone)")
    ax.set_title(f"LoRA on CPU, {results['machine']['threads']} threads")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def require_positive(parser, args, names: tuple[str, ...]) -> None:
    """``parser.error`` (exit 2) naming the first option in ``names`` that is not positive."""
    for name in names:
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")


def print_and_save(result: dict, table: str, json_path: Path | None) -> dict:
    """Print a benchmark's markdown table and, when asked, write its raw numbers as JSON."""
    import json

    print(table, end="")
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=1))
    return result
