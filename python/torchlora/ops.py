"""Typed Python wrappers of the ``torch.ops.torchlora`` operators.

Every operator is defined and implemented in C++ (CPU, CUDA, Meta and Autograd kernels);
these functions only give them Python signatures and docstrings.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
from torch import Tensor

from . import _native  # noqa: F401  (registers the operators)

__all__ = [
    "linear_with_lora", "lora_linear", "lora_linear_", "lora_embedding", "lora_conv2d", "lora_conv3d", "dropout_apply",
    "make_seed",
    "lora_delta_weight", "multi_lora_shrink", "multi_lora_expand", "multi_lora_expand_", "multi_lora_linear",
    "multi_lora_linear_", "linear_with_multi_lora", "multi_lora_embedding", "multi_lora_conv2d",
    "multi_dora_scale",
    "dora_weight_norm", "dora_weight_sq_norm", "dora_scale",
]

_SEED_HIGH = 2**62


def make_seed(device: torch.device | str | None = None) -> Tensor:
    """A fresh dropout seed (one int64 element) drawn from torch's generator on ``device``.

    Drawing it with ``torch.randint`` keeps ``torch.manual_seed`` reproducibility, works
    inside ``torch.compile`` graphs and CUDA graphs (no host synchronisation).
    """
    return torch.randint(0, _SEED_HIGH, (1,), dtype=torch.int64, device=device)


def lora_linear(
    x: Tensor,
    base_out: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    lora_bias: Tensor | None,
    scaling: float,
    dropout_p: float = 0.0,
    seed: Tensor | None = None,
) -> Tensor:
    """``base_out + scaling * (dropout_p(x) @ lora_A.T) @ lora_B.T (+ scaling * lora_bias)``.

    Shapes: ``x [..., in]``, ``base_out [..., out]``, ``lora_A [r, in]``, ``lora_B [out, r]``,
    ``lora_bias [out]``. ``seed`` (see :func:`make_seed`) is required when ``dropout_p > 0``;
    backward regenerates the mask from it instead of storing it.

    DTensor factors with the local ``x`` / ``base_out`` of a tensor-parallel base layer are
    computed on their mesh by :func:`torchlora.distributed.lora_linear_on_mesh`.
    """
    if _mixes_dtensors(x, base_out, lora_A, lora_B, lora_bias, seed):
        from .distributed.tensor_parallel import lora_linear_on_mesh
        return lora_linear_on_mesh(x, base_out, lora_A, lora_B, lora_bias, scaling, dropout_p, seed)
    return torch.ops.torchlora.lora_linear(x, base_out, lora_A, lora_B, lora_bias, scaling, dropout_p, seed)


def _mixes_dtensors(*tensors: Tensor | None) -> bool:
    """Whether DTensors and plain tensors meet; never imports ``torch.distributed.tensor`` (if it
    is not imported, no DTensor exists)."""
    module = sys.modules.get("torch.distributed.tensor")
    if module is None:
        return False
    kinds = [isinstance(t, module.DTensor) for t in tensors if t is not None]
    return any(kinds) and not all(kinds)


def lora_linear_(
    base_out: Tensor,
    x: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    lora_bias: Tensor | None,
    scaling: float,
    dropout_p: float = 0.0,
    seed: Tensor | None = None,
) -> Tensor:
    """In-place :func:`lora_linear`: adds the low-rank term into ``base_out`` and returns it.

    Saves the new ``[..., out]`` tensor and the pass that writes it. Under autograd,
    ``base_out`` must not be a leaf that requires grad, and nothing else may have saved it for
    backward (autograd's version check raises if something did); the output of a frozen
    ``nn.Linear`` qualifies.
    """
    return torch.ops.torchlora.lora_linear_(base_out, x, lora_A, lora_B, lora_bias, scaling, dropout_p, seed)


def linear_with_lora(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    lora_bias: Tensor | None,
    scaling: float,
    dropout_p: float = 0.0,
    seed: Tensor | None = None,
) -> Tensor:
    """``F.linear(x, weight, bias) + scaling * (dropout_p(x) @ lora_A.T) @ lora_B.T (+ scaling * lora_bias)``.

    A (frozen) ``nn.Linear`` and one adapter as a single op: on the CPU the low-rank term lands
    in the output before the base GEMM accumulates into it, the adapter is folded into the
    weight where that costs fewer flops, and dropout is applied as a correction at the dropped
    elements. It saves only the ``[T, r]`` shrink beyond what ``F.linear`` saves. Shapes as
    :func:`lora_linear`, with ``weight [out, in]`` and ``bias [out]``.

    ``weight`` has ``x``'s dtype, or is float32 with bfloat16/float16 ``x``: the op then computes
    with the weight rounded to ``x``'s dtype (where it folds the adapter into the weight it
    rounds ``weight + scaling * lora_B @ lora_A`` once). CPU autocast passes a float32 frozen
    weight so, which spares the cast's pass over the weight and the rounded copy that
    ``F.linear`` under autocast keeps for backward.
    """
    return torch.ops.torchlora.linear_with_lora(x, weight, bias, lora_A, lora_B, lora_bias, scaling, dropout_p, seed)


def lora_embedding(
    ids: Tensor,
    base_out: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    padding_idx: int | None = None,
    scale_grad_by_freq: bool = False,
) -> Tensor:
    """``base_out + scaling * embedding(ids, lora_A.T) @ lora_B.T``.

    Shapes: ``ids [...]``, ``base_out [..., D]``, ``lora_A [r, V]``, ``lora_B [D, r]``.
    ``padding_idx`` and ``scale_grad_by_freq`` act on the gradient of ``lora_A`` as in
    ``torch.nn.functional.embedding``. DTensor factors with the local ids / ``base_out`` of a
    tensor-parallel embedding: :func:`torchlora.distributed.tensor_parallel.lora_embedding_on_mesh`.
    """
    if padding_idx is None:
        padding_idx = -1
    elif padding_idx < 0:
        padding_idx += lora_A.shape[1]
    if _mixes_dtensors(ids, base_out, lora_A, lora_B):
        from .distributed.tensor_parallel import lora_embedding_on_mesh
        return lora_embedding_on_mesh(ids, base_out, lora_A, lora_B, scaling, padding_idx, scale_grad_by_freq)
    return torch.ops.torchlora.lora_embedding(ids, base_out, lora_A, lora_B, scaling, padding_idx, scale_grad_by_freq)


def lora_conv2d(
    x: Tensor,
    base_out: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    lora_bias: Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    scaling: float,
    dropout_p: float = 0.0,
    seed: Tensor | None = None,
) -> Tensor:
    """``base_out + scaling * conv1x1(conv2d(dropout_p(x), lora_A), lora_B, lora_bias, groups)``.

    Shapes: ``x [N, in, H, W]``, ``lora_A [r, in, kh, kw]`` (applied with ``stride``,
    ``padding``, ``dilation``), ``lora_B [out, r / groups, 1, 1]``, ``base_out [N, out, H', W']``.
    """
    return torch.ops.torchlora.lora_conv2d(
        x, base_out, lora_A, lora_B, lora_bias, list(stride), list(padding), list(dilation), groups, scaling,
        dropout_p, seed,
    )


def lora_conv3d(
    x: Tensor,
    base_out: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    lora_bias: Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    scaling: float,
    dropout_p: float = 0.0,
    seed: Tensor | None = None,
) -> Tensor:
    """``base_out + scaling * conv1x1x1(conv3d(dropout_p(x), lora_A), lora_B, lora_bias, groups)``.

    Shapes: ``x [N, in, D, H, W]``, ``lora_A [r, in, kd, kh, kw]`` (applied with ``stride``,
    ``padding``, ``dilation``), ``lora_B [out, r / groups, 1, 1, 1]``, ``base_out [N, out, D', H', W']``.
    One composite of ATen's conv3d (see ``csrc/torchlora/composite/lora_conv3d.cpp``).
    """
    return torch.ops.torchlora.lora_conv3d(
        x, base_out, lora_A, lora_B, lora_bias, list(stride), list(padding), list(dilation), groups, scaling,
        dropout_p, seed,
    )


def dropout_apply(x: Tensor, p: float, seed: Tensor) -> Tensor:
    """Inverted dropout with torchlora's counter-based mask: ``x * keep(seed, i) / (1 - p)``
    where ``i`` is the row-major element index. The same (seed, shape) gives the same mask on
    every device."""
    return torch.ops.torchlora.dropout_apply(x, p, seed)


def lora_delta_weight(
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    fan_in_fan_out: bool = False,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """The change a LoRA adapter makes to its base layer's weight, in that weight's layout
    (PEFT's ``get_delta_weight``).

    - 2-D factors ``lora_A [r, in]``, ``lora_B [out, r]``: ``scaling * lora_B @ lora_A``
      ``[out, in]``; with ``fan_in_fan_out`` (a base weight stored ``[in, out]``: transformers
      ``Conv1D``, and ``nn.Embedding``, whose ``lora_embedding_A [r, V]`` and
      ``lora_embedding_B [D, r]`` give ``[V, D]``) its transpose.
    - 4-D factors ``lora_A [r, in, kh, kw]``, ``lora_B [out, r, 1, 1]``: the conv kernel
      ``[out, in, kh, kw]`` (PEFT's ``conv2d(A.transpose(0, 1), B).transpose(0, 1)``). Adapters of
      a conv with ``groups > 1`` raise ``NotImplementedError``, as PEFT cannot merge them either.

    float16/bfloat16 factors are multiplied in float32 on every device, so the delta is rounded
    once and does not depend on the device. The result is contiguous, in ``dtype`` (default: the
    factors' dtype, as in PEFT). Differentiable in both factors.
    """
    return torch.ops.torchlora.lora_delta_weight(lora_A, lora_B, scaling, fan_in_fan_out, dtype)


# ---- many adapters in one batch -----------------------------------------------------------------
# S adapters stacked in slots and zero-padded to one rank r: lora_A [S, r, in], lora_B [S, out, r],
# lora_bias [S, out], scale [S] (a tensor: changing it costs nothing and recompiles nothing).
# slot_index [T] (int32/int64) picks each row's slot; -1 means no adapter. Values outside [-1, S)
# raise on the CPU and trip a device-side assert on CUDA (the kernels never wait for the host).


def multi_lora_shrink(x: Tensor, lora_A: Tensor, slot_index: Tensor) -> Tensor:
    """``h[t] = lora_A[slot_index[t]] @ x[t]``: ``x [T, in]`` -> ``h [T, r]`` in float32
    (float64 for float64); rows with slot -1 are zero."""
    return torch.ops.torchlora.multi_lora_shrink(x, lora_A, slot_index)


def multi_lora_expand(base_out: Tensor, h: Tensor, lora_B: Tensor, lora_bias: Tensor | None, scale: Tensor,
                      slot_index: Tensor) -> Tensor:
    """``base_out[t] + scale[s] * (lora_B[s] @ h[t] + lora_bias[s])`` with ``s = slot_index[t]``;
    ``base_out [T, out]`` in any float dtype, which the result keeps."""
    return torch.ops.torchlora.multi_lora_expand(base_out, h, lora_B, lora_bias, scale, slot_index)


def multi_lora_expand_(base_out: Tensor, h: Tensor, lora_B: Tensor, lora_bias: Tensor | None, scale: Tensor,
                       slot_index: Tensor) -> Tensor:
    """:func:`multi_lora_expand` into ``base_out`` itself; returns it."""
    return torch.ops.torchlora.multi_lora_expand_(base_out, h, lora_B, lora_bias, scale, slot_index)


def multi_lora_linear(x: Tensor, base_out: Tensor, lora_A: Tensor, lora_B: Tensor, lora_bias: Tensor | None,
                      scale: Tensor, slot_index: Tensor) -> Tensor:
    """A linear layer's mixed batch: row ``t`` of ``x [..., in]`` gets the adapter in slot
    ``slot_index[t]`` added to ``base_out [..., out]``, one operator whatever the number of adapters."""
    return torch.ops.torchlora.multi_lora_linear(x, base_out, lora_A, lora_B, lora_bias, scale, slot_index)


def multi_lora_linear_(base_out: Tensor, x: Tensor, lora_A: Tensor, lora_B: Tensor, lora_bias: Tensor | None,
                       scale: Tensor, slot_index: Tensor) -> Tensor:
    """:func:`multi_lora_linear` accumulating into ``base_out`` (no new ``[T, out]`` tensor); returns it."""
    return torch.ops.torchlora.multi_lora_linear_(base_out, x, lora_A, lora_B, lora_bias, scale, slot_index)


def linear_with_multi_lora(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                           lora_bias: Tensor | None, scale: Tensor, slot_index: Tensor) -> Tensor:
    """``F.linear(x, weight, bias)`` with every row's adapter added into it in place."""
    return torch.ops.torchlora.linear_with_multi_lora(x, weight, bias, lora_A, lora_B, lora_bias, scale, slot_index)


def multi_lora_embedding(ids: Tensor, base_out: Tensor, lora_A: Tensor, lora_B: Tensor, scale: Tensor,
                         slot_index: Tensor, padding_idx: int = -1) -> Tensor:
    """``base_out[t] + scale[s] * lora_B[s] @ lora_A[s][:, ids[t]]``: ``ids [...]`` with T entries,
    ``lora_A [S, r, V]`` (PEFT's ``lora_embedding_A`` per slot), ``lora_B [S, D, r]``. With
    ``padding_idx >= 0`` that id's column of ``lora_A`` gets no gradient."""
    return torch.ops.torchlora.multi_lora_embedding(ids, base_out, lora_A, lora_B, scale, slot_index, padding_idx)


def multi_lora_conv2d(x: Tensor, base_out: Tensor, lora_A: Tensor, lora_B: Tensor, lora_bias: Tensor | None,
                      scale: Tensor, slot_index: Tensor, stride: Sequence[int], padding: Sequence[int],
                      dilation: Sequence[int], groups: int) -> Tensor:
    """:func:`lora_conv2d` with a slot per sample: ``x [N, in, H, W]``, ``lora_A [S, r, in, kh, kw]``,
    ``lora_B [S, out, r / groups, 1, 1]``, ``lora_bias [S, out]``, ``slot_index [N]``."""
    return torch.ops.torchlora.multi_lora_conv2d(x, base_out, lora_A, lora_B, lora_bias, scale, slot_index,
                                                 list(stride), list(padding), list(dilation), groups)


def dora_weight_norm(
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    fan_in_fan_out: bool = False,
    weight_sq_norm: Tensor | None = None,
) -> Tensor:
    """DoRA's weight norm: the L2 norm of every output row of ``weight + scaling * lora_B @ lora_A``,
    computed from ``||W_i||^2 + 2 s (W A^T)_i . B_i + s^2 B_i (A A^T) B_i^T`` without forming that matrix.

    - ``weight [out, in]`` with ``lora_A [r, in]``, ``lora_B [out, r]``; with ``fan_in_fan_out`` the
      weight is stored ``[in, out]`` (transformers ``Conv1D``; ``nn.Embedding``'s ``[V, D]`` with
      ``lora_A [r, V]``, ``lora_B [D, r]``).
    - A conv kernel ``[out, in, kh, kw]`` with ``lora_A [r, in, kh, kw]``, ``lora_B [out, r, 1, 1]``
      (read as ``[out, in * kh * kw]``). Adapters of a conv with ``groups > 1`` raise ``NotImplementedError``.

    ``weight`` may have another float dtype than the factors (a bfloat16 base under a float32 adapter).
    ``weight_sq_norm`` is an optional cached ``||W_i||^2`` from :func:`dora_weight_sq_norm`. Accumulated in
    float32 (float64 for float64 factors); returns ``[out]`` in ``lora_A``'s dtype. Differentiable in
    ``weight``, ``lora_A``, ``lora_B`` and ``weight_sq_norm``.
    """
    return torch.ops.torchlora.dora_weight_norm(weight, lora_A, lora_B, scaling, fan_in_fan_out, weight_sq_norm)


def dora_weight_sq_norm(weight: Tensor, fan_in_fan_out: bool = False) -> Tensor:
    """``||W_i||^2`` per output row of ``weight`` (layouts as :func:`dora_weight_norm`): the part of
    DoRA's weight norm that is fixed while the base weight is frozen. ``[out]`` float32 (float64 for a
    float64 weight)."""
    return torch.ops.torchlora.dora_weight_sq_norm(weight, fan_in_fan_out)


def dora_scale(
    z: Tensor,
    magnitude: Tensor,
    weight_norm: Tensor,
    bias: Tensor | None = None,
    dim: int = -1,
) -> Tensor:
    """DoRA's output from the adapted layer's output ``z`` (base output plus the scaled LoRA term):
    ``(magnitude / weight_norm) * (z - bias) + bias`` along dimension ``dim`` of ``z``.

    ``dim`` is ``-1`` for linear and embedding outputs ``[..., out]`` and ``1`` for conv outputs
    ``[N, out, H, W]``; ``magnitude``, ``weight_norm`` and ``bias`` (the base layer's bias, absent: zero)
    have ``out`` elements in any shape. Computed in float32 (float64 for float64); the result has ``z``'s
    dtype. Differentiable in all tensor inputs.
    """
    return torch.ops.torchlora.dora_scale(z, magnitude, weight_norm, bias, dim)


def multi_dora_scale(z: Tensor, factor: Tensor, bias: Tensor | None, slot_index: Tensor, dim: int = -1) -> Tensor:
    """DoRA's scale in a mixed batch: ``factor[slot_index[t]] * (z[t] - bias) + bias`` along
    ``dim`` of ``z`` (``factor [S, out]``: a served DoRA adapter's magnitude / weight norm, 1 for
    other slots); rows with slot -1 keep ``z``. Computed in float32 (float64 for float64)."""
    return torch.ops.torchlora.multi_dora_scale(z, factor, bias, slot_index, dim)
