"""Tensor parallelism (DTensor) with two CPU processes on gloo, against one process. One
torchrun launch (tests/distributed_tp_worker.py) runs:

- the operators' sharding rules (tests/distributed_tp_ops_worker.py): outputs and gradients of
  the colwise, rowwise and replicated layouts equal the operators on the whole tensors;
- examples/distributed/train_tp.py: a tiny MLP under the plan a PEFT user writes (with
  dropout and lora_bias), a tiny llama and a tiny OPT under
  ``torchlora.distributed.parallelize_lora``, and a tiny llama loaded with transformers'
  ``tp_plan="auto"`` (embeddings adapted too): the loss of every step, the eval outputs and the
  saved adapter equal a one-process run of the same script in this process, and PEFT loads the
  adapter with the same outputs;
- in this process: the plans :func:`lora_tp_plan` builds and the errors it raises.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file

import torchlora
from distributed_launch import ROOT, torchrun

pytest.importorskip("torch.distributed.tensor.parallel")

import torchlora.distributed as tl_dist  # noqa: E402

SCRIPT = os.path.join(ROOT, "examples", "distributed", "train_tp.py")
WORKER = os.path.join(ROOT, "tests", "distributed_tp_worker.py")
LAUNCH_TIMEOUT = 300

# the plan of the original report (ColwiseParallel on up.base_layer and up.lora_B.default,
# RowwiseParallel on down.base_layer and down.lora_A.default), with dropout and lora_bias (added
# once after the rowwise reduction)
MLP_PEFT_STYLE = ("--model", "mlp", "--plan", "peft-style", "--lora-dropout", "0.1", "--init-lora-weights", "false",
                  "--lora-bias", "--steps", "5", "--lr", "0.05", "--distinct-batches", "1")
LLAMA_TORCHLORA = ("--model", "llama", "--plan", "torchlora", "--lora-dropout", "0.1", "--init-lora-weights",
                   "gaussian", "--target-embeddings", "--steps", "4", "--distinct-batches", "1")
# OPT: the MLP sharded, the attention's adapters replicated (OPT's attention needs all heads)
OPT_TORCHLORA = ("--model", "opt", "--plan", "torchlora", "--init-lora-weights", "false", "--steps", "3",
                 "--distinct-batches", "1")
# a tiny llama saved to a folder, loaded with tp_plan="auto": transformers shards q/k/v/gate/up
# colwise, o/down rowwise and embed_tokens on the vocabulary; torchlora shards the adapters like
# them when it injects them
LLAMA_HF_AUTO = ("--plan", "hf-auto", "--init-lora-weights", "gaussian", "--target-embeddings", "--steps", "4",
                 "--distinct-batches", "1")


def _example():
    spec = importlib.util.spec_from_file_location("train_tp_example", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_tp = _example()


@pytest.fixture(scope="module")
def parallel_runs(tmp_path_factory) -> dict:
    """One torchrun launch (2 processes): the operators' checks, then the example with each plan.
    Returns the launch's output and, per run, (its arguments, its output folder)."""
    root = tmp_path_factory.mktemp("tp")
    llama_dir = str(root / "llama")
    train_tp.build_base(train_tp.parse_args(["--model", "llama"])).save_pretrained(llama_dir)
    runs = {"mlp": MLP_PEFT_STYLE, "llama": LLAMA_TORCHLORA, "opt": OPT_TORCHLORA,
            "hf_auto": ("--model", llama_dir, *LLAMA_HF_AUTO)}
    argvs = {name: [*argv, "--output-dir", str(root / name)] for name, argv in runs.items()}
    out = torchrun(WORKER, [json.dumps(list(argvs.values()))], nproc=2, timeout=LAUNCH_TIMEOUT)
    return {"output": out, **{name: (argv, str(root / name)) for name, argv in argvs.items()}}


def test_sharding_rules_of_every_operator_match_whole_tensors(parallel_runs):
    out = parallel_runs["output"]
    assert "ALL OK" in out, out[-3000:]
    assert "OK lora_linear rowwise p=0.0 bias=True" in out and "OK mixed rowwise" in out
    assert "OK replicated factors synchronised" in out
    assert out.count("world size 2") == 4, out[-3000:]
    # mlp: up.lora_B (weight, bias), down.lora_A; llama: one factor of 7 layers x 2 blocks and
    # lora_embedding_A; opt: fc1.lora_B and fc2.lora_A of 2 blocks; hf_auto: as llama
    assert re.findall(r"sharded LoRA tensors: (\d+)", out) == ["3", "15", "4", "15"], out[-3000:]


def _one_process(argv: list[str], tmp_path) -> tuple[argparse.Namespace, list[float], torch.Tensor, dict]:
    """The same training in this process: (args, losses, eval outputs, saved adapter tensors)."""
    args = train_tp.parse_args([*argv, "--plan", "torchlora", "--output-dir", str(tmp_path / "one")])
    model = train_tp.build_peft_model(args)
    losses = train_tp.train(model, args)
    outputs = train_tp.eval_outputs(model, args)
    model.save_pretrained(str(tmp_path / "one" / "adapter"))
    return args, losses, outputs, load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))


def _assert_same_training(output_dir: str, single_losses: list[float], single_outputs: torch.Tensor,
                          single: dict) -> None:
    torch.testing.assert_close(torch.load(os.path.join(output_dir, "eval_outputs.pt")), single_outputs,
                               rtol=1e-4, atol=1e-5)
    with open(os.path.join(output_dir, "losses.json")) as f:
        parallel_losses = json.load(f)
    assert len(parallel_losses) == len(single_losses)
    torch.testing.assert_close(torch.tensor(parallel_losses), torch.tensor(single_losses), rtol=1e-5, atol=1e-6)
    assert parallel_losses[-1] < parallel_losses[0]  # it trains (on one batch, repeated)
    parallel = load_file(os.path.join(output_dir, "adapter", "adapter_model.safetensors"))
    assert sorted(parallel) == sorted(single) and parallel
    for key in single:
        torch.testing.assert_close(parallel[key], single[key], rtol=1e-4, atol=1e-5, msg=lambda m: f"{key}: {m}")


def _peft_outputs_equal(args: argparse.Namespace, adapter_dir: str) -> None:
    """PEFT loads the parallel run's adapter and gives the outputs of torchlora with it."""
    import peft

    inputs = train_tp.batches(args)[0][0]
    reference = torchlora.PeftModel.from_pretrained(train_tp.build_base(args), adapter_dir).eval()
    loaded = peft.PeftModel.from_pretrained(train_tp.build_base(args), adapter_dir).eval()
    with torch.no_grad():
        if isinstance(reference.get_base_model(), train_tp.TinyMLP):
            want, got = reference(inputs), loaded(inputs)
        else:
            want, got = reference(input_ids=inputs).logits, loaded(input_ids=inputs).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("run", ["mlp", "llama", "opt", "hf_auto"])
def test_two_processes_train_as_one_and_peft_loads_the_adapter(parallel_runs, run, tmp_path):
    argv, output_dir = parallel_runs[run]
    args, losses, outputs, single = _one_process(argv[:-2], tmp_path)
    _assert_same_training(output_dir, losses, outputs, single)
    _peft_outputs_equal(args, os.path.join(output_dir, "adapter"))


# ---- in this process ---------------------------------------------------------------------------------

def _lora_mlp(**config) -> torchlora.PeftModel:
    torch.manual_seed(0)
    config.setdefault("target_modules", ["up", "down"])
    return torchlora.get_peft_model(train_tp.TinyMLP(), torchlora.LoraConfig(**config))


def test_lora_tp_plan_puts_the_styles_on_base_layers_and_the_sharded_factor():
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    model = _lora_mlp(r=4)
    model.add_adapter("other", torchlora.LoraConfig(target_modules=["up"], r=2))
    plan = tl_dist.lora_tp_plan(model, {"up": "colwise", "down": "rowwise"})
    prefix = "base_model.model."
    assert {k: type(v) for k, v in plan.items()} == {
        f"{prefix}up.base_layer": ColwiseParallel,
        f"{prefix}up.lora_B.default": ColwiseParallel,
        f"{prefix}up.lora_B.other": ColwiseParallel,
        f"{prefix}down.base_layer": RowwiseParallel,
        f"{prefix}down.lora_A.default": RowwiseParallel,
    }


def test_lora_tp_plan_shards_plain_linear_layers_and_matches_globs():
    from torch.distributed.tensor.parallel import ColwiseParallel

    model = _lora_mlp(r=4, target_modules=["up"])
    plan = tl_dist.lora_tp_plan(model, {"*.up": "colwise", "down": "rowwise"})
    assert type(plan["base_model.model.up.base_layer"]) is ColwiseParallel
    assert "base_model.model.down" in plan  # not adapted: the style itself


def test_lora_tp_plan_shards_lora_embeddings_on_the_vocabulary():
    from torch.distributed.tensor.parallel import ParallelStyle, RowwiseParallel

    args = train_tp.parse_args(["--model", "llama", "--target-embeddings"])
    model = train_tp.build_peft_model(args)
    plan = tl_dist.lora_tp_plan(model, {"embed_tokens": "rowwise", "q_proj": "colwise"})
    assert type(plan["base_model.model.model.embed_tokens.base_layer"]) is RowwiseParallel
    assert isinstance(plan["base_model.model.model.embed_tokens.lora_embedding_A"], ParallelStyle)
    assert len(plan) == 2 + 2 * 2  # embed_tokens, and q_proj's base layer and lora_B in 2 blocks
    with pytest.raises(ValueError, match="a LoRA embedding is sharded 'rowwise'"):
        tl_dist.lora_tp_plan(model, {"embed_tokens": "colwise"})


@pytest.mark.parametrize("styles, error, match", [
    ({"up": "diagonal"}, ValueError, "must be one of"),
    ({"nothing": "colwise"}, ValueError, r"matches \['nothing'\]"),
    (["up"], TypeError, "must map module names"),
])
def test_lora_tp_plan_rejects_bad_styles(styles, error, match):
    with pytest.raises(error, match=match):
        tl_dist.lora_tp_plan(_lora_mlp(r=4), styles)


def test_lora_tp_plan_rejects_dora():
    with pytest.raises(NotImplementedError, match="DoRA"):
        tl_dist.lora_tp_plan(_lora_mlp(r=4, use_dora=True), {"up": "colwise"})


def test_rules_register_once_and_plain_models_are_left_alone():
    assert tl_dist.register_sharding_rules() is True
    assert tl_dist.register_sharding_rules() is True
    model = _lora_mlp(r=4)
    assert tl_dist.shard_adapters_like_base(model) == 0  # not a transformers tp_plan model
    x = torch.randn(3, 16)
    with torch.no_grad():  # plain tensors never take the DTensor path
        torch.testing.assert_close(model(x), model.get_base_model()(x) + 0.0)
