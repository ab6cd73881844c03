"""PEFT's ``cast_mixed_precision_params``: frozen weights in half precision, trained ones in float32."""

from __future__ import annotations

import torch
from torch import nn


def cast_mixed_precision_params(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast every parameter of ``model`` that does not require grad to ``dtype`` (float16 or
    bfloat16, the mixed-precision dtype) and every trainable one to float32, in place: the frozen
    base takes half the memory while the adapters train in full precision under autocast."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating point torch.dtype (torch.float16 or torch.bfloat16), got {dtype!r}")
    for param in model.parameters():
        param.data = param.data.to(dtype if not param.requires_grad else torch.float32)
    for module in model.modules():  # cached adapter stacks hold copies in the old dtype
        refresh = getattr(module, "refresh_adapter_stack", None)
        if callable(refresh):
            refresh()
