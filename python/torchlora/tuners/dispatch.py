"""Which torchlora layer wraps a matched module, and the adapter dtype policy."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..config import LoraConfig
from ..nn import LoraConv1d, LoraConv2d, LoraConv3d, LoraEmbedding, LoraLayer, LoraLinear, LoraMultiheadAttention
from .matching import is_conv1d


def create_lora_module(config: LoraConfig, adapter_name: str, target: nn.Module, r: int,
                       lora_alpha: float, low_cpu_mem_usage: bool = False) -> LoraLayer:
    """A torchlora layer around ``target``; corrects ``config.fan_in_fan_out`` like PEFT does.
    With ``low_cpu_mem_usage`` the adapter's weights are left empty on the meta device."""
    common = dict(r=r, lora_alpha=lora_alpha, lora_dropout=config.lora_dropout,
                  init_lora_weights=config.init_lora_weights, use_rslora=config.use_rslora,
                  lora_bias=config.lora_bias, low_cpu_mem_usage=low_cpu_mem_usage, use_dora=config.use_dora)
    if config.lora_bias and getattr(target, "bias", None) is None:
        warnings.warn(
            f"`lora_bias=True` was passed but the targeted layer of type {type(target).__name__} has no bias. "
            "This means that merging LoRA weights won't be possible."
        )
    custom = custom_lora_module(config, adapter_name, target, common)
    if custom is not None:
        return custom
    if isinstance(target, nn.Embedding):
        return LoraEmbedding(target, adapter_name, **common)
    if isinstance(target, nn.Conv2d):
        return LoraConv2d(target, adapter_name, **common)
    if isinstance(target, nn.Conv3d):
        return LoraConv3d(target, adapter_name, **common)
    if isinstance(target, nn.Conv1d):
        return LoraConv1d(target, adapter_name, **common)
    if isinstance(target, nn.MultiheadAttention):
        return LoraMultiheadAttention(target, adapter_name, **common)
    if isinstance(target, nn.Linear):
        if config.fan_in_fan_out:
            warnings.warn("fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. "
                          "Setting fan_in_fan_out to False.")
            config.fan_in_fan_out = False
        return LoraLinear(target, adapter_name, fan_in_fan_out=False, **common)
    if is_conv1d(target):
        if not config.fan_in_fan_out:
            warnings.warn("fan_in_fan_out is set to False but the target module is `Conv1D`. "
                          "Setting fan_in_fan_out to True.")
            config.fan_in_fan_out = True
        return LoraLinear(target, adapter_name, fan_in_fan_out=True, **common)
    raise ValueError(
        f"Target module {target} is not supported. Currently, only the following modules are supported: "
        "`torch.nn.Linear`, `torch.nn.Embedding`, `torch.nn.Conv1d`, `torch.nn.Conv2d`, `torch.nn.Conv3d`, "
        "`transformers.pytorch_utils.Conv1D`, `torch.nn.MultiheadAttention`. Custom module types can be "
        "registered with LoraConfig._register_custom_module."
    )


def custom_lora_module(config: LoraConfig, adapter_name: str, target: nn.Module,
                       options: dict) -> LoraLayer | None:
    """The layer of a custom module type registered with ``LoraConfig._register_custom_module``
    (checked first, as in PEFT), built as torchlora builds its own layers:
    ``cls(target, adapter_name, r=..., lora_alpha=..., lora_dropout=..., ...)``; None when no
    registered type matches."""
    for module_type, layer_cls in (getattr(config, "_custom_modules", None) or {}).items():
        if isinstance(target, module_type):
            layer = layer_cls(target, adapter_name, **options)
            if not isinstance(layer, LoraLayer):
                raise TypeError(f"the custom LoRA layer {layer_cls.__name__} registered for {module_type.__name__} "
                                f"must be a torchlora.LoraLayer, got {type(layer).__name__}")
            return layer
    return None


def cast_adapter_dtype(model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
    """Upcast this adapter's float16/bfloat16 LoRA weights to float32 (PEFT's default), which keeps
    training stable; the layers compute in the adapter's dtype and return the base dtype."""
    if not autocast_adapter_dtype:
        return
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        for param in module.adapter_tensors(adapter_name).values():
            if param.dtype in (torch.float16, torch.bfloat16):
                param.data = param.data.float()
