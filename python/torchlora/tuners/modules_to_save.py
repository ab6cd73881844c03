"""``ModulesToSaveWrapper``: a whole module trained and saved per adapter (``modules_to_save``),
kept beside the untouched original as ``<path>.original_module`` and
``<path>.modules_to_save.<adapter>``, as in PEFT."""

from __future__ import annotations

import copy
from typing import Any, Optional, Union

import torch
from torch import nn

from ..nn.layer import BASE_ADAPTER_NAME

def get_submodules(model: nn.Module, key: str) -> tuple[nn.Module, nn.Module, str]:
    """(parent, module, attribute name in parent) of the submodule named ``key``."""
    parent_name, _, target_name = key.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    return parent, model.get_submodule(key), target_name


_MIXED_BATCH_TYPES = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class ModulesToSaveWrapper(nn.Module):
    """Runs the active adapter's trainable copy of ``module_to_save`` (the original when no
    adapter is active or adapters are disabled)."""

    def __init__(self, module_to_save: nn.Module, adapter_name: str) -> None:
        super().__init__()
        if isinstance(module_to_save, (nn.ModuleDict, nn.ModuleList, nn.ParameterDict, nn.ParameterList)):
            raise TypeError(f"modules_to_save cannot be applied to modules of type {type(module_to_save)}")
        from ..nn import LoraLayer

        if isinstance(module_to_save, LoraLayer):
            raise TypeError(f"modules_to_save cannot be applied to modules of type {type(module_to_save)}")
        self.original_module = module_to_save
        self.modules_to_save = nn.ModuleDict()
        self._active_adapter: Union[str, list[str]] = [adapter_name]
        self._disable_adapters = False
        self._adapters: set[str] = set()
        self.update(adapter_name)

    # ------------------------------------------------------------------ state
    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    @property
    def active_adapter(self) -> Union[str, list[str]]:
        return self._active_adapter

    @property
    def active_adapters(self) -> list[str]:
        return [self._active_adapter] if isinstance(self._active_adapter, str) else list(self._active_adapter)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            pass
        modules = self.__dict__.get("_modules")
        if modules is None:
            raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")
        if self._disable_adapters or not self.active_adapters:
            return getattr(modules["original_module"], name)
        active = self.active_adapters[0]
        if active in modules["modules_to_save"]:
            return getattr(modules["modules_to_save"][active], name)
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def update(self, adapter_name: str) -> None:
        """Add a trainable copy of the original module for ``adapter_name``."""
        self._adapters.add(adapter_name)
        if adapter_name not in self.modules_to_save:
            self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module)
        self.original_module.requires_grad_(False)
        if adapter_name == self.active_adapter:
            self.modules_to_save[adapter_name].requires_grad_(True)

    def set_adapter(self, adapter_names: Union[str, list[str]], inference_mode: bool = False) -> None:
        """Activate one adapter's copy (trainable unless ``inference_mode``); [] activates none."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if len(names) > 1:
            raise ValueError(f"Attempted to set multiple ({names}) adapters at once for modules_to_save.")
        for current in self.active_adapters:
            if current in self.modules_to_save:
                self.modules_to_save[current].requires_grad_(False)
        if not names:
            self._active_adapter = []
            return
        name = names[0]
        if name not in self._adapters:
            raise ValueError(f"Adapter {name} not found in {self._adapters}")
        self.modules_to_save[name].requires_grad_(not inference_mode)
        self._active_adapter = name

    def enable_adapters(self, enabled: bool) -> None:
        """Enabled: the active copy is used and trainable; disabled: the original runs, copies frozen."""
        self._disable_adapters = not enabled
        if enabled:
            for name in self.active_adapters:
                self.modules_to_save[name].requires_grad_(True)
        else:
            for module in self.modules_to_save.values():
                module.requires_grad_(False)

    def delete_adapter(self, adapter_name: str, new_active_adapters: Optional[list[str]]) -> None:
        """Drop ``adapter_name``'s copy; activate the first of ``new_active_adapters`` held here."""
        if adapter_name not in self.modules_to_save:
            return
        self._adapters.discard(adapter_name)
        new_active = [n for n in (new_active_adapters or []) if n in self.modules_to_save and n != adapter_name]
        del self.modules_to_save[adapter_name]
        if not new_active:
            self._active_adapter = []
        elif new_active[0] not in self.active_adapters:
            self.set_adapter(new_active[0])

    # ------------------------------------------------------------------ forward
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        adapter_names = kwargs.pop("adapter_names", None)
        if self._disable_adapters or any(name not in self._adapters for name in self.active_adapters):
            return self.original_module(*args, **kwargs)
        if adapter_names is None:
            if not self.active_adapters:
                return self.original_module(*args, **kwargs)
            return self.modules_to_save[self.active_adapters[0]](*args, **kwargs)
        return self._mixed_batch_forward(*args, adapter_names=adapter_names, **kwargs)

    def _mixed_batch_forward(self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any) -> Any:
        if not isinstance(self.original_module, _MIXED_BATCH_TYPES):
            raise TypeError(
                "Mixed batching is only supported for modules_to_save of type "
                + ", ".join(t.__name__ for t in _MIXED_BATCH_TYPES)
            )
        if len(x) != len(adapter_names):
            raise ValueError(
                "Length of `adapter_names` should be the same as the number of inputs, but got "
                f"{len(adapter_names)} and {len(x)} respectively."
            )
        unknown = sorted({n for n in adapter_names if n != BASE_ADAPTER_NAME} - set(self.modules_to_save))
        if unknown:
            raise ValueError(f"adapter_names contains adapters without a modules_to_save copy here: {unknown}")
        results: list[Any] = [None] * len(x)
        for name in dict.fromkeys(adapter_names):
            rows = [i for i, n in enumerate(adapter_names) if n == name]
            module = self.original_module if name == BASE_ADAPTER_NAME else self.modules_to_save[name]
            out = module(x[rows], *args, **kwargs)
            for j, row in enumerate(rows):
                results[row] = out[j]
        return torch.stack(results)

    # ------------------------------------------------------------------ saving / unloading
    def adapter_state_dict(self, adapter_name: str, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``adapter_name``'s copy, keyed as the plain module (``weight``, ``bias``...)."""
        if adapter_name not in self._adapters:
            return {}
        return {k: state_dict[f"modules_to_save.{adapter_name}.{k}"] for k in self.modules_to_save[adapter_name].state_dict()}

    def adapter_state_dict_load_map(self, adapter_name: str) -> dict[str, str]:
        """Plain module key -> key inside this wrapper for ``adapter_name``."""
        if adapter_name not in self._adapters:
            return {}
        return {k: f"modules_to_save.{adapter_name}.{k}" for k in self.modules_to_save[adapter_name].state_dict()}

    def unwrapped_module(self) -> nn.Module:
        """The module that replaces this wrapper on unload: the active copy, or the original."""
        if not self.active_adapters:
            return self.original_module
        return self.modules_to_save[self.active_adapters[0]]


def set_trainable_modules(model: nn.Module, adapter_name: str, module_names: list[str], inference_mode: bool,
                          activate: bool = True) -> list[ModulesToSaveWrapper]:
    """Wrap every module whose name ends with one of ``module_names`` in a ModulesToSaveWrapper
    (or add ``adapter_name`` to an existing wrapper)."""
    from ..nn import LoraLayer

    wrappers = []
    keys = [key for key, _ in model.named_modules(remove_duplicate=False)]
    for key in keys:
        if not any(key.endswith(name) for name in module_names):
            continue
        try:
            parent, target, target_name = get_submodules(model, key)
        except AttributeError:
            continue  # already replaced by a wrapper earlier in this loop
        parts = key.split(".")
        grandparent = model.get_submodule(".".join(parts[:-2])) if len(parts) >= 2 else None
        if isinstance(grandparent, LoraLayer):
            raise ValueError(
                f"You are trying to target a module with ModulesToSaveWrapper that is a child of {type(grandparent)}. "
                f"This is almost certainly not the intended behavior. Please ensure that the adapter name, "
                f"'{adapter_name}', does not conflict with any of the targeted modules.")
        if isinstance(grandparent, ModulesToSaveWrapper) or isinstance(parent, ModulesToSaveWrapper):
            continue  # a module inside a wrapper (original_module / a copy)
        if isinstance(target, ModulesToSaveWrapper):
            target.update(adapter_name)
            target.set_adapter(target.active_adapter, inference_mode=inference_mode)
            wrappers.append(target)
            continue
        wrapper = ModulesToSaveWrapper(target, adapter_name)
        wrapper.set_adapter(adapter_name if activate else [], inference_mode=inference_mode)
        setattr(parent, target_name, wrapper)
        wrappers.append(wrapper)
    return wrappers
