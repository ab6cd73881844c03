"""LoRA for ``nn.Conv1d`` and ``nn.Conv3d``, as PEFT wraps them: ``lora_A`` a conv of the base
layer's type with its kernel size, stride and padding (in -> r), ``lora_B`` a 1x1 (1x1x1) conv
(r -> out) with the base layer's groups; DoRA as PEFT's DoRA for these layers. Everything but the
operator is :class:`LoraConv2d`'s."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from .conv2d import LoraConv2d


def explicit_padding(conv: nn.Module) -> tuple[int, ...]:
    """A conv's padding as ints: 'valid' is 0; 'same' where it is symmetric (the operators pad both sides equally)."""
    if not isinstance(conv.padding, str):
        return tuple(int(p) for p in conv.padding)
    if conv.padding == "valid":
        return (0,) * len(conv.kernel_size)
    pads = []
    for k, d in zip(conv.kernel_size, conv.dilation):
        total = d * (k - 1)
        if total % 2:
            raise NotImplementedError(
                f"padding='same' with kernel {tuple(conv.kernel_size)} needs asymmetric padding, which torchlora "
                "does not support")
        pads.append(total // 2)
    return tuple(pads)


class _StackFreeConv(LoraConv2d):
    """Conv layers whose mixed batches run one adapter at a time (no multi-adapter operator for
    their layout)."""

    def _stacks_adapters(self) -> bool:
        return False


class LoraConv1d(_StackFreeConv):
    """LoRA around a ``nn.Conv1d``: ``lora_A.<adapter>.weight`` [r, in, k], ``lora_B.<adapter>.weight``
    [out, r / groups, 1]. Runs the native ``torchlora.lora_conv2d`` on a height-1 view of the input
    (a length-L sequence is a 1 x L image), so it shares that operator's kernels and gradients."""

    _conv_type = nn.Conv1d
    _kernel_dims = 1
    _conv_fn = staticmethod(F.conv1d)

    def _conv_lora(self, name: str, x: Tensor, base_out: Tensor, dropout_p: float, seed: Tensor | None) -> Tensor:
        lora_A, lora_B = self.lora_A[name], self.lora_B[name]
        weight_B, bias_B, scaling = self._operator_factors(name, lora_B.weight, lora_B.bias)
        out = ops.lora_conv2d(
            x.unsqueeze(2), base_out.unsqueeze(2), lora_A.weight.unsqueeze(2), weight_B.unsqueeze(2),
            bias_B, (1, lora_A.stride[0]), (0, explicit_padding(lora_A)[0]), (1, lora_A.dilation[0]),
            lora_B.groups, scaling, dropout_p, seed,
        )
        return out.squeeze(2)


class LoraConv3d(_StackFreeConv):
    """LoRA around a ``nn.Conv3d``: ``lora_A.<adapter>.weight`` [r, in, kd, kh, kw],
    ``lora_B.<adapter>.weight`` [out, r / groups, 1, 1, 1]; computed by the native
    ``torchlora.lora_conv3d`` operator."""

    _conv_type = nn.Conv3d
    _kernel_dims = 3
    _conv_fn = staticmethod(F.conv3d)

    def _conv_lora(self, name: str, x: Tensor, base_out: Tensor, dropout_p: float, seed: Tensor | None) -> Tensor:
        lora_A, lora_B = self.lora_A[name], self.lora_B[name]
        weight_B, bias_B, scaling = self._operator_factors(name, lora_B.weight, lora_B.bias)
        return ops.lora_conv3d(x, base_out, lora_A.weight, weight_B, bias_B, lora_A.stride, explicit_padding(lora_A),
                               lora_A.dilation, lora_B.groups, scaling, dropout_p, seed)
