"""Preparing a quantized (k-bit) transformers model for training, as ``peft.utils.other``."""

from __future__ import annotations

import inspect
import warnings
from typing import Any, Optional

import torch
from torch import nn

# quantization methods whose parameters must keep their dtype (no float32 upcast)
_KEEP_DTYPE_METHODS = ("gptq", "aqlm", "eetq", "hqq", "torchao")


def _quantization_method(model: nn.Module) -> Optional[str]:
    if getattr(model, "hqq_quantized", False):
        return "hqq"
    method = getattr(model, "quantization_method", None)
    return getattr(method, "value", method)  # transformers may hold an enum


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: Optional[dict[str, Any]] = None,
    auto_clear_cache: bool = True,
) -> nn.Module:
    """Get a quantized transformers model ready for LoRA training, with PEFT's semantics.

    Every parameter is frozen; unless the model is quantized by gptq, aqlm, eetq, hqq or
    torchao, float16/bfloat16 parameters other than bitsandbytes 4-bit weights are cast to
    float32 (layer norms, embeddings, the head). On a model loaded in 4-bit/8-bit (or by one of
    those methods) with ``use_gradient_checkpointing``, gradient checkpointing is enabled with
    ``gradient_checkpointing_kwargs``, and, unless ``use_reentrant=False`` is among them, the
    input embeddings' output is made to require grad so that checkpointed blocks see a tensor
    that requires grad. Returns ``model`` (changed in place).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if gradient_checkpointing_kwargs is None:
        gradient_checkpointing_kwargs = {}
    if not isinstance(gradient_checkpointing_kwargs, dict):
        raise TypeError(f"gradient_checkpointing_kwargs must be a dict or None, got {gradient_checkpointing_kwargs!r}")
    method = _quantization_method(model)
    loaded_in_kbit = bool(getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False))

    for param in model.parameters():
        param.requires_grad = False

    if method not in _KEEP_DTYPE_METHODS:
        for param in model.parameters():
            if param.dtype in (torch.float16, torch.bfloat16) and type(param).__name__ != "Params4bit":
                param.data = param.data.to(torch.float32)
        if auto_clear_cache and torch.cuda.is_available():
            torch.cuda.empty_cache()  # the casts leave half-precision blocks in the allocator's cache

    if (loaded_in_kbit or method in _KEEP_DTYPE_METHODS) and use_gradient_checkpointing:
        if gradient_checkpointing_kwargs.get("use_reentrant", True):
            _make_inputs_require_grad(model)
        enable = getattr(model, "gradient_checkpointing_enable", None)
        if enable is None:
            raise TypeError(f"{type(model).__name__} has no gradient_checkpointing_enable(); "
                            "pass use_gradient_checkpointing=False")
        if "gradient_checkpointing_kwargs" in inspect.signature(enable).parameters:
            enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)
        else:
            if gradient_checkpointing_kwargs:
                warnings.warn("gradient_checkpointing_kwargs is not supported by this model's "
                              "gradient_checkpointing_enable(); they are ignored.", FutureWarning)
            enable()
    return model


def _make_inputs_require_grad(model: nn.Module) -> None:
    """Reentrant checkpointing passes no gradient to blocks whose inputs do not require grad."""
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
        return

    def require_grad(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        output.requires_grad_(True)

    model.get_input_embeddings().register_forward_hook(require_grad)
