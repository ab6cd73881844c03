"""The scales of a LoRA layer's adapters: PEFT's ``set_scale`` / ``scale_layer`` /
``unscale_layer``, and how a scaling reaches the operators.

A scaling is a float (``layer.scaling[name]``, computed by the C++ rule ``_C.peft.lora_scaling``)
or, after ``torchlora.utils.hotswap.prepare_model_for_compiled_hotswap``, a 0-dim tensor: a
compiled graph reads a tensor as data, while it bakes a float in as a constant, so that another
adapter's scaling would recompile it.
"""

from __future__ import annotations

import numbers
from typing import Optional, Union

import torch
from torch import Tensor

from .._native import _C


def _check_number(value: object, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a float or an int, got {type(value).__name__}")


class AdapterScales:
    """Mixin of :class:`torchlora.nn.LoraLayer` for the adapters' scalings."""

    def _operator_factors(self, adapter_name: str, lora_B: Tensor,
                          lora_bias: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor], float]:
        """``(lora_B, lora_bias, scaling)`` as the operators take them.

        The operators take the scaling as a float; a tensor scaling is folded into ``lora_B`` and
        ``lora_bias`` (``s * B`` is ``[out, r]``, far smaller than the activations) and the
        operator gets 1.0, so the fused paths stay and a compiled graph reads the scale as data.
        """
        scaling = self.scaling[adapter_name]
        if not isinstance(scaling, Tensor):
            return lora_B, lora_bias, scaling
        scaling = scaling.to(lora_B.dtype)
        return lora_B * scaling, None if lora_bias is None else lora_bias * scaling, 1.0

    def _initial_scaling(self, adapter_name: str) -> float:
        """The adapter's scaling from its rank and alpha (the C++ rule)."""
        return _C.peft.lora_scaling(self.lora_alpha[adapter_name], self.r[adapter_name],
                                    self.use_rslora.get(adapter_name, False))

    def _set_scaling(self, adapter_name: str, value: Union[float, Tensor]) -> None:
        """Give ``adapter_name`` a new scaling. A tensor scaling is written in place, so a compiled
        graph that reads it sees the new value without recompiling."""
        current = self.scaling[adapter_name]
        if isinstance(current, Tensor):
            with torch.no_grad():
                current.fill_(value)
            changed = getattr(self.scaling, "_changed", None)  # a ScalingDict: cached adapter stacks see it
            if changed is not None:
                changed()
        else:
            self.scaling[adapter_name] = float(value) if isinstance(value, Tensor) else value

    def set_scale(self, adapter: str, scale: Union[float, int]) -> None:
        """Set the scaling of ``adapter`` to ``scale`` times its initial scaling (from ``r`` and
        ``lora_alpha``). A layer that does not hold ``adapter`` is left as it is (as in PEFT)."""
        _check_number(scale, "scale")
        if adapter not in self.scaling:
            return
        self._set_scaling(adapter, scale * self._initial_scaling(adapter))

    def scale_layer(self, scale: Union[float, int]) -> None:
        """Multiply the scaling of every active adapter of this layer by ``scale``."""
        _check_number(scale, "scale")
        if scale == 1:
            return
        for name in self.active_adapters:
            if self._holds(name):
                self._set_scaling(name, self.scaling[name] * scale)

    def unscale_layer(self, scale: Optional[Union[float, int]] = None) -> None:
        """Divide the scaling of every active adapter of this layer by ``scale``; with ``None``,
        reset it to the initial scaling (from ``r`` and ``lora_alpha``)."""
        if scale is not None:
            _check_number(scale, "scale")
            if scale == 0:
                raise ValueError("unscale_layer: scale must not be 0")
        for name in self.active_adapters:
            if not self._holds(name):
                continue
            if scale is None:
                self._set_scaling(name, self._initial_scaling(name))
            else:
                self._set_scaling(name, self.scaling[name] / scale)
