"""LoRA for ``nn.Embedding``: ``lora_embedding_A`` [r, num_embeddings] (zero-initialised) and
``lora_embedding_B`` [embedding_dim, r]; the base layer's padding_idx, max_norm, norm_type and
scale_grad_by_freq act on the low-rank gather exactly as ``F.embedding`` would."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .. import ops
from .adapter_stack import AdapterStack, row_slots
from .layer import InitLoraWeights, LoraLayer, reject_unknown_kwargs


class LoraEmbedding(LoraLayer):
    """LoRA around a ``nn.Embedding``, computed by the native ``torchlora.lora_embedding``.

    No dropout is applied (as in PEFT). Gradients of ``lora_embedding_A`` are dense, also when
    the base embedding is ``sparse``.
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
        if not isinstance(base, nn.Embedding):
            raise TypeError(f"LoraEmbedding wraps torch.nn.Embedding, got {type(base).__name__}")
        self.in_features, self.out_features = base.num_embeddings, base.embedding_dim
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora, lora_bias,
                          low_cpu_mem_usage=low_cpu_mem_usage, use_dora=use_dora)

    def _check_new_adapter(self, r: int, lora_bias: bool) -> None:
        if lora_bias:
            raise ValueError(f"lora_bias={lora_bias} is not supported for {type(self).__name__}.")

    def _create_adapter(self, adapter_name: str, r: int, lora_bias: bool) -> None:
        self.lora_embedding_A[adapter_name] = nn.Parameter(torch.randn((r, self.in_features)))
        self.lora_embedding_B[adapter_name] = nn.Parameter(torch.randn((self.out_features, r)))

    def reset_lora_parameters(self, adapter_name: str, init_lora_weights: InitLoraWeights) -> None:
        """PEFT's initialisation: any init but False -> A zero, B standard normal; False keeps
        both random (the adapter is not a no-op)."""
        if init_lora_weights is False:
            return
        # PEFT gives embeddings the default init for "pissa*"/"olora" too (they only rewrite Linear weights)
        if isinstance(init_lora_weights, str) and not (
            init_lora_weights.lower() in ("gaussian", "olora") or init_lora_weights.startswith("pissa")
        ):
            raise ValueError(f"Unknown initialization init_lora_weights={init_lora_weights!r}")
        nn.init.zeros_(self.lora_embedding_A[adapter_name])
        nn.init.normal_(self.lora_embedding_B[adapter_name])

    def get_delta_weight(self, adapter: str) -> Tensor:
        # The embedding weight is stored [num_embeddings, embedding_dim], i.e. [in, out].
        lora_B, _, scaling = self._operator_factors(adapter, self.lora_embedding_B[adapter])
        return ops.lora_delta_weight(self.lora_embedding_A[adapter], lora_B, scaling, fan_in_fan_out=True)

    def _holds(self, adapter_name: str) -> bool:
        return adapter_name in self.lora_embedding_A

    def _stack_factors(self, name: str) -> tuple[Tensor, Tensor, Tensor | None]:
        return self.lora_embedding_A[name], self.lora_embedding_B[name], None

    def _stacks_adapters(self) -> bool:
        # max_norm renormalises each adapter's looked-up rows, scale_grad_by_freq scales their
        # gradients by the batch's id counts: both stay with the per-adapter loop
        base = self.get_base_layer()
        return base.max_norm is None and not (base.scale_grad_by_freq and torch.is_grad_enabled())

    def _multi_lora_update(self, stack: AdapterStack, sample_slots: Tensor, ids: Tensor, result: Tensor) -> Tensor:
        padding_idx = self.get_base_layer().padding_idx
        slots = row_slots(sample_slots, ids.numel())
        return ops.multi_lora_embedding(ids, result, stack.lora_A, stack.lora_B, stack.scale, slots,
                                        -1 if padding_idx is None else padding_idx)

    def _dora_factors(self, adapter_name: str) -> tuple[Tensor, Tensor]:
        return self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name]

    def _dora_fan_in_fan_out(self) -> bool:
        return True  # the table is [num_embeddings, dim]: DoRA's norm runs over each dim's column

    def _lora_update(self, name: str, ids: Tensor, result: Tensor) -> Tensor:
        out = self._lora_embedding_update(name, ids, result)
        if self._uses_dora(name):
            # PEFT: g * result + g * s * lora (no bias)
            return ops.dora_scale(out, self.lora_magnitude_vector[name].weight, self.dora_weight_norm(name))
        return out

    def _lora_embedding_update(self, name: str, ids: Tensor, result: Tensor) -> Tensor:
        base = self.get_base_layer()
        lora_A = self.lora_embedding_A[name]
        if base.max_norm is not None:
            # F.embedding(ids, A.T, max_norm=...) renormalises the looked-up rows of A.T in place
            with torch.no_grad():
                torch.embedding_renorm_(lora_A.T, ids, base.max_norm, base.norm_type)
        lora_B, _, scaling = self._operator_factors(name, self.lora_embedding_B[name])
        return ops.lora_embedding(ids, result, lora_A, lora_B, scaling, base.padding_idx, base.scale_grad_by_freq)
