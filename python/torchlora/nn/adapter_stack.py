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
import torch.nn.functional as F
from torch import Tensor


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


def pad_rank(t: Tensor, dim: int, rank: int, groups: int = 1) -> Tensor:
    """``t`` zero-padded along ``dim`` to ``rank``; with ``groups`` the dimension is that many
    equal blocks (a grouped conv's channels), each padded to ``rank / groups``."""
    size = t.shape[dim]
    if size == rank:
        return t
    if groups > 1:
        blocks = t.unflatten(dim, (groups, size // groups))
        return pad_rank(blocks, dim + 1, rank // groups).flatten(dim, dim + 1)
    return F.pad(t, [0, 0] * (t.dim() - dim - 1) + [0, rank - size])


def build_stack(names: list[str], factors: list[tuple[Tensor, Tensor, Optional[Tensor]]], scaling: list[float],
                dropout: list[float], a_rank_dim: int, b_rank_dim: int, groups: int = 1) -> AdapterStack:
    """Stack per-adapter factors (``A`` with its rank along ``a_rank_dim``, ``B`` along
    ``b_rank_dim``, optional bias) into slots, zero-padding ranks to the largest (a multiple of
    ``groups``) and casting to one dtype."""
    dtype = factors[0][0].dtype
    for A, _, _ in factors[1:]:
        dtype = torch.promote_types(dtype, A.dtype)
    rank = max(A.shape[a_rank_dim] for A, _, _ in factors)
    rank = -(-rank // groups) * groups
    lora_A = torch.stack([pad_rank(A.to(dtype), a_rank_dim, rank, groups) for A, _, _ in factors])
    lora_B = torch.stack([pad_rank(B.to(dtype), b_rank_dim, rank // groups) for _, B, _ in factors])
    lora_bias = None
    if any(b is not None for _, _, b in factors):
        out = factors[0][1].shape[0]
        zeros = factors[0][1].new_zeros(out, dtype=dtype)
        lora_bias = torch.stack([zeros if b is None else b.to(dtype) for _, _, b in factors])
    device = lora_A.device
    scale = torch.tensor(scaling, dtype=torch.float32, device=device)
    return AdapterStack(tuple(names), {n: i for i, n in enumerate(names)}, lora_A, lora_B, lora_bias, scale,
                        tuple(dropout))


def row_slots(sample_slots: Tensor, rows: int) -> Tensor:
    """Per-row slots for ``rows`` rows made of ``len(sample_slots)`` equal consecutive blocks."""
    samples = sample_slots.shape[0]
    if rows == samples:
        return sample_slots
    return sample_slots[:, None].expand(samples, rows // samples).reshape(-1)


def per_row_dropout(x: Tensor, slots: Tensor, dropout: tuple[float, ...], training: bool) -> Tensor:
    """Inverted dropout with each row's adapter's probability (rows of ``x`` follow ``slots``)."""
    if not training or not any(p > 0.0 for p in dropout):
        return x
    p = torch.tensor(dropout, dtype=x.dtype, device=x.device)[slots.clamp(min=0).long()]
    p = p.view(-1, *([1] * (x.dim() - 1)))
    keep = torch.rand_like(x) >= p
    return x * keep / (1.0 - p)
