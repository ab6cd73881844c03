"""Reading and writing the weight of a base layer that may be quantized (bitsandbytes 4-bit and
8-bit, torchao): merging dequantizes, adds the delta and quantizes again; DoRA reads the
dequantized weight a block of rows at a time.

bitsandbytes and torchao are optional: they are imported only when a layer holds one of their
weights, which is recognised by the weight's class.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn

# bitsandbytes' CPU inference layout packs the 4-bit codes of 32 output rows together.
_BNB_CPU_ROW_GROUP = 32

_BNB4, _BNB8, _TORCHAO = "bnb-4bit", "bnb-8bit", "torchao"


def _kind(base_layer: nn.Module) -> str | None:
    weight = getattr(base_layer, "weight", None)
    if weight is None:
        return None
    if type(weight) in (nn.Parameter, torch.Tensor):
        return None  # a plain weight (also what compiled graphs see; dynamo cannot walk __mro__)
    name = type(weight).__name__
    if name == "Params4bit" and getattr(weight, "bnb_quantized", False):
        return _BNB4
    if name == "Int8Params" and weight.dtype == torch.int8:
        return _BNB8
    if any(cls.__module__.startswith("torchao.") for cls in type(weight).__mro__):
        return _TORCHAO
    return None


def quantization_kind(base_layer: nn.Module) -> str | None:
    """How ``base_layer``'s weight is stored: "bnb-4bit", "bnb-8bit", "torchao", or None (plain)."""
    return _kind(base_layer)


def is_quantized(base_layer: nn.Module) -> bool:
    """Whether ``base_layer``'s weight is stored quantized."""
    return _kind(base_layer) is not None


def dequantized_weight(base_layer: nn.Module) -> Tensor:
    """The base weight as a float tensor in its layout ([out, in] for a Linear)."""
    kind = _kind(base_layer)
    if kind is None:
        return base_layer.weight.data
    if kind == _TORCHAO:
        return _torchao_dequantize(base_layer.weight)
    return _bnb_rows(base_layer, kind, 0, _out_features(base_layer))


def write_weight(base_layer: nn.Module, value: Tensor) -> None:
    """Store ``value`` (float, the base weight's layout) as the base weight, quantizing it again
    with the layer's own settings when the layer is quantized."""
    kind = _kind(base_layer)
    if kind is None:
        weight = base_layer.weight
        weight.data.copy_(value.to(weight.dtype))
    elif kind == _BNB4:
        _bnb4_write(base_layer, value)
    elif kind == _BNB8:
        _bnb8_write(base_layer, value)
    else:
        _torchao_write(base_layer, value)


def weight_row_blocks(base_layer: nn.Module, rows_per_block: int = 1024) -> Iterator[tuple[int, Tensor]]:
    """``(first_row, rows)`` blocks of the dequantized weight, so that a quantized weight is never
    dequantized whole."""
    if not isinstance(rows_per_block, int) or rows_per_block < 1:
        raise ValueError(f"rows_per_block must be a positive int, got {rows_per_block!r}")
    kind = _kind(base_layer)
    if kind is None:
        weight = base_layer.weight.data
        for start in range(0, weight.shape[0], rows_per_block):
            yield start, weight[start:start + rows_per_block]
        return
    rows = _out_features(base_layer)
    for start in range(0, rows, rows_per_block):
        stop = min(start + rows_per_block, rows)
        if kind == _TORCHAO:
            # torchao's weight tensors slice along rows with their scales; only the slice is dequantized
            yield start, _torchao_dequantize(base_layer.weight[start:stop])
        else:
            yield start, _bnb_rows(base_layer, kind, start, stop)


def describe(base_layer: nn.Module) -> str:
    """How the weight is quantized, for messages ("4-bit", "8-bit", ...)."""
    kind = _kind(base_layer)
    if kind == _BNB4:
        return "4-bit"
    if kind == _BNB8:
        return "8-bit"
    if kind == _TORCHAO:
        return f"torchao {type(base_layer.weight).__name__}"
    return "float"


def _out_features(base_layer: nn.Module) -> int:
    out = getattr(base_layer, "out_features", None)
    if out is None:
        raise TypeError(f"{type(base_layer).__name__} has no out_features; quantized weights are read for Linear layers")
    return int(out)


# ---------------------------------------------------------------------- bitsandbytes
def _bnb_rows(base_layer: nn.Module, kind: str, start: int, stop: int) -> Tensor:
    if kind == _BNB8:
        return _bnb8_rows(base_layer, start, stop)
    state = base_layer.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        return _bnb4_cpu_packed_rows(base_layer, start, stop)
    return _bnb4_rows(base_layer, start, stop)


def _bnb4_state(absmax: Tensor, numel: int, state, dtype: torch.dtype):
    import bitsandbytes.functional as bnbf

    return bnbf.QuantState(absmax=absmax, shape=torch.Size([numel]), code=state.code, blocksize=state.blocksize,
                           quant_type=state.quant_type, dtype=dtype)


def _bnb4_absmax(state, first_block: int, stop_block: int) -> Tensor:
    """The float absmax of blocks ``[first_block, stop_block)``; a double-quantized absmax is
    dequantized for those blocks only (its own blocks of ``state2.blocksize`` entries)."""
    if not state.nested:
        return state.absmax[first_block:stop_block].float()
    import bitsandbytes.functional as bnbf

    nested = state.state2
    size = nested.blocksize
    lo, hi = first_block // size, math.ceil(stop_block / size)
    part = state.absmax[lo * size:min(hi * size, state.absmax.numel())]
    values = bnbf.dequantize_blockwise(part, absmax=nested.absmax[lo:hi], code=nested.code, blocksize=size)
    values = values.float() + state.offset
    return values[first_block - lo * size:stop_block - lo * size]


def _bnb4_rows(base_layer: nn.Module, start: int, stop: int) -> Tensor:
    """Rows ``[start, stop)``: the packed bytes and absmax of the blocks covering them."""
    import bitsandbytes.functional as bnbf

    weight = base_layer.weight
    state = weight.quant_state
    n_rows, n_cols = state.shape
    block = state.blocksize
    first, last = start * n_cols, stop * n_cols
    b0, b1 = first // block, math.ceil(last / block)
    e0, e1 = b0 * block, min(b1 * block, n_rows * n_cols)
    packed = weight.data.view(torch.uint8).reshape(-1)[e0 // 2:(e1 + 1) // 2]
    absmax = _bnb4_absmax(state, b0, b1)
    flat = bnbf.dequantize_4bit(packed, _bnb4_state(absmax, e1 - e0, state, state.dtype))
    return flat.reshape(-1)[first - e0:last - e0].reshape(stop - start, n_cols)


def _bnb4_cpu_packed_rows(base_layer: nn.Module, start: int, stop: int) -> Tensor:
    """Rows of a weight that bitsandbytes repacked for its CPU kernel ([N, K/2] bytes, 32-row
    groups interleaved, absmax [K/blocksize, N] in bfloat16): the row groups covering the rows
    are unpacked to codes, packed again in the plain layout and dequantized."""
    import bitsandbytes.functional as bnbf

    weight = base_layer.weight
    state = weight.quant_state
    n_cols = state.shape[1]
    group = _BNB_CPU_ROW_GROUP
    g0, g1 = (start // group) * group, math.ceil(stop / group) * group
    packed = weight.data[g0:g1].reshape(-1, group)
    codes = torch.cat([packed & 0xF, packed >> 4], dim=-1)
    codes = codes.reshape((g1 - g0) // group, n_cols // 2, group, 2).transpose(1, 2).reshape(-1)
    plain = (codes[0::2] << 4) | codes[1::2]
    absmax = state.absmax[:, g0:g1].T.reshape(-1).float()
    dtype = getattr(state, "original_dtype", state.dtype)
    flat = bnbf.dequantize_4bit(plain.contiguous(), _bnb4_state(absmax, (g1 - g0) * n_cols, state, dtype))
    return flat.reshape(g1 - g0, n_cols)[start - g0:stop - g0]


def _bnb4_write(base_layer: nn.Module, value: Tensor) -> None:
    import bitsandbytes as bnb

    old = base_layer.weight
    state = old.quant_state
    dtype = getattr(state, "original_dtype", state.dtype) if getattr(state, "packing_format_for_cpu", False) \
        else state.dtype
    fresh = bnb.nn.Params4bit(value.detach().to("cpu", dtype).contiguous(), requires_grad=False,
                              blocksize=old.blocksize, compress_statistics=old.compress_statistics,
                              quant_type=old.quant_type, quant_storage=old.quant_storage, module=old.module)
    base_layer.weight = fresh.to(old.device)  # quantizes on the layer's device
    if getattr(base_layer, "quant_state", None) is not None:
        base_layer.quant_state = base_layer.weight.quant_state


def _bnb8_scb(base_layer: nn.Module) -> Tensor:
    """The per-row scales: on the weight until the first forward, then on the layer's state."""
    scb = getattr(base_layer.weight, "SCB", None)
    if scb is None:
        scb = getattr(getattr(base_layer, "state", None), "SCB", None)
    if scb is None:
        raise ValueError(f"{type(base_layer).__name__} holds int8 data but no scales (SCB)")
    return scb


def _bnb8_rows(base_layer: nn.Module, start: int, stop: int) -> Tensor:
    import bitsandbytes.functional as bnbf

    data = base_layer.weight.data[start:stop]
    scb = _bnb8_scb(base_layer)[start:stop].to(data.device)
    return bnbf.int8_vectorwise_dequant(data.contiguous(), scb.contiguous())


def _bnb8_write(base_layer: nn.Module, value: Tensor) -> None:
    import bitsandbytes as bnb

    old = base_layer.weight
    fresh = bnb.nn.Int8Params(value.detach().to("cpu").contiguous(), requires_grad=False,
                              has_fp16_weights=old.has_fp16_weights)
    base_layer.weight = fresh.to(old.device)  # quantizes: int8 rows and their scales
    state = getattr(base_layer, "state", None)
    if state is not None:
        # the layer takes the new CB/SCB from its weight on the next forward; the threshold stays
        state.CB = None
        state.SCB = None
        state.reset_grads()


# ---------------------------------------------------------------------- torchao
def _torchao_dequantize(weight: Tensor) -> Tensor:
    try:
        return weight.dequantize()
    except NotImplementedError as exc:
        raise NotImplementedError(f"torchao {type(weight).__name__} weights cannot be dequantized") from exc


def _torchao_write(base_layer: nn.Module, value: Tensor) -> None:
    """Quantize ``value`` into a tensor of the weight's own torchao class and settings."""
    old = base_layer.weight
    value = value.detach().to(old.device, old.dtype)
    name = type(old).__name__
    if name == "Int8Tensor":
        fresh = _torchao_int8(old, value)
    elif name == "IntxUnpackedToInt8Tensor":
        fresh = _torchao_intx(old, value)
    else:
        raise NotImplementedError(
            f"re-quantizing a torchao {name} weight is not supported (supported: Int8Tensor, "
            "IntxUnpackedToInt8Tensor); dequantize the layer before merging")
    base_layer.weight = nn.Parameter(fresh, requires_grad=False)


def _torchao_int8(old: Tensor, value: Tensor) -> Tensor:
    from torchao.quantization import Int8Tensor, PerGroup, PerRow, PerTensor
    from torchao.quantization.quant_primitives import MappingType

    block = list(old.block_size)
    if block == list(old.shape):
        granularity = PerTensor()
    elif block[:-1] == [1] * (len(block) - 1) and block[-1] == old.shape[-1]:
        granularity = PerRow()
    elif block[:-1] == [1] * (len(block) - 1):
        granularity = PerGroup(block[-1])
    else:
        raise NotImplementedError(f"torchao Int8Tensor with block_size {block} cannot be re-quantized")
    return Int8Tensor.from_hp(value, granularity, mapping_type=_torchao_mapping(old, MappingType), act_quant_kwargs=old.act_quant_kwargs)


def _torchao_intx(old: Tensor, value: Tensor) -> Tensor:
    from torchao.quantization import IntxUnpackedToInt8Tensor
    from torchao.quantization.quant_primitives import MappingType

    return IntxUnpackedToInt8Tensor.from_hp(value, tuple(old.block_size), old.target_dtype,
                                           mapping_type=_torchao_mapping(old, MappingType),
                                           activation_quantization=old.activation_quantization)


def _torchao_mapping(old: Tensor, mapping_type):
    """Symmetric unless the weight has a non-zero zero point."""
    zero_point = getattr(old, "zero_point", None)
    symmetric = zero_point is None or not bool(zero_point.any())
    return mapping_type.SYMMETRIC if symmetric else mapping_type.ASYMMETRIC
