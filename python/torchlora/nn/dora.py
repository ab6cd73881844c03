"""DoRA (weight-decomposed LoRA) for the LoRA layers, with PEFT's semantics and names.

An adapter with ``use_dora`` has a magnitude ``m`` (``lora_magnitude_vector.<adapter>.weight``)
and scales the adapted layer's output per output feature by ``m / ||W + s B A||``, the norm
detached as in PEFT and the paper. The norm comes from ``torchlora.dora_weight_norm``, which
never forms ``W + s B A``; ``||W||^2`` is cached while the base weight does not change.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import ops
from . import quantized_weight
from ..utils.distributed import gathered_by_fsdp


class DoraMagnitude(nn.Module):
    """Holds one adapter's magnitude as ``weight`` (PEFT keeps it in a module of the same name)."""

    def __init__(self, magnitude: Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(magnitude, requires_grad=True)

    def extra_repr(self) -> str:
        return f"features={self.weight.numel()}"


class WeightSqNormCache:
    """``||W_i||^2`` of a frozen base weight, recomputed when the weight is replaced or changed in
    place (its version counter moves); never cached inside a compiled graph."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._value: Tensor | None = None

    def clear(self) -> None:
        self._key, self._value = None, None

    def get(self, base_layer: nn.Module, fan_in_fan_out: bool) -> Tensor | None:
        if torch.compiler.is_compiling():
            return None  # the operator computes it; a Python-side cache would not survive tracing
        if gathered_by_fsdp(base_layer):
            return None  # FSDP2 refills the weight without a version change: the operator computes it
        weight = base_layer.weight
        key = (id(weight), weight.data_ptr(), weight._version, weight.dtype, weight.device, fan_in_fan_out)
        if self._key != key or self._value is None:
            if quantized_weight.is_quantized(base_layer):
                parts = [ops.dora_weight_sq_norm(rows) for _, rows in quantized_weight.weight_row_blocks(base_layer)]
                self._value = torch.cat(parts)
            else:
                self._value = ops.dora_weight_sq_norm(weight.detach(), fan_in_fan_out)
            self._key = key
        return self._value


def weight_norm(base_layer: nn.Module, lora_A: Tensor, lora_B: Tensor, scaling: float, fan_in_fan_out: bool,
                sq_norm: Tensor | None) -> Tensor:
    """``||W + scaling * B @ A||`` per output feature, detached; a quantized weight is read a block
    of rows at a time."""
    with torch.no_grad():
        lora_A, lora_B = lora_A.detach(), lora_B.detach()
        if not quantized_weight.is_quantized(base_layer):
            return ops.dora_weight_norm(base_layer.weight.detach(), lora_A, lora_B, scaling, fan_in_fan_out, sq_norm)
        parts = []
        for start, rows in quantized_weight.weight_row_blocks(base_layer):
            stop = start + rows.shape[0]
            block_sq = None if sq_norm is None else sq_norm[start:stop]
            parts.append(ops.dora_weight_norm(rows, lora_A, lora_B[start:stop], scaling, False, block_sq))
        return torch.cat(parts)


def norm_of(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, fan_in_fan_out: bool) -> Tensor:
    """The DoRA norm for an explicit (dequantized, unmerged) weight: what merging divides by."""
    with torch.no_grad():
        return ops.dora_weight_norm(weight, lora_A.detach(), lora_B.detach(), scaling, fan_in_fan_out)
