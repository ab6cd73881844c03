"""A layer's adapters stacked in slots for the multi-adapter operators (one operator per layer
for a mixed batch, whatever the number of adapters).

Slot ``i`` holds ``layer.adapter_names()[i]``; ranks are zero-padded to the largest one (the
padding adds exact zeros). Without autograd (``torch.no_grad`` / ``inference_mode``) the stack
is a cached copy, rebuilt only when the adapters change: added or deleted, loaded
(``load_state_dict``), moved or cast (``.to()``), rescaled (``layer.scaling[name] = ...``), or
changed in place (an optimizer step, an edit under ``no_grad``: the parameters' version counters
tell). With autograd the stack is built from the parameters on every forward, so each row's
gradient reaches its own adapter's parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .. import _native  # noqa: F401  (registers the operators)


@dataclass(frozen=True)
class AdapterStack:
    """The stacked operands of a layer's adapters (see ``torchlora.ops.multi_lora_linear``)."""

    names: tuple[str, ...]
    slot_of: dict[str, int]
    lora_A: Tensor
    lora_B: Tensor
    lora_bias: Optional[Tensor]
    scale: Tensor
    dropout: tuple[float, ...]

    def sample_slots(self, adapter_names: list[str], device: torch.device) -> Tensor:
        """One slot per sample (-1 for ``"__base__"`` and adapters this layer does not hold)."""
        slot_of = self.slot_of
        return torch.tensor([slot_of.get(n, -1) for n in adapter_names], dtype=torch.int32, device=device)


def build_stack(names: list[str], factors: list[tuple[Tensor, Tensor, Optional[Tensor]]], scaling: list[float],
                dropout: list[float], a_rank_dim: int, b_rank_dim: int, groups: int = 1) -> AdapterStack:
    """Stack per-adapter factors (``A`` with its rank along ``a_rank_dim``, ``B`` along
    ``b_rank_dim``, optional bias) into slots by the C++ core's rule (``torchlora.stack_adapters``:
    ranks zero-padded to the largest, one dtype)."""
    stacked = torch.ops.torchlora.stack_adapters([f[0] for f in factors], [f[1] for f in factors],
                                                 [f[2] for f in factors], a_rank_dim, b_rank_dim, groups)
    lora_A, lora_B = stacked[0], stacked[1]
    lora_bias = stacked[2] if len(stacked) > 2 else None
    scale = torch.tensor(scaling, dtype=torch.float32, device=lora_A.device)
    return AdapterStack(tuple(names), {n: i for i, n in enumerate(names)}, lora_A, lora_B, lora_bias, scale,
                        tuple(dropout))


def row_slots(sample_slots: Tensor, rows: int) -> Tensor:
    """Per-row slots for ``rows`` rows made of ``len(sample_slots)`` equal consecutive blocks."""
    if rows == sample_slots.shape[0]:
        return sample_slots
    return torch.ops.torchlora.multi_lora_row_slots(sample_slots, rows)


def per_row_dropout(x: Tensor, slots: Tensor, dropout: tuple[float, ...], training: bool) -> Tensor:
    """Inverted dropout with each row's adapter's probability (rows of ``x`` follow ``slots``)."""
    if not training or not any(p > 0.0 for p in dropout):
        return x
    return torch.ops.torchlora.multi_lora_row_dropout(x, slots, list(dropout), training)
