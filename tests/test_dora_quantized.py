"""DoRA on quantized bases (bitsandbytes 4-bit / 8-bit on the CPU) with the real PEFT as the
oracle: the magnitude starts at PEFT's norm of the dequantized weight, outputs and gradients
(magnitude included) equal PEFT's, files move both ways, and merging works on the CPU where
PEFT's does not."""

from __future__ import annotations

import warnings

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

import tiny_models  # noqa: E402
from peft_parity import copy_adapter, logits  # noqa: E402
from test_quantized_bases import QUANT, lora_grads, pair, quantized, wrapped  # noqa: E402

import torchlora  # noqa: E402
from torchlora.nn import LoraLayer, quantized_weight  # noqa: E402

DORA = dict(use_dora=True)


def magnitudes(model) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if "lora_magnitude_vector" in n}


@pytest.mark.parametrize("quant", ["nf4-fp32", "nf4-dq-bf16", "int8"])
def test_initial_magnitude_is_peft_norm_of_the_dequantized_weight(quant):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.get_peft_model(quantized("llama", quant), peft.LoraConfig(target_modules=["q_proj", "down_proj"],
                                                                             **DORA))
        ours = torchlora.get_peft_model(quantized("llama", quant),
                                        torchlora.LoraConfig(target_modules=["q_proj", "down_proj"], **DORA))
    m_ref, m_ours = magnitudes(ref), magnitudes(ours)
    assert m_ours.keys() == m_ref.keys() and m_ref
    for name in m_ref:
        torch.testing.assert_close(m_ours[name], m_ref[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("model_name", ["llama", "opt"])
@pytest.mark.parametrize("quant", ["nf4-fp32", "nf4-dq-bf16", "fp4-fp32", "int8"])
def test_dora_outputs_and_gradients_equal_peft(model_name, quant):
    ref, ours = pair(model_name, quant, **DORA)
    assert wrapped(ours) == wrapped(ref) and wrapped(ours)
    assert magnitudes(ours).keys() == magnitudes(ref).keys() and magnitudes(ours)
    ids = tiny_models.input_ids(batch=2, length=6)
    ref.train()
    ours.train()
    out_ref, out_ours = logits(ref(ids)), logits(ours(ids))
    torch.testing.assert_close(out_ours, out_ref, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        with ours.disable_adapter():
            base = logits(ours(ids))
    assert (out_ours - base).abs().max() > 1e-3  # the adapter (init_lora_weights=False) is not the identity
    (out_ref.float() ** 2).mean().backward()
    (out_ours.float() ** 2).mean().backward()
    g_ref, g_ours = lora_grads(ref), lora_grads(ours)
    assert g_ours.keys() == g_ref.keys() and any("lora_magnitude_vector" in n for n in g_ref)
    for name in g_ref:
        torch.testing.assert_close(g_ours[name], g_ref[name], atol=1e-5, rtol=1e-3, msg=name)
    # the eval path (bitsandbytes' CPU inference layout) on a fresh pair: after a backward, PEFT's
    # own eval forward of an 8-bit DoRA layer fails on the CPU
    ref, ours = pair(model_name, quant, **DORA)
    ref.eval()
    ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(logits(ours(ids)), logits(ref(ids)), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("quant", ["nf4-dq-bf16", "int8"])
def test_dora_files_move_both_ways_with_peft(tmp_path, quant):
    ref, ours = pair("llama", quant, **DORA)
    with torch.no_grad():  # a trained magnitude, so that loading it (not re-initialising it) shows
        for module in (ref, ours):
            for name, param in module.named_parameters():
                if "lora_magnitude_vector" in name:
                    param.mul_(1.25)
    ids = tiny_models.input_ids()
    ours.save_pretrained(str(tmp_path / "ours"))
    ref.save_pretrained(str(tmp_path / "ref"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        by_peft = peft.PeftModel.from_pretrained(quantized("llama", quant), str(tmp_path / "ours")).eval()
        by_ours = torchlora.PeftModel.from_pretrained(quantized("llama", quant), str(tmp_path / "ref")).eval()
    with torch.no_grad():
        expected = logits(ours.eval()(ids))
        torch.testing.assert_close(logits(by_peft(ids)), expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(logits(by_ours(ids)), logits(ref.eval()(ids)), atol=1e-5, rtol=1e-4)
    for name, value in magnitudes(by_ours).items():
        torch.testing.assert_close(value, magnitudes(ref)[name], msg=name)


@pytest.mark.parametrize("quant", ["nf4-fp32", "int8"])
def test_dora_merge_unmerge_and_merge_and_unload_on_the_cpu(quant):
    bits = QUANT[quant][0]
    # re-quantizing the merged weight rounds it (see test_quantized_bases' merge test for the bounds)
    model_tol = 0.3 if bits == 4 else 0.05
    _, ours = pair("llama", quant, cpu_inference_layout=True, **DORA)
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if "lora_B" in name:
                param.mul_(0.2)
            elif "lora_magnitude_vector" in name:
                param.mul_(1.5)  # DoRA's own part of the change: merging must scale the rows
    ids = tiny_models.input_ids()
    ours.eval()
    layers = {n: m for n, m in ours.named_modules() if isinstance(m, LoraLayer)}
    with torch.no_grad():
        with_adapter = logits(ours(ids))
        with ours.disable_adapter():
            base_out = logits(ours(ids))
    change = (with_adapter - base_out).norm()
    assert change > 0.1 * base_out.norm()
    originals = {n: quantized_weight.dequantized_weight(m.base_layer).clone() for n, m in layers.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours.merge_adapter()
    for name, layer in layers.items():
        merged = quantized_weight.dequantized_weight(layer.base_layer)
        # DoRA's merged weight: g * (W + delta), rows scaled by ~1.5
        ratio = merged.norm(dim=1) / originals[name].norm(dim=1)
        assert ratio.mean() > 1.3, name
    with torch.no_grad():
        assert (logits(ours(ids)) - with_adapter).norm() < model_tol * change
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours.unmerge_adapter()
    for name, layer in layers.items():
        restored = quantized_weight.dequantized_weight(layer.base_layer)
        assert (restored - originals[name]).norm() < 0.35 * originals[name].norm(), name
    with torch.no_grad():
        assert (logits(ours(ids)) - with_adapter).norm() < 2 * model_tol * change
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unloaded = ours.merge_and_unload()
    assert not any(isinstance(m, LoraLayer) for m in unloaded.modules())
    assert any(quantized_weight.is_quantized(m) for m in unloaded.modules())
    with torch.no_grad():
        assert (logits(unloaded(ids)) - with_adapter).norm() < 2 * model_tol * change

