"""``add_weighted_adapter``: a new adapter made of existing ones with weights, PEFT's method with
every ``combination_type``.

The checks, the new adapter's rank and config changes, and the per-module combination math are
the C++ core's (``torchlora._C.peft.weighted_adapter_plan`` / ``combine_lora_factors``, the rule
``serve::AdapterPool::compose`` applies too); this module collects each layer's factors in the
model's module order and installs the result.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal, Optional

import torch

from .._native import _C
from ..nn import LoraLayer
from .modules_to_save import ModulesToSaveWrapper

if TYPE_CHECKING:
    from .lora_model import LoraModel

CombinationType = Literal[
    "svd", "linear", "cat", "ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd", "dare_linear_svd",
    "magnitude_prune", "magnitude_prune_svd",
]


def _names(adapters: Sequence[str]) -> list[str]:
    if isinstance(adapters, str) or not isinstance(adapters, Sequence):
        raise TypeError(f"adapters must be a list of adapter names, got {adapters!r}")
    for name in adapters:
        if not isinstance(name, str):
            raise TypeError(f"adapters must be a list of adapter names, got {name!r} in it")
    return list(adapters)


def _weights(weights: Sequence[float], count: int) -> list[float]:
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise TypeError(f"weights must be a list of numbers, got {weights!r}")
    out = []
    for w in weights:
        if isinstance(w, torch.Tensor) and w.numel() == 1:
            w = w.item()
        if isinstance(w, bool) or not isinstance(w, numbers.Real):
            raise TypeError(f"weights must be a list of numbers, got {w!r} in it")
        out.append(float(w))
    # PEFT zips the two lists, silently dropping the adapters without a weight
    if len(out) != count:
        raise ValueError(f"add_weighted_adapter got {count} adapters but {len(out)} weights; give one weight per adapter")
    return out


def _check_modules_to_save(model: torch.nn.Module, adapters: list[str]) -> None:
    shared = [w for w in model.modules()
              if isinstance(w, ModulesToSaveWrapper) and sum(a in w.modules_to_save for a in adapters) > 1]
    if shared:
        raise ValueError("Cannot add weighted adapters if they target the same module with modules_to_save, but found "
                         f"{len(shared)} such instance(s).")


def _factors(layer: LoraLayer, adapter: str) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    if adapter in layer.lora_A:
        return layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    if adapter in layer.lora_embedding_A:
        return layer.lora_embedding_A[adapter], layer.lora_embedding_B[adapter]
    return None


def _combine_layer(layer: LoraLayer, adapters: list[str], weights: list[float], adapter_name: str,
                   options: "_C.peft.CombinationOptions") -> None:
    target = _factors(layer, adapter_name)
    if target is None:
        return
    factors = []
    for adapter, weight in zip(adapters, weights):
        held = _factors(layer, adapter)
        if held is not None:
            factors.append((held[0].detach(), held[1].detach(), float(layer.scaling[adapter]), weight))
    # PEFT merges an embedding's (or a fan_in_fan_out Linear's) delta weight in its [in, out] layout
    transposed = any(a in layer.lora_embedding_A for a in adapters) or bool(getattr(layer, "fan_in_fan_out", False))
    lora_A, lora_B = _C.peft.combine_lora_factors(factors, options, transposed)
    with torch.no_grad():
        for param, value in zip(target, (lora_A, lora_B)):
            param.data = value.to(device=param.device, dtype=param.dtype)
    layer.refresh_adapter_stack()


def add_weighted_adapter(
    lora_model: "LoraModel",
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination_type: CombinationType = "svd",
    svd_rank: Optional[int] = None,
    svd_clamp: Optional[float] = None,
    svd_full_matrices: bool = True,
    svd_driver: Optional[str] = None,
    density: Optional[float] = None,
    majority_sign_method: Literal["total", "frequency"] = "total",
) -> None:
    """Add ``adapter_name``, the weighted combination of ``adapters`` (see
    :meth:`LoraModel.add_weighted_adapter`). Nothing is left behind when it fails."""
    if adapter_name in lora_model.peft_config:
        warnings.warn(f"Adapter '{adapter_name}' already exists; add_weighted_adapter leaves it unchanged.")
        return
    adapters = _names(adapters)
    weights = _weights(weights, len(adapters))
    for adapter in adapters:
        if adapter not in lora_model.peft_config:
            raise ValueError(f"Adapter {adapter} does not exist")
    _check_modules_to_save(lora_model.model, adapters)
    configs = [lora_model.peft_config[a] for a in adapters]
    options, changes = _C.peft.weighted_adapter_plan(
        [json.dumps(c.to_json_dict()) for c in configs], adapters, combination_type, svd_rank, svd_clamp,
        svd_full_matrices, svd_driver, density, majority_sign_method)
    lora_model.peft_config[adapter_name] = dataclasses.replace(configs[0], **json.loads(changes))
    try:
        lora_model.inject_adapter(lora_model.model, adapter_name)
    except BaseException:
        del lora_model.peft_config[adapter_name]
        raise
    try:
        lora_model.set_requires_grad(adapter_name, False)  # PEFT adds it frozen
        for key, module in lora_model.model.named_modules():
            if isinstance(module, LoraLayer) and lora_model.prefix not in key:
                _combine_layer(module, adapters, weights, adapter_name, options)
    except BaseException:
        lora_model.delete_adapter(adapter_name)
        raise
