"""LoRA on quantized base layers (bitsandbytes 4-bit / 8-bit, torchao), with the real PEFT as
the oracle: the same quantized tiny models get the same LoRA layers, outputs and gradients;
adapter files move both ways; merging works on the CPU; prepare_model_for_kbit_training has
PEFT's effect."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

import tiny_models  # noqa: E402
from peft_parity import copy_adapter, grads, logits  # noqa: E402

import torchlora  # noqa: E402
from torchlora.nn import LoraLayer, quantized_weight  # noqa: E402
from torchlora.utils import prepare_model_for_kbit_training, quantize_linear_layers  # noqa: E402

# (bits, quantize_linear_layers options): every setting the tests cover
QUANT = {
    "nf4-fp32": (4, dict(quant_type="nf4", compute_dtype=torch.float32)),
    "nf4-dq-bf16": (4, dict(quant_type="nf4", double_quant=True, compute_dtype=torch.bfloat16)),
    "fp4-fp32": (4, dict(quant_type="fp4", compute_dtype=torch.float32)),
    "fp4-dq-fp32": (4, dict(quant_type="fp4", double_quant=True, compute_dtype=torch.float32)),
    "nf4-bf16-storage": (4, dict(quant_type="nf4", quant_storage=torch.bfloat16)),
    "int8": (8, dict(threshold=6.0)),
}
MODELS = {"llama": tiny_models.llama_for_quantization, "opt": tiny_models.opt}
PEFT_ROUNDING = "Merge lora module to {} linear may get different generations due to rounding errors."
PEFT_UNMERGE_ROUNDING = "Un" + PEFT_ROUNDING[0].lower() + PEFT_ROUNDING[1:]


def quantized(model_name: str, quant: str, seed: int = 0, cpu_inference_layout: bool = False):
    model = MODELS[model_name](seed)
    bits, options = QUANT[quant]
    quantize_linear_layers(model, bits, skip_modules=["lm_head"], cpu_inference_layout=cpu_inference_layout, **options)
    return model


def lora_config(lib, **overrides):
    options = dict(r=8, lora_alpha=16, lora_dropout=0.0, init_lora_weights=False,
                   target_modules=["q_proj", "v_proj", "fc1", "down_proj"])
    options.update(overrides)
    return lib.LoraConfig(**options)


def pair(model_name: str, quant: str, cpu_inference_layout: bool = False, **config):
    """(PEFT model, torchlora model) on identically quantized bases, ours given PEFT's adapter."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.get_peft_model(quantized(model_name, quant, 0, cpu_inference_layout), lora_config(peft, **config))
        ours = torchlora.get_peft_model(quantized(model_name, quant, 0, cpu_inference_layout),
                                        lora_config(torchlora, **config))
    copy_adapter(ref, ours)
    return ref, ours


def wrapped(model) -> set[str]:
    return {n for n, m in model.named_modules()
            if isinstance(m, (LoraLayer, peft.tuners.lora.LoraLayer)) and not isinstance(m.base_layer, LoraLayer)}


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: g for n, g in grads(model).items() if "lora_" in n}


# ------------------------------------------------------------------ the weight seam
def _float_and_quantized(bits: int, options: dict, rows: int = 96, cols: int = 128):
    torch.manual_seed(0)
    holder = torch.nn.Sequential(torch.nn.Linear(cols, rows))
    weight = holder[0].weight.detach().clone()
    quantize_linear_layers(holder, bits, cpu_inference_layout=True, **options)
    return weight, holder[0]


def _rounding_bound(bits: int, weight: torch.Tensor) -> float:
    return float(weight.abs().max()) * (0.2 if bits == 4 else 0.01)


@pytest.mark.parametrize("quant", sorted(QUANT))
def test_dequantize_row_blocks_and_write_keep_the_layer_settings(quant):
    bits, options = QUANT[quant]
    weight, layer = _float_and_quantized(bits, options)
    assert quantized_weight.is_quantized(layer)
    assert quantized_weight.describe(layer) == ("4-bit" if bits == 4 else "8-bit")
    full = quantized_weight.dequantized_weight(layer)
    assert full.shape == weight.shape and full.dtype.is_floating_point
    assert (full - weight).abs().max() < _rounding_bound(bits, weight)
    if bits == 4:  # bitsandbytes' own dequantization is the reference
        assert torch.equal(full, bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state))
    blocks = list(quantized_weight.weight_row_blocks(layer, rows_per_block=40))
    assert [start for start, _ in blocks] == [0, 40, 80]
    assert torch.equal(torch.cat([rows for _, rows in blocks]), full)

    x = torch.randn(3, weight.shape[1])
    layer.eval()
    with torch.no_grad():
        layer(x)  # bitsandbytes may repack a 4-bit weight for its CPU kernel here
    again = quantized_weight.dequantized_weight(layer)
    assert (again - full).abs().max() < 1e-2 * float(full.abs().max())  # the CPU layout keeps absmax in bfloat16
    assert torch.equal(torch.cat([r for _, r in quantized_weight.weight_row_blocks(layer, 40)]), again)

    delta = 0.5 * weight.abs().max() * torch.randn_like(weight).sign()
    before = (type(layer.weight), getattr(layer.weight, "quant_type", None),
              getattr(layer.weight, "compress_statistics", None), getattr(layer.weight, "quant_storage", None),
              getattr(layer.weight, "blocksize", None), getattr(layer, "compute_dtype", None))
    quantized_weight.write_weight(layer, again + delta)
    after = (type(layer.weight), getattr(layer.weight, "quant_type", None),
             getattr(layer.weight, "compress_statistics", None), getattr(layer.weight, "quant_storage", None),
             getattr(layer.weight, "blocksize", None), getattr(layer, "compute_dtype", None))
    assert after == before and type(layer).__module__.startswith("bitsandbytes")
    if bits == 8:
        assert layer.state.threshold == options["threshold"]
    written = quantized_weight.dequantized_weight(layer)
    assert (written - (again + delta)).abs().max() < _rounding_bound(bits, again + delta)
    assert (written - again).abs().max() > 0.4 * float(weight.abs().max())  # the new value, not the old one
    with torch.no_grad():
        out = layer(x)
    expected = x.to(written.dtype) @ written.T + layer.bias.to(written.dtype)
    assert torch.allclose(out.float(), expected.float(), atol=5e-2 * float(expected.abs().max()))


def test_row_blocks_never_dequantize_the_whole_4bit_weight(monkeypatch):
    _, layer = _float_and_quantized(4, dict(quant_type="nf4", double_quant=True), rows=128, cols=256)
    sizes = []
    real = bnb.functional.dequantize_4bit

    def recording(A, quant_state=None, *args, **kwargs):
        sizes.append(A.numel() * 2)  # two values a byte
        return real(A, quant_state, *args, **kwargs)

    monkeypatch.setattr(bnb.functional, "dequantize_4bit", recording)
    total = sum(rows.numel() for _, rows in quantized_weight.weight_row_blocks(layer, rows_per_block=32))
    assert total == 128 * 256 and len(sizes) == 4 and max(sizes) == 32 * 256
    with pytest.raises(ValueError, match="rows_per_block"):
        list(quantized_weight.weight_row_blocks(layer, rows_per_block=0))


def test_training_after_evaluation_keeps_the_training_layout():
    _, ours = pair("llama", "nf4-dq-bf16")
    ids = tiny_models.input_ids()
    with torch.no_grad():
        before = logits(ours.eval()(ids))
    layers = _quantized_layers(ours).values()
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    ours.train()
    logits(ours(ids)).sum().backward()
    assert lora_grads(ours)
    with torch.no_grad():
        torch.testing.assert_close(logits(ours.eval()(ids)), before)


def test_no_dequantized_weight_is_kept_on_the_layer():
    _, ours = pair("llama", "nf4-fp32")
    ours.merge_adapter()
    ours.unmerge_adapter()
    for module in ours.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            floats = [t for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
                      if t.dtype.is_floating_point and t.dim() == 2]
            assert not floats and module.weight.dtype == torch.uint8


# ------------------------------------------------------------------ parity with PEFT
@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("quant", ["nf4-fp32", "nf4-dq-bf16", "fp4-fp32", "fp4-dq-fp32", "int8"])
def test_outputs_and_adapter_gradients_equal_peft(model_name, quant):
    ref, ours = pair(model_name, quant)
    assert wrapped(ours) == wrapped(ref) and wrapped(ours)
    ids = tiny_models.input_ids(batch=2, length=6)
    ref.train()
    ours.train()
    out_ref, out_ours = logits(ref(ids)), logits(ours(ids))
    assert out_ref.dtype == out_ours.dtype
    torch.testing.assert_close(out_ours, out_ref, atol=1e-5, rtol=1e-4)
    (out_ref.float() ** 2).mean().backward()
    (out_ours.float() ** 2).mean().backward()
    g_ref, g_ours = lora_grads(ref), lora_grads(ours)
    assert g_ours.keys() == g_ref.keys() and g_ours
    for name in g_ref:
        torch.testing.assert_close(g_ours[name], g_ref[name], atol=1e-5, rtol=1e-3, msg=name)
    ref.eval()
    ours.eval()
    with torch.no_grad():  # the eval path (bitsandbytes' CPU inference layout)
        torch.testing.assert_close(logits(ours(ids)), logits(ref(ids)), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("quant", ["nf4-fp32", "int8"])
@pytest.mark.parametrize("targets", ["all-linear", None, ["k_proj", "out_proj", "gate_proj"]])
def test_wraps_exactly_what_peft_wraps(model_name, quant, targets):
    ref, ours = pair(model_name, quant, target_modules=targets)
    assert wrapped(ours) == wrapped(ref) and wrapped(ours)
    assert not any(name.endswith("lm_head") for name in wrapped(ours))
    for name in wrapped(ours):
        assert type(ours.get_submodule(name).base_layer) is type(ref.get_submodule(name).base_layer)


@pytest.mark.parametrize("quant", ["nf4-dq-bf16", "int8"])
def test_adapter_files_move_both_ways_with_peft(tmp_path, quant):
    ref, ours = pair("opt", quant)
    ids = tiny_models.input_ids()
    ours.save_pretrained(str(tmp_path / "ours"))
    ref.save_pretrained(str(tmp_path / "ref"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        by_peft = peft.PeftModel.from_pretrained(quantized("opt", quant), str(tmp_path / "ours")).eval()
        by_ours = torchlora.PeftModel.from_pretrained(quantized("opt", quant), str(tmp_path / "ref")).eval()
    with torch.no_grad():
        expected = logits(ours.eval()(ids))
        torch.testing.assert_close(logits(by_peft(ids)), expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(logits(by_ours(ids)), logits(ref.eval()(ids)), atol=1e-5, rtol=1e-4)
        base = logits(quantized("opt", quant)(ids))
    assert (expected - base).abs().max() > 1e-2  # the adapter changes the output


# ------------------------------------------------------------------ merging on the CPU
def _quantized_layers(model):
    return {n: m for n, m in model.named_modules() if quantized_weight.is_quantized(m)}


@pytest.mark.parametrize("quant", ["nf4-fp32", "fp4-dq-fp32", "nf4-dq-bf16", "int8"])
def test_merge_and_unload_and_unmerge_on_the_cpu(quant):
    bits = QUANT[quant][0]
    # measured rounding: 4-bit re-quantization moves a layer by up to ~0.25 of its delta and the
    # logits by ~0.16 of the adapter's change; int8 by ~0.015. Without the merge both ratios are 1.
    layer_tol, model_tol = (0.35, 0.3) if bits == 4 else (0.05, 0.05)
    peft_text = open(os.path.join(os.path.dirname(peft.tuners.lora.__file__), "bnb.py"), encoding="utf-8").read()
    described = "4-bit" if bits == 4 else "8-bit"
    assert PEFT_ROUNDING.format(described) in peft_text and PEFT_UNMERGE_ROUNDING.format(described) in peft_text
    # bitsandbytes' CPU inference layout, which the first eval forward below switches 4-bit layers to
    _, ours = pair("llama", quant, cpu_inference_layout=True)
    with torch.no_grad():  # a delta about as large as the base weights
        for name, param in ours.named_parameters():
            if "lora_B" in name:
                param.mul_(0.2)
    ids = tiny_models.input_ids()
    ours.eval()
    layers = {n: m for n, m in ours.named_modules() if isinstance(m, LoraLayer)}
    originals = {n: quantized_weight.dequantized_weight(m.base_layer).clone() for n, m in layers.items()}
    deltas = {n: m.get_delta_weight("default") for n, m in layers.items()}
    with torch.no_grad():
        with_adapter = logits(ours(ids))
        with ours.disable_adapter():
            base_out = logits(ours(ids))
    change = (with_adapter - base_out).norm()
    assert change > 0.1 * base_out.norm()
    if bits == 4:
        assert all(m.weight.quant_state.packing_format_for_cpu for m in _quantized_layers(ours).values())

    with pytest.warns(UserWarning) as record:
        ours.merge_adapter()
    assert PEFT_ROUNDING.format(described) in [str(w.message) for w in record]
    for name, layer in layers.items():
        merged_weight = quantized_weight.dequantized_weight(layer.base_layer)
        assert (merged_weight - originals[name] - deltas[name]).norm() < layer_tol * deltas[name].norm(), name
        assert type(layer.base_layer).__module__.startswith("bitsandbytes")
    with torch.no_grad():
        assert (logits(ours(ids)) - with_adapter).norm() < model_tol * change

    with pytest.warns(UserWarning) as record:
        ours.unmerge_adapter()
    assert PEFT_UNMERGE_ROUNDING.format(described) in [str(w.message) for w in record]
    for name, layer in layers.items():
        restored = quantized_weight.dequantized_weight(layer.base_layer)
        assert (restored - originals[name]).norm() < 2 * layer_tol * deltas[name].norm(), name
    with torch.no_grad():
        assert (logits(ours(ids)) - with_adapter).norm() < 2 * model_tol * change  # adapter on top again

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = ours.merge_and_unload()
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    assert len(_quantized_layers(merged)) == 14
    with torch.no_grad():
        assert (logits(merged(ids)) - with_adapter).norm() < 2 * model_tol * change


def test_merge_of_a_quantized_layer_with_safe_merge_refuses_non_finite_values():
    _, ours = pair("llama", "nf4-fp32")
    layer = ours.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    before = layer.base_layer.weight.data.clone()
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaNs detected"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.base_layer.weight.data, before) and not layer.merged


# ------------------------------------------------------------------ transformers' quantizer
def test_transformers_bitsandbytes_config_on_the_cpu(tmp_path):
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    tiny_models.llama_for_quantization().save_pretrained(str(tmp_path / "base"))
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)

    def load():
        return LlamaForCausalLM.from_pretrained(str(tmp_path / "base"), quantization_config=config, device_map="cpu")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.get_peft_model(prepare_peft(load()), lora_config(peft, target_modules="all-linear"))
        ours = torchlora.get_peft_model(prepare_model_for_kbit_training(load()),
                                        lora_config(torchlora, target_modules="all-linear"))
    copy_adapter(ref, ours)
    assert wrapped(ours) == wrapped(ref) and len(wrapped(ours)) == 14
    ids = tiny_models.input_ids()
    out_ref, out_ours = logits(ref(ids)), logits(ours(ids))
    torch.testing.assert_close(out_ours, out_ref, atol=1e-5, rtol=1e-4)
    out_ref.sum().backward()
    out_ours.sum().backward()
    g_ref, g_ours = lora_grads(ref), lora_grads(ours)
    assert g_ref.keys() == g_ours.keys() and g_ref
    for name in g_ref:
        torch.testing.assert_close(g_ours[name], g_ref[name], atol=1e-5, rtol=1e-3, msg=name)


def prepare_peft(model):
    return peft.prepare_model_for_kbit_training(model)


# ------------------------------------------------------------------ prepare_model_for_kbit_training
def _half_quantized_llama():
    model = tiny_models.llama_for_quantization().to(torch.bfloat16)
    quantize_linear_layers(model, 4, skip_modules=["lm_head"], compute_dtype=torch.bfloat16)
    model.is_loaded_in_4bit = True
    return model


def _prepared_state(model) -> dict:
    params = {n: (p.dtype, p.requires_grad, type(p).__name__) for n, p in model.named_parameters()}
    ids = tiny_models.input_ids()
    embeds = model.get_input_embeddings()(ids)
    return dict(params=params, checkpointing=model.is_gradient_checkpointing,
                embeds_require_grad=embeds.requires_grad,
                layer_flags=[getattr(m, "gradient_checkpointing", None) for m in model.modules()
                             if hasattr(m, "gradient_checkpointing")])


@pytest.mark.parametrize("kwargs", [
    {}, dict(use_gradient_checkpointing=False), dict(gradient_checkpointing_kwargs={"use_reentrant": False}),
    dict(gradient_checkpointing_kwargs={"use_reentrant": True}),
])
def test_prepare_model_for_kbit_training_has_peft_effect(kwargs):
    ours = prepare_model_for_kbit_training(_half_quantized_llama(), **kwargs)
    ref = peft.prepare_model_for_kbit_training(_half_quantized_llama(), **kwargs)
    got, expected = _prepared_state(ours), _prepared_state(ref)
    assert got == expected
    dtypes = {dtype for dtype, _, _ in got["params"].values()}
    assert torch.bfloat16 not in dtypes and torch.uint8 in dtypes  # upcast, except the 4-bit weights
    assert not any(requires_grad for _, requires_grad, _ in got["params"].values())


def test_prepare_model_for_kbit_training_paths_and_errors():
    import torchlora.utils.other as other

    assert torchlora.prepare_model_for_kbit_training is other.prepare_model_for_kbit_training
    assert "prepare_model_for_kbit_training" in torchlora.__all__
    model = tiny_models.llama_for_quantization().to(torch.bfloat16)  # not quantized: no checkpointing
    prepare_model_for_kbit_training(model)
    assert not model.is_gradient_checkpointing and all(p.dtype == torch.float32 for p in model.parameters())
    with pytest.raises(TypeError, match="torch.nn.Module"):
        prepare_model_for_kbit_training("model")
    with pytest.raises(TypeError, match="gradient_checkpointing_kwargs"):
        prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs=["use_reentrant"])


def test_qlora_training_step_after_prepare_matches_peft():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.get_peft_model(peft.prepare_model_for_kbit_training(_half_quantized_llama()), lora_config(peft))
        ours = torchlora.get_peft_model(prepare_model_for_kbit_training(_half_quantized_llama()),
                                        lora_config(torchlora))
    copy_adapter(ref, ours)
    ids = tiny_models.input_ids()
    ref.train()
    ours.train()
    loss_ref = ref(input_ids=ids, labels=ids).loss
    loss_ours = ours(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(loss_ours, loss_ref, atol=1e-5, rtol=1e-5)
    loss_ref.backward()
    loss_ours.backward()
    g_ref, g_ours = lora_grads(ref), lora_grads(ours)
    assert g_ref.keys() == g_ours.keys() and g_ref
    for name in g_ref:
        torch.testing.assert_close(g_ours[name], g_ref[name], atol=1e-5, rtol=1e-3, msg=name)


# ------------------------------------------------------------------ torchao
def _torchao_quantized(config_name: str):
    torchao_quant = pytest.importorskip("torchao.quantization")
    configs = {"int8": lambda: torchao_quant.Int8WeightOnlyConfig(),
               "intx-int4": lambda: torchao_quant.IntxWeightOnlyConfig(weight_dtype=torch.int4)}
    model = tiny_models.llama_for_quantization()
    torchao_quant.quantize_(model, configs[config_name](),
                            filter_fn=lambda m, name: isinstance(m, torch.nn.Linear) and "lm_head" not in name)
    return model


@pytest.mark.parametrize("config_name", ["int8", "intx-int4"])
def test_torchao_weight_only_base_matches_peft_and_merges(config_name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.get_peft_model(_torchao_quantized(config_name), lora_config(peft))
        ours = torchlora.get_peft_model(_torchao_quantized(config_name), lora_config(torchlora))
    copy_adapter(ref, ours)
    assert wrapped(ours) == wrapped(ref) and wrapped(ours)
    ids = tiny_models.input_ids()
    ref.train()
    ours.train()
    out_ref, out_ours = logits(ref(ids)), logits(ours(ids))
    torch.testing.assert_close(out_ours, out_ref, atol=1e-5, rtol=1e-4)
    out_ref.sum().backward()
    out_ours.sum().backward()
    g_ref, g_ours = lora_grads(ref), lora_grads(ours)
    assert g_ref.keys() == g_ours.keys() and g_ref
    for name in g_ref:
        torch.testing.assert_close(g_ours[name], g_ref[name], atol=1e-5, rtol=1e-3, msg=name)

    ours.eval()
    layer = ours.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    weight_class = type(layer.base_layer.weight)
    original = quantized_weight.dequantized_weight(layer.base_layer).clone()
    blocks = torch.cat([rows for _, rows in quantized_weight.weight_row_blocks(layer.base_layer, 24)])
    torch.testing.assert_close(blocks, original)
    delta = layer.get_delta_weight("default")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer.merge()
    assert type(layer.base_layer.weight) is weight_class
    merged = quantized_weight.dequantized_weight(layer.base_layer)
    assert (merged - (original + delta)).norm() < 0.2 * delta.norm()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer.unmerge()
    assert (quantized_weight.dequantized_weight(layer.base_layer) - original).norm() < 0.2 * delta.norm()


def test_torchao_int4_weight_only():
    torchao_quant = pytest.importorskip("torchao.quantization")
    layer = torch.nn.Sequential(torch.nn.Linear(128, 64, dtype=torch.bfloat16))
    try:
        torchao_quant.quantize_(layer, torchao_quant.Int4WeightOnlyConfig(group_size=64))
    except ImportError as exc:
        pytest.skip(f"torchao's Int4WeightOnlyConfig (Int4Tensor) does not run here: {exc}; the CPU int4 path "
                    "IntxWeightOnlyConfig(weight_dtype=torch.int4) is tested instead")
    assert quantized_weight.is_quantized(layer[0])


# ------------------------------------------------------------------ without bitsandbytes
def test_torchlora_imports_and_these_tests_skip_without_bitsandbytes(tmp_path):
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['bitsandbytes'] = None\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # the torchlora this run imports: the source tree in a dev build, site-packages when installed
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(torchlora.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), package_parent,
                                                       os.path.join(root, "tests")]))
    probe = ("import torch, torchlora\n"
             "from torchlora.nn import quantized_weight as q\n"
             "layer = torch.nn.Linear(4, 3)\n"
             "assert not q.is_quantized(layer) and q.describe(layer) == 'float'\n"
             "m = torchlora.get_peft_model(torch.nn.Sequential(layer), torchlora.LoraConfig(target_modules=['0']))\n"
             "m.merge_and_unload()\n"
             "try:\n    import bitsandbytes\nexcept ImportError:\n    print('no bitsandbytes')\n")
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "no bitsandbytes" in done.stdout
    done = subprocess.run([sys.executable, "-m", "pytest", os.path.abspath(__file__), "-q", "-p", "no:cacheprovider",
                           "-rs"], env=env, capture_output=True, text=True, timeout=180, cwd=root)
    # 5: pytest's "no tests collected" -- the module skipped as a whole
    assert done.returncode in (0, 5) and "1 skipped" in done.stdout and "bitsandbytes" in done.stdout, \
        done.stdout[-2000:]
