"""DoRA (use_dora=True) against the real PEFT: outputs and gradients, several adapters, merge and
unmerge, files both ways, mixed batches, dropout, low_cpu_mem_usage, torch.compile; for Linear,
transformers Conv1D, Embedding and Conv2d."""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import torchlora
from torchlora import ops

from peft_parity import copy_adapter, grads, logits
from tiny_models import VOCAB, gpt2, input_ids, llama, plain_mlp

TOL = dict(rtol=1e-5, atol=1e-5)


class _Layers(nn.Module):
    """One layer of every kind DoRA supports, on one input."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(VOCAB, 12)
        self.lin = nn.Linear(12, 11)
        self.c1d = Conv1D(9, 11)  # transformers' [in, out] weight
        self.conv = nn.Conv2d(1, 5, 3, padding=1)
        self.head = nn.Linear(5 * 9, 4, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.c1d(torch.tanh(self.lin(self.emb(ids))))  # [B, L, 9]
        image = h[:, None, :3, :]  # [B, 1, 3, 9]
        return self.head(self.conv(image).mean(2).flatten(1))


TARGETS = {
    "layers": (_Layers, ["emb", "lin", "c1d", "conv"]),
    "mlp": (plain_mlp, ["emb", "conv", "lin0"]),
    "gpt2": (gpt2, ["c_attn", "c_proj", "wte"]),
    "llama": (llama, ["q_proj", "v_proj", "down_proj", "embed_tokens"]),
}


def dora_config(lib, targets, **overrides):
    options = dict(r=4, lora_alpha=8, target_modules=targets, use_dora=True, init_lora_weights=False)
    options.update(overrides)
    return lib.LoraConfig(**options)


def perturb_magnitudes(model, seed: int = 3) -> None:
    """Move every magnitude away from its initial norm, so that DoRA is not the plain LoRA."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(0.5 + torch.rand(param.shape, generator=generator))


def dora_pair(model: str, adapter: str = "default", **overrides):
    builder, targets = TARGETS[model]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.get_peft_model(builder(), dora_config(peft, targets, **overrides), adapter_name=adapter)
        ours = torchlora.get_peft_model(builder(), dora_config(torchlora, targets, **overrides), adapter_name=adapter)
    perturb_magnitudes(ref)
    copy_adapter(ref, ours, adapter)
    for module in (*ref.modules(), *ours.modules()):
        if type(module) is nn.Dropout:  # the base model's own dropout (GPT-2): training steps must agree
            module.p = 0.0
    return ref, ours


def forward_backward(model, ids):
    out = logits(model(ids))
    out.float().square().sum().backward()
    return out.detach(), grads(model)


def assert_same_training_step(ref, ours, ids, **tol):
    tol = tol or TOL
    out_ref, grads_ref = forward_backward(ref, ids)
    out_ours, grads_ours = forward_backward(ours, ids)
    torch.testing.assert_close(out_ours, out_ref, **tol)
    assert grads_ours.keys() == grads_ref.keys()
    assert any("lora_magnitude_vector" in k for k in grads_ours)
    for name in grads_ref:
        torch.testing.assert_close(grads_ours[name], grads_ref[name], msg=name, **tol)


@pytest.mark.parametrize("model", list(TARGETS))
def test_dora_forward_and_gradients_match_peft(model):
    ref, ours = dora_pair(model)
    ref.train(), ours.train()
    assert_same_training_step(ref, ours, input_ids(batch=2, length=7))
    ref.eval(), ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(logits(ours(input_ids(seed=4))), logits(ref(input_ids(seed=4))), **TOL)


def test_dora_parameters_have_peft_names_and_initial_magnitude():
    builder, targets = TARGETS["layers"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.get_peft_model(builder(), dora_config(peft, targets, init_lora_weights=True))
        ours = torchlora.get_peft_model(builder(), dora_config(torchlora, targets, init_lora_weights=True))
    ref_state, our_state = ref.state_dict(), ours.state_dict()
    assert sorted(our_state) == sorted(ref_state)
    magnitudes = [k for k in our_state if "lora_magnitude_vector" in k]
    assert len(magnitudes) == 4
    for key in magnitudes:
        # lora_B is zero at init: the magnitude is the base weight's norm, as PEFT computes it
        assert our_state[key].shape == ref_state[key].shape, key
        torch.testing.assert_close(our_state[key], ref_state[key], **TOL)
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        n for n, p in ref.named_parameters() if p.requires_grad}
    with torch.no_grad():
        base = builder()
        torch.testing.assert_close(ours(input_ids()), base(input_ids()), **TOL)


def test_several_dora_and_lora_adapters_match_peft():
    builder, targets = TARGETS["layers"]
    ref, ours = dora_pair("layers")
    second = dict(r=3, lora_alpha=5, init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref.add_adapter("plain", peft.LoraConfig(target_modules=targets, **second))
        ours.add_adapter("plain", torchlora.LoraConfig(target_modules=targets, **second))
        ref.add_adapter("dora2", dora_config(peft, targets, r=2))
        ours.add_adapter("dora2", dora_config(torchlora, targets, r=2))
    perturb_magnitudes(ref, seed=9)
    for name in ("plain", "dora2"):
        copy_adapter(ref, ours, name)
    copy_adapter(ref, ours, "default")
    for active in (["default", "plain", "dora2"], ["dora2", "default"]):
        ref.base_model.set_adapter(active)
        ours.base_model.set_adapter(active)
        ref.zero_grad(), ours.zero_grad()
        # gradients up to ~25 through three stacked adapters: float32 rounding of a few 1e-6
        assert_same_training_step(ref, ours, input_ids(batch=3, length=7), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model", ["layers", "llama"])
def test_dora_merge_unmerge_and_merge_and_unload_match_peft(model):
    ref, ours = dora_pair(model)
    ref.eval(), ours.eval()
    ids = input_ids(batch=2, length=7, seed=5)
    with torch.no_grad():
        unmerged = logits(ours(ids))
        before = {k: v.clone() for k, v in ours.state_dict().items()}
        ref.merge_adapter()
        ours.merge_adapter()
        torch.testing.assert_close(logits(ours(ids)), logits(ref(ids)), **TOL)
        torch.testing.assert_close(logits(ours(ids)), unmerged, **TOL)
        merged_ours = {k: v for k, v in ours.state_dict().items() if "base_layer" in k}
        merged_ref = ref.state_dict()
        for key, value in merged_ours.items():
            torch.testing.assert_close(value, merged_ref[key], msg=key, **TOL)
        ours.unmerge_adapter()
        for key, value in ours.state_dict().items():
            torch.testing.assert_close(value, before[key], msg=key, **TOL)  # W / g - delta after g (W + delta): rounding only
        torch.testing.assert_close(logits(ours(ids)), unmerged, **TOL)
        plain_ref = ref.merge_and_unload()
        plain_ours = ours.merge_and_unload()
        torch.testing.assert_close(logits(plain_ours(ids)), logits(plain_ref(ids)), **TOL)


def test_two_dora_adapters_merged_in_turn_match_peft():
    builder, targets = TARGETS["layers"]
    ref, ours = dora_pair("layers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref.add_adapter("other", dora_config(peft, targets, r=2))
        ours.add_adapter("other", dora_config(torchlora, targets, r=2))
    perturb_magnitudes(ref, seed=11)
    copy_adapter(ref, ours, "other")
    copy_adapter(ref, ours, "default")
    ids = input_ids(seed=6)
    with torch.no_grad():
        ref.base_model.set_adapter(["default", "other"])
        ours.base_model.set_adapter(["default", "other"])
        ref.eval(), ours.eval()
        unmerged = logits(ours(ids))
        torch.testing.assert_close(unmerged, logits(ref(ids)), **TOL)
        ref.merge_adapter(["default", "other"])
        ours.merge_adapter(["default", "other"])
        torch.testing.assert_close(logits(ours(ids)), logits(ref(ids)), **TOL)
        torch.testing.assert_close(logits(ours(ids)), unmerged, **TOL)


@pytest.mark.parametrize("model", ["layers", "gpt2"])
def test_dora_files_move_both_ways_with_peft(model, tmp_path):
    builder, targets = TARGETS[model]
    ref, ours = dora_pair(model)
    ids = input_ids(seed=7)
    ours.save_pretrained(tmp_path / "ours")
    ref.save_pretrained(tmp_path / "ref")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_loaded = peft.PeftModel.from_pretrained(builder(), tmp_path / "ours").eval()
        ours_loaded = torchlora.PeftModel.from_pretrained(builder(), tmp_path / "ref").eval()
        ours_lazy = torchlora.PeftModel.from_pretrained(builder(), tmp_path / "ref", low_cpu_mem_usage=True).eval()
    assert peft_loaded.peft_config["default"].use_dora and ours_loaded.peft_config["default"].use_dora
    ref.eval()
    with torch.no_grad():
        expected = logits(ref(ids))
        torch.testing.assert_close(logits(peft_loaded(ids)), expected, **TOL)
        torch.testing.assert_close(logits(ours_loaded(ids)), expected, **TOL)
        torch.testing.assert_close(logits(ours_lazy(ids)), expected, **TOL)


def test_dora_mixed_batch_equals_each_sample_alone():
    builder, targets = TARGETS["layers"]
    ref, ours = dora_pair("layers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours.add_adapter("other", dora_config(torchlora, targets, r=2))
    perturb_magnitudes(ours, seed=13)
    ours.eval()
    ids = input_ids(batch=3, length=7, seed=8)
    names = ["other", "__base__", "default"]
    with torch.no_grad():
        mixed = ours(ids, adapter_names=names)
        for i, name in enumerate(names):
            if name == "__base__":
                with ours.disable_adapter():
                    alone = ours(ids[i:i + 1])
            else:
                ours.set_adapter(name)
                alone = ours(ids[i:i + 1])
            torch.testing.assert_close(mixed[i:i + 1], alone, **TOL)


def _linear_dora_reference(layer, x, seed_value):
    """PEFT's DoRA formula with dropout, with torchlora's counter-based mask."""
    name = "default"
    base = layer.get_base_layer()
    lora_A, lora_B = layer.lora_A[name].weight, layer.lora_B[name].weight
    scaling = layer.scaling[name]
    magnitude = layer.lora_magnitude_vector[name].weight
    norm = torch.linalg.norm(base.weight + scaling * lora_B @ lora_A, dim=1).detach()
    gain = magnitude / norm
    dropped = ops.dropout_apply(x, layer.lora_dropout[name].p, seed_value)
    base_dropped = nn.functional.linear(dropped, base.weight)
    lora = nn.functional.linear(nn.functional.linear(dropped, lora_A), lora_B)
    return base(x) + (gain - 1) * base_dropped + gain * lora * scaling


def test_dora_dropout_in_training_follows_peft_formula():
    torch.manual_seed(0)
    layer = torchlora.LoraLinear(nn.Linear(13, 7), r=3, lora_alpha=6, lora_dropout=0.3, use_dora=True,
                                 init_lora_weights=False)
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].weight.mul_(torch.rand(7) + 0.5)
    ref_layer = copy.deepcopy(layer)
    layer.train()
    x = torch.randn(2, 5, 13, dtype=torch.float32)
    torch.manual_seed(42)
    out = layer(x)
    torch.manual_seed(42)
    seed = ops.make_seed(x.device)
    expected = _linear_dora_reference(ref_layer, x, seed)
    torch.testing.assert_close(out, expected, **TOL)
    out.square().sum().backward()
    expected.square().sum().backward()
    for name, param in layer.named_parameters():
        if param.requires_grad:
            other = dict(ref_layer.named_parameters())[name]
            torch.testing.assert_close(param.grad, other.grad, msg=name, **TOL)


def test_dora_bf16_base_with_float32_adapter_matches_peft():
    ref, ours = dora_pair("llama")
    ref.to(torch.bfloat16), ours.to(torch.bfloat16)
    for model in (ref, ours):  # PEFT's autocast_adapter_dtype: the adapter trains in float32
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.data = param.data.float()
    ref.eval(), ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(logits(ours(input_ids())).float(), logits(ref(input_ids())).float(),
                                   rtol=2e-2, atol=2e-2)


def test_dora_layer_compiles_fullgraph_without_breaks():
    torch.manual_seed(0)
    layer = torchlora.LoraLinear(nn.Linear(16, 8), r=4, lora_alpha=8, use_dora=True, init_lora_weights=False)
    x = torch.randn(3, 16)
    eager = layer(x)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), eager, **TOL)
    compiled(x).sum().backward()
    assert layer.lora_magnitude_vector["default"].weight.grad is not None


def test_weight_norm_follows_changes_of_the_base_weight():
    torch.manual_seed(0)
    layer = torchlora.LoraLinear(nn.Linear(10, 6), r=2, lora_alpha=4, use_dora=True, init_lora_weights=False)
    first = layer.dora_weight_norm("default").clone()
    with torch.no_grad():
        layer.base_layer.weight.mul_(2.0)  # in place: the cached ||W||^2 must not be reused
    second = layer.dora_weight_norm("default")
    w = layer.base_layer.weight
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    torch.testing.assert_close(second, torch.linalg.norm(w + layer.scaling["default"] * B @ A, dim=1), **TOL)
    assert not torch.allclose(first, second)


def test_dora_errors_name_the_problem():
    conv = nn.Conv2d(4, 4, 3, groups=2)
    with pytest.raises(ValueError, match="groups > 1"):
        torchlora.LoraConv2d(conv, r=2, lora_alpha=2, use_dora=True)
    with pytest.raises(TypeError, match="use_dora"):
        torchlora.LoraLinear(nn.Linear(4, 4), r=2, use_dora="yes")
    layer = torchlora.LoraLinear(nn.Linear(4, 3), r=2, use_dora=True)
    with pytest.raises(NotImplementedError, match="DoRA"):
        layer(torch.randn(2, 4), adapter_slots=torch.tensor([0, -1]))
