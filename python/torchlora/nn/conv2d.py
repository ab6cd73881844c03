"""LoRA for ``nn.Conv2d``: ``lora_A`` is a conv with the base layer's kernel size, stride and
padding (in -> r), ``lora_B`` a 1x1 conv (r -> out) with the base layer's groups."""

from __future__ import annotations

import warnings
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from .adapter_stack import AdapterStack, per_row_dropout
from .layer import InitLoraWeights, LoraLayer, reject_unknown_kwargs


def _explicit_padding(conv: nn.Conv2d) -> tuple[int, int]:
    """Padding as two ints; 'valid' is 0 and 'same' works where it is symmetric."""
    return _padding_ints(conv.padding, conv.kernel_size, conv.dilation)


def _padding_ints(padding, kernel_size, dilation) -> tuple[int, int]:
    if not isinstance(padding, str):
        return int(padding[0]), int(padding[1])
    if padding == "valid":
        return 0, 0
    pads = []
    for k, d in zip(kernel_size, dilation):
        total = d * (k - 1)
        if total % 2:
            raise NotImplementedError(
                f"padding='same' with kernel {tuple(kernel_size)} needs asymmetric padding, which torchlora does not support"
            )
        pads.append(total // 2)
    return pads[0], pads[1]


def lora_A_geometry(base: nn.Conv2d) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """(stride, padding, dilation) of the ``lora_A`` conv PEFT builds for ``base``: the base
    layer's kernel, stride and padding, dilation 1."""
    stride = (int(base.stride[0]), int(base.stride[1]))
    return stride, _padding_ints(base.padding, base.kernel_size, (1, 1)), (1, 1)


class LoraConv2d(LoraLayer):
    """LoRA around a ``nn.Conv2d``, computed by the native ``torchlora.lora_conv2d``.

    ``y = base_layer(x) + scaling * lora_B(lora_A(dropout(x)))`` with PEFT's parameters:
    ``lora_A.<adapter>.weight`` [r, in, kh, kw], ``lora_B.<adapter>.weight``
    [out, r / groups, 1, 1]. The rank must be divisible by the base layer's groups.
    """

    # the wrapped conv type and its number of kernel dimensions (Conv1d / Conv3d subclasses change them)
    _conv_type: type = nn.Conv2d
    _kernel_dims: int = 2
    _conv_fn = staticmethod(F.conv2d)  # the base conv's functional form (DoRA with dropout)

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str = "default",
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        init_lora_weights: InitLoraWeights = True,
        use_rslora: bool = False,
        lora_bias: bool = False,
        low_cpu_mem_usage: bool = False,
        use_dora: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(base_layer)
        reject_unknown_kwargs(kwargs)
        base = self.get_base_layer()
        if not isinstance(base, self._conv_type):
            raise TypeError(f"{type(self).__name__} wraps torch.nn.{self._conv_type.__name__}, "
                            f"got {type(base).__name__}")
        if base.groups > 1:
            warnings.warn("LoRA adapter added to ConvNd layer with groups > 1. Merging is not supported.")
        self.in_features, self.out_features = base.in_channels, base.out_channels
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora, lora_bias,
                          low_cpu_mem_usage=low_cpu_mem_usage, use_dora=use_dora)

    def _check_new_adapter(self, r: int, lora_bias: bool) -> None:
        base = self.get_base_layer()
        if r % base.groups != 0:
            raise ValueError(
                f"Targeting a {type(base).__name__} with groups={base.groups} and rank {r}. "
                "Currently, support is limited to conv layers where the rank is divisible by groups. "
                "Either choose a different rank or do not target this specific layer."
            )

    def _create_adapter(self, adapter_name: str, r: int, lora_bias: bool) -> None:
        base = self.get_base_layer()
        conv, unit = self._conv_type, (1,) * self._kernel_dims
        self.lora_A[adapter_name] = conv(self.in_features, r, base.kernel_size, base.stride, base.padding, bias=False)
        self.lora_B[adapter_name] = conv(r, self.out_features, unit, unit, groups=base.groups, bias=lora_bias)

    def _check_mergeable(self, adapter: str) -> None:
        if self.get_base_layer().groups > 1:
            raise NotImplementedError("Merging is not supported for _ConvNd layers with groups > 1!")

    def get_delta_weight(self, adapter: str) -> Tensor:
        lora_B, _, scaling = self._operator_factors(adapter, self.lora_B[adapter].weight)
        return ops.lora_delta_weight(self.lora_A[adapter].weight, lora_B, scaling)

    def _delta_bias(self, adapter: str) -> Tensor | None:
        if not self.lora_bias[adapter]:
            return None
        return self.lora_B[adapter].bias * self.scaling[adapter]

    def _stack_factors(self, name: str) -> tuple[Tensor, Tensor, Tensor | None]:
        return self.lora_A[name].weight, self.lora_B[name].weight, self.lora_B[name].bias

    def _stack_groups(self) -> int:
        return self.get_base_layer().groups

    def _multi_lora_update(self, stack: AdapterStack, sample_slots: Tensor, x: Tensor, result: Tensor) -> Tensor:
        if x.dim() == 3:  # unbatched [C, H, W]
            return self._multi_lora_update(stack, sample_slots, x.unsqueeze(0), result.unsqueeze(0)).squeeze(0)
        stride, padding, dilation = lora_A_geometry(self.get_base_layer())  # slots may hold no adapter of this layer
        x = per_row_dropout(x.to(stack.lora_A.dtype), sample_slots, stack.dropout, self.training)
        return ops.multi_lora_conv2d(x, result, stack.lora_A, stack.lora_B, stack.lora_bias, stack.scale, sample_slots,
                                     stride, padding, dilation, self._stack_groups())

    def _check_dora_supported(self) -> None:
        if self.get_base_layer().groups > 1:
            raise ValueError("DoRA on a conv with groups > 1 is not supported (use_dora=True)")

    def _dora_factors(self, adapter_name: str) -> tuple[Tensor, Tensor]:
        return self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight

    def _dora_magnitude_shape(self) -> tuple[int, ...]:
        return (1, self.out_features) + (1,) * self._kernel_dims

    def _dora_factor_view(self) -> tuple[int, ...]:
        return (-1,) + (1,) * (self._kernel_dims + 1)

    def _conv_lora(self, name: str, x: Tensor, base_out: Tensor, dropout_p: float, seed: Tensor | None) -> Tensor:
        """``base_out`` plus the adapter's low-rank conv path for a batched ``x`` (one native operator)."""
        lora_A, lora_B = self.lora_A[name], self.lora_B[name]
        weight_B, bias_B, scaling = self._operator_factors(name, lora_B.weight, lora_B.bias)
        return ops.lora_conv2d(x, base_out, lora_A.weight, weight_B, bias_B, lora_A.stride,
                               _explicit_padding(lora_A), lora_A.dilation, lora_B.groups, scaling, dropout_p, seed)

    def _lora_update(self, name: str, x: Tensor, result: Tensor) -> Tensor:
        if x.dim() == self._kernel_dims + 1:  # unbatched [C, *spatial], as the base conv accepts
            return self._lora_update(name, x.unsqueeze(0), result.unsqueeze(0)).squeeze(0)
        x = x.to(self.lora_A[name].weight.dtype)
        p, seed = self._seed_for(name, x.device)

        def conv_lora(inputs: Tensor, base_out: Tensor, dropout_p: float) -> Tensor:
            return self._conv_lora(name, inputs, base_out, dropout_p, seed)

        if not self._uses_dora(name):
            return conv_lora(x, result, p)
        # DoRA (PEFT): result + (g - 1) * (base - bias) + g * s * lora, g per output channel
        magnitude = self.lora_magnitude_vector[name].weight
        norm = self.dora_weight_norm(name)
        base = self.get_base_layer()
        if p == 0.0:
            return ops.dora_scale(conv_lora(x, result, 0.0), magnitude, norm, base.bias, 1)
        dropped = ops.dropout_apply(x, p, seed)
        base_dropped = self._conv_fn(dropped.to(base.weight.dtype), base.weight, None, base.stride, base.padding,
                                     base.dilation, base.groups)
        z = conv_lora(dropped, base_dropped, 0.0)
        return result + ops.dora_scale(z, magnitude, norm, None, 1) - base_dropped
