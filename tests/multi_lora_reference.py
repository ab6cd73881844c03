"""Pure-PyTorch statements of the multi-adapter operators (one slot per row, -1 = none), the
oracle of the op tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _rows(slot_index: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    return slot_index.long().clamp(min=0), (slot_index >= 0).to(dtype)


def multi_lora_linear(x: Tensor, base_out: Tensor, lora_A: Tensor, lora_B: Tensor, lora_bias: Tensor | None,
                      scale: Tensor, slot_index: Tensor) -> Tensor:
    """base_out + scale[s] * (B[s] @ A[s] @ x + bias[s]) row by row, computed in float64."""
    x2 = x.reshape(-1, x.shape[-1]).double()
    s, used = _rows(slot_index, torch.float64)
    h = torch.einsum("tri,ti->tr", lora_A.double()[s], x2)
    delta = torch.einsum("tor,tr->to", lora_B.double()[s], h)
    if lora_bias is not None:
        delta = delta + lora_bias.double()[s]
    delta = delta * (scale.double()[s] * used)[:, None]
    return (base_out.reshape(-1, base_out.shape[-1]).double() + delta).to(base_out.dtype).reshape(base_out.shape)


def multi_lora_embedding(ids: Tensor, base_out: Tensor, lora_A: Tensor, lora_B: Tensor, scale: Tensor,
                         slot_index: Tensor) -> Tensor:
    flat = ids.reshape(-1)
    s, used = _rows(slot_index, torch.float64)
    h = lora_A.double()[s, :, flat]  # [T, r]
    delta = torch.einsum("tdr,tr->td", lora_B.double()[s], h) * (scale.double()[s] * used)[:, None]
    return (base_out.reshape(-1, base_out.shape[-1]).double() + delta).to(base_out.dtype).reshape(base_out.shape)


def multi_lora_conv2d(x: Tensor, base_out: Tensor, lora_A: Tensor, lora_B: Tensor, lora_bias: Tensor | None,
                      scale: Tensor, slot_index: Tensor, stride, padding, dilation, groups: int) -> Tensor:
    outs = []
    for n in range(x.shape[0]):
        slot = int(slot_index[n])
        if slot < 0:
            outs.append(base_out[n].double())
            continue
        h = F.conv2d(x[n : n + 1].double(), lora_A[slot].double(), None, stride, padding, dilation)
        d = F.conv2d(h, lora_B[slot].double(), None if lora_bias is None else lora_bias[slot].double(), 1, 0, 1, groups)
        outs.append(base_out[n].double() + scale[slot].double() * d[0])
    return torch.stack(outs).to(base_out.dtype)
