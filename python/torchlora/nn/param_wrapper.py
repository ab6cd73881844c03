"""``ParamWrapper``: LoRA on an ``nn.Parameter`` (``LoraConfig.target_parameters``), such as
the fused 3-D expert weights of mixture-of-experts layers, with PEFT's names and semantics.

The wrapped module keeps computing with its own forward; while the wrapper runs it, the
targeted parameter reads as ``W + delta`` through a parametrization (the factors never meet
the input, so there is no dropout, lora_bias or DoRA). Several parameters of one module are
adapted by wrappers nested one inside the other, as in PEFT, so files keep PEFT's keys
(``<module>.lora_A.weight``, ``<module>.base_layer.lora_A.weight``, ...).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .._native import _C
from .layer import InitLoraWeights, LoraLayer


class _AddDelta(nn.Module):
    """A parametrization that adds a fixed (differentiable) delta to the parameter."""

    def __init__(self, delta: Tensor) -> None:
        super().__init__()
        self.delta = delta

    def forward(self, weight: Tensor) -> Tensor:
        return weight + self.delta.to(weight.dtype)


class ParamWrapper(LoraLayer):
    """LoRA for the parameter ``parameter_name`` of ``base_layer`` (a module, or a ParamWrapper
    of another parameter of the same module).

    A 2-D parameter is ``[out, in]``; a 3-D one is a stack of experts ``[experts, out, in]``
    (``[experts, in, out]`` when the module sets ``is_transposed``). ``lora_A`` is
    ``Linear(in, r * experts)`` and ``lora_B`` is ``Linear(r * experts, out)``; expert ``e``'s
    delta is ``scaling * B_e @ A_e`` (``torchlora._C.peft.parameter_delta_weight``).
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, parameter_name: str, r: int, lora_alpha: float,
                 init_lora_weights: InitLoraWeights = True, use_rslora: bool = False,
                 low_cpu_mem_usage: bool = False) -> None:
        super().__init__(base_layer)
        self.parameter_name = parameter_name
        param = self.get_param()
        if not isinstance(param, Tensor):
            raise TypeError(f"{type(self.get_base_layer()).__name__} has no parameter {parameter_name!r}")
        self.is_transposed = bool(getattr(self.get_base_layer(), "is_transposed", False))
        self.num_experts, self.in_features, self.out_features = _C.peft.parameter_lora_shape(
            list(param.shape), self.is_transposed)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha, 0.0, init_lora_weights, use_rslora,
                          low_cpu_mem_usage=low_cpu_mem_usage)

    # ------------------------------------------------------------------ the parameter
    def get_param(self) -> Tensor:
        """The targeted parameter of the innermost module (without any LoRA delta)."""
        module = self.get_base_layer()
        if parametrize.is_parametrized(module, self.parameter_name):
            return module.parametrizations[self.parameter_name].original
        return getattr(module, self.parameter_name)

    @property
    def weight(self) -> Tensor:
        return self.get_param()

    @property
    def bias(self) -> None:
        return None

    # ------------------------------------------------------------------ adapters
    def _check_new_adapter(self, r: int, lora_bias: bool) -> None:
        if lora_bias:
            raise ValueError("lora.ParamWrapper does not work with lora_bias=True.")

    def _check_dora_supported(self) -> None:
        raise ValueError("lora.ParamWrapper does not work with LoRA variants like DoRA.")

    def _create_adapter(self, adapter_name: str, r: int, lora_bias: bool) -> None:
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r * self.num_experts, bias=False)
        self.lora_B[adapter_name] = nn.Linear(r * self.num_experts, self.out_features, bias=False)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                     init_lora_weights: InitLoraWeights = True, use_rslora: bool = False, lora_bias: bool = False,
                     low_cpu_mem_usage: bool = False, use_dora: bool = False) -> None:
        """Add (or replace) an adapter; see :meth:`LoraLayer.update_layer`."""
        if lora_dropout:
            raise ValueError("lora.ParamWrapper does not work with lora_dropout != 0.")
        super().update_layer(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora, lora_bias,
                             low_cpu_mem_usage=low_cpu_mem_usage, use_dora=use_dora)

    def _move_adapter_to_base(self, adapter_name: str) -> None:
        param = self.get_param()
        dtype = param.dtype if param.dtype.is_floating_point else None
        for tensor in self.adapter_tensors(adapter_name).values():
            device = tensor.device if tensor.is_meta else param.device
            tensor.data = tensor.data.to(device, dtype=dtype or tensor.dtype)

    def get_delta_weight(self, adapter: str) -> Tensor:
        """``scaling * B_e @ A_e`` per expert, in the parameter's layout and dtype."""
        param = self.get_param()
        delta = _C.peft.parameter_delta_weight(self.lora_A[adapter].weight, self.lora_B[adapter].weight,
                                               float(self.scaling[adapter]), list(param.shape), self.is_transposed)
        return delta.to(param.device, param.dtype)

    # ------------------------------------------------------------------ merging
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add the adapters' deltas into the parameter (``safe_merge``: on a copy, ValueError if
        anything is not finite)."""
        param = self.get_param()
        for name in self._adapters_to_merge(adapter_names):
            merged = param.data + self.get_delta_weight(name).detach()
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
            param.data.copy_(merged)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract every merged adapter's delta again, newest first."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        param = self.get_param()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            param.data -= self.get_delta_weight(name).detach()

    def unload_base_layer(self) -> nn.Module:
        return self.get_base_layer()

    # ------------------------------------------------------------------ forward
    @contextlib.contextmanager
    def _delta_applied(self, adapters: list[str]) -> Iterator[None]:
        held = [a for a in adapters if self._holds(a)]
        if not held:
            yield
            return
        delta = self.get_delta_weight(held[0])
        for name in held[1:]:
            delta = delta + self.get_delta_weight(name)
        module = self.get_base_layer()
        param = self.get_param()
        requires_grad = param.requires_grad
        parametrize.register_parametrization(module, self.parameter_name, _AddDelta(delta))
        module.parametrizations[self.parameter_name].original.requires_grad_(requires_grad)
        try:
            with parametrize.cached():
                yield
        finally:
            self._remove_delta(module)

    def _remove_delta(self, module: nn.Module) -> None:
        plist = module.parametrizations[self.parameter_name]
        if len(plist) == 1:
            # restores the original Parameter object, so optimizers keep their reference
            parametrize.remove_parametrizations(module, self.parameter_name, leave_parametrized=False)
            return
        for i in reversed(range(len(plist))):
            if isinstance(plist[i], _AddDelta):
                del plist[i]
                return

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        if kwargs.pop("adapter_names", None) is not None or kwargs.pop("adapter_slots", None) is not None:
            raise ValueError("lora.ParamWrapper does not support mixed adapter batches.")
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        with self._delta_applied(self.active_adapters):
            return self.base_layer(x, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"parameter_name={self.parameter_name!r}, num_experts={self.num_experts}, " + super().extra_repr()


def find_target_parameters(model: nn.Module, target_parameters: list[str]) -> list[tuple[str, str]]:
    """(module path, parameter name) of every parameter ``target_parameters`` selects, in the
    order PEFT wraps them: modules in order, each module's parameters in registration order (so
    the first one of a module ends up innermost). Module paths are those of the unwrapped
    modules, where their (outermost) wrapper sits."""
    targets = sorted(set(target_parameters))
    found: list[tuple[str, str]] = []
    for module_name, module in model.named_modules():
        if isinstance(module, ParamWrapper):
            continue  # the wrapped module's parameters are listed under it
        unwrapped, _ = _C.peft.strip_base_layer(module_name)
        for param_name, _ in module.named_parameters(recurse=False):
            key = f"{unwrapped}.{param_name}" if unwrapped else param_name
            if not _C.peft.parameter_is_targeted(key, targets):
                continue
            if not unwrapped:
                raise ValueError("Targeting an nn.Parameter on the top-level module is not supported "
                                 f"(parameter '{param_name}').")
            holder = model.get_submodule(unwrapped)
            if isinstance(holder, LoraLayer) and not isinstance(holder, ParamWrapper):
                raise ValueError(f"Trying to wrap an `nn.Parameter` of layer '{unwrapped}' of type "
                                 f"{type(holder).__name__}, which is not a valid target. Make sure that this layer is "
                                 "not also targeted with `target_modules`.")
            found.append((unwrapped, param_name))
    return found


def find_param_wrapper(module: nn.Module, parameter_name: str) -> Optional[ParamWrapper]:
    """The (possibly nested) ParamWrapper of ``parameter_name`` in the chain starting at ``module``."""
    while isinstance(module, ParamWrapper):
        if module.parameter_name == parameter_name:
            return module
        module = module.base_layer
    return None
