"""LoRA on nn.MultiheadAttention against PEFT's lora.MultiheadAttention: parameter and file keys,
outputs and gradients, merging, unloading and the options PEFT rejects.

PEFT 0.21.2 adds out_proj's delta twice (merge() writes W + dW and then calls out_proj.merge(),
which adds dW again; its forward merges). torchlora adds it once, so the comparisons of outputs
with PEFT hold out_proj's lora_B at zero (PEFT's initialisation) and out_proj's own contribution
is checked against the attention computed with W + dW from PEFT's own delta.
"""

import copy
import warnings

import peft
import pytest
import torch
from torch import nn
from torch.func import functional_call

import torchlora
from torchlora import _native


class Attn(nn.Module):
    def __init__(self, batch_first=True, **kwargs):
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, batch_first=batch_first, **kwargs)
        self.head = nn.Linear(8, 3)

    def forward(self, x, need_weights=False):
        out, weights = self.mha(x, x, x, need_weights=need_weights)
        return self.head(out) if not need_weights else (self.head(out), weights)


def attn(seed=0, **kwargs):
    torch.manual_seed(seed)
    return Attn(**kwargs)


def config(lib, **kw):
    return lib.LoraConfig(target_modules=["mha"], r=2, lora_alpha=4, **kw)


def pair(init_lora_weights=False, zero_out_proj_B=True, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.get_peft_model(attn(**kw), config(peft, init_lora_weights=init_lora_weights))
        ours = torchlora.get_peft_model(attn(**kw), config(torchlora, init_lora_weights=init_lora_weights))
    if zero_out_proj_B:
        nn.init.zeros_(ref.base_model.model.mha.base_layer.out_proj.lora_B["default"].weight)
    torchlora.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(ref))
    return ref, ours


def test_keys_and_layout_match_peft():
    ref, ours = pair()
    assert sorted(ours.state_dict()) == sorted(ref.state_dict())
    assert sorted(torchlora.get_peft_model_state_dict(ours)) == sorted(peft.get_peft_model_state_dict(ref))
    layer = ours.base_model.model.mha
    assert isinstance(layer, torchlora.nn.LoraMultiheadAttention)
    assert isinstance(layer.get_base_layer().out_proj, torchlora.LoraLinear)
    assert layer.lora_B["default"].weight.shape == (24, 2)
    assert ours.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()


@pytest.mark.parametrize("batch_first", [True, False])
def test_outputs_and_gradients_match_peft(batch_first):
    ref, ours = pair(batch_first=batch_first)
    x = torch.randn(2, 5, 8)
    yr, yo = ref(x), ours(x)
    torch.testing.assert_close(yo, yr, rtol=1e-5, atol=1e-5)
    yr.sum().backward()
    yo.sum().backward()
    ref_params = dict(ref.named_parameters())
    trained = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert sorted(trained) == sorted(n for n, p in ref_params.items() if p.requires_grad)
    for name in trained:
        torch.testing.assert_close(dict(ours.named_parameters())[name].grad, ref_params[name].grad,
                                   rtol=1e-5, atol=1e-5, msg=name)


def test_out_proj_adapter_applies_its_delta_once():
    ref, ours = pair(zero_out_proj_B=False)
    x = torch.randn(2, 5, 8)
    layer = ref.base_model.model.mha
    base = layer.get_base_layer()
    weights = {"in_proj_weight": base.in_proj_weight + layer.get_delta_weight("default"),
               "out_proj.base_layer.weight": base.out_proj.base_layer.weight
               + base.out_proj.get_delta_weight("default")}
    expected = ref.base_model.model.head(functional_call(base, weights, (x, x, x), {"need_weights": False})[0])
    torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)


def test_attention_weights_and_disable_adapter():
    ref, ours = pair()
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        (yo, wo), (yr, wr) = ours(x, need_weights=True), ref(x, need_weights=True)
        torch.testing.assert_close(wo, wr, rtol=1e-5, atol=1e-6)
        with ours.disable_adapter():
            plain = ours(x)
        torch.testing.assert_close(plain, attn()(x), rtol=1e-5, atol=1e-6)


def test_merge_unmerge_and_merge_and_unload():
    ref, ours = pair(zero_out_proj_B=False)
    x = torch.randn(2, 5, 8)
    base = attn()
    with torch.no_grad():
        adapted = ours(x)
        ours.merge_adapter()
        layer = ours.base_model.model.mha
        assert layer.merged and layer.out_proj_layer.merged
        torch.testing.assert_close(ours(x), adapted, rtol=1e-4, atol=1e-5)
        ours.unmerge_adapter()
        assert not layer.merged and not layer.out_proj_layer.merged
        torch.testing.assert_close(layer.get_base_layer().in_proj_weight, base.mha.in_proj_weight)
        torch.testing.assert_close(layer.out_proj_layer.get_base_layer().weight, base.mha.out_proj.weight)
        merged = ours.merge_and_unload()
    assert type(merged.mha) is nn.MultiheadAttention
    assert type(merged.mha.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert not any("lora" in k for k in merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(x), adapted, rtol=1e-4, atol=1e-5)
    # PEFT's merged in_proj weight is ours (its out_proj one carries the delta twice, see the module docstring)
    with torch.no_grad():
        ref_merged = ref.merge_and_unload()
    torch.testing.assert_close(merged.mha.in_proj_weight, ref_merged.mha.in_proj_weight, rtol=1e-5, atol=1e-6)


def test_files_both_ways(tmp_path):
    ref, ours = pair()
    ref.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "ours")
    from safetensors.torch import load_file

    theirs_file = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    ours_file = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert sorted(ours_file) == sorted(theirs_file)
    assert "base_model.model.mha.base_layer.out_proj.lora_A.weight" in ours_file
    for key in theirs_file:
        torch.testing.assert_close(ours_file[key], theirs_file[key], rtol=0, atol=0, msg=key)
    x = torch.randn(2, 5, 8)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded_ours = torchlora.PeftModel.from_pretrained(attn(), tmp_path / "peft")
        loaded_ref = peft.PeftModel.from_pretrained(attn(), tmp_path / "ours")
        torch.testing.assert_close(loaded_ours(x), loaded_ref(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(NotImplementedError, match="MultiheadAttention"):
        _native._C.cpp.load_peft_adapter(str(tmp_path / "peft"))


def test_second_adapter_and_delete():
    ref, ours = pair()
    ours.add_adapter("other", config(torchlora, init_lora_weights=False))
    layer = ours.base_model.model.mha
    assert layer.adapter_names() == ["default", "other"]
    assert layer.out_proj_layer.adapter_names() == ["default", "other"]
    ours.set_adapter("other")
    assert layer.out_proj_layer.active_adapters == ["other"]
    assert layer.lora_A["other"].weight.requires_grad and not layer.lora_A["default"].weight.requires_grad
    ours.delete_adapter("other")
    assert layer.adapter_names() == ["default"] and layer.out_proj_layer.adapter_names() == ["default"]


@pytest.mark.parametrize("options, error, message", [
    (dict(use_dora=True), ValueError, "DoRA"),
    (dict(lora_bias=True), ValueError, "lora_bias"),
])
def test_unsupported_options_raise(options, error, message):
    with pytest.raises(error, match=message):
        torchlora.get_peft_model(attn(), config(torchlora, **options))


def test_separate_kv_dims_and_mixed_batches_raise():
    with pytest.raises(ValueError, match="one embedding size"):
        torchlora.get_peft_model(attn(kdim=4, vdim=4), config(torchlora))
    ours = torchlora.get_peft_model(attn(), config(torchlora))
    ours.add_adapter("other", config(torchlora))
    ours.eval()
    with pytest.raises(TypeError, match="mixed adapter batches"):
        ours(torch.randn(2, 5, 8), adapter_names=["default", "other"])
