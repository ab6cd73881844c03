"""Adapter scales (set_scale, scale_layer, unscale_layer, rescale_adapter_scale), layer and model
status, set_requires_grad and set_adapter with several adapters, against the real PEFT."""

from __future__ import annotations

import dataclasses
import inspect
import warnings

import peft
import peft.helpers
import pytest
import torch
from peft_parity import build_pair, copy_adapter, trainable
from torch.testing import assert_close

import tiny_models as tiny
import torchlora
import torchlora.helpers
from torchlora.nn import LoraLayer


def llama_config(lib, **kwargs):
    return lib.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False, **kwargs)


def out(model) -> torch.Tensor:
    with torch.no_grad():
        return model(tiny.input_ids()).logits


def lora_layers(model) -> list:
    return [m for m in model.modules() if isinstance(m, (LoraLayer, peft.tuners.lora.LoraLayer))]


def scalings(model) -> list[dict[str, float]]:
    return [{k: float(v) for k, v in layer.scaling.items()} for layer in lora_layers(model)]


def other_config(lib):
    return lib.LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj"],
                          init_lora_weights=False)


def assert_same_scalings(ours, ref) -> None:
    a, b = scalings(ours), scalings(ref)
    assert [sorted(d) for d in a] == [sorted(d) for d in b]
    assert [d[k] for d in a for k in sorted(d)] == pytest.approx([d[k] for d in b for k in sorted(d)], rel=1e-12)


def two_adapter_pair():
    """PEFT and torchlora llama models with adapters "default" and "other" (other: rsLoRA, r=8)."""
    ref, ours = build_pair(tiny.llama, llama_config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref.add_adapter("other", other_config(peft))
    ours.add_adapter("other", other_config(torchlora))
    copy_adapter(ref, ours, "other")
    return ref, ours


# ---------------------------------------------------------------------------------- scales
@pytest.mark.parametrize("use_rslora", [False, True])
def test_set_scale_matches_peft(use_rslora):
    ref, ours = build_pair(tiny.llama, lambda lib: llama_config(lib, use_rslora=use_rslora))
    for layer in lora_layers(ref) + lora_layers(ours):
        layer.set_scale("default", 0.25)
        layer.set_scale("missing", 3.0)  # a layer without the adapter is left alone (PEFT)
    assert_same_scalings(ours, ref)
    assert_close(out(ours), out(ref))
    with pytest.raises(TypeError, match="scale must be a float or an int"):
        lora_layers(ours)[0].set_scale("default", "2")


def test_scale_and_unscale_layer_match_peft():
    ref, ours = two_adapter_pair()
    ref.base_model.set_adapter(["default", "other"])
    ours.base_model.set_adapter(["default", "other"])
    initial = scalings(ours)
    for layers in (lora_layers(ref), lora_layers(ours)):
        for layer in layers:
            layer.scale_layer(3.0)
    assert_same_scalings(ours, ref)
    assert scalings(ours)[0]["other"] == pytest.approx(3 * 16 / 8 ** 0.5)
    assert_close(out(ours), out(ref))
    for layers in (lora_layers(ref), lora_layers(ours)):
        for layer in layers:
            layer.unscale_layer(1.5)
    assert_same_scalings(ours, ref)
    assert_close(out(ours), out(ref))
    for layers in (lora_layers(ref), lora_layers(ours)):
        for layer in layers:
            layer.unscale_layer()
    assert scalings(ours) == scalings(ref) == initial
    with pytest.raises(ValueError, match="must not be 0"):
        lora_layers(ours)[0].unscale_layer(0)


def test_scale_layer_only_touches_active_adapters():
    _, ours = two_adapter_pair()
    layer = lora_layers(ours)[0]
    layer.scale_layer(2.0)
    assert float(layer.scaling["default"]) == 4.0 and float(layer.scaling["other"]) == pytest.approx(16 / 8 ** 0.5)


def test_scale_layer_scales_embedding_adapters():
    # PEFT skips Embedding layers here (it looks the adapter up in lora_A, which embeddings leave
    # empty); torchlora scales them like every other layer: the low-rank term doubles
    model = torchlora.get_peft_model(tiny.plain_mlp(), torchlora.LoraConfig(target_modules=["emb"],
                                                                              init_lora_weights=False))
    emb = model.base_model.model.emb
    ids = tiny.input_ids(batch=3, length=4)
    with torch.no_grad():
        base = emb.base_layer(ids)
        delta = emb(ids) - base
        emb.scale_layer(2.0)
        assert_close(emb(ids) - base, 2 * delta)


def test_lora_model_set_scale():
    ref, ours = two_adapter_pair()
    ours.base_model.set_scale("other", 0.5)
    for layer in lora_layers(ref):
        layer.set_scale("other", 0.5)
    assert_same_scalings(ours, ref)
    ours.set_scale("default", 2)  # reaches the LoraModel through the PeftModel
    assert all(s["default"] == 4.0 for s in scalings(ours))
    with pytest.raises(ValueError, match="Adapter missing not found"):
        ours.base_model.set_scale("missing", 1.0)


def test_rescale_adapter_scale_matches_peft():
    ref, ours = build_pair(tiny.llama, llama_config)
    before = out(ours)
    with torchlora.helpers.rescale_adapter_scale(ours, 0.5), peft.helpers.rescale_adapter_scale(ref, 0.5):
        assert scalings(ours) == scalings(ref)
        assert_close(out(ours), out(ref))
        assert not torch.allclose(out(ours), before)
    assert scalings(ours) == [{"default": 2.0}] * 4
    assert_close(out(ours), before)
    with pytest.raises(RuntimeError, match="inside"):
        with torchlora.helpers.rescale_adapter_scale(ours, 0.0):
            raise RuntimeError("inside")
    assert_close(out(ours), before)


def test_rescale_adapter_scale_errors_match_peft():
    ref, ours = build_pair(tiny.llama, llama_config)
    for bad_model, bad_multiplier, error in ((ours, "0.5", TypeError), (tiny.llama(), 0.5, ValueError)):
        peft_model = ref if bad_model is ours else bad_model
        with pytest.raises(error) as ours_error:
            with torchlora.helpers.rescale_adapter_scale(bad_model, bad_multiplier):
                pass
        with pytest.raises(error) as peft_error:
            with peft.helpers.rescale_adapter_scale(peft_model, bad_multiplier):
                pass
        assert str(ours_error.value) == str(peft_error.value)


def test_rescaled_mixed_batches_see_the_new_scale():
    # mixed batches under no_grad use a cached stack of the adapters: it follows the rescaling
    ref, ours = two_adapter_pair()
    ref.eval(), ours.eval()
    names = ["default", "other"]
    with torch.no_grad():
        plain = ours(tiny.input_ids(), adapter_names=names).logits
        with torchlora.helpers.rescale_adapter_scale(ours, 0.3), peft.helpers.rescale_adapter_scale(ref, 0.3):
            assert_close(ours(tiny.input_ids(), adapter_names=names).logits,
                         ref(tiny.input_ids(), adapter_names=names).logits)
        assert_close(ours(tiny.input_ids(), adapter_names=names).logits, plain)


def test_tensor_scalings_stay_tensors():
    # after prepare_model_for_compiled_hotswap scalings are tensors a compiled graph reads in place
    from torchlora.utils.hotswap import prepare_model_for_compiled_hotswap

    ref, ours = build_pair(tiny.llama, llama_config)
    prepare_model_for_compiled_hotswap(ours)
    layer = lora_layers(ours)[0]
    tensor = layer.scaling["default"]
    layer.set_scale("default", 0.5)
    layer.scale_layer(3.0)
    assert layer.scaling["default"] is tensor and float(tensor) == 3.0
    for peft_layer in lora_layers(ref)[:1]:
        peft_layer.set_scale("default", 1.5)
    for layer in lora_layers(ours)[1:]:
        layer.set_scale("default", 0.75)
    for peft_layer in lora_layers(ref)[1:]:
        peft_layer.set_scale("default", 0.75)
    assert_close(out(ours), out(ref))


# ---------------------------------------------------------------------------------- status
def _status_dicts(statuses) -> list[dict]:
    return [dataclasses.asdict(s) for s in statuses]


def test_layer_and_model_status_match_peft():
    ref, ours = two_adapter_pair()
    assert _status_dicts(torchlora.get_layer_status(ours)) == _status_dicts(peft.get_layer_status(ref))
    assert dataclasses.asdict(ours.get_model_status()) == dataclasses.asdict(ref.get_model_status())
    status = ours.get_model_status()
    assert status.available_adapters == ["default", "other"] and status.active_adapters == ["default"]
    assert status.requires_grad == {"default": True, "other": False}
    assert torchlora.get_layer_status(ours)[0].module_type == "lora.Linear"
    from torchlora.peft_model import TunerLayerStatus, TunerModelStatus

    assert [f.name for f in dataclasses.fields(TunerLayerStatus)] == [
        f.name for f in dataclasses.fields(peft.peft_model.TunerLayerStatus)]
    assert [f.name for f in dataclasses.fields(TunerModelStatus)] == [
        f.name for f in dataclasses.fields(peft.peft_model.TunerModelStatus)]


def test_irregular_status_matches_peft():
    ref, ours = two_adapter_pair()
    for model in (ref, ours):
        layers = lora_layers(model)
        layers[0].set_adapter("other")  # one layer disagrees about the active adapter
        layers[1].enable_adapters(False)
        layers[2].merge(adapter_names=["default"])
    assert _status_dicts(torchlora.get_layer_status(ours)) == _status_dicts(peft.get_layer_status(ref))
    ours_status, ref_status = ours.get_model_status(), ref.get_model_status()
    assert dataclasses.asdict(ours_status) == dataclasses.asdict(ref_status)
    assert ours_status.enabled == ours_status.active_adapters == ours_status.merged_adapters == "irregular"


def test_status_of_other_models_matches_peft():
    def config(lib):
        return lib.LoraConfig(target_modules=["query", "value"], task_type="SEQ_CLS")

    ref, ours = build_pair(tiny.bert_seq_cls, config)
    assert _status_dicts(ours.get_layer_status()) == _status_dicts(ref.get_layer_status())
    assert dataclasses.asdict(ours.get_model_status()) == dataclasses.asdict(ref.get_model_status())
    injected = torchlora.inject_adapter_in_model(torchlora.LoraConfig(target_modules=["lin0"]), tiny.plain_mlp())
    ref_injected = peft.inject_adapter_in_model(peft.LoraConfig(target_modules=["lin0"]), tiny.plain_mlp())
    assert dataclasses.asdict(torchlora.get_model_status(injected)) == dataclasses.asdict(
        peft.get_model_status(ref_injected))
    with pytest.raises(ValueError) as ours_error:
        torchlora.get_layer_status(tiny.plain_mlp())
    with pytest.raises(ValueError) as peft_error:
        peft.get_layer_status(tiny.plain_mlp())
    assert str(ours_error.value) == str(peft_error.value)


# ---------------------------------------------------------------------------------- requires_grad / set_adapter
def test_set_requires_grad_matches_peft():
    ref, ours = two_adapter_pair()
    for model in (ref, ours):
        model.set_requires_grad("other")
    assert trainable(ours) == trainable(ref)
    assert ours.get_model_status().requires_grad == {"default": True, "other": True}
    for model in (ref, ours):
        model.set_requires_grad(["default", "other"], requires_grad=False)
    assert trainable(ours) == trainable(ref)
    for model in (ref.base_model, ours.base_model):
        model.set_requires_grad(("default",))
    assert trainable(ours) == trainable(ref)
    layer = lora_layers(ours)[0]
    layer.set_requires_grad("other", True)
    assert layer.lora_A["other"].weight.requires_grad and not lora_layers(ours)[1].lora_A["other"].weight.requires_grad
    with pytest.raises(ValueError, match="missing"):
        ours.set_requires_grad("missing")


@pytest.mark.parametrize("inference_mode", [False, True])
def test_lora_model_set_adapter_with_a_list_matches_peft(inference_mode):
    ref, ours = two_adapter_pair()
    for model in (ref.base_model, ours.base_model):
        model.set_adapter(["default", "other"], inference_mode=inference_mode)
    assert ours.base_model.active_adapters == ref.base_model.active_adapters == ["default", "other"]
    assert trainable(ours) == trainable(ref)
    assert_close(out(ours), out(ref))
    assert dataclasses.asdict(ours.get_model_status()) == dataclasses.asdict(ref.get_model_status())


@pytest.mark.parametrize("inference_mode", [False, True])
def test_peft_model_set_adapter_matches_peft(inference_mode):
    ref, ours = two_adapter_pair()
    for model in (ref, ours):
        model.set_adapter("other", inference_mode=inference_mode)
    assert ours.active_adapter == ref.active_adapter == "other"
    assert trainable(ours) == trainable(ref)
    assert_close(out(ours), out(ref))
    with pytest.raises(ValueError, match="Adapter missing not found"):
        ours.set_adapter("missing")


# ---------------------------------------------------------------------------------- helpers
def test_check_if_peft_model(tmp_path):
    ref, ours = build_pair(tiny.llama, llama_config)
    ours.save_pretrained(str(tmp_path / "ours"))
    ref.save_pretrained(str(tmp_path / "ref"))
    for folder in ("ours", "ref"):
        assert torchlora.helpers.check_if_peft_model(str(tmp_path / folder))
        assert peft.helpers.check_if_peft_model(str(tmp_path / folder))
    (tmp_path / "empty").mkdir()
    assert not torchlora.helpers.check_if_peft_model(str(tmp_path / "empty"))
    assert not torchlora.helpers.check_if_peft_model(str(tmp_path / "nowhere"))


def test_update_signature_matches_peft():
    ref, ours = build_pair(tiny.llama, lambda lib: llama_config(lib))
    torchlora.helpers.update_signature(ours)
    peft.helpers.update_signature(ref)
    for method in ("forward", "generate"):
        ours_sig = inspect.signature(getattr(ours, method))
        assert list(ours_sig.parameters) == list(inspect.signature(getattr(ref, method)).parameters)
    assert "input_ids" in inspect.signature(ours.forward).parameters
    assert ours.forward.__doc__ == type(ours.get_base_model()).forward.__doc__
    assert_close(out(ours), out(ref))
    with pytest.raises(ValueError, match="not supported"):
        torchlora.helpers.update_signature(ours, "backward")


def test_status_with_trainable_tokens_matches_peft():
    def config(lib):
        return lib.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[1, 2])

    ref, ours = build_pair(tiny.llama, config)
    assert _status_dicts(ours.get_layer_status()) == _status_dicts(ref.get_layer_status())
    assert ours.get_layer_status()[0].module_type == "TrainableTokensLayer"
    assert dataclasses.asdict(ours.get_model_status()) == dataclasses.asdict(ref.get_model_status())
