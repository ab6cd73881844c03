"""LoraConfig / TaskType: PEFT's fields and defaults, validation, and the JSON round trip."""

from __future__ import annotations

import dataclasses
import json

import peft
import pytest

import torchlora
from torchlora import LoraConfig, TaskType
from torchlora.config import UNSUPPORTED_FIELD_DEFAULTS

SUPPORTED = ["r", "lora_alpha", "target_modules", "exclude_modules", "lora_dropout", "fan_in_fan_out", "bias",
             "use_rslora", "modules_to_save", "init_lora_weights", "layers_to_transform", "layers_pattern",
             "rank_pattern", "alpha_pattern", "lora_bias", "task_type", "inference_mode",
             "base_model_name_or_path", "revision", "use_dora", "trainable_token_indices", "target_parameters",
             "ensure_weight_tying"]


def test_defaults_equal_peft():
    ours, theirs = LoraConfig(), peft.LoraConfig()
    for name in SUPPORTED:
        assert getattr(ours, name) == getattr(theirs, name), name


def test_every_peft_field_is_known():
    peft_fields = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    ours = {f.name for f in dataclasses.fields(LoraConfig)}
    assert peft_fields <= ours, sorted(peft_fields - ours)
    assert peft_fields - set(SUPPORTED) - {"peft_type", "auto_mapping", "peft_version"} <= set(UNSUPPORTED_FIELD_DEFAULTS)


def test_task_type_values_equal_peft():
    for task in ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION"):
        assert TaskType(task) == peft.TaskType(task) == task
    assert LoraConfig(task_type="CAUSAL_LM").task_type == TaskType.CAUSAL_LM
    assert LoraConfig(task_type=TaskType.SEQ_CLS).task_type == "SEQ_CLS"


def test_lists_become_sets_like_peft():
    config = LoraConfig(target_modules=["q", "v", "q"], exclude_modules=["k"])
    assert config.target_modules == {"q", "v"} and config.exclude_modules == {"k"}
    assert LoraConfig(target_modules="all-linear").target_modules == "all-linear"


@pytest.mark.parametrize("init", [True, False, "gaussian", "Gaussian", "pissa", "pissa_niter_4", "olora"])
def test_supported_inits(init):
    assert LoraConfig(init_lora_weights=init).init_lora_weights == init


# ---------------------------------------------------------------------- validation errors
BAD = [
    (dict(r=0), ValueError, "r"),
    (dict(r=-2), ValueError, "r"),
    (dict(r=2.5), TypeError, "r must be an int"),
    (dict(r=True), TypeError, "r must be an int"),
    (dict(lora_alpha=0), ValueError, "lora_alpha"),
    (dict(lora_alpha=-1.0), ValueError, "lora_alpha"),
    (dict(lora_alpha=float("nan")), ValueError, "lora_alpha"),
    (dict(lora_alpha="8"), TypeError, "lora_alpha"),
    (dict(lora_dropout=1.0), ValueError, "lora_dropout"),
    (dict(lora_dropout=-0.1), ValueError, "lora_dropout"),
    (dict(lora_dropout="0.1"), TypeError, "lora_dropout"),
    (dict(bias="some"), ValueError, "bias"),
    (dict(init_lora_weights="kaiming"), ValueError, "init_lora_weights"),
    (dict(init_lora_weights="pissa_niter_x"), ValueError, "init_lora_weights"),
    (dict(init_lora_weights=1), TypeError, "init_lora_weights"),
    (dict(task_type="TRANSLATION"), ValueError, "Invalid task type"),
    (dict(target_modules=5), TypeError, "target_modules"),
    (dict(target_modules=["q", 3]), TypeError, "target_modules"),
    (dict(target_modules="(unclosed"), ValueError, "target_modules"),
    (dict(exclude_modules=[1]), TypeError, "exclude_modules"),
    (dict(modules_to_save="classifier"), TypeError, "modules_to_save"),
    (dict(fan_in_fan_out=1), TypeError, "fan_in_fan_out"),
    (dict(use_rslora="yes"), TypeError, "use_rslora"),
    (dict(lora_bias=None), TypeError, "lora_bias"),
    (dict(inference_mode=0), TypeError, "inference_mode"),
    (dict(layers_to_transform="0"), TypeError, "layers_to_transform"),
    (dict(layers_to_transform=[0, "1"], target_modules=["q"]), TypeError, "layers_to_transform"),
    (dict(rank_pattern=[("q", 2)]), TypeError, "rank_pattern"),
    (dict(rank_pattern={"q": 0}), ValueError, "rank_pattern"),
    (dict(alpha_pattern={"q": "x"}), TypeError, "alpha_pattern"),
    (dict(base_model_name_or_path=3), TypeError, "base_model_name_or_path"),
    (dict(revision=1), TypeError, "revision"),
    # the combinations PEFT rejects
    (dict(target_modules=".*q", layers_to_transform=[0]), ValueError, "layers_to_transform"),
    (dict(target_modules=".*q", layers_pattern="layers"), ValueError, "layers_pattern"),
    (dict(target_modules=["q"], layers_pattern="layers"), ValueError, "layers_to_transform"),
    (dict(lora_bias=True, init_lora_weights="gaussian"), ValueError, "lora_bias"),
]


@pytest.mark.parametrize("kwargs,error,match", BAD, ids=[str(b[0]) for b in BAD])
def test_validation_errors_name_the_field(kwargs, error, match):
    with pytest.raises(error, match=match):
        LoraConfig(**kwargs)


PEFT_REJECTS = [
    dict(target_modules=".*q", layers_to_transform=[0]),
    dict(target_modules=".*q", layers_pattern="layers"),
    dict(target_modules=["q"], layers_pattern="layers"),
    dict(lora_bias=True, init_lora_weights="gaussian"),
    dict(task_type="TRANSLATION"),
]


@pytest.mark.parametrize("kwargs", PEFT_REJECTS, ids=[str(k) for k in PEFT_REJECTS])
def test_what_peft_rejects_we_reject(kwargs):
    with pytest.raises(ValueError):
        peft.LoraConfig(**kwargs)
    with pytest.raises(ValueError):
        LoraConfig(**kwargs)


NON_DEFAULTS = {
    "megatron_config": {"x": 1}, "megatron_core": "other",
    "loftq_config": {"loftq_bits": 4}, "eva_config": {"rho": 2.0}, "corda_config": {}, "lora_ga_config": {},
    "velora_config": {}, "alora_invocation_tokens": [1], "use_qalora": True, "qalora_group_size": 32,
    "monteclora_config": {}, "layer_replication": [[0, 1]], "runtime_config": {"ephemeral_gpu_offload": True},
    "use_bdlora": {}, "arrow_config": {}, "kasa_config": {},
}


def test_every_unsupported_field_has_a_non_default_case():
    assert set(NON_DEFAULTS) == set(UNSUPPORTED_FIELD_DEFAULTS)


@pytest.mark.parametrize("name", sorted(NON_DEFAULTS))
def test_unsupported_fields_raise_not_implemented(name):
    with pytest.raises(NotImplementedError, match=name):
        LoraConfig(**{name: NON_DEFAULTS[name]})


@pytest.mark.parametrize("name", sorted(NON_DEFAULTS))
def test_unsupported_fields_at_default_are_accepted(name):
    LoraConfig(**{name: UNSUPPORTED_FIELD_DEFAULTS[name]})


@pytest.mark.parametrize("init", ["loftq", "eva", "corda", "lora_ga", "orthogonal", "mica"])
def test_peft_inits_we_lack_raise_not_implemented(init):
    with pytest.raises(NotImplementedError, match=init):
        LoraConfig(init_lora_weights=init)


# ---------------------------------------------------------------------- (de)serialisation
def _full_config(lib):
    return lib.LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj"], exclude_modules=["lm_head"],
                          lora_dropout=0.05, bias="lora_only", use_rslora=True, modules_to_save=["score"],
                          init_lora_weights="gaussian", layers_to_transform=[0, 1], layers_pattern="layers",
                          rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 3}, task_type="CAUSAL_LM",
                          base_model_name_or_path="some/model", revision="main")


def test_from_peft_json(tmp_path):
    _full_config(peft).save_pretrained(str(tmp_path))
    config = LoraConfig.from_pretrained(str(tmp_path))
    theirs = peft.LoraConfig.from_pretrained(str(tmp_path))
    for name in SUPPORTED:
        assert getattr(config, name) == getattr(theirs, name), name
    assert config.peft_version == theirs.peft_version


def test_peft_reads_our_json(tmp_path):
    ours = _full_config(torchlora)
    ours.save_pretrained(str(tmp_path))
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "LORA" and data["target_modules"] == ["q_proj", "v_proj"]
    theirs = peft.LoraConfig.from_pretrained(str(tmp_path))
    for name in SUPPORTED:
        assert getattr(theirs, name) == getattr(ours, name), name


def test_dict_round_trip():
    config = _full_config(torchlora)
    again = LoraConfig.from_dict(config.to_dict())
    assert again == config
    assert LoraConfig.from_dict(json.loads(json.dumps(config.to_json_dict()))) == config


def test_from_dict_rejects_unknown_keys():
    data = LoraConfig().to_dict()
    data["my_new_option"] = 1
    data["other"] = 2
    with pytest.raises(ValueError, match=r"\['my_new_option', 'other'\]"):
        LoraConfig.from_dict(data)


def test_from_dict_rejects_other_peft_types():
    with pytest.raises(ValueError, match="peft_type"):
        LoraConfig.from_dict({"peft_type": "IA3", "r": 8})


def test_from_dict_rejects_unsupported_non_defaults():
    with pytest.raises(NotImplementedError, match="use_qalora"):
        LoraConfig.from_dict({"peft_type": "LORA", "use_qalora": True})


def test_use_dora_is_a_bool_option():
    assert LoraConfig(use_dora=True).use_dora is True
    assert LoraConfig.from_dict({"peft_type": "LORA", "use_dora": True}).to_dict()["use_dora"] is True
    with pytest.raises(TypeError, match="use_dora"):
        LoraConfig(use_dora="yes")


def test_from_pretrained_missing_file(tmp_path):
    with pytest.raises(ValueError, match="adapter_config.json"):
        LoraConfig.from_pretrained(str(tmp_path))


def test_from_pretrained_rejects_overrides(tmp_path):
    LoraConfig().save_pretrained(str(tmp_path))
    with pytest.raises(TypeError, match="r"):
        LoraConfig.from_pretrained(str(tmp_path), r=4)


def test_save_pretrained_into_a_file_fails(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(ValueError, match="directory"):
        LoraConfig().save_pretrained(str(path))


def test_public_names_mirror_peft():
    for name in ("LoraConfig", "PeftConfig", "TaskType", "PeftType", "PeftModel", "PeftModelForCausalLM",
                 "PeftModelForSeq2SeqLM", "PeftModelForSequenceClassification", "PeftModelForTokenClassification",
                 "PeftModelForQuestionAnswering", "PeftModelForFeatureExtraction", "get_peft_model",
                 "inject_adapter_in_model", "get_peft_model_state_dict", "set_peft_model_state_dict"):
        assert hasattr(peft, name) and hasattr(torchlora, name) and name in torchlora.__all__, name
