"""``get_peft_model_state_dict`` / ``set_peft_model_state_dict``: an adapter's weights with
PEFT's key convention (the adapter name removed from every key), so state dicts move between
PEFT and torchlora unchanged."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from typing import Any, Union

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from .nn import LoraLayer
from .peft_format import PEFT_KEY_PREFIX, from_peft_key, to_peft_key
from .tuners import LoraModel, ModulesToSaveWrapper
from .tuners.trainable_tokens import TrainableTokensWrapper
from .utils.distributed import is_dtensor, shard_like

EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")


def _peft_configs(model: nn.Module) -> dict:
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict):
        raise TypeError("model has no LoRA adapters (no `peft_config`); use get_peft_model or inject_adapter_in_model")
    return configs


def _check_adapter(model: nn.Module, adapter_name: str) -> dict:
    configs = _peft_configs(model)
    if adapter_name not in configs:
        raise ValueError(f"Adapter {adapter_name!r} does not exist; the model has {list(configs)}")
    return configs


def _key_prefix(model: nn.Module) -> str:
    """``base_model.model.`` for a PeftModel (its keys carry PEFT's prefix), "" for a model from
    ``inject_adapter_in_model``."""
    return PEFT_KEY_PREFIX if isinstance(model._modules.get("base_model"), LoraModel) else ""


def _to_file_key(model_key: str, prefix: str, adapter_name: str) -> str:
    if prefix and model_key.startswith(prefix):
        return to_peft_key(model_key[len(prefix):], adapter_name)
    return to_peft_key(model_key, adapter_name, with_prefix=False)


def _lora_layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]


def _adapter_param_keys(model: nn.Module, adapter_name: str) -> list[str]:
    """The model's state-dict keys of this adapter's LoRA weights (and trainable token rows)."""
    own = {id(t) for _, layer in _lora_layers(model) for t in layer.adapter_tensors(adapter_name).values()}
    own.update(id(t) for m in model.modules() if isinstance(m, TrainableTokensWrapper)
               for t in m.adapter_parameters(adapter_name))
    return [name for name, param in model.named_parameters() if id(param) in own]


def _without_other_adapters(state_dict: dict[str, Any], others: list[str]) -> dict[str, Any]:
    return {k: v for k, v in state_dict.items()
            if not any(f".{n}." in k or k.endswith(f".{n}") for n in others)}


def _embedding_is_targeted(model: nn.Module, config: Any) -> bool:
    targets = config.target_modules
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if isinstance(targets, str):
        from .tuners.matching import is_target, rules_for

        rules = rules_for(config)
        return any(is_target(rules, k) for k, _ in base.named_modules()
                   if k.rsplit(".", 1)[-1] in EMBEDDING_LAYER_NAMES)
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
    configs = _check_adapter(model, adapter_name)
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
    # trainable tokens save their rows, not the embedding (PEFT's "auto")
    if _embedding_layers_to_save(model, config, save_embedding_layers,
                                 targeted and config.trainable_token_indices is None):
        _add_embedding_layers(model, state_dict, to_return, targeted)
    prefix = _key_prefix(model)
    return {_to_file_key(k, prefix, adapter_name): v for k, v in to_return.items()}


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


def _modules_to_save_keys(model: nn.Module, adapter_name: str) -> dict[str, str]:
    """Plain module key (as saved) -> model key of the adapter's modules_to_save copy."""
    mapping = {}
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            for plain, inner in module.adapter_state_dict_load_map(adapter_name).items():
                mapping[f"{name}.{plain}"] = f"{name}.{inner}"
    return mapping


def _home_devices(model: nn.Module, adapter_name: str) -> dict[str, torch.device]:
    """Model key -> device of the base layer, for this adapter's LoRA weights: where weights
    created on the meta device go when they are loaded."""
    owner = {}
    for _, layer in _lora_layers(model):
        device = layer.weight.device  # the base weight, or the parameter a ParamWrapper adapts
        owner.update((id(t), device) for t in layer.adapter_tensors(adapter_name).values())
    return {name: owner[id(param)] for name, param in model.named_parameters() if id(param) in owner}


def load_adapter_tensors(model: nn.Module, tensors: Mapping[str, torch.Tensor], adapter_name: str, *,
                         source: str = "state dict", ignore_mismatched_sizes: bool = False,
                         assign: bool = False) -> _IncompatibleKeys:
    """Load PEFT-keyed ``tensors`` into the existing adapter ``adapter_name``.

    Every key is resolved and its shape checked (the one shape check of every load path) before
    anything changes. Weights still on the meta device (an adapter created with
    ``low_cpu_mem_usage``) are replaced by the given tensors, cast to the parameter's dtype, on
    the base layer's device; others are copied into, or with ``assign`` replaced as well.
    Parameters sharded by FSDP2 (``DTensor``) are always copied into: each rank keeps its own
    piece of the full tensor it was given.
    Errors name ``source`` (a file path, or "state dict") and the key. Returns the adapter's
    weights that ``tensors`` did not provide as ``missing_keys``.
    """
    _check_adapter(model, adapter_name)
    prefix = _key_prefix(model)
    saved_copies = _modules_to_save_keys(model, adapter_name)
    homes = _home_devices(model, adapter_name)
    model_state = model.state_dict(keep_vars=True)

    to_copy: dict[str, torch.Tensor] = {}
    to_assign: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{source}: entry {key!r} is a {type(value).__name__}, not a tensor")
        module_key = prefix + from_peft_key(key, adapter_name)
        target = saved_copies.get(module_key, module_key)
        if target not in model_state:
            raise ValueError(f"{source}: key {key!r} matches no weight of adapter {adapter_name!r} in the model")
        current = model_state[target]
        if value.shape != current.shape:
            if ignore_mismatched_sizes:
                warnings.warn(f"Skipping {key!r}: found shape {tuple(value.shape)} in the checkpoint and "
                              f"{tuple(current.shape)} in the model")
                continue
            raise ValueError(f"{source}: key {key!r} has shape {tuple(value.shape)} but the model expects "
                             f"{tuple(current.shape)} for {target!r}")
        if is_dtensor(current):
            # an FSDP2 shard: copied into in place, so that FSDP keeps managing the parameter
            to_copy[target] = shard_like(value, current)
        elif current.is_meta or assign:
            device = homes.get(target, current.device) if current.is_meta else current.device
            to_assign[target] = value.to(device=device, dtype=current.dtype)
        else:
            to_copy[target] = value
    results = [model.load_state_dict(to_copy, strict=False), model.load_state_dict(to_assign, strict=False, assign=True)]
    if any(r.unexpected_keys for r in results):  # cannot happen after the checks above; never drop weights silently
        raise RuntimeError(f"weights were not loaded: {[k for r in results for k in r.unexpected_keys]}")
    adapter_keys = set(_adapter_param_keys(model, adapter_name)) | set(saved_copies.values())
    missing = sorted(adapter_keys - set(to_copy) - set(to_assign))
    return _IncompatibleKeys(missing, [])


def set_peft_model_state_dict(model: nn.Module, peft_model_state_dict: dict[str, torch.Tensor],
                              adapter_name: str = "default", ignore_mismatched_sizes: bool = False,
                              low_cpu_mem_usage: bool = False) -> _IncompatibleKeys:
    """Load a state dict from ``get_peft_model_state_dict`` (torchlora's or PEFT's) into
    ``adapter_name``, which must already exist in the model.

    Raises ``ValueError`` naming the key for an entry that fits nothing in the model or whose
    shape differs (with ``ignore_mismatched_sizes`` such entries are skipped with a warning).
    With ``low_cpu_mem_usage`` (as in PEFT) the tensors replace the parameters instead of being
    copied into them; adapter weights still on the meta device are always replaced, so loading
    into an adapter made with ``low_cpu_mem_usage=True`` never drops values.
    Returns ``missing_keys``: the adapter's own weights the state dict did not provide.
    """
    return load_adapter_tensors(model, peft_model_state_dict, adapter_name,
                                ignore_mismatched_sizes=ignore_mismatched_sizes, assign=low_cpu_mem_usage)
