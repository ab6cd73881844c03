"""Quantizing the Linear layers of a model in place with bitsandbytes (4-bit nf4/fp4 or 8-bit),
from the float weights it holds: a QLoRA base built without transformers' quantizer, which
also works on the CPU."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

_QUANT_TYPES = ("nf4", "fp4")


def quantize_linear_layers(
    model: nn.Module,
    bits: int = 4,
    *,
    quant_type: str = "nf4",
    compute_dtype: torch.dtype = torch.float32,
    double_quant: bool = False,
    quant_storage: torch.dtype = torch.uint8,
    blocksize: int | None = None,
    threshold: float = 6.0,
    skip_modules: Iterable[str] = (),
    cpu_inference_layout: bool = False,
) -> list[str]:
    """Replace every ``torch.nn.Linear`` of ``model`` (exactly that class) whose name is not in
    ``skip_modules`` (or below one of them) by ``bitsandbytes.nn.Linear4bit`` (``bits=4``:
    ``quant_type``, ``compute_dtype``, ``double_quant``, ``quant_storage``, ``blocksize``) or
    ``Linear8bitLt`` (``bits=8``: int8 weights, outlier ``threshold``), quantized from the
    layer's weight on its device. Returns the names of the replaced layers.

    bitsandbytes repacks a 4-bit weight for its CPU inference kernel on the first eval-mode
    forward without gradients (rounding absmax to bfloat16); with bitsandbytes 0.50 a layer so
    repacked fails in training afterwards. ``cpu_inference_layout=False`` (the default) keeps
    the training layout; True lets bitsandbytes repack."""
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise ImportError("quantizing layers needs bitsandbytes: pip install bitsandbytes") from exc
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    if bits == 4 and quant_type not in _QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {_QUANT_TYPES}, got {quant_type!r}")
    skip = tuple(skip_modules)
    if isinstance(skip_modules, str):
        raise TypeError("skip_modules must be an iterable of module names, not a string")
    names = [name for name, module in model.named_modules()
             if type(module) is nn.Linear and not any(name == s or name.startswith(s + ".") for s in skip)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        float_layer = getattr(parent, child)
        new = _quantized(bnb, float_layer, bits, quant_type, compute_dtype, double_quant, quant_storage, blocksize,
                         threshold)
        if bits == 4 and not cpu_inference_layout:
            new.support_avx512bf16_for_cpu = False
        setattr(parent, child, new)
    return names


def _quantized(bnb, layer: nn.Linear, bits: int, quant_type: str, compute_dtype: torch.dtype, double_quant: bool,
               quant_storage: torch.dtype, blocksize: int | None, threshold: float) -> nn.Module:
    weight = layer.weight.detach()
    device = weight.device
    has_bias = layer.bias is not None
    if bits == 4:
        new = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=has_bias, compute_dtype=compute_dtype,
                                compress_statistics=double_quant, quant_type=quant_type,
                                quant_storage=quant_storage, device="meta")
        new.weight = bnb.nn.Params4bit(weight.to("cpu").clone(), requires_grad=False, blocksize=blocksize,
                                       compress_statistics=double_quant, quant_type=quant_type,
                                       quant_storage=quant_storage, module=new)
    else:
        new = bnb.nn.Linear8bitLt(layer.in_features, layer.out_features, bias=has_bias, has_fp16_weights=False,
                                  threshold=threshold, device="meta")
        new.weight = bnb.nn.Int8Params(weight.to("cpu").clone(), requires_grad=False, has_fp16_weights=False)
    if has_bias:
        new.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=layer.bias.requires_grad)
    new.train(layer.training)
    return new.to(device)  # bitsandbytes quantizes when the weight moves to its device
