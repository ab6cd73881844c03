"""LoraConfig(target_parameters=...) against the real ``peft``: LoRA on the fused 3-D expert
weights of a tiny Mixtral (transformers 5 MoE), PEFT's ParamWrapper layout (nesting, factor
shapes with experts, file keys), outputs, gradients, merging and files both ways; the C++ loader
reads such adapters and merges them into the parameters (C++ modules and the adapter pool have
no MoE layer and say so)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import tiny_models as tm  # noqa: E402
import torchlora  # noqa: E402
from peft_parity import grads, logits, lora_layer_names  # noqa: E402
from torchlora.nn.param_wrapper import ParamWrapper  # noqa: E402

cpp = torchlora._C.cpp
serve = torchlora._C.serve
EXPERTS = 4
TARGETS = ["experts.gate_up_proj", "experts.down_proj"]
PREFIX = "base_model.model.model.layers.0.mlp.experts"


def mixtral(seed: int = 0):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(vocab_size=tm.VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, num_local_experts=EXPERTS,
                           num_experts_per_tok=2, max_position_embeddings=32, tie_word_embeddings=False)
    return MixtralForCausalLM(config).eval()


def _config(lib, **kw):
    return lib.LoraConfig(**{"r": 2, "lora_alpha": 6, "target_modules": [], "target_parameters": TARGETS,
                             "init_lora_weights": False, **kw})


def _pair(**kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.get_peft_model(mixtral(), _config(peft, **kw))
        ours = torchlora.get_peft_model(mixtral(), _config(torchlora, **kw))
    torchlora.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(ref))
    return ref, ours


# ----------------------------------------------------------------------------- layout
def test_wrappers_nest_like_peft_with_expert_shapes_and_keys() -> None:
    ref, ours = _pair()
    assert lora_layer_names(ours) == lora_layer_names(ref)
    outer = ours.base_model.model.model.layers[0].mlp.experts
    assert isinstance(outer, ParamWrapper) and outer.parameter_name == "down_proj"
    assert isinstance(outer.base_layer, ParamWrapper) and outer.base_layer.parameter_name == "gate_up_proj"
    assert outer.base_layer.num_experts == EXPERTS
    ref_sd, our_sd = peft.get_peft_model_state_dict(ref), torchlora.get_peft_model_state_dict(ours)
    assert {k: v.shape for k, v in our_sd.items()} == {k: v.shape for k, v in ref_sd.items()}
    # gate_up_proj [E, 2 * 24, 16]: lora_A [r * E, 16], lora_B [48, r * E]
    assert our_sd[f"{PREFIX}.base_layer.lora_A.weight"].shape == (2 * EXPERTS, 16)
    assert our_sd[f"{PREFIX}.base_layer.lora_B.weight"].shape == (48, 2 * EXPERTS)
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        n for n, p in ref.named_parameters() if p.requires_grad}


def test_delta_rule_matches_peft_per_expert() -> None:
    ref, ours = _pair()
    for layer_ref, layer_ours in [(ref.base_model.model.model.layers[1].mlp.experts,
                                   ours.base_model.model.model.layers[1].mlp.experts)]:
        while isinstance(layer_ours, ParamWrapper):
            torch.testing.assert_close(layer_ours.get_delta_weight("default"),
                                       layer_ref.get_delta_weight("default"))
            layer_ours, layer_ref = layer_ours.base_layer, layer_ref.base_layer
    a, b = torch.randn(6, 5), torch.randn(4, 6)  # r = 2, 3 experts, [experts, in, out] layout
    delta = torchlora._C.peft.parameter_delta_weight(a, b, 0.5, [3, 5, 4], True)
    for e in range(3):
        expected = 0.5 * b.reshape(4, 2, 3)[:, :, e] @ a.reshape(3, 2, 5)[e]
        torch.testing.assert_close(delta[e], expected.T)
    with pytest.raises(ValueError, match="needs lora_A"):
        torchlora._C.peft.parameter_delta_weight(a, b, 0.5, [3, 4, 4], False)


# ----------------------------------------------------------------------------- numerics
def test_outputs_and_gradients_match_peft() -> None:
    ref, ours = _pair()
    ids = tm.input_ids(length=9)
    base_out = logits(mixtral()(ids))
    ref.train(), ours.train()
    out_ref, out_ours = logits(ref(ids)), logits(ours(ids))
    torch.testing.assert_close(out_ours, out_ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out_ours, base_out, atol=1e-4)
    out_ref.square().mean().backward()
    out_ours.square().mean().backward()
    g_ref, g_ours = grads(ref), grads(ours)
    assert set(g_ours) == set(g_ref) and len(g_ref) == 8
    for name in g_ref:
        torch.testing.assert_close(g_ours[name], g_ref[name], rtol=1e-4, atol=1e-6)
    # the parameters are restored after each forward (no parametrization left behind)
    experts = ours.base_model.model.model.layers[0].mlp.experts.get_base_layer()
    assert not torch.nn.utils.parametrize.is_parametrized(experts)
    torch.testing.assert_close(experts.gate_up_proj, mixtral().model.layers[0].mlp.experts.gate_up_proj)


def test_merge_unmerge_disable_and_merge_and_unload() -> None:
    ref, ours = _pair()
    ids = tm.input_ids(length=7)
    expected = logits(ours(ids))
    ours.merge_adapter()
    torch.testing.assert_close(logits(ours(ids)), expected, rtol=1e-5, atol=1e-5)
    ours.unmerge_adapter()
    torch.testing.assert_close(ours.base_model.model.model.layers[0].mlp.experts.get_base_layer().down_proj,
                               mixtral().model.layers[0].mlp.experts.down_proj)
    with ours.disable_adapter():
        torch.testing.assert_close(logits(ours(ids)), logits(mixtral()(ids)))
    merged_ours, merged_ref = ours.merge_and_unload(), ref.merge_and_unload()
    assert not any(isinstance(m, ParamWrapper) for m in merged_ours.modules())
    torch.testing.assert_close(logits(merged_ours(ids)), logits(merged_ref(ids)), rtol=1e-5, atol=1e-5)


def test_second_adapter_shares_the_wrappers() -> None:
    ours = torchlora.get_peft_model(mixtral(), _config(torchlora))
    ours.add_adapter("other", _config(torchlora, r=3))
    outer = ours.base_model.model.model.layers[0].mlp.experts
    assert set(outer.lora_A) == {"default", "other"} and set(outer.base_layer.lora_A) == {"default", "other"}
    assert outer.lora_A["other"].weight.shape == (3 * EXPERTS, 24)
    with pytest.raises(ValueError, match="must target the same set of parameters"):
        ours.add_adapter("third", _config(torchlora, target_parameters=["experts.down_proj"]))


def test_config_errors_name_what_is_wrong() -> None:
    with pytest.raises(TypeError, match="target_parameters must be a list of strings"):
        torchlora.LoraConfig(target_parameters="experts.down_proj")
    with pytest.raises(ValueError, match="lora_dropout"):
        torchlora.LoraConfig(target_parameters=TARGETS, lora_dropout=0.1)
    with pytest.raises(ValueError, match="use_dora"):
        torchlora.LoraConfig(target_parameters=TARGETS, use_dora=True)
    with pytest.raises(ValueError, match="init_lora_weights"):
        torchlora.LoraConfig(target_parameters=TARGETS, init_lora_weights="pissa")
    with pytest.raises(ValueError, match="target_modules"):
        torchlora.get_peft_model(mixtral(), _config(torchlora, target_parameters=["experts.nothing"]))


# ----------------------------------------------------------------------------- files
def test_files_both_ways(tmp_path: Path) -> None:
    ref, ours = _pair()
    ids = tm.input_ids(length=6)
    expected = logits(ref(ids))
    ref.save_pretrained(str(tmp_path / "peft"))
    loaded = torchlora.PeftModel.from_pretrained(mixtral(), str(tmp_path / "peft"))
    torch.testing.assert_close(logits(loaded(ids)), expected, rtol=1e-5, atol=1e-5)
    ours.save_pretrained(str(tmp_path / "ours"))
    back = peft.PeftModel.from_pretrained(mixtral(), str(tmp_path / "ours"))
    torch.testing.assert_close(logits(back(ids)), expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- C++ loader
def test_cpp_loader_reads_and_merges_into_parameters(tmp_path: Path) -> None:
    ref, _ = _pair()
    ids = tm.input_ids(length=6)
    expected = logits(ref(ids))
    ref.save_pretrained(str(tmp_path))
    modules, other = cpp.load_peft_adapter(str(tmp_path))
    assert "model.layers.0.mlp.experts.base_layer" in modules and not other
    assert modules["model.layers.1.mlp.experts"]["lora_A"].shape == (2 * EXPERTS, 24)

    base = mixtral()
    changed = cpp.merge_parameter_adapter(str(tmp_path), list(base.named_parameters()))
    assert sorted(changed) == sorted(f"model.layers.{i}.mlp.experts.{p}" for i in range(2)
                                     for p in ("gate_up_proj", "down_proj"))
    with torch.no_grad():
        torch.testing.assert_close(logits(base(ids)), expected, rtol=1e-5, atol=1e-5)
    cpp.merge_parameter_adapter(str(tmp_path), list(base.named_parameters()), unmerge=True)
    original = mixtral().model.layers[1].mlp.experts.down_proj
    torch.testing.assert_close(base.model.layers[1].mlp.experts.down_proj, original, rtol=1e-5, atol=1e-6)

    # a model whose parameters do not fit the factors is refused by name
    other_model = mixtral()
    params = [(n, p if "down_proj" not in n else p[:, :, :12]) for n, p in other_model.named_parameters()]
    with pytest.raises(ValueError, match="down_proj"):
        cpp.merge_parameter_adapter(str(tmp_path), params)


def test_cpp_modules_and_pool_reject_parameter_adapters_by_name(tmp_path: Path) -> None:
    ref, _ = _pair()
    ref.save_pretrained(str(tmp_path))
    tree = cpp.ModuleTree({"lm_head": cpp.LoraLinear(torch.randn(tm.VOCAB, 16), None)})
    with pytest.raises(NotImplementedError, match="target_parameters"):
        cpp.load_adapter(tree, str(tmp_path), "moe")
    pool = serve.AdapterPool([serve.TargetLayer("lm_head", "linear", [tm.VOCAB, 16])], max_loras=2, max_lora_rank=4)
    with pytest.raises(Exception, match="target_parameters"):
        pool.load("moe", str(tmp_path))
