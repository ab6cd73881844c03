"""Injection of ``LoraConfig.target_parameters``: a ``ParamWrapper`` around the module of each
targeted ``nn.Parameter`` (nested when one module has several), as PEFT's LoRA does."""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from ..config import LoraConfig
from ..nn.param_wrapper import ParamWrapper, find_param_wrapper, find_target_parameters
from .modules_to_save import get_submodules


def check_same_target_parameters(configs: dict[str, LoraConfig], config: LoraConfig) -> None:
    """All adapters of a model that use target_parameters must target the same parameters: the
    nesting of the wrappers (and so the keys in files) depends on them."""
    if not config.target_parameters:
        return
    wanted = set(config.target_parameters)
    for name, other in configs.items():
        if other is config or not other.target_parameters:
            continue
        if set(other.target_parameters) != wanted:
            raise ValueError("When using multiple adapters with `target_parameters`, all adapters must target the "
                             f"same set of parameters, but got {sorted(wanted)} for the new adapter and "
                             f"{sorted(other.target_parameters)} for adapter '{name}'.")


def inject_parameters(model: nn.Module, config: LoraConfig, adapter_name: str, rules: Any,
                      targets: list[tuple[str, str]], low_cpu_mem_usage: bool = False) -> list[Callable[[], None]]:
    """Wrap (or add ``adapter_name`` to the existing wrapper of) every ``(module path,
    parameter name)`` of ``targets`` (from ``find_target_parameters``); rank and alpha come from
    rank_pattern / alpha_pattern by the parameter's full name. Returns functions that undo each
    step, newest last."""
    undo: list[Callable[[], None]] = []
    for module_path, param_name in targets:
        key = f"{module_path}.{param_name}"
        r, alpha = rules.rank_for(key), rules.alpha_for(key)
        parent, target, target_name = get_submodules(model, module_path)
        existing = find_param_wrapper(target, param_name)
        if existing is not None:
            existing.update_layer(adapter_name, r, alpha, config.lora_dropout, config.init_lora_weights,
                                  config.use_rslora, config.lora_bias, low_cpu_mem_usage=low_cpu_mem_usage,
                                  use_dora=config.use_dora)

            def drop(layer: ParamWrapper = existing) -> None:
                layer.delete_adapter(adapter_name)

            undo.append(drop)
            continue
        wrapper = ParamWrapper(target, adapter_name, param_name, r, alpha, config.init_lora_weights,
                               config.use_rslora, low_cpu_mem_usage=low_cpu_mem_usage)
        setattr(parent, target_name, wrapper)

        def restore(parent: nn.Module = parent, name: str = target_name, module: nn.Module = target) -> None:
            setattr(parent, name, module)

        undo.append(restore)
    return undo


def unload_param_wrappers(wrapper: ParamWrapper, merge: bool, safe_merge: bool,
                          adapter_names: list[str] | None) -> nn.Module:
    """The module inside nested ParamWrappers, with every wrapper's adapters merged first when
    ``merge``."""
    module: nn.Module = wrapper
    while isinstance(module, ParamWrapper):
        if merge:
            names = [n for n in (adapter_names or module.active_adapters) if module._holds(n)]
            if names:
                module.merge(safe_merge=safe_merge, adapter_names=names)
        module = module.base_layer
    return module


__all__ = ["check_same_target_parameters", "find_target_parameters", "inject_parameters", "unload_param_wrappers"]
