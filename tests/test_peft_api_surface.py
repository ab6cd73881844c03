"""PEFT's public LoRA API exists in torchlora at the same paths (lists computed from the real
peft), what torchlora implements behaves as PEFT on tiny models, and what it does not implement
raises an error that names what is missing."""

from __future__ import annotations

import dataclasses
import inspect
import os
import warnings

import peft
import peft.tuners.lora as peft_lora
import pytest
import torch
from torch import nn

import tiny_models as tm
import torchlora
import torchlora.tuners.lora as ours_lora
from peft_parity import build_pair

pytestmark = pytest.mark.filterwarnings("ignore")


def _public_members(cls: type) -> list[str]:
    """Public names of a PEFT class that plain ``torch.nn.Module`` does not have."""
    return sorted(name for name, _ in inspect.getmembers(cls)
                  if not name.startswith("_") and not hasattr(nn.Module, name))


def _lora_names_at_peft_top_level() -> list[str]:
    """Names ``peft`` exports at top level that are defined in ``peft.tuners.lora``."""
    names = []
    for name in dir(peft):
        obj = getattr(peft, name)
        if not name.startswith("_") and (getattr(obj, "__module__", "") or "").startswith("peft.tuners.lora"):
            names.append(name)
    return sorted(names)


# LoRA helpers PEFT defines in peft.utils and exports at top level, next to the tuner's own names
_PEFT_UTILS_LORA_NAMES = ("load_peft_weights", "cast_mixed_precision_params", "replace_lora_weights_loftq")


def _llama_config(lib, **kw):
    return lib.LoraConfig(target_modules=["q_proj", "v_proj"], r=4, init_lora_weights=False, **kw)


# ---------------------------------------------------------------- (a) the names exist

def test_tuners_lora_all_mirrors_peft():
    assert set(peft_lora.__all__) <= set(ours_lora.__all__)
    missing = [name for name in peft_lora.__all__ if not hasattr(ours_lora, name)]
    assert not missing


def test_tuners_lora_layer_aliases():
    assert ours_lora.Linear is torchlora.LoraLinear
    assert ours_lora.Embedding is torchlora.LoraEmbedding
    assert ours_lora.Conv2d is torchlora.LoraConv2d
    assert ours_lora.Conv3d is torchlora.LoraConv3d
    assert ours_lora.LoraModel is torchlora.LoraModel
    assert ours_lora.LoraConfig is torchlora.LoraConfig


@pytest.mark.parametrize("peft_cls,ours_cls", [(peft.PeftModel, torchlora.PeftModel),
                                                (peft_lora.LoraModel, torchlora.LoraModel)],
                         ids=["PeftModel", "LoraModel"])
def test_model_classes_have_peft_public_members(peft_cls, ours_cls):
    members = _public_members(peft_cls)
    assert members  # the walk found PEFT's API
    missing = [name for name in members if not hasattr(ours_cls, name)]
    assert not missing


def test_lora_layer_has_peft_public_members():
    # merged_adapters is an instance attribute in torchlora: ask a layer
    layer = torchlora.LoraLinear(nn.Linear(4, 3), "default", r=2, lora_alpha=2)
    members = _public_members(peft_lora.LoraLayer)
    assert "get_base_weight" in members
    missing = [name for name in members if not hasattr(layer, name)]
    assert not missing


def test_top_level_lora_names():
    names = _lora_names_at_peft_top_level()
    assert "LoraRuntimeConfig" in names and "convert_to_lora" in names
    for name in names + list(_PEFT_UTILS_LORA_NAMES):
        assert hasattr(peft, name)
        assert hasattr(torchlora, name), name
    assert torchlora.utils.load_peft_weights is torchlora.load_peft_weights
    assert torchlora.utils.cast_mixed_precision_params is torchlora.cast_mixed_precision_params


@pytest.mark.parametrize("name", ["ArrowConfig", "BdLoraConfig", "EvaConfig", "KasaConfig", "LoftQConfig",
                                  "LoraGAConfig", "LoraRuntimeConfig", "MontecloraConfig", "VeloraConfig"])
def test_sub_configs_have_peft_fields_and_defaults(name):
    def defaults(cls):
        return {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
                for f in dataclasses.fields(cls)}

    assert defaults(getattr(ours_lora, name)) == defaults(getattr(peft_lora, name))


@pytest.mark.parametrize("function", ["convert_to_lora", "save_as_lora", "create_arrow_model", "get_eva_state_dict",
                                      "initialize_lora_eva_weights", "preprocess_loraga"])
def test_unsupported_functions_keep_peft_signatures(function):
    ours = inspect.signature(getattr(ours_lora, function))
    ref = inspect.signature(getattr(peft_lora, function))
    assert list(ours.parameters) == list(ref.parameters)


# ---------------------------------------------------------------- (b) behaviour against PEFT

def test_base_model_torch_dtype_and_active_enabled_adapter():
    ref, ours = build_pair(tm.llama, _llama_config)
    assert ours.base_model_torch_dtype == ref.base_model_torch_dtype == torch.float32
    assert ours.has_active_enabled_adapter is ref.has_active_enabled_adapter is True
    with ref.disable_adapter(), ours.disable_adapter():
        assert ours.has_active_enabled_adapter is ref.has_active_enabled_adapter is False
    assert ours.has_active_enabled_adapter is ref.has_active_enabled_adapter is True
    ref_mlp, ours_mlp = build_pair(tm.plain_mlp, lambda lib: lib.LoraConfig(target_modules=["lin0"], r=2))
    assert ours_mlp.base_model_torch_dtype is ref_mlp.base_model_torch_dtype is None


@pytest.mark.parametrize("extra", [{}, {"use_dora": True}, {"trainable_token_indices": [1, 2]}],
                         ids=["lora", "dora", "trainable_tokens"])
def test_supports_lora_conversion(extra):
    ref, ours = build_pair(tm.llama, lambda lib: _llama_config(lib, **extra))
    expected = ref.supports_lora_conversion()
    assert ours.supports_lora_conversion() is expected
    assert ours.base_model.supports_lora_conversion() is ref.base_model.supports_lora_conversion()
    assert expected is (not extra.get("trainable_token_indices"))


def test_prepare_model_for_gradient_checkpointing():
    ref, ours = build_pair(tm.llama, _llama_config)
    ids = tm.input_ids()
    for model in (ref, ours):
        base = model.get_base_model()
        assert not base.get_input_embeddings()(ids).requires_grad
        assert model.prepare_model_for_gradient_checkpointing(base) is None
        assert base.get_input_embeddings()(ids).requires_grad


@dataclasses.dataclass
class _DataclassConfig:
    model_type: str = "toy"
    hidden: int = 3


@pytest.mark.parametrize("builder", [tm.llama, tm.plain_mlp, "dataclass"])
def test_get_model_config(builder):
    if builder == "dataclass":
        model = tm.plain_mlp()
        model.config = _DataclassConfig()
    else:
        model = builder()
    assert torchlora.LoraModel.get_model_config(model) == peft_lora.LoraModel.get_model_config(model)


def test_tuner_class_attributes():
    assert torchlora.LoraModel.tuner_layer_cls is torchlora.LoraLayer
    assert torchlora.LoraModel.uses_shared_state is peft_lora.LoraModel.uses_shared_state is False
    ours, ref = torchlora.LoraModel.target_module_mapping, peft_lora.LoraModel.target_module_mapping
    common = set(ours) & set(ref)
    assert {"llama", "gpt2", "t5", "bert"} <= common
    for model_type in common:
        mine, theirs = ours[model_type], ref[model_type]
        assert (mine == theirs) if isinstance(theirs, str) else (set(mine) == set(theirs)), model_type


def test_base_weight_get_and_set():
    ref, ours = build_pair(tm.llama, _llama_config)
    path = "base_model.model.model.layers.0.self_attn.q_proj"
    ref_layer, our_layer = ref.get_submodule(path), ours.get_submodule(path)
    torch.testing.assert_close(our_layer.get_base_weight(), ref_layer.get_base_weight(), rtol=0, atol=0)
    new = torch.randn_like(ref_layer.get_base_weight())
    ref_layer.set_base_weight(new.clone())
    our_layer.set_base_weight(new.clone())
    x = torch.randn(2, our_layer.in_features)
    with torch.no_grad():
        torch.testing.assert_close(our_layer(x), ref_layer(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="tensor"):
        our_layer.set_base_weight([1.0])
    assert our_layer.frozen_peft_weight_names == ref_layer.frozen_peft_weight_names == {}
    assert our_layer.quantization_backend is ref_layer.quantization_backend is None
    assert our_layer.supports_lora_conversion() is ref_layer.supports_lora_conversion() is True
    assert our_layer.resolve_lora_variant(config=_llama_config(torchlora)) is None
    assert ref_layer.resolve_lora_variant(config=_llama_config(peft)) is None
    assert our_layer.lora_variants == {(): None}
    with pytest.raises(TypeError, match="LoraConfig"):
        our_layer.resolve_lora_variant(config={"r": 4})


@pytest.mark.parametrize("safe_serialization", [True, False])
def test_load_peft_weights(tmp_path, safe_serialization):
    ref, _ = build_pair(tm.llama, _llama_config)
    ref.save_pretrained(str(tmp_path), safe_serialization=safe_serialization)
    expected = peft.load_peft_weights(str(tmp_path), device="cpu")
    loaded = torchlora.load_peft_weights(str(tmp_path), device="cpu")
    assert sorted(loaded) == sorted(expected)
    for key in expected:
        torch.testing.assert_close(loaded[key], expected[key], rtol=0, atol=0)
    with pytest.raises(TypeError, match="bogus"):
        torchlora.load_peft_weights(str(tmp_path), bogus=1)
    with pytest.raises(NotImplementedError, match="key_mapping"):
        torchlora.load_peft_weights(str(tmp_path), key_mapping={"a": "b"})
    with pytest.raises((FileNotFoundError, ValueError), match="adapter"):
        torchlora.load_peft_weights(str(tmp_path / "nothing"))


def test_cast_mixed_precision_params():
    ref, ours = build_pair(tm.llama, _llama_config)
    peft.cast_mixed_precision_params(ref, torch.bfloat16)
    torchlora.cast_mixed_precision_params(ours, torch.bfloat16)
    ref_dtypes = {n: p.dtype for n, p in ref.named_parameters()}
    our_dtypes = {n: p.dtype for n, p in ours.named_parameters()}
    assert our_dtypes == ref_dtypes
    assert {torch.bfloat16, torch.float32} == set(our_dtypes.values())
    with pytest.raises(TypeError, match="dtype"):
        torchlora.cast_mixed_precision_params(ours, torch.int8)


def test_subtract_mutated_init_matches_peft():
    def pissa(lib):
        return lib.LoraConfig(target_modules=["q_proj", "v_proj"], r=2, init_lora_weights="pissa")

    ref, ours = build_pair(tm.llama, pissa)
    initial = peft.get_peft_model_state_dict(ref)
    g = torch.Generator().manual_seed(3)
    trained = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in initial.items()}
    expected = ref.base_model.subtract_mutated_init(trained, "default", {})
    got = ours.base_model.subtract_mutated_init(trained, "default")
    assert sorted(got) == sorted(expected) and expected
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)
    with pytest.raises(ValueError, match="nope"):
        ours.base_model.subtract_mutated_init(trained, "nope")


def test_model_card_like_peft(tmp_path):
    from huggingface_hub import ModelCard

    ref, ours = build_pair(tm.llama, lambda lib: _llama_config(lib, task_type="CAUSAL_LM"))
    for model in (ref, ours):
        model.get_base_model().config._name_or_path = "org/tiny-llama"
    ref.create_or_update_model_card(str(tmp_path / "ref"))
    ours.create_or_update_model_card(str(tmp_path / "ours"))
    ref_card, our_card = (ModelCard.load(str(tmp_path / d / "README.md")) for d in ("ref", "ours"))
    for key in ("library_name", "tags", "base_model", "pipeline_tag"):
        assert our_card.data.to_dict().get(key) == ref_card.data.to_dict().get(key), key
    assert our_card.data.library_name == "peft" and "lora" in our_card.data.tags
    version_line = f"- torchlora {torchlora.__version__}"
    assert our_card.text.count(version_line) == 1
    # updating keeps what was there and adds the version once
    ours.create_or_update_model_card(str(tmp_path / "ours"))
    again = ModelCard.load(str(tmp_path / "ours" / "README.md"))
    assert again.text.count(version_line) == 1 and again.data.to_dict() == our_card.data.to_dict()
    with pytest.raises(ValueError, match="file"):
        ours.create_or_update_model_card(str(tmp_path / "ours" / "README.md"))


# ---------------------------------------------------------------- (c) what is not implemented says so

def test_prompt_learning_methods_raise_like_peft():
    ref, ours = build_pair(tm.llama, _llama_config)
    with pytest.raises(AttributeError):
        ref.get_prompt(1)
    with pytest.raises(AttributeError):
        ref.get_prompt_embedding_to_save("default")
    with pytest.raises(AttributeError, match="prompt learning only; LoRA models have no prompt encoder"):
        ours.get_prompt(1)
    with pytest.raises(AttributeError, match="prompt learning only; LoRA models have no prompt encoder"):
        ours.get_prompt_embedding_to_save("default")


@pytest.mark.parametrize("call,missing", [
    (lambda: ours_lora.convert_to_lora(nn.Linear(2, 2), 4), "convert_to_lora"),
    (lambda: ours_lora.save_as_lora("x", nn.Linear(2, 2), 4), "save_as_lora"),
    (lambda: ours_lora.create_arrow_model(nn.Linear(2, 2), [], ours_lora.ArrowConfig()), "Arrow"),
    (lambda: ours_lora.get_eva_state_dict(nn.Linear(2, 2), []), "get_eva_state_dict"),
    (lambda: ours_lora.initialize_lora_eva_weights(nn.Linear(2, 2)), "initialize_lora_eva_weights"),
    (lambda: ours_lora.preprocess_loraga(nn.Linear(2, 2), None, lambda: None), "LoRA-GA"),
    (lambda: torchlora.replace_lora_weights_loftq(nn.Linear(2, 2)), "LoftQ"),
    (lambda: ours_lora.GPTQLoraLinear(nn.Linear(2, 2), "default"), "GPTQ"),
], ids=["convert_to_lora", "save_as_lora", "create_arrow_model", "get_eva_state_dict",
        "initialize_lora_eva_weights", "preprocess_loraga", "replace_lora_weights_loftq", "GPTQLoraLinear"])
def test_unsupported_functions_name_what_is_missing(call, missing):
    with pytest.raises(NotImplementedError, match=f"torchlora does not implement .*{missing}"):
        call()


@pytest.mark.parametrize("method,args,missing", [
    ("corda_init", ("default", "corda"), "CorDA"),
    ("loftq_init", ("default", None), "LoftQ"),
    ("lora_ga_init", ("default", None), "LoRA-GA"),
    ("mica_init", ("default",), "MiCA"),
    ("orthogonal_init", ("default",), "orthogonal"),
])
def test_unsupported_layer_inits_name_what_is_missing(method, args, missing):
    layer = torchlora.LoraLinear(nn.Linear(4, 3), "default", r=2, lora_alpha=2)
    with pytest.raises(NotImplementedError, match=f"torchlora does not implement {missing}.*LoraLinear"):
        getattr(layer, method)(*args)


def test_pissa_olora_only_on_linear_layers():
    layer = torchlora.LoraEmbedding(nn.Embedding(8, 4), "default", r=2, lora_alpha=2)
    with pytest.raises(NotImplementedError, match="PiSSA.*LoraEmbedding"):
        layer.pissa_init("default", "pissa")
    with pytest.raises(NotImplementedError, match="OLoRA.*LoraEmbedding"):
        layer.olora_init("default")


@pytest.mark.parametrize("field,value", [
    ("loftq_config", ours_lora.LoftQConfig()), ("eva_config", ours_lora.EvaConfig()),
    ("lora_ga_config", ours_lora.LoraGAConfig()), ("velora_config", ours_lora.VeloraConfig()),
    ("arrow_config", ours_lora.ArrowConfig()), ("use_bdlora", ours_lora.BdLoraConfig()),
    ("kasa_config", ours_lora.KasaConfig()), ("monteclora_config", ours_lora.MontecloraConfig()),
    ("runtime_config", ours_lora.LoraRuntimeConfig(ephemeral_gpu_offload=True)),
])
def test_lora_config_rejects_sub_configs_by_name(field, value):
    with pytest.raises(NotImplementedError, match=f"{field}=.* is not supported by torchlora"):
        torchlora.LoraConfig(**{field: value})


def test_default_runtime_config_is_accepted_as_in_peft():
    config = torchlora.LoraConfig(runtime_config=ours_lora.LoraRuntimeConfig())
    assert config.runtime_config is None and "runtime_config" not in config.to_dict()
    assert peft.LoraConfig(runtime_config=peft_lora.LoraRuntimeConfig()).runtime_config.ephemeral_gpu_offload is False


@pytest.mark.parametrize("bits,kind", [(4, "bnb-4bit"), (8, "bnb-8bit")])
def test_base_weight_of_quantized_layers(bits, kind):
    # PEFT needs a transformers-quantized model to pick its bitsandbytes layers; here the weights
    # are checked against themselves: read dequantized, written quantized again
    pytest.importorskip("bitsandbytes")
    from torchlora.utils import quantize_linear_layers

    model = tm.llama_for_quantization(0)
    options = dict(quant_type="nf4", compute_dtype=torch.float32) if bits == 4 else dict(threshold=6.0)
    quantize_linear_layers(model, bits, skip_modules=["lm_head"], **options)
    ours = torchlora.get_peft_model(model, _llama_config(torchlora))
    layer = ours.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    assert layer.quantization_backend == kind
    weight_type = type(layer.get_base_layer().weight)
    old = layer.get_base_weight()
    assert old.dtype.is_floating_point and old.shape == (layer.out_features, layer.in_features)
    new = torch.randn_like(old)
    layer.set_base_weight(new.clone())
    assert type(layer.get_base_layer().weight) is weight_type  # still quantized
    stored = layer.get_base_weight()
    assert (stored - new).norm() < 0.2 * new.norm()  # the new weight, up to quantization rounding
    assert (stored - old).norm() > 0.5 * new.norm()
