"""Loading adapters without random initialisation, ``low_cpu_mem_usage`` as in PEFT, the one key
mapping and the one config writer of ``torchlora.peft_format``, and ``LoraLayer.adapter_tensors``."""

from __future__ import annotations

import json
import os
import warnings

import peft
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import tiny_models as tm
import torchlora
from peft_parity import logits
from torchlora import peft_format
from torchlora.nn import LoraLayer

IDS = tm.input_ids()
PREFIX = "base_model.model."


def _peft_model(builder, **config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(builder(), peft.LoraConfig(**config)).eval()


def _inputs(builder):
    return {"pixel_values": tm.pixel_values()} if builder is tm.resnet else {"input_ids": IDS}


def _out(model, builder):
    with torch.no_grad():
        return logits(model(**_inputs(builder)))


CASES = {
    "linear+modules_to_save": (tm.bert_seq_cls, dict(task_type="SEQ_CLS", target_modules=["query", "value"], r=4,
                                                     lora_alpha=8, init_lora_weights=False)),
    "embedding": (tm.bert, dict(target_modules=["word_embeddings", "query"], r=2, init_lora_weights=False)),
    "lora_bias": (tm.llama, dict(target_modules=["q_proj", "o_proj"], r=4, lora_bias=True, init_lora_weights=False)),
    "conv2d": (tm.resnet, dict(target_modules=r".*\.convolution", r=2, init_lora_weights=False)),
    "conv1d": (tm.gpt2, dict(target_modules=["c_attn"], r=4, init_lora_weights=False)),
    "rslora+patterns": (tm.llama, dict(target_modules=["q_proj", "v_proj"], r=4, use_rslora=True,
                                       rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 16},
                                       init_lora_weights=False)),
}


@pytest.fixture(params=sorted(CASES))
def peft_folder(request, tmp_path):
    """(builder, folder written by PEFT, the PEFT model that wrote it)."""
    builder, config = CASES[request.param]
    ref = _peft_model(builder, **config)
    ref.save_pretrained(str(tmp_path))
    return builder, str(tmp_path), ref


# ------------------------------------------------------------------------- no random initialisation
_INITS = ("kaiming_uniform_", "kaiming_normal_", "uniform_", "normal_", "xavier_uniform_", "xavier_normal_",
          "zeros_", "ones_", "orthogonal_", "trunc_normal_")


@pytest.fixture
def init_calls(monkeypatch):
    """Devices of the tensors every ``torch.nn.init`` initialiser and ``torch.randn`` touch."""
    calls: list[str] = []
    # torch.device(...) as a context manager looks factory functions up once, on first use: use it
    # before torch.randn is replaced, so that it still recognises the real one
    with torch.device("meta"):
        torch.empty(0)
    for name in _INITS:
        real = getattr(torch.nn.init, name)

        def spy(tensor, *args, _real=real, _name=name, **kwargs):
            calls.append(f"{_name}:{tensor.device.type}")
            return _real(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.nn.init, name, spy)
    real_randn = torch.randn

    def randn_spy(*args, **kwargs):
        out = real_randn(*args, **kwargs)
        calls.append(f"randn:{out.device.type}")
        return out

    monkeypatch.setattr(torch, "randn", randn_spy)
    return calls


def test_from_pretrained_never_initialises_real_weights(peft_folder, init_calls):
    builder, folder, ref = peft_folder
    base = builder()
    init_calls.clear()
    loaded = torchlora.PeftModel.from_pretrained(base, folder)
    real = [call for call in init_calls if not call.endswith(":meta")]
    assert real == [], real
    assert not any(p.is_meta for p in loaded.parameters())
    torch.testing.assert_close(_out(loaded, builder), _out(ref, builder), rtol=1e-5, atol=1e-5)


def test_load_adapter_never_initialises_real_weights(peft_folder, init_calls):
    builder, folder, ref = peft_folder
    model = torchlora.PeftModel.from_pretrained(builder(), folder)
    init_calls.clear()
    model.load_adapter(folder, adapter_name="again")
    assert [call for call in init_calls if not call.endswith(":meta")] == []
    model.set_adapter("again")
    torch.testing.assert_close(_out(model, builder), _out(ref, builder), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_from_pretrained_and_load_adapter_accept_low_cpu_mem_usage(peft_folder, low_cpu_mem_usage):
    builder, folder, ref = peft_folder
    theirs = peft.PeftModel.from_pretrained(builder(), folder, low_cpu_mem_usage=low_cpu_mem_usage)
    ours = torchlora.PeftModel.from_pretrained(builder(), folder, low_cpu_mem_usage=low_cpu_mem_usage)
    torch.testing.assert_close(_out(ours, builder), _out(theirs, builder), rtol=1e-5, atol=1e-5)
    assert {n: p.dtype for n, p in ours.named_parameters()} == {n: p.dtype for n, p in theirs.named_parameters()}
    assert {n: p.requires_grad for n, p in ours.named_parameters()} == {
        n: p.requires_grad for n, p in theirs.named_parameters()}
    ours.load_adapter(folder, adapter_name="second", low_cpu_mem_usage=low_cpu_mem_usage)
    ours.set_adapter("second")
    torch.testing.assert_close(_out(ours, builder), _out(theirs, builder), rtol=1e-5, atol=1e-5)


def test_trainable_load_keeps_peft_trainability(peft_folder):
    builder, folder, _ = peft_folder
    theirs = peft.PeftModel.from_pretrained(builder(), folder, is_trainable=True)
    ours = torchlora.PeftModel.from_pretrained(builder(), folder, is_trainable=True)
    assert {n: p.requires_grad for n, p in ours.named_parameters()} == {
        n: p.requires_grad for n, p in theirs.named_parameters()}


def test_half_precision_base_gets_float32_adapters_like_peft(tmp_path):
    ref = _peft_model(tm.llama, target_modules=["q_proj", "v_proj"], r=4, init_lora_weights=False)
    ref.save_pretrained(str(tmp_path))
    for low in (False, True):
        theirs = peft.PeftModel.from_pretrained(tm.llama().to(torch.bfloat16), str(tmp_path), low_cpu_mem_usage=low)
        ours = torchlora.PeftModel.from_pretrained(tm.llama().to(torch.bfloat16), str(tmp_path),
                                                   low_cpu_mem_usage=low)
        assert {n: p.dtype for n, p in ours.named_parameters()} == {n: p.dtype for n, p in theirs.named_parameters()}
        kept = torchlora.PeftModel.from_pretrained(tm.llama().to(torch.bfloat16), str(tmp_path),
                                                   autocast_adapter_dtype=False, low_cpu_mem_usage=low)
        assert {p.dtype for n, p in kept.named_parameters() if "lora_" in n} == {torch.bfloat16}


def test_pissa_adapter_reloads_like_peft(tmp_path):
    """A PiSSA adapter saved without conversion rewrites the base weight on load (as in PEFT),
    so its factors are computed even though the file then provides them."""
    config = dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, init_lora_weights="pissa")
    ref = _peft_model(tm.llama, **config)
    with torch.no_grad():
        for name, param in ref.named_parameters():
            if "lora_B" in name:
                param.add_(0.01)  # a trained adapter differs from its initial factors
    ref.save_pretrained(str(tmp_path))
    theirs = peft.PeftModel.from_pretrained(tm.llama(), str(tmp_path))
    ours = torchlora.PeftModel.from_pretrained(tm.llama(), str(tmp_path))
    torch.testing.assert_close(_out(ours, tm.llama), _out(theirs, tm.llama), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------- low_cpu_mem_usage on new adapters
def _meta_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.is_meta}


@pytest.mark.parametrize("case", sorted(CASES))
def test_get_peft_model_low_cpu_mem_usage_matches_peft(case):
    builder, config = CASES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trained = peft.get_peft_model(builder(), peft.LoraConfig(**config)).eval()
        theirs = peft.get_peft_model(builder(), peft.LoraConfig(**config), low_cpu_mem_usage=True)
        ours = torchlora.get_peft_model(builder(), torchlora.LoraConfig(**config), low_cpu_mem_usage=True)
    assert _meta_names(ours) == _meta_names(theirs) and _meta_names(ours)
    assert {n: p.requires_grad for n, p in ours.named_parameters()} == {
        n: p.requires_grad for n, p in theirs.named_parameters()}
    state = peft.get_peft_model_state_dict(trained)
    peft.set_peft_model_state_dict(theirs, state, low_cpu_mem_usage=True)
    result = torchlora.set_peft_model_state_dict(ours, state, low_cpu_mem_usage=True)
    assert result.missing_keys == []
    assert not _meta_names(ours)
    ours.eval(), theirs.eval()
    torch.testing.assert_close(_out(ours, builder), _out(trained, builder), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_out(ours, builder), _out(theirs, builder), rtol=1e-5, atol=1e-5)
    assert {n: p.requires_grad for n, p in ours.named_parameters()} == {
        n: p.requires_grad for n, p in theirs.named_parameters()}


def test_meta_adapter_is_filled_also_without_the_flag():
    """PEFT copies into meta tensors (a silent no-op) unless low_cpu_mem_usage=True is passed again;
    torchlora always fills weights that are still on the meta device."""
    config = dict(target_modules=["q_proj", "v_proj"], r=4, init_lora_weights=False)
    trained = _peft_model(tm.llama, **config)
    ours = torchlora.get_peft_model(tm.llama(), torchlora.LoraConfig(**config), low_cpu_mem_usage=True).eval()
    torchlora.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(trained))
    assert not _meta_names(ours)
    torch.testing.assert_close(_out(ours, tm.llama), _out(trained, tm.llama), rtol=1e-5, atol=1e-5)


def test_partially_loaded_meta_adapter_reports_missing_keys():
    config = dict(target_modules=["q_proj", "v_proj"], r=4)
    trained = _peft_model(tm.llama, **config)
    ours = torchlora.get_peft_model(tm.llama(), torchlora.LoraConfig(**config), low_cpu_mem_usage=True)
    state = peft.get_peft_model_state_dict(trained)
    dropped = sorted(state)[0]
    del state[dropped]
    result = torchlora.set_peft_model_state_dict(ours, state, low_cpu_mem_usage=True)
    assert result.missing_keys == [PREFIX + peft_format.from_peft_key(dropped, "default")]
    assert _meta_names(ours) == set(result.missing_keys)


def test_add_adapter_low_cpu_mem_usage_then_load():
    config = dict(target_modules=["q_proj", "v_proj"], r=4, init_lora_weights=False)
    trained = _peft_model(tm.llama, **config)
    ours = torchlora.get_peft_model(tm.llama(), torchlora.LoraConfig(target_modules=["q_proj"], r=2))
    ours.add_adapter("other", torchlora.LoraConfig(**config), low_cpu_mem_usage=True)
    assert _meta_names(ours) and all(".other." in n for n in _meta_names(ours))
    torchlora.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(trained), adapter_name="other",
                                        low_cpu_mem_usage=True)
    assert not _meta_names(ours)
    ours.set_adapter("other")
    ours.eval()
    torch.testing.assert_close(_out(ours, tm.llama), _out(trained, tm.llama), rtol=1e-5, atol=1e-5)


def test_inject_adapter_in_model_low_cpu_mem_usage_matches_peft():
    config = dict(target_modules=["q_proj", "v_proj"], r=4, init_lora_weights=False)
    trained = _peft_model(tm.llama, **config)
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(**config), tm.llama(), low_cpu_mem_usage=True)
    ours = torchlora.inject_adapter_in_model(torchlora.LoraConfig(**config), tm.llama(), low_cpu_mem_usage=True)
    assert _meta_names(ours) == _meta_names(theirs) and _meta_names(ours)
    state = peft.get_peft_model_state_dict(trained)  # keys with the base_model.model. prefix
    torchlora.set_peft_model_state_dict(ours, state, low_cpu_mem_usage=True)
    assert not _meta_names(ours)
    torch.testing.assert_close(_out(ours.eval(), tm.llama), _out(trained, tm.llama), rtol=1e-5, atol=1e-5)


def test_saving_an_unloaded_meta_adapter_is_an_error(tmp_path):
    ours = torchlora.get_peft_model(tm.llama(), torchlora.LoraConfig(target_modules=["q_proj"], r=2),
                                    low_cpu_mem_usage=True)
    with pytest.raises(ValueError, match=r"q_proj\.lora_A\.weight.*meta device"):
        ours.save_pretrained(str(tmp_path))
    assert not os.path.exists(tmp_path / "adapter_config.json")


def test_unsupported_load_options_are_errors(tmp_path):
    _peft_model(tm.llama, target_modules=["q_proj"], r=2).save_pretrained(str(tmp_path))
    with pytest.raises(NotImplementedError, match="ephemeral_gpu_offload"):
        torchlora.PeftModel.from_pretrained(tm.llama(), str(tmp_path), ephemeral_gpu_offload=True)
    with pytest.raises(NotImplementedError, match="key_mapping"):
        torchlora.PeftModel.from_pretrained(tm.llama(), str(tmp_path), key_mapping={"a": "b"})


# ------------------------------------------------------------------------- one shape check
def test_shape_error_names_file_key_expected_and_actual(tmp_path):
    ref = _peft_model(tm.llama, target_modules=["q_proj"], r=4)
    ref.save_pretrained(str(tmp_path))
    path = os.path.join(str(tmp_path), "adapter_model.safetensors")
    with safe_open(path, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    key = f"{PREFIX}model.layers.1.self_attn.q_proj.lora_B.weight"
    tensors[key] = torch.zeros(32, 5)
    save_file(tensors, path, metadata={"format": "pt"})
    model = tm.llama()
    with pytest.raises(ValueError) as info:
        torchlora.PeftModel.from_pretrained(model, str(tmp_path))
    message = str(info.value)
    assert message.startswith(f"{path}: key {key!r} has shape (32, 5) but the model expects (32, 4)"), message
    assert not any(isinstance(m, LoraLayer) for m in model.modules())


# ------------------------------------------------------------------------- the key mapping
@pytest.mark.parametrize("case", sorted(CASES))
def test_key_pair_matches_peft(case):
    builder, config = CASES[case]
    ref = _peft_model(builder, **config)
    file_keys = set(peft.get_peft_model_state_dict(ref))
    model_keys = set(ref.state_dict())
    lora_model_keys = {k for k in model_keys if ".lora_" in k}
    mapped = {peft_format.to_peft_key(k[len(PREFIX):], "default") for k in lora_model_keys}
    assert mapped == {k for k in file_keys if ".lora_" in k}
    for key in lora_model_keys:
        assert PREFIX + peft_format.from_peft_key(peft_format.to_peft_key(key[len(PREFIX):], "default"),
                                                  "default") == key


def test_key_pair_examples():
    assert peft_format.to_peft_key("a.b.lora_A.x.weight", "x") == "base_model.model.a.b.lora_A.weight"
    assert peft_format.to_peft_key("a.lora_embedding_B.x", "x", with_prefix=False) == "a.lora_embedding_B"
    assert peft_format.to_peft_key("a.lora_B.x.bias", "x") == "base_model.model.a.lora_B.bias"
    assert peft_format.to_peft_key("classifier.weight", "x") == "base_model.model.classifier.weight"
    assert peft_format.to_peft_key("a.lora_A.other.weight", "x") == "base_model.model.a.lora_A.other.weight"
    assert peft_format.from_peft_key("base_model.model.a.lora_A.weight", "x") == "a.lora_A.x.weight"
    assert peft_format.from_peft_key("a.lora_embedding_A", "x") == "a.lora_embedding_A.x"
    assert peft_format.from_peft_key("base_model.model.classifier.bias", "x") == "classifier.bias"


# ------------------------------------------------------------------------- the one config writer
def test_both_config_writers_go_through_config_to_peft_json(tmp_path, monkeypatch):
    seen = []
    real = peft_format.config_to_peft_json

    def spy(config_dict):
        seen.append(dict(config_dict))
        return real(config_dict)

    monkeypatch.setattr(peft_format, "config_to_peft_json", spy)
    config = torchlora.LoraConfig(target_modules=["q_proj"], r=2)
    config.save_pretrained(str(tmp_path / "config"))
    torchlora.get_peft_model(tm.llama(), torchlora.LoraConfig(target_modules=["q_proj"], r=2)).save_pretrained(
        str(tmp_path / "model"))
    assert len(seen) == 2


def test_config_save_pretrained_writes_what_the_model_writes(tmp_path):
    config = torchlora.LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], r=4,
                                  exclude_modules=["lm_head"], inference_mode=True)
    config.save_pretrained(str(tmp_path / "config"))
    torchlora.get_peft_model(tm.llama(), config).save_pretrained(str(tmp_path / "model"))
    on_its_own = json.loads((tmp_path / "config" / "adapter_config.json").read_text())
    with_model = json.loads((tmp_path / "model" / "adapter_config.json").read_text())
    assert on_its_own == with_model
    assert set(on_its_own) <= peft_format.PEFT_LORA_CONFIG_KEYS
    assert [n for n in os.listdir(tmp_path / "config")] == ["adapter_config.json"]  # no temporary file left
    theirs = peft.LoraConfig.from_pretrained(str(tmp_path / "config"))
    assert theirs.r == 4 and set(theirs.exclude_modules) == {"lm_head"}


# ------------------------------------------------------------------------- LoraLayer.adapter_tensors
@pytest.mark.parametrize("case", sorted(CASES))
def test_adapter_tensors_are_peft_local_names(case):
    builder, config = CASES[case]
    ref = _peft_model(builder, **config)
    ours = torchlora.get_peft_model(builder(), torchlora.LoraConfig(**config))
    theirs_layers = {n: m for n, m in ref.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    for name, layer in ours.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        tensors = layer.adapter_tensors("default")
        expected = {k.replace(".default", "") for k in theirs_layers[name].state_dict()
                    if ".default" in k and "base_layer" not in k}
        assert set(tensors) == expected and set(tensors) <= set(peft_format.LORA_TENSOR_NAMES)
        params = {id(p) for p in layer.parameters()}
        assert all(id(t) in params for t in tensors.values())  # live parameters, not copies
        assert layer.adapter_tensors("nope") == {}
