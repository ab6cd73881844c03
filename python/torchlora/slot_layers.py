"""Layers that take their adapters from slot stacks handed to them as tensors, the shape of an
exported serving model: the base layer's own computation plus every sample's slot through the
multi-adapter operators, with the stacks and the per-sample slots set for each forward by
:class:`SlotInputs` (in an exported model they are graph inputs, so swapping an adapter only
rewrites tensors).

Slot stack layouts (one per layer, S slots zero-padded to rank R):
  Linear     lora_A [S, R, in]            lora_B [S, out, R]
  Embedding  lora_A [S, R, num]           lora_B [S, dim, R]
  Conv2d     lora_A [S, R, in, kh, kw]    lora_B [S, out, R / groups, 1, 1]
  lora_bias [S, out] (optional; unused by Embedding)   scale [S] float32
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from . import _native  # noqa: F401  (registers the operators)
from .nn.conv2d import lora_A_geometry

KIND_LINEAR, KIND_EMBEDDING, KIND_CONV2D = "linear", "embedding", "conv2d"


@dataclass
class LayerSlots:
    """One layer's slot stacks for the current forward."""

    lora_A: Tensor
    lora_B: Tensor
    lora_bias: Optional[Tensor]
    scale: Tensor


class SlotInputs:
    """What the slot layers of one model read during a forward: ``sample_slots [B]`` (-1: no
    adapter), ``request_scale [S]`` (multiplies each slot's scale) and each layer's stacks."""

    def __init__(self) -> None:
        self.sample_slots: Optional[Tensor] = None
        self.request_scale: Optional[Tensor] = None
        self.layers: list[LayerSlots] = []

    def set(self, sample_slots: Tensor, request_scale: Tensor, layers: list[LayerSlots]) -> None:
        self.sample_slots, self.request_scale, self.layers = sample_slots, request_scale, layers

    def clear(self) -> None:
        self.set(None, None, [])  # type: ignore[arg-type]

    def layer(self, index: int) -> LayerSlots:
        if self.sample_slots is None:
            raise RuntimeError("slot layers run only inside a forward that sets their slot inputs")
        return self.layers[index]

    def effective_scale(self, slots: LayerSlots) -> Tensor:
        return slots.scale * self.request_scale

    def row_slots(self, rows) -> Tensor:
        """One slot per row for ``rows`` rows made of the batch's samples in order (the core's rule)."""
        return torch.ops.torchlora.multi_lora_row_slots(self.sample_slots, rows)


class SlotLayer(nn.Module):
    """Base of the slot layers: the base layer, its place in :class:`SlotInputs`, and what a
    pool needs to know about it (``kind``, ``weight_shape``, ``groups``)."""

    kind: str = ""

    def __init__(self, base_layer: nn.Module, inputs: SlotInputs, index: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.slot_inputs = inputs
        self.index = index

    @property
    def weight_shape(self) -> list[int]:
        return [int(s) for s in self.base_layer.weight.shape]

    @property
    def groups(self) -> int:
        return 1

    def stack_shapes(self, max_loras: int, max_lora_rank: int) -> tuple[list[int], list[int], int]:
        """Shapes of lora_A and lora_B, and the length of lora_bias, for this layer's stacks."""
        raise NotImplementedError


class SlotLinear(SlotLayer):
    """``nn.Linear`` (or transformers ``Conv1D``, weight [in, out]) plus each row's slot,
    as one ``torchlora.linear_with_multi_lora``."""

    kind = KIND_LINEAR

    def __init__(self, base_layer: nn.Module, inputs: SlotInputs, index: int, weight_is_in_out: bool = False) -> None:
        super().__init__(base_layer, inputs, index)
        self.weight_is_in_out = weight_is_in_out
        if weight_is_in_out:
            # the operator takes [out, in]; one transposed copy, made once
            self.register_buffer("weight_out_in", base_layer.weight.detach().t().contiguous(), persistent=False)

    def _weight(self) -> Tensor:
        return self.weight_out_in if self.weight_is_in_out else self.base_layer.weight

    @property
    def weight_shape(self) -> list[int]:
        return [int(s) for s in self._weight().shape]

    def stack_shapes(self, max_loras: int, max_lora_rank: int) -> tuple[list[int], list[int], int]:
        out_features, in_features = self.weight_shape
        return [max_loras, max_lora_rank, in_features], [max_loras, out_features, max_lora_rank], out_features

    def forward(self, x: Tensor) -> Tensor:
        slots = self.slot_inputs.layer(self.index)
        x2 = x.reshape(-1, x.shape[-1])
        out = torch.ops.torchlora.linear_with_multi_lora(
            x2, self._weight(), self.base_layer.bias, slots.lora_A, slots.lora_B, slots.lora_bias,
            self.slot_inputs.effective_scale(slots), self.slot_inputs.row_slots(x2.shape[0]))
        return out.view(*x.shape[:-1], out.shape[-1])


class SlotEmbedding(SlotLayer):
    """``nn.Embedding`` plus each id's slot (``torchlora.multi_lora_embedding``)."""

    kind = KIND_EMBEDDING

    def stack_shapes(self, max_loras: int, max_lora_rank: int) -> tuple[list[int], list[int], int]:
        num, dim = self.weight_shape
        return [max_loras, max_lora_rank, num], [max_loras, dim, max_lora_rank], dim

    def forward(self, ids: Tensor) -> Tensor:
        slots = self.slot_inputs.layer(self.index)
        padding_idx = self.base_layer.padding_idx
        return torch.ops.torchlora.multi_lora_embedding(
            ids, self.base_layer(ids), slots.lora_A, slots.lora_B, self.slot_inputs.effective_scale(slots),
            self.slot_inputs.row_slots(ids.numel()), -1 if padding_idx is None else padding_idx)


class SlotConv2d(SlotLayer):
    """``nn.Conv2d`` plus each sample's slot (``torchlora.multi_lora_conv2d``); the low-rank conv
    has the base layer's kernel, stride and padding (PEFT's ``lora_A``)."""

    kind = KIND_CONV2D

    @property
    def groups(self) -> int:
        return int(self.base_layer.groups)

    def stack_shapes(self, max_loras: int, max_lora_rank: int) -> tuple[list[int], list[int], int]:
        out_channels, in_per_group, kh, kw = self.weight_shape
        in_channels = in_per_group * self.groups
        return ([max_loras, max_lora_rank, in_channels, kh, kw],
                [max_loras, out_channels, max_lora_rank // self.groups, 1, 1], out_channels)

    def forward(self, x: Tensor) -> Tensor:
        slots = self.slot_inputs.layer(self.index)
        stride, padding, dilation = lora_A_geometry(self.base_layer)
        return torch.ops.torchlora.multi_lora_conv2d(
            x, self.base_layer(x), slots.lora_A, slots.lora_B, slots.lora_bias, self.slot_inputs.effective_scale(slots),
            self.slot_inputs.sample_slots, list(stride), list(padding), list(dilation), self.groups)


def _check_plain_weight(base_layer: nn.Module, name: str) -> None:
    """Slot layers compute with the base weight itself: a quantized or wrapped weight (bitsandbytes
    Params4bit / Int8Params, torchao tensor subclasses) would be read as if it were plain."""
    weight = getattr(base_layer, "weight", None)
    if weight is None:
        return
    if type(weight) not in (nn.Parameter, Tensor) or not weight.is_floating_point():
        raise TypeError(f"module {name!r} ({type(base_layer).__name__}) holds a {type(weight).__name__} weight of "
                        f"dtype {weight.dtype}; served models need plain floating-point base weights "
                        "(dequantize the base model before exporting)")


def slot_layer_for(base_layer: nn.Module, inputs: SlotInputs, index: int, name: str) -> SlotLayer:
    """The slot layer for a base ``nn.Linear``, transformers ``Conv1D``, ``nn.Embedding`` or
    ``nn.Conv2d`` (TypeError naming the module otherwise)."""
    _check_plain_weight(base_layer, name)
    if isinstance(base_layer, nn.Linear):
        return SlotLinear(base_layer, inputs, index)
    if type(base_layer).__name__ == "Conv1D" and getattr(base_layer, "weight", None) is not None \
            and base_layer.weight.dim() == 2:
        return SlotLinear(base_layer, inputs, index, weight_is_in_out=True)
    if isinstance(base_layer, nn.Embedding):
        if base_layer.max_norm is not None:
            raise ValueError(f"module {name!r}: an nn.Embedding with max_norm rewrites its weight in the forward "
                             "and cannot be served")
        return SlotEmbedding(base_layer, inputs, index)
    if isinstance(base_layer, nn.Conv2d):
        lora_A_geometry(base_layer)  # raises for asymmetric 'same' padding
        return SlotConv2d(base_layer, inputs, index)
    raise TypeError(f"module {name!r} is a {type(base_layer).__name__}; served LoRA layers wrap nn.Linear, "
                    "transformers Conv1D, nn.Embedding or nn.Conv2d")


__all__ = ["LayerSlots", "SlotInputs", "SlotLayer", "SlotLinear", "SlotEmbedding", "SlotConv2d", "slot_layer_for"]
