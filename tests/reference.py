"""Pure-PyTorch statements of the torchlora operators, the oracle for the native kernels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

import torchlora


def dropout_mask(shape: torch.Size, p: float, seed: Tensor, dtype: torch.dtype, device) -> Tensor:
    """The multiplier torchlora's dropout applies (0 or 1/(1-p)), from the same generator."""
    return torchlora.ops.dropout_apply(torch.ones(shape, dtype=dtype, device=device), p, seed)


def lora_linear(x, base_out, A, B, bias, scaling, p=0.0, seed=None):
    if p > 0:
        x = x * dropout_mask(x.shape, p, seed, x.dtype, x.device)
    delta = (x @ A.T) @ B.T
    if bias is not None:
        delta = delta + bias
    return base_out + scaling * delta.to(base_out.dtype)


def lora_embedding(ids, base_out, A, B, scaling, padding_idx=None):
    return base_out + scaling * (F.embedding(ids, A.T, padding_idx=padding_idx) @ B.T).to(base_out.dtype)


def lora_conv2d(x, base_out, A, B, bias, stride, padding, dilation, groups, scaling, p=0.0, seed=None):
    if p > 0:
        x = x * dropout_mask(x.shape, p, seed, x.dtype, x.device)
    h = F.conv2d(x, A, None, stride, padding, dilation)
    return base_out + scaling * F.conv2d(h, B, bias, groups=groups).to(base_out.dtype)


def dora_weight_norm(weight, A, B, scaling, fan_in_fan_out=False):
    """PEFT's DoRA weight norm with the matrix formed: ||W + s B A|| per output row (W^T's rows for
    fan_in_fan_out; a conv kernel [out, ...] flattened to [out, K])."""
    if weight.dim() == 2:
        rows = weight.T if fan_in_fan_out else weight
    else:
        rows = weight.flatten(1)
    lora = B.flatten(1) @ A.flatten(1)
    return torch.linalg.norm(rows + scaling * lora, dim=1)


def dora_weight_sq_norm(weight, fan_in_fan_out=False):
    rows = (weight.T if fan_in_fan_out else weight) if weight.dim() == 2 else weight.flatten(1)
    return (rows * rows).sum(1)


def dora_scale(z, magnitude, weight_norm, bias=None, dim=-1):
    """(m / n) * (z - bias) + bias, the per-channel vectors broadcast along `dim` of z."""
    shape = [1] * z.dim()
    shape[dim] = -1
    g = (magnitude.reshape(-1) / weight_norm.reshape(-1)).reshape(shape)
    b = torch.zeros_like(g) if bias is None else bias.reshape(shape).to(g.dtype)
    return g * (z - b) + b
