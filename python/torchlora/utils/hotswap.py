"""Hot-swapping (PEFT's ``peft.utils.hotswap``): replace the weights of a loaded adapter by another
adapter's, in place and under the same name, so that a ``torch.compile``d model runs the new
adapter without being compiled again.

A compiled graph bakes in what it reads as Python values and guards on tensor shapes. So that
adapters of other ranks and alphas swap in without recompiling,
:func:`prepare_model_for_compiled_hotswap` (called before compiling) turns every scaling into a
0-dim tensor, which the layers fold into ``lora_B`` (the operators keep their float scaling and
their fused paths), and zero-pads every adapter to ``target_rank`` by the C++ core's padding rule
(the one mixed batches stack adapters with), which leaves the outputs as they were. A swap then
only writes into existing tensors.

Key names, rank / alpha patterns and the scaling come from the C++ core, as everywhere else.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

import torch
from torch import Tensor, nn

from .._native import _C
from ..config import LoraConfig, PeftType
from ..hub import split_hub_kwargs
from ..nn import LoraLayer
from ..peft_format import CONFIG_NAME, from_peft_key
from ..peft_model import _LOAD_KWARGS, _check_kwargs, _config_from_json, _read_adapter_folder
from ..state_dict import _key_prefix, _modules_to_save_keys
from ..tuners import LoraModel
from ..tuners.weight_conversion import check_loadable

__all__ = [
    "CONFIG_KEYS_TO_CHECK",
    "check_hotswap_configs_compatible",
    "hotswap_adapter",
    "hotswap_adapter_from_state_dict",
    "prepare_model_for_compiled_hotswap",
]

# Config options that change a layer's output beyond its weights, rank and alpha: two adapters
# must agree on them to be swapped (PEFT's list).
CONFIG_KEYS_TO_CHECK = {PeftType.LORA: ["use_rslora", "lora_dropout", "alpha_pattern", "use_dora"]}


# ---------------------------------------------------------------------------------- the model
def _unwrap_compiled(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)


def _adapted_root(model: nn.Module) -> nn.Module:
    """The model whose module names the config's targets and patterns refer to."""
    model = _unwrap_compiled(model)
    base_model = model._modules.get("base_model")
    if isinstance(base_model, LoraModel):
        return base_model.model
    if isinstance(model, LoraModel):
        return model.model
    return model


def _lora_layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    return [(name, m) for name, m in _adapted_root(model).named_modules() if isinstance(m, LoraLayer)]


def _is_compiled(model: nn.Module) -> bool:
    return hasattr(model, "_orig_mod") or bool(getattr(model, "_compiled_call_impl", False))


# ---------------------------------------------------------------------------------- rank padding
def _factor_names(layer: LoraLayer, adapter_name: str) -> tuple[str, str]:
    """The local names of the adapter's (lora_A, lora_B) in ``layer.adapter_tensors``."""
    tensors = layer.adapter_tensors(adapter_name)
    if "lora_A.weight" in tensors:
        return "lora_A.weight", "lora_B.weight"
    return "lora_embedding_A", "lora_embedding_B"


def _with_size(shape: torch.Size, dim: int, size: int) -> list[int]:
    out = list(shape)
    out[dim] = size
    return out


def _padded_factors(layer: LoraLayer, lora_A: Tensor, lora_B: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """``lora_A`` and ``lora_B`` zero-padded to ``rank`` by the C++ core's rule (grouped convs
    keep each group's block together): stacked beside a zero adapter of that rank, slot 0."""
    a_dim, b_dim = layer._stack_rank_dims
    groups = layer._stack_groups()
    zero_A = lora_A.new_zeros(_with_size(lora_A.shape, a_dim, rank))
    zero_B = lora_B.new_zeros(_with_size(lora_B.shape, b_dim, rank // groups))
    stacked = torch.ops.torchlora.stack_adapters([lora_A.detach(), zero_A], [lora_B.detach(), zero_B], [None, None],
                                                 a_dim, b_dim, groups)
    return stacked[0][0].clone(), stacked[1][0].clone()


def _sync_shape_attributes(module: nn.Module) -> None:
    """Keep ``in_features`` / ``out_channels`` ... of a factor module in line with its new weight."""
    weight = module.weight
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = int(weight.shape[0]), int(weight.shape[1])
    elif isinstance(module, nn.modules.conv._ConvNd):
        module.out_channels, module.in_channels = int(weight.shape[0]), int(weight.shape[1]) * module.groups


def _replace_factor(layer: LoraLayer, adapter_name: str, param: Tensor, value: Tensor) -> None:
    """Give a factor parameter a new value of another shape (the same Parameter object)."""
    param.data = value.detach().to(device=param.device, dtype=param.dtype, copy=True)
    for container in (layer.lora_A, layer.lora_B):
        if adapter_name in container:
            _sync_shape_attributes(container[adapter_name])


def _rank_of(layer: LoraLayer, adapter_name: str) -> int:
    lora_A = layer.adapter_tensors(adapter_name)[_factor_names(layer, adapter_name)[0]]
    return int(lora_A.shape[layer._stack_rank_dims[0]])


def _check_paddable(layer: LoraLayer, path: str, adapter_name: str, target_rank: int) -> None:
    groups = layer._stack_groups()
    if target_rank % groups != 0:
        raise ValueError(
            f"Trying to pad a {type(layer.get_base_layer()).__name__} LoRA adapter with groups={groups} to target rank "
            f"{target_rank}, but the target rank is not divisible by {groups}. Please choose a target rank that is "
            f"divisible by {groups}.")
    rank = _rank_of(layer, adapter_name)
    if rank > target_rank:
        raise ValueError(f"Trying to pad the adapter to the target rank {target_rank}, but the original rank is larger "
                         f"({rank}). This is not possible. (adapter {adapter_name!r} of {path})")


def _pad_adapter(layer: LoraLayer, adapter_name: str, target_rank: int) -> None:
    if _rank_of(layer, adapter_name) == target_rank:
        return
    tensors = layer.adapter_tensors(adapter_name)
    a_name, b_name = _factor_names(layer, adapter_name)
    with torch.no_grad():
        padded_A, padded_B = _padded_factors(layer, tensors[a_name], tensors[b_name], target_rank)
        _replace_factor(layer, adapter_name, tensors[a_name], padded_A)
        _replace_factor(layer, adapter_name, tensors[b_name], padded_B)
    layer.refresh_adapter_stack()


def _scalings_to_tensors(layer: LoraLayer) -> None:
    for name, value in list(layer.scaling.items()):
        if not isinstance(value, Tensor):
            layer.scaling[name] = torch.tensor(float(value), device=layer.weight.device)


def prepare_model_for_compiled_hotswap(
    model: nn.Module,
    *,
    target_rank: Optional[int] = None,
    config: Optional[Union[LoraConfig, dict[str, LoraConfig]]] = None,
    check_compiled: Literal["error", "warn", "ignore"] = "error",
) -> None:
    """Prepare a model with its first adapter loaded so that, once compiled, adapters of other
    ranks and alphas can be hot-swapped into it without recompiling.

    Call it after loading the adapter that will be swapped out and before ``torch.compile``.
    Every scaling becomes a 0-dim tensor and, with ``target_rank`` (the largest rank that will be
    swapped in), every adapter is zero-padded to that rank; outputs do not change. With
    ``config`` (a LoraConfig or a dict of them, e.g. ``model.peft_config``) their ``r`` and
    ``rank_pattern`` values are set to ``target_rank``. ``check_compiled`` says what to do with a
    model that is already compiled: ``"error"``, ``"warn"`` or ``"ignore"``.

    Adapters that target other layers still cannot be swapped in. The model is changed in place.
    """
    if check_compiled not in ("error", "warn", "ignore"):
        raise ValueError(f"check_compiles should be one of 'error', 'warn', or 'ignore', got '{check_compiled}' instead.")
    if target_rank is not None:
        if isinstance(target_rank, bool) or not isinstance(target_rank, int):
            raise TypeError(f"target_rank must be an int, got {type(target_rank).__name__}")
        if target_rank <= 0:
            raise ValueError(f"target_rank must be a positive integer, got {target_rank}")
    if _is_compiled(model):
        if check_compiled == "error":
            raise ValueError("Call prepare_model_for_compiled_hotswap *before* compiling the model")
        if check_compiled == "warn":
            warnings.warn("prepare_model_for_compiled_hotswap was called with a model that is already compiled. This "
                          "will likely result in re-compilation, hurting performance. Call the function before "
                          "compiling the model.")
    layers = _lora_layers(model)
    if not layers:
        raise ValueError("No adapter layers found on the model, make sure call `prepare_model_for_compiled_hotswap` "
                         "after loading the first adapter and before loading the second adapter.")
    if target_rank is not None:  # every check before the first change
        for path, layer in layers:
            for name in layer.adapter_names():
                _check_paddable(layer, path, name, target_rank)
    for _, layer in layers:
        _scalings_to_tensors(layer)
        if target_rank is not None:
            for name in layer.adapter_names():
                _pad_adapter(layer, name, target_rank)

    if not config or target_rank is None:
        return
    configs = config.values() if isinstance(config, dict) else [config]
    for lora_config in configs:
        lora_config.r = target_rank
        if lora_config.rank_pattern:
            for key in lora_config.rank_pattern:
                lora_config.rank_pattern[key] = target_rank


# ---------------------------------------------------------------------------------- configs
def check_hotswap_configs_compatible(config0: LoraConfig, config1: LoraConfig) -> None:
    """Raise ValueError unless an adapter with ``config1`` can be swapped into one with
    ``config0``: same PEFT type, and equal values of the options that act beyond the weights,
    rank and alpha (:data:`CONFIG_KEYS_TO_CHECK`)."""
    for config in (config0, config1):
        if not hasattr(config, "peft_type") or not hasattr(config, "to_dict"):
            raise TypeError(f"expected a LoraConfig, got {type(config).__name__}")
    type0, type1 = PeftType(config0.peft_type), PeftType(config1.peft_type)
    if type0 != type1:
        raise ValueError(f"Incompatible PEFT types found: {type0.value} and {type1.value}")
    if type0 not in CONFIG_KEYS_TO_CHECK:
        raise ValueError(f"Hotswapping only supports {', '.join(t.value for t in CONFIG_KEYS_TO_CHECK)} but "
                         f"{type0.value} was passed.")
    dict0, dict1 = config0.to_dict(), config1.to_dict()
    missing = object()
    for key in CONFIG_KEYS_TO_CHECK[type0]:
        value0, value1 = dict0.get(key, missing), dict1.get(key, missing)
        if value0 != value1:
            raise ValueError(f"Configs are incompatible: for {key}, {value0} != {value1}")


# ---------------------------------------------------------------------------------- swapping
@dataclass
class _LayerSwap:
    """What a swap writes into one layer (everything checked before the first write)."""

    path: str
    layer: LoraLayer
    new: dict[str, Tensor] = field(default_factory=dict)  # local tensor name -> new value
    rank: Optional[int] = None
    alpha: Optional[float] = None


def _check_factor_shapes(key: str, old: Tensor, new: Tensor, rank_dim: int) -> None:
    same_elsewhere = old.dim() == new.dim() and all(
        o == n for d, (o, n) in enumerate(zip(old.shape, new.shape)) if d != rank_dim)
    if not same_elsewhere:
        raise ValueError(f"Incompatible shapes found for LoRA weights {key}: {old.shape} vs {new.shape}. Please "
                         "ensure that all ranks are padded to the largest rank among all LoRA adapters by using "
                         "torchlora.utils.hotswap.prepare_model_for_compiled_hotswap.")


def _plan_layer(swap: _LayerSwap, adapter_name: str, config_rules: "_C.peft.TargetRules", keys: dict[str, str]) -> None:
    """Check the new tensors of one layer against it and the config; fill in rank and alpha."""
    layer, tensors = swap.layer, swap.layer.adapter_tensors(adapter_name)
    a_name, b_name = _factor_names(layer, adapter_name)
    a_dim, b_dim = layer._stack_rank_dims
    given = [n for n in (a_name, b_name) if n in swap.new]
    if len(given) == 1:
        missing = b_name if given == [a_name] else a_name
        raise ValueError(f"{keys[given[0]]}: the state dict has {given[0]} but not {missing} for {swap.path}")
    for local, value in swap.new.items():
        old = tensors[local]
        if local in (a_name, b_name):
            _check_factor_shapes(keys[local], old, value, a_dim if local == a_name else b_dim)
        elif old.shape != value.shape:
            raise ValueError(f"{keys[local]}: shape {tuple(value.shape)} does not fit {tuple(old.shape)} in the model")
    if not given:
        return
    new_rank = int(swap.new[a_name].shape[a_dim])
    groups = layer._stack_groups()
    if int(swap.new[b_name].shape[b_dim]) * groups != new_rank:
        raise ValueError(f"{keys[b_name]}: rank {int(swap.new[b_name].shape[b_dim]) * groups} does not match "
                         f"the rank {new_rank} of {keys[a_name]}")
    swap.rank, swap.alpha = config_rules.rank_for(swap.path), config_rules.alpha_for(swap.path)
    if new_rank != swap.rank:
        raise ValueError(f"{keys[a_name]}: the adapter has rank {new_rank} but its config gives r={swap.rank} for "
                         f"{swap.path}")


def _write_factors(swap: _LayerSwap, adapter_name: str) -> None:
    layer, tensors = swap.layer, swap.layer.adapter_tensors(adapter_name)
    a_name, b_name = _factor_names(layer, adapter_name)
    old_A, old_B = tensors[a_name], tensors[b_name]
    new_A, new_B = swap.new[a_name], swap.new[b_name]
    current = int(old_A.shape[layer._stack_rank_dims[0]])
    if swap.rank > current:
        # a larger rank than the model holds: the shapes change, a compiled model compiles again
        _replace_factor(layer, adapter_name, old_A, new_A)
        _replace_factor(layer, adapter_name, old_B, new_B)
        return
    if swap.rank < current:  # padded to the rank the model holds; the padding adds exact zeros
        new_A, new_B = _padded_factors(layer, new_A.to(old_A.device), new_B.to(old_B.device), current)
    old_A.copy_(new_A)
    old_B.copy_(new_B)


def _apply_layer_swap(swap: _LayerSwap, adapter_name: str, use_rslora: bool) -> None:
    layer = swap.layer
    tensors = layer.adapter_tensors(adapter_name)
    a_name, b_name = _factor_names(layer, adapter_name)
    if swap.rank is not None:
        _write_factors(swap, adapter_name)
        layer.r[adapter_name] = swap.rank
        layer.lora_alpha[adapter_name] = swap.alpha
        layer._set_scaling(adapter_name, layer._scaling_for(swap.rank, swap.alpha, use_rslora))
    else:  # a layer the new adapter does not target: its factors are zeroed (as in PEFT)
        tensors[a_name].zero_()
        tensors[b_name].zero_()
    for local, value in swap.new.items():
        if local not in (a_name, b_name):
            tensors[local].copy_(value)
    for local, tensor in tensors.items():
        if local in swap.new or local in (a_name, b_name):
            continue
        if local.startswith("lora_magnitude_vector"):
            # DoRA without a given magnitude: the one that leaves the layer's weight unchanged
            # (its initialisation), so an untargeted layer computes the base layer
            tensor.copy_(layer.dora_weight_norm(adapter_name).reshape(tensor.shape))
        else:
            tensor.zero_()
    layer.refresh_adapter_stack()


def hotswap_adapter_from_state_dict(
    model: nn.Module,
    state_dict: dict[str, Tensor],
    adapter_name: str,
    config: LoraConfig,
    parameter_prefix: str = "lora_",
) -> None:
    """Write the adapter in ``state_dict`` into the loaded adapter ``adapter_name`` (which keeps its
    name), with the rank, alpha and scaling ``config`` gives each layer.

    ``state_dict`` is keyed like ``model.state_dict()`` (of the uncompiled model), with the adapter
    name in the keys: ``base_model.model.<path>.lora_A.<adapter_name>.weight``. A new adapter of a
    smaller rank is zero-padded to the rank the model holds (a compiled model does not recompile);
    a larger one replaces the tensors (a compiled model recompiles: see
    :func:`prepare_model_for_compiled_hotswap`). Layers the new adapter does not target get a
    zero update. Keys that are not weights of ``adapter_name`` raise RuntimeError (adapters
    that target other layers cannot be swapped); wrong shapes raise ValueError; nothing is
    changed when an error is raised.
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a torchlora LoraConfig, got {type(config).__name__}")
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a dict of tensors, got {type(state_dict).__name__}")
    if parameter_prefix != LoraModel.prefix:
        raise ValueError(f"only LoRA adapters can be hot-swapped (parameter_prefix {LoraModel.prefix!r}), "
                         f"got {parameter_prefix!r}")
    layers = _lora_layers(model)
    if any(adapter_name in layer.merged_adapters for _, layer in layers):
        raise ValueError(
            f"Cannot hot-swap adapter '{adapter_name}' because it is currently merged into the base weights. "
            "Please unmerge the adapter first by calling `peft_model.unmerge_adapter()`; unmerging after a swap of "
            "merged weights would otherwise corrupt them.")
    swaps = {path: _LayerSwap(path, layer) for path, layer in layers if adapter_name in layer.adapter_names()}
    if not swaps:
        raise ValueError(f"Adapter {adapter_name!r} not found in the model; cannot hot-swap into it")

    # the model's keys of the adapter's LoRA tensors (by identity, not by name patterns)
    unwrapped = _unwrap_compiled(model)
    owner = {id(t): (path, local) for path, swap in swaps.items()
             for local, t in swap.layer.adapter_tensors(adapter_name).items()}
    lora_keys = {key: owner[id(p)] for key, p in unwrapped.named_parameters() if id(p) in owner}
    saved_copies = _modules_to_save_keys(unwrapped, adapter_name)  # plain module key -> the adapter's copy
    copy_targets = set(saved_copies.values())
    model_state = unwrapped.state_dict(keep_vars=True)

    unexpected, copies = [], {}
    keys: dict[str, dict[str, str]] = {}
    for key, value in state_dict.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"state dict entry {key!r} is a {type(value).__name__}, not a tensor")
        _C.peft.check_adapter_tensor(value, key, "state dict")
        if key in lora_keys:
            path, local = lora_keys[key]
            swaps[path].new[local] = value
            keys.setdefault(path, {})[local] = key
        elif key in saved_copies or key in copy_targets:
            target = saved_copies.get(key, key)
            if model_state[target].shape != value.shape:
                raise ValueError(f"{key}: shape {tuple(value.shape)} does not fit {tuple(model_state[target].shape)} "
                                 "in the model")
            copies[target] = value
        else:
            unexpected.append(key)
    if unexpected:
        raise RuntimeError(f"Hot swapping the adapter did not succeed, unexpected keys found: {', '.join(unexpected)}.")

    rules = _C.peft.TargetRules(config.to_dict())
    for path, swap in swaps.items():
        _plan_layer(swap, adapter_name, rules, keys.get(path, {}))

    with torch.no_grad():
        for swap in swaps.values():
            _apply_layer_swap(swap, adapter_name, config.use_rslora)
        for target, value in copies.items():
            model_state[target].copy_(value)


def hotswap_adapter(
    model: nn.Module,
    model_name_or_path: Union[str, os.PathLike],
    adapter_name: str,
    torch_device: Optional[str] = None,
    **kwargs,
) -> None:
    """Replace the weights of the loaded adapter ``adapter_name`` of ``model`` (a PeftModel,
    possibly ``torch.compile``d) by those of the adapter saved in the folder
    ``model_name_or_path``, keeping the name.

    The new adapter's config must be compatible with the active adapter's
    (:func:`check_hotswap_configs_compatible`) and it must target no other layers than the
    loaded one. Its rank and alpha may differ; for a compiled model that must not recompile,
    call :func:`prepare_model_for_compiled_hotswap` before compiling. ``torch_device``: where
    the new weights are loaded (they end up on the device of the weights they replace);
    ``subfolder=`` reads the adapter from a subfolder; ``model_name_or_path`` may be a Hub id
    (with ``revision=``, ``token=``, ``cache_dir=``, as ``PeftModel.from_pretrained``).

    Example::

        model = PeftModel.from_pretrained(base_model, "path-adapter-0")
        prepare_model_for_compiled_hotswap(model, target_rank=16)
        model = torch.compile(model)
        hotswap_adapter(model, "path-adapter-1", adapter_name="default")
    """
    _check_kwargs(kwargs, _LOAD_KWARGS - {"torch_device"}, "hotswap_adapter")
    folder, config_json, tensors, _ = _read_adapter_folder(model_name_or_path, kwargs.get("subfolder"),
                                                           **split_hub_kwargs(kwargs)[0])
    config = _config_from_json(config_json, os.path.join(folder, CONFIG_NAME))
    check_loadable(config, folder)
    check_hotswap_configs_compatible(model.active_peft_config, config)
    if torch_device is not None:
        tensors = {key: value.to(torch_device) for key, value in tensors.items()}
    prefix = _key_prefix(_unwrap_compiled(model))
    state_dict = {prefix + from_peft_key(key, adapter_name): value for key, value in tensors.items()}
    hotswap_adapter_from_state_dict(model, state_dict, adapter_name, config, parameter_prefix=LoraModel.prefix)
