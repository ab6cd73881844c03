"""LoRA for ``nn.MultiheadAttention`` as PEFT wraps it: one adapter on the packed q/k/v projection
``in_proj_weight`` (``lora_A.<adapter>.weight`` [r, embed_dim], ``lora_B.<adapter>.weight``
[3 * embed_dim, r]) and a :class:`LoraLinear` on ``out_proj``, whose factors are saved under
``<path>.base_layer.out_proj.lora_A`` / ``lora_B`` as in PEFT's files.

``nn.MultiheadAttention`` reads ``in_proj_weight`` and ``out_proj.weight`` directly instead of
calling submodules, so the forward runs the attention with ``W + delta`` substituted for both
weights (``torch.func.functional_call``): the deltas are differentiable, nothing is written into
the module, and, as in PEFT, lora_dropout does not apply here.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .. import ops
from .layer import InitLoraWeights, LoraLayer, reject_unknown_kwargs
from .linear import LoraLinear


class LoraMultiheadAttention(LoraLayer):
    """LoRA around a ``nn.MultiheadAttention`` with one embedding size for query, key and value.

    Merging adds the in_proj delta to ``in_proj_weight`` and merges ``out_proj``'s adapter into
    its weight, each delta once. (PEFT 0.21.2 adds out_proj's delta twice while merging, and so in
    its forward as well; torchlora does not reproduce that defect, so its outputs equal PEFT's
    while out_proj's ``lora_B`` is zero, as PEFT initialises it.) DoRA, lora_bias and mixed
    batches are not supported here, as in PEFT.
    """

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
        if not isinstance(base, nn.MultiheadAttention):
            raise TypeError(f"LoraMultiheadAttention wraps torch.nn.MultiheadAttention, got {type(base).__name__}")
        if not base._qkv_same_embed_dim:
            raise ValueError("LoRA on torch.nn.MultiheadAttention needs query, key and value of one embedding size "
                             f"(kdim=vdim=embed_dim); got kdim={base.kdim}, vdim={base.vdim}, embed_dim={base.embed_dim}")
        if not isinstance(base.out_proj, nn.Linear):
            raise TypeError(f"out_proj must be an instance of nn.Linear for LoraMultiheadAttention, "
                            f"got {type(base.out_proj).__name__}")
        self.in_features, self.out_features = base.embed_dim, 3 * base.embed_dim
        options = dict(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, init_lora_weights=init_lora_weights,
                       use_rslora=use_rslora, lora_bias=lora_bias, low_cpu_mem_usage=low_cpu_mem_usage,
                       use_dora=use_dora)
        self._check_options(lora_bias, use_dora, init_lora_weights)
        base.out_proj = LoraLinear(base.out_proj, adapter_name, **options)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora, lora_bias,
                          low_cpu_mem_usage=low_cpu_mem_usage, use_dora=use_dora)

    @staticmethod
    def _check_options(lora_bias: bool, use_dora: bool, init_lora_weights: InitLoraWeights) -> None:
        if use_dora:
            raise ValueError("LoraMultiheadAttention does not support DoRA, please set use_dora to False")
        if lora_bias:
            # PEFT creates the bias but its merged forward never adds it: rejected rather than ignored
            raise ValueError("lora_bias=True is not supported on torch.nn.MultiheadAttention")
        if isinstance(init_lora_weights, str) and init_lora_weights.lower() not in ("gaussian",):
            raise ValueError(f"init_lora_weights={init_lora_weights!r} is not supported on torch.nn.MultiheadAttention")

    # ------------------------------------------------------------------ the wrapped module
    @property
    def out_proj_layer(self) -> LoraLinear:
        """The LoRA layer around the attention's ``out_proj``."""
        return self.get_base_layer().out_proj

    @property
    def weight(self) -> Tensor:
        return self.get_base_layer().in_proj_weight

    @property
    def bias(self) -> Tensor | None:
        return self.get_base_layer().in_proj_bias

    def unload_base_layer(self) -> nn.Module:
        base = self.get_base_layer()
        base.out_proj = self.out_proj_layer.unload_base_layer()
        return base

    # ------------------------------------------------------------------ adapters
    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                     init_lora_weights: InitLoraWeights = True, use_rslora: bool = False, lora_bias: bool = False,
                     low_cpu_mem_usage: bool = False, use_dora: bool = False) -> None:
        """Add ``adapter_name`` to the in_proj and to ``out_proj`` (PEFT adapts both, always)."""
        self._check_options(lora_bias, use_dora, init_lora_weights)
        super().update_layer(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora, lora_bias,
                             low_cpu_mem_usage=low_cpu_mem_usage, use_dora=use_dora)
        self.out_proj_layer.update_layer(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora,
                                         lora_bias, low_cpu_mem_usage=low_cpu_mem_usage, use_dora=use_dora)

    def _create_adapter(self, adapter_name: str, r: int, lora_bias: bool) -> None:
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=False)

    def _stacks_adapters(self) -> bool:
        return False

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_names, inference_mode)
        out_proj = self.get_base_layer().out_proj
        if isinstance(out_proj, LoraLinear):  # not yet wrapped while the first adapter is created
            out_proj.set_adapter(adapter_names, inference_mode)

    def enable_adapters(self, enabled: bool) -> None:
        super().enable_adapters(enabled)
        self.out_proj_layer.enable_adapters(enabled)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        if adapter_name in self.out_proj_layer.adapter_names():
            self.out_proj_layer.delete_adapter(adapter_name)

    # ------------------------------------------------------------------ merging
    def get_delta_weight(self, adapter: str) -> Tensor:
        """The change of ``in_proj_weight`` [3 * embed_dim, embed_dim]."""
        lora_B, _, scaling = self._operator_factors(adapter, self.lora_B[adapter].weight)
        return ops.lora_delta_weight(self.lora_A[adapter].weight, lora_B, scaling)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the adapters' deltas to ``in_proj_weight`` and merge them into ``out_proj``; with
        ``safe_merge`` nothing changes and a ValueError is raised if a merged weight is not finite."""
        base = self.get_base_layer()
        for name in self._adapters_to_merge(adapter_names):
            in_weight = base.in_proj_weight.data
            merged = in_weight + self.get_delta_weight(name).to(in_weight.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
            self.out_proj_layer.merge(safe_merge=safe_merge, adapter_names=[name])
            in_weight.copy_(merged)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Undo :meth:`merge` for every merged adapter, last merged first."""
        if not self.merged:
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            in_weight = base.in_proj_weight.data
            in_weight.sub_(self.get_delta_weight(name).to(in_weight.dtype))
        if self.out_proj_layer.merged:
            self.out_proj_layer.unmerge()

    # ------------------------------------------------------------------ forward
    def forward(self, query: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor | None]:
        """``nn.MultiheadAttention``'s forward with the active adapters' deltas added to
        ``in_proj_weight`` and ``out_proj.weight``."""
        for key in ("adapter_names", "adapter_slots"):
            if key in kwargs:
                raise TypeError(f"LoraMultiheadAttention does not support mixed adapter batches ({key}=...)")
        base = self.get_base_layer()
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            result = self.base_layer(query, *args, **kwargs)
        elif self.merged:
            result = self.base_layer(query, *args, **kwargs)
        else:
            out_proj = self.out_proj_layer
            if out_proj.merged:
                raise ValueError("The out_proj layer of MultiheadAttention has merged adapters but the attention "
                                 "itself does not; merge or unmerge both")
            result = functional_call(base, self._adapted_weights(self._active_held()), (query, *args), kwargs)
        attn_output, attn_weights = result
        dtype = query.dtype
        return attn_output.to(dtype), (attn_weights.to(dtype) if attn_weights is not None else None)

    def _active_held(self) -> list[str]:
        return [name for name in self.active_adapters if self._holds(name)]

    def _adapted_weights(self, names: Iterable[str]) -> dict[str, Tensor]:
        """``in_proj_weight`` and ``out_proj``'s weight with the deltas of ``names`` added."""
        base = self.get_base_layer()
        out_proj = self.out_proj_layer
        in_weight, out_weight = base.in_proj_weight, out_proj.get_base_layer().weight
        for name in names:
            in_weight = in_weight + self.get_delta_weight(name).to(in_weight.dtype)
            if out_proj._holds(name):
                out_weight = out_weight + out_proj.get_delta_weight(name).to(out_weight.dtype)
        return {"in_proj_weight": in_weight, "out_proj.base_layer.weight": out_weight}
