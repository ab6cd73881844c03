"""LoraConfig._register_custom_module: a user's own LoRA layer class for a module type that
torchlora does not wrap, used by get_peft_model as PEFT uses its registered class; compared with
the same custom layer written for PEFT (outputs, gradients, merging, files)."""

import warnings

import peft
import pytest
import torch
from peft.tuners.lora import layer as peft_layers
from torch import Tensor, nn

import torchlora
from torchlora import ops


class ScaledLinear(nn.Module):
    """A layer neither library knows: y = 2 * (x @ W^T) + b."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / in_features ** 0.5)
        self.bias = nn.Parameter(torch.randn(out_features))

    def forward(self, x):
        return 2 * (x @ self.weight.T) + self.bias


class PeftScaledLora(peft_layers.Linear):
    """PEFT's custom layer: its Linear LoRA on top of ScaledLinear (delta added to the output)."""


class OurScaledLora(torchlora.LoraLayer):
    """torchlora's custom layer for ScaledLinear, built on the native operators."""

    def __init__(self, base_layer, adapter_name="default", r=8, lora_alpha=8, lora_dropout=0.0,
                 init_lora_weights=True, use_rslora=False, lora_bias=False, low_cpu_mem_usage=False,
                 use_dora=False):
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora, lora_bias,
                          low_cpu_mem_usage=low_cpu_mem_usage, use_dora=use_dora)

    def _create_adapter(self, adapter_name: str, r: int, lora_bias: bool) -> None:
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=lora_bias)

    def get_delta_weight(self, adapter: str) -> Tensor:
        return ops.lora_delta_weight(self.lora_A[adapter].weight, self.lora_B[adapter].weight, self.scaling[adapter])

    def _stacks_adapters(self) -> bool:
        return False

    def _lora_update(self, name: str, x: Tensor, result: Tensor) -> Tensor:
        p, seed = self._seed_for(name, x.device)
        return ops.lora_linear(x, result, self.lora_A[name].weight, self.lora_B[name].weight, self.lora_B[name].bias,
                               self.scaling[name], p, seed)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = ScaledLinear(6, 5)
        self.out = nn.Linear(5, 2)

    def forward(self, x):
        return self.out(torch.relu(self.inner(x)))


def net(seed=0):
    torch.manual_seed(seed)
    return Net()


def configs():
    theirs = peft.LoraConfig(target_modules=["inner"], r=3, lora_alpha=6, init_lora_weights=False)
    theirs._register_custom_module({ScaledLinear: PeftScaledLora})
    ours = torchlora.LoraConfig(target_modules=["inner"], r=3, lora_alpha=6, init_lora_weights=False)
    ours._register_custom_module({ScaledLinear: OurScaledLora})
    return theirs, ours


def test_unregistered_type_is_rejected():
    with pytest.raises(ValueError, match="not supported.*_register_custom_module"):
        torchlora.get_peft_model(net(), torchlora.LoraConfig(target_modules=["inner"]))


def test_registered_layer_matches_peft(tmp_path):
    theirs_cfg, ours_cfg = configs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.get_peft_model(net(), theirs_cfg)
    ours = torchlora.get_peft_model(net(), ours_cfg)
    assert isinstance(ours.base_model.model.inner, OurScaledLora)
    assert sorted(ours.state_dict()) == sorted(ref.state_dict())
    torchlora.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(ref))
    x = torch.randn(4, 6)
    yr, yo = ref(x), ours(x)
    torch.testing.assert_close(yo, yr, rtol=1e-5, atol=1e-5)
    yr.sum().backward()
    yo.sum().backward()
    ref_params = dict(ref.named_parameters())
    for name, param in ours.named_parameters():
        assert param.requires_grad == ref_params[name].requires_grad, name
        if param.requires_grad:
            torch.testing.assert_close(param.grad, ref_params[name].grad, rtol=1e-5, atol=1e-5, msg=name)

    ours.save_pretrained(tmp_path / "ours")
    ref.save_pretrained(tmp_path / "peft")
    from safetensors.torch import load_file

    assert sorted(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == sorted(
        load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    # the mapping belongs to the config object, never to the file
    assert "_custom_modules" not in (tmp_path / "ours" / "adapter_config.json").read_text()

    # loading needs the registration too (PEFT's way: a config passed to from_pretrained)
    loaded_cfg = torchlora.LoraConfig.from_pretrained(tmp_path / "peft")
    loaded_cfg._register_custom_module({ScaledLinear: OurScaledLora})
    loaded = torchlora.PeftModel.from_pretrained(net(), tmp_path / "peft", config=loaded_cfg)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ref(x), rtol=1e-5, atol=1e-5)
        merged = loaded.merge_and_unload()
        assert type(merged.inner) is ScaledLinear
        # the delta goes into the weight; this layer doubles it in forward, so merged output differs by design
        torch.testing.assert_close(merged.inner.weight, net().inner.weight + ref.base_model.model.inner
                                   .get_delta_weight("default"), rtol=1e-5, atol=1e-6)


def test_registration_checks_its_argument():
    config = torchlora.LoraConfig(target_modules=["inner"])
    with pytest.raises(TypeError, match="dict"):
        config._register_custom_module([(ScaledLinear, OurScaledLora)])
    with pytest.raises(TypeError, match="subclass of torchlora.LoraLayer"):
        config._register_custom_module({ScaledLinear: PeftScaledLora})
    with pytest.raises(TypeError, match="not a module type"):
        config._register_custom_module({"ScaledLinear": OurScaledLora})
    config._register_custom_module({ScaledLinear: OurScaledLora})
    config._register_custom_module({nn.GRU: OurScaledLora})
    assert set(config._custom_modules) == {ScaledLinear, nn.GRU}
    assert torchlora.LoraConfig()._custom_modules is None  # per object, not shared


def test_layer_class_must_produce_a_lora_layer():
    class NotALayer(torchlora.LoraLayer):
        def __new__(cls, *args, **kwargs):
            return nn.Identity()

    config = torchlora.LoraConfig(target_modules=["inner"])
    config._register_custom_module({ScaledLinear: NotALayer})
    with pytest.raises(TypeError, match="must be a torchlora.LoraLayer"):
        torchlora.get_peft_model(net(), config)
