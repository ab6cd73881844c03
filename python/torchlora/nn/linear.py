"""LoRA for ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2 style, weight stored [in, out])."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module_hooks

from .. import ops
from .._native import _C
from .adapter_stack import AdapterStack, per_row_dropout, row_slots
from .layer import InitLoraWeights, LoraLayer, reject_unknown_kwargs


def linear_features(base_layer: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, weight_is_in_out) of a Linear or a transformers Conv1D."""
    if isinstance(base_layer, nn.Linear):
        return base_layer.in_features, base_layer.out_features, False
    if type(base_layer).__name__ == "Conv1D" and hasattr(base_layer, "weight") and base_layer.weight.dim() == 2:
        in_features, out_features = base_layer.weight.shape
        return int(in_features), int(out_features), True
    raise TypeError(
        f"LoraLinear wraps torch.nn.Linear or transformers Conv1D, got {type(base_layer).__name__}"
    )


class LoraLinear(LoraLayer):
    """LoRA around a ``nn.Linear`` (or transformers ``Conv1D`` with ``fan_in_fan_out=True``).

    ``y = base_layer(x) + scaling * lora_B(lora_A(dropout(x)))``, computed by the native
    ``torchlora.lora_linear`` operator. Parameters are PEFT's: ``lora_A.<adapter>.weight``
    [r, in], ``lora_B.<adapter>.weight`` [out, r] and, with ``lora_bias``,
    ``lora_B.<adapter>.bias`` [out].
    """

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str = "default",
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        fan_in_fan_out: bool = False,
        init_lora_weights: InitLoraWeights = True,
        use_rslora: bool = False,
        lora_bias: bool = False,
        low_cpu_mem_usage: bool = False,
        use_dora: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(base_layer)
        reject_unknown_kwargs(kwargs)
        self.in_features, self.out_features, weight_is_in_out = linear_features(self.get_base_layer())
        if fan_in_fan_out != weight_is_in_out:
            raise ValueError(
                f"fan_in_fan_out={fan_in_fan_out} does not fit {type(self.get_base_layer()).__name__}, whose weight is "
                f"stored {'[in, out]' if weight_is_in_out else '[out, in]'}; use fan_in_fan_out={weight_is_in_out}"
            )
        self.fan_in_fan_out = fan_in_fan_out
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora, lora_bias,
                          low_cpu_mem_usage=low_cpu_mem_usage, use_dora=use_dora)

    def _create_adapter(self, adapter_name: str, r: int, lora_bias: bool) -> None:
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=lora_bias)

    def reset_lora_parameters(self, adapter_name: str, init_lora_weights: InitLoraWeights) -> None:
        """PEFT's initialisation: True -> A kaiming-uniform, B zero; "gaussian" -> A ~ N(0, 1/r),
        B zero; False -> nn.Linear's default for both (the adapter is not a no-op); "pissa",
        "pissa_niter_<K>" and "olora" factor the base weight and subtract the adapter from it."""
        if isinstance(init_lora_weights, str) and init_lora_weights.startswith("pissa"):
            self.pissa_init(adapter_name, init_lora_weights)
            return
        if isinstance(init_lora_weights, str) and init_lora_weights.lower() == "olora":
            self.olora_init(adapter_name)
            return
        super().reset_lora_parameters(adapter_name, init_lora_weights)

    def _init_from_base_weight(self, adapter_name: str, init_lora_weights: InitLoraWeights) -> None:
        if isinstance(init_lora_weights, str) and (
            init_lora_weights.startswith("pissa") or init_lora_weights.lower() == "olora"
        ):
            device = self.get_base_layer().weight.device
            self.lora_A[adapter_name].to_empty(device=device)
            self.lora_B[adapter_name].to_empty(device=device)
            self.reset_lora_parameters(adapter_name, init_lora_weights)

    def _base_weight_out_in(self) -> tuple[Tensor, torch.dtype]:
        """The base weight in [out, in] layout, and its dtype."""
        weight = self.get_base_layer().weight.detach()
        return (weight.T if self.fan_in_fan_out else weight), weight.dtype

    def _set_factors_and_residual(self, adapter_name: str, factors: tuple[Tensor, Tensor], weight: Tensor,
                                  dtype: torch.dtype) -> None:
        """Install the factors and keep ``W - scaling * B @ A`` as the base weight, so the
        layer's output is unchanged at initialisation."""
        lora_A, lora_B = factors
        self.lora_A[adapter_name].weight.data = lora_A
        self.lora_B[adapter_name].weight.data = lora_B
        residual = _C.peft.residual_weight(weight, lora_A, lora_B, self.scaling[adapter_name]).to(dtype)
        self.get_base_layer().weight.data = residual.T if self.fan_in_fan_out else residual

    def pissa_init(self, adapter_name: str, init_lora_weights: str) -> None:
        """PiSSA: A and B from the top-r singular triplets of the base weight (exact SVD, or
        ``torch.svd_lowrank`` with K iterations for "pissa_niter_K"); the rule is the C++ core's."""
        weight, dtype = self._base_weight_out_in()
        r, scaling = self.r[adapter_name], self.scaling[adapter_name]
        if init_lora_weights == "pissa":
            factors = _C.peft.pissa_factors(weight, r, scaling)
        else:
            prefix, _, niter = init_lora_weights.partition("_niter_")
            if prefix != "pissa" or not niter.isdigit():
                raise ValueError(
                    f"init_lora_weights should be 'pissa' or 'pissa_niter_[number of iters]', got {init_lora_weights}"
                )
            if dtype not in (torch.float32, torch.float16, torch.bfloat16):
                raise TypeError(f"PiSSA initialisation needs a float32, float16 or bfloat16 base weight, got {dtype}")
            # torch.svd_lowrank (randomised, Python-only) finds the triplets; the factors are the C++ rule's
            U, S, V = torch.svd_lowrank(weight.to(torch.float32), r, niter=int(niter))
            factors = _C.peft.pissa_factors_from_svd(U, S, V.t(), scaling)
        self._set_factors_and_residual(adapter_name, factors, weight, dtype)

    def olora_init(self, adapter_name: str) -> None:
        """OLoRA: B and A from the first r columns / rows of the QR decomposition of the base weight."""
        weight, dtype = self._base_weight_out_in()
        self._set_factors_and_residual(adapter_name, _C.peft.olora_factors(weight, self.r[adapter_name]), weight, dtype)

    def get_delta_weight(self, adapter: str) -> Tensor:
        lora_B, _, scaling = self._operator_factors(adapter, self.lora_B[adapter].weight)
        return ops.lora_delta_weight(self.lora_A[adapter].weight, lora_B, scaling, self.fan_in_fan_out)

    def _delta_bias(self, adapter: str) -> Tensor | None:
        if not self.lora_bias[adapter]:
            return None
        return self.lora_B[adapter].bias * self.scaling[adapter]

    def _dora_factors(self, adapter_name: str) -> tuple[Tensor, Tensor]:
        return self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight

    def _dora_fan_in_fan_out(self) -> bool:
        return self.fan_in_fan_out

    def _base_without_bias(self, x: Tensor) -> Tensor:
        """``W x`` of the base layer (no bias), for DoRA's dropout path."""
        base = self.get_base_layer()
        if type(base) is nn.Linear:
            return F.linear(x.to(base.weight.dtype), base.weight)
        out = base(x.to(base.weight.dtype) if base.weight.dtype.is_floating_point else x)
        return out if base.bias is None else out - base.bias

    def _dora_update(self, name: str, x: Tensor, result: Tensor) -> Tensor:
        """PEFT's DoRA on top of ``result``: ``result + (g - 1) * (base - bias) + g * s * lora``
        with ``g = m / ||W + s B A||``; with dropout in training, ``base`` is ``W dropout(x)``
        (computed again, as PEFT does)."""
        lora_A = self.lora_A[name].weight
        lora_B = self.lora_B[name]
        magnitude = self.lora_magnitude_vector[name].weight
        norm = self.dora_weight_norm(name)
        bias = self.get_base_layer().bias
        x = x.to(lora_A.dtype)
        p, seed = self._seed_for(name, x.device)
        lora_B, lora_bias, scaling = self._operator_factors(name, lora_B.weight, lora_B.bias)
        if p == 0.0:
            z = ops.lora_linear(x, result, lora_A, lora_B, lora_bias, scaling)
            return ops.dora_scale(z, magnitude, norm, bias)
        dropped = ops.dropout_apply(x, p, seed)
        base_dropped = self._base_without_bias(dropped)
        z = ops.lora_linear(dropped, base_dropped, lora_A, lora_B, lora_bias, scaling)
        return result + ops.dora_scale(z, magnitude, norm) - base_dropped

    def _lora_update(self, name: str, x: Tensor, result: Tensor, in_place: bool = False) -> Tensor:
        if self._uses_dora(name):
            return self._dora_update(name, x, result)
        lora_A = self.lora_A[name].weight
        lora_B, lora_bias, scaling = self._operator_factors(name, self.lora_B[name].weight, self.lora_B[name].bias)
        x = x.to(lora_A.dtype)
        p, seed = self._seed_for(name, x.device)
        if in_place:
            return ops.lora_linear_(result, x, lora_A, lora_B, lora_bias, scaling, p, seed)
        return ops.lora_linear(x, result, lora_A, lora_B, lora_bias, scaling, p, seed)

    def _stack_factors(self, name: str) -> tuple[Tensor, Tensor, Tensor | None]:
        return self.lora_A[name].weight, self.lora_B[name].weight, self.lora_B[name].bias

    def _forward_with_slots(self, stack: AdapterStack, sample_slots: Tensor, x: Tensor, *args: Any,
                            **kwargs: Any) -> Tensor:
        """For a plain ``nn.Linear`` base, the base GEMM and every row's adapter as one op
        (``torchlora.linear_with_multi_lora``) on the flattened input; otherwise the general path."""
        base = self.base_layer
        if args or kwargs or not self._base_is_plain_linear() or x.dim() == 0:
            return super()._forward_with_slots(stack, sample_slots, x, *args, **kwargs)
        x2 = x.reshape(-1, x.shape[-1])
        slots = row_slots(sample_slots, x2.shape[0])
        dropped = per_row_dropout(x2, slots, stack.dropout, self.training)
        args = (stack.lora_A, stack.lora_B, stack.lora_bias, stack.scale, slots)
        if dropped is x2 and x2.dtype == base.weight.dtype == stack.lora_A.dtype:
            out = ops.linear_with_multi_lora(x2, base.weight, base.bias, *args)
        else:
            out = ops.multi_lora_linear_(F.linear(x2, base.weight, base.bias), dropped.to(stack.lora_A.dtype), *args)
        return out.view(*x.shape[:-1], out.shape[-1])

    def _multi_lora_update(self, stack: AdapterStack, sample_slots: Tensor, x: Tensor, result: Tensor) -> Tensor:
        """Every row's adapter in one ``torchlora.multi_lora_linear`` added to ``result``."""
        x2 = x.reshape(-1, x.shape[-1]).to(stack.lora_A.dtype)
        slots = row_slots(sample_slots, x2.shape[0])
        x2 = per_row_dropout(x2, slots, stack.dropout, self.training)
        out2 = result.reshape(-1, result.shape[-1])
        out = ops.multi_lora_linear(x2, out2, stack.lora_A, stack.lora_B, stack.lora_bias, stack.scale, slots)
        return out.view(result.shape)

    def _base_is_plain_linear(self) -> bool:
        """Whether the base layer is exactly ``nn.Linear`` with no hooks anywhere, so that calling
        ``F.linear`` ourselves is the same as calling it, and its output is a fresh tensor that
        nothing else holds (a Linear saves its input and weight for backward, not its output)."""
        base = self.base_layer
        if type(base) is not nn.Linear or type(base.weight) not in (nn.Parameter, Tensor):
            return False  # a tensor-subclass weight (torchao) computes through its own F.linear
        own_hooks = (base._forward_hooks, base._forward_pre_hooks, base._backward_hooks, base._backward_pre_hooks)
        global_hooks = (
            _module_hooks._global_forward_hooks,
            _module_hooks._global_forward_pre_hooks,
            _module_hooks._global_backward_hooks,
            _module_hooks._global_backward_pre_hooks,
        )
        return not any(own_hooks) and not any(global_hooks)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """``base_layer(x)`` plus every active adapter's low-rank term.

        For a plain ``nn.Linear`` base the base layer and the first active adapter run as one op
        (``torchlora.linear_with_lora``) and further adapters add into its output in place
        (``torchlora.lora_linear_``), on the flattened ``[T, in]`` input, so no extra
        ``[T, out]`` tensor is made.
        Everything else (hooks, other base layers, merged or disabled adapters, mixed batches)
        takes the general path of :class:`LoraLayer`.
        """
        if (args or kwargs or self._bound_slots is not None or self.disable_adapters or self.merged
                or not self._base_is_plain_linear()):
            return super().forward(x, *args, **kwargs)
        names = [name for name in self.active_adapters if self._holds(name)]
        if not names or x.dim() == 0:
            return super().forward(x)
        base = self.base_layer
        x2 = x.reshape(-1, x.shape[-1])
        first, rest = names[0], names[1:]
        dora_first = self._uses_dora(first)
        same_dtype = x2.dtype == base.weight.dtype == self.lora_A[first].weight.dtype
        # Under autocast the op casts its inputs itself (csrc/torchlora/autocast.cpp).
        if (same_dtype or torch.is_autocast_enabled(x2.device.type)) and not (dora_first and self.dropout_p(first)):
            # The base layer and the first adapter in one op: they share their passes over memory.
            lora_B = self.lora_B[first]
            lora_B, lora_bias, scaling = self._operator_factors(first, lora_B.weight, lora_B.bias)
            p, seed = self._seed_for(first, x.device)
            result = ops.linear_with_lora(
                x2, base.weight, base.bias, self.lora_A[first].weight, lora_B, lora_bias, scaling, p, seed,
            )
            if dora_first:
                magnitude = self.lora_magnitude_vector[first].weight
                result = ops.dora_scale(result, magnitude, self.dora_weight_norm(first), base.bias)
        else:
            result, rest = F.linear(x2, base.weight, base.bias), names
        result_dtype = result.dtype
        for name in rest:
            # A leaf that requires grad cannot be updated in place (only when F.linear is overridden).
            in_place = not (result.requires_grad and result.is_leaf) and result._base is None
            result = self._lora_update(name, x2, result, in_place=in_place)
        return result.to(result_dtype).view(*x.shape[:-1], result.shape[-1])

