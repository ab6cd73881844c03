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
