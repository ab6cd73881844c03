"""``get_peft_model_state_dict`` / ``set_peft_model_state_dict``: an adapter's weights with
PEFT's key convention (the adapter name removed from every key), so state dicts move between
PEFT and torchlora unchanged."""

from __future__ import annotations

import json
import os
import re
import warnings
from typing import Any, Union

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from .nn import LoraLayer
from .tuners import ModulesToSaveWrapper

PEFT_PREFIX = "base_model.model."
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")


def remove_adapter_name(key: str, adapter_name: str) -> str:
    """``a.lora_A.<adapter>.weight`` -> ``a.lora_A.weight``; ``a.lora_embedding_A.<adapter>`` ->
    ``a.lora_embedding_A`` (only the adapter-name segment is removed)."""
    if "." not in key:
        return key
    if key.endswith(f".{adapter_name}"):
        return key[: -len(adapter_name) - 1]
    head, _, suffix = key.rpartition(".")
    if head.endswith(f".{adapter_name}"):
        head = head[: -len(adapter_name) - 1]
    return f"{head}.{suffix}"


def _peft_configs(model: nn.Module) -> dict:
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict):
        raise TypeError("model has no LoRA adapters (no `peft_config`); use get_peft_model or inject_adapter_in_model")
    return configs


def _adapter_param_keys(model: nn.Module, adapter_name: str) -> list[str]:
    """The model's state-dict keys of this adapter's LoRA weights."""
    keys = []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        prefix = f"{name}." if name else ""
        for layer_name in module.adapter_layer_names:
            container = getattr(module, layer_name)
            if adapter_name not in container:
                continue
            item = container[adapter_name]
            if isinstance(item, nn.Parameter):
                keys.append(f"{prefix}{layer_name}.{adapter_name}")
            else:
                keys.extend(f"{prefix}{layer_name}.{adapter_name}.{k}" for k in item.state_dict())
    return keys


def _without_other_adapters(state_dict: dict[str, Any], others: list[str]) -> dict[str, Any]:
    return {k: v for k, v in state_dict.items()
            if not any(f".{n}." in k or k.endswith(f".{n}") for n in others)}


def _embedding_is_targeted(model: nn.Module, config: Any) -> bool:
    targets = config.target_modules
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if isinstance(targets, str):
        return any(re.fullmatch(targets, k) for k, _ in base.named_modules()
                   if any(re.match(rf"(.*\.)?{e}$", k) for e in EMBEDDING_LAYER_NAMES))
    return bool(targets) and any(t in EMBEDDING_LAYER_NAMES for t in targets)


def _embedding_layers_to_save(model: nn.Module, config: Any, save_embedding_layers: Union[bool, str],
                              targeted: bool) -> bool:
    if save_embedding_layers != "auto":
        return bool(save_embedding_layers)
    if targeted:
        warnings.warn("Setting `save_embedding_layers` to `True` as embedding layers found in `target_modules`.")
        return True
    # a resized vocabulary (compared with the base model's config saved locally) must be saved too
    vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    model_id = config.base_model_name_or_path
    base_config = os.path.join(model_id, "config.json") if model_id else None
    if vocab_size and base_config and os.path.isfile(base_config):
        with open(base_config, encoding="utf-8") as f:
            if json.load(f).get("vocab_size") not in (None, vocab_size):
                warnings.warn("Setting `save_embedding_layers` to `True` as the embedding layer has been resized "
                              "during finetuning.")
                return True
    return False


def get_peft_model_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None,
                              adapter_name: str = "default", unwrap_compiled: bool = False,
                              save_embedding_layers: Union[bool, str] = "auto") -> dict[str, torch.Tensor]:
    """The weights of ``adapter_name`` (LoRA factors, trainable biases, modules_to_save copies),
    keyed as PEFT saves them: ``base_model.model.<path>.lora_A.weight`` etc. without the adapter name.

    Works on a ``PeftModel`` and on a model returned by ``inject_adapter_in_model`` (keys then
    have no ``base_model.model.`` prefix).
    """
    if unwrap_compiled:
        model = getattr(model, "_orig_mod", model)
    configs = _peft_configs(model)
    if adapter_name not in configs:
        raise ValueError(f"Adapter {adapter_name!r} does not exist; the model has {list(configs)}")
    config = configs[adapter_name]
    if state_dict is None:
        state_dict = model.state_dict()
    others = [n for n in configs if n != adapter_name]
    filtered = _without_other_adapters(state_dict, others)
    state_dict = filtered or state_dict

    to_return = {k: state_dict[k] for k in _adapter_param_keys(model, adapter_name) if k in state_dict}
    if config.bias == "all":
        to_return.update({k: v for k, v in state_dict.items() if k == "bias" or k.endswith(".bias")})
    elif config.bias == "lora_only":
        for name, module in model.named_modules():
            key = f"{name}.base_layer.bias" if name else "base_layer.bias"
            if isinstance(module, LoraLayer) and key in state_dict:
                to_return[key] = state_dict[key]
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            inner = {k[len(name) + 1:]: v for k, v in state_dict.items() if k.startswith(f"{name}.")}
            to_return.update({f"{name}.{k}": v for k, v in module.adapter_state_dict(adapter_name, inner).items()})
    targeted = _embedding_is_targeted(model, config)
    if _embedding_layers_to_save(model, config, save_embedding_layers, targeted):
        _add_embedding_layers(model, state_dict, to_return, targeted)
    return {remove_adapter_name(k, adapter_name): v for k, v in to_return.items()}


def _add_embedding_layers(model: nn.Module, state_dict: dict[str, Any], to_return: dict[str, Any],
                          targeted: bool) -> None:
    """Add the input/output embedding weights: the base layers of LoRA-wrapped embeddings when
    embeddings are targeted, the whole (resized) layers otherwise."""
    if not hasattr(model, "get_input_embeddings"):
        warnings.warn("Could not identify embedding layer(s) because the model is not a transformers model.")
        return
    for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
        if layer is None:
            continue
        base_layer = getattr(layer, "base_layer", None)
        if targeted and not isinstance(base_layer, (nn.Linear, nn.Embedding)):
            continue
        wanted = base_layer if targeted else layer
        name = next((n for n, m in model.named_modules() if m is wanted), None)
        if name:
            to_return.update({k: v for k, v in state_dict.items() if k.startswith(f"{name}.")})


def _checkpoint_to_model_keys(model: nn.Module, adapter_name: str) -> dict[str, str]:
    """Checkpoint key (adapter name removed) -> model key, for everything an adapter can load."""
    mapping = {}
    for key in _adapter_param_keys(model, adapter_name):
        mapping[remove_adapter_name(key, adapter_name)] = key
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            for plain, inner in module.adapter_state_dict_load_map(adapter_name).items():
                mapping[f"{name}.{plain}"] = f"{name}.{inner}"
    return mapping


def set_peft_model_state_dict(model: nn.Module, peft_model_state_dict: dict[str, torch.Tensor],
                              adapter_name: str = "default", ignore_mismatched_sizes: bool = False,
                              low_cpu_mem_usage: bool = False) -> _IncompatibleKeys:
    """Load a state dict from ``get_peft_model_state_dict`` (torchlora's or PEFT's) into
    ``adapter_name``, which must already exist in the model.

    Raises ``ValueError`` naming the key for an entry that fits nothing in the model or whose
    shape differs (with ``ignore_mismatched_sizes`` such entries are skipped with a warning).
    Returns ``missing_keys``: the adapter's own weights the state dict did not provide.
    """
    if low_cpu_mem_usage:
        raise NotImplementedError("low_cpu_mem_usage=True is not supported by torchlora")
    configs = _peft_configs(model)
    if adapter_name not in configs:
        raise ValueError(f"Adapter {adapter_name!r} does not exist; the model has {list(configs)}")
    mapping = _checkpoint_to_model_keys(model, adapter_name)
    model_state = model.state_dict()
    has_prefix = any(k.startswith(PEFT_PREFIX) for k in model_state)

    to_load: dict[str, torch.Tensor] = {}
    for key, value in peft_model_state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state dict entry {key!r} is a {type(value).__name__}, not a tensor")
        # a model from inject_adapter_in_model has no PeftModel prefix; the checkpoint still may
        lookup = key if has_prefix or not key.startswith(PEFT_PREFIX) else key[len(PEFT_PREFIX):]
        target = mapping.get(lookup, lookup if lookup in model_state else None)
        if target is None:
            raise ValueError(f"state dict key {key!r} matches no weight of adapter {adapter_name!r} in the model")
        expected = model_state[target].shape
        if value.shape != expected:
            if ignore_mismatched_sizes:
                warnings.warn(f"Skipping {key!r}: found shape {tuple(value.shape)} in the checkpoint and "
                              f"{tuple(expected)} in the model")
                continue
            raise ValueError(f"state dict key {key!r} has shape {tuple(value.shape)} but the model expects "
                             f"{tuple(expected)} for {target!r}")
        to_load[target] = value
    result = model.load_state_dict(to_load, strict=False)
    if result.unexpected_keys:  # cannot happen after the checks above; never drop weights silently
        raise RuntimeError(f"weights were not loaded: {result.unexpected_keys}")
    missing = sorted(set(mapping.values()) - set(to_load))
    return _IncompatibleKeys(missing, [])
