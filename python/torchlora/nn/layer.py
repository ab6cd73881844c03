"""The adapter bookkeeping shared by every LoRA layer, with PEFT's attribute and parameter
names (``lora_A.<adapter>``, ``lora_B.<adapter>``, ``lora_embedding_A.<adapter>``, ...), so
state dicts map one to one between PEFT and torchlora."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any, Union

import torch
from torch import Tensor, nn

from .. import ops
from .._native import _C
from ..config import validate_config_dict
from . import dora, quantized_weight
from .adapter_scales import AdapterScales
from .adapter_stack import AdapterStack, build_stack
from ..utils.distributed import gathered_by_fsdp

# The adapter name of "no adapter" in a mixed batch (PEFT's "__base__"), from the C++ core.
BASE_ADAPTER_NAME: str = _C.peft.BASE_ADAPTER_NAME

InitLoraWeights = Union[bool, str]


class ScalingDict(dict):
    """``layer.scaling``: a dict that counts its changes, so cached adapter stacks see a new scale."""

    def _changed(self) -> None:
        self.changes = getattr(self, "changes", 0) + 1

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        self._changed()

    def __delitem__(self, key) -> None:
        super().__delitem__(key)
        self._changed()

    def update(self, *args, **kwargs) -> None:
        super().update(*args, **kwargs)
        self._changed()

    def pop(self, *args):
        value = super().pop(*args)
        self._changed()
        return value


class SampleAdapters(list):
    """The per-sample adapter names of one mixed-batch forward, as the model hands them to every
    layer: layers with the same adapters share the slot tensor made from them (``memo``), and
    names a layer does not hold take no adapter there (as PEFT)."""

    def __init__(self, names) -> None:
        super().__init__(names)
        self.memo: dict = {}

_LAYER_INIT_CHOICES = (True, False, "gaussian")


def check_adapter_args(r: Any, lora_alpha: Any, lora_dropout: Any, init_lora_weights: Any) -> None:
    """Validate the per-adapter options a layer accepts by the config schema's rules; errors
    name the option."""
    validate_config_dict(
        {"r": r, "lora_alpha": lora_alpha, "lora_dropout": lora_dropout, "init_lora_weights": init_lora_weights}
    )


def reject_unknown_kwargs(kwargs: dict[str, Any]) -> None:
    """Layers take PEFT's options; anything else is a typo."""
    for key in kwargs:
        raise TypeError(f"unexpected argument {key!r}")


class LoraLayer(AdapterScales, nn.Module):
    """Base of the LoRA layers: wraps ``base_layer`` and holds any number of named adapters.

    Subclasses create their adapter parameters in ``update_layer`` and implement
    ``get_delta_weight`` and ``forward``.
    """

    adapter_layer_names: tuple[str, ...] = (
        "lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
    other_param_names: tuple[str, ...] = ("r", "lora_alpha", "scaling", "lora_dropout")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = ScalingDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_bias: dict[str, bool] = {}
        self.use_rslora: dict[str, bool] = {}
        # DoRA: the magnitude of each DoRA adapter, the cached ||W||^2 and the norms merging used
        self.lora_magnitude_vector = nn.ModuleDict()
        self.use_dora: dict[str, bool] = {}
        self._dora_sq_norm = dora.WeightSqNormCache()
        self._dora_merge_norms: dict[str, Tensor] = {}
        self.merged_adapters: list[str] = []
        self._disable_adapters = False
        self._active_adapter: str | list[str] = "default"
        self._stack_cache: tuple | None = None
        self._stack_changes = 0
        self._bound_slots: tuple[AdapterStack, Tensor] | None = None
        self.register_load_state_dict_post_hook(lambda module, incompatible: module.refresh_adapter_stack())

    # ------------------------------------------------------------------ adapters
    def get_base_layer(self) -> nn.Module:
        """The wrapped layer (unwrapping nested LoRA layers)."""
        base = self.base_layer
        while isinstance(base, LoraLayer):
            base = base.base_layer
        return base

    def unload_base_layer(self) -> nn.Module:
        """The module that takes this layer's place when the LoRA layers are removed (``unload``,
        ``merge_and_unload``): the base layer, with any LoRA layers inside it removed too."""
        return self.get_base_layer()

    @property
    def weight(self) -> Tensor:
        return self.get_base_layer().weight

    @property
    def bias(self) -> Tensor | None:
        return getattr(self.get_base_layer(), "bias", None)

    # PEFT's names of adapter weights that stay frozen when their adapter is trained: no torchlora
    # adapter has any (PEFT fills it for variants torchlora does not implement)
    frozen_peft_weight_names: dict[str, tuple[str, ...]] = {}

    @property
    def quantization_backend(self) -> str | None:
        """How the base weight is quantized ("bnb-4bit", "bnb-8bit", "torchao"), None for a
        plain weight. (PEFT holds a backend object here; torchlora's quantized weights are read
        and written by ``torchlora.nn.quantized_weight``.)"""
        return quantized_weight.quantization_kind(self.get_base_layer())

    def get_base_weight(self) -> Tensor:
        """The base layer's weight data, dequantized when it is stored quantized."""
        return quantized_weight.dequantized_weight(self.get_base_layer())

    def set_base_weight(self, weight_data: Tensor) -> None:
        """Make ``weight_data`` the base layer's weight data; a quantized weight is quantized
        again with the layer's own settings."""
        if not isinstance(weight_data, Tensor):
            raise TypeError(f"set_base_weight takes a tensor, got {type(weight_data).__name__}")
        base = self.get_base_layer()
        if quantized_weight.is_quantized(base):
            quantized_weight.write_weight(base, weight_data)
        else:
            base.weight.data = weight_data
        self.refresh_adapter_stack()

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """Whether the adapter is additive (``W + delta``) and so convertible to plain LoRA: always
        true here, DoRA included (as in PEFT); the variants PEFT refuses are not in torchlora."""
        return True

    @property
    def lora_variants(self) -> dict[tuple[str, ...], None]:
        """PEFT's registry of LoRA variant classes per config field. torchlora has no variant
        classes (DoRA is part of every layer), so only plain LoRA, ``()``, is listed."""
        return {(): None}

    def resolve_lora_variant(self, *, config: Any, **kwargs: Any) -> None:
        """PEFT's variant lookup: None (plain LoRA, DoRA built in) for every config torchlora
        accepts; the config schema has already rejected the variants torchlora lacks."""
        from ..config import LoraConfig

        if not isinstance(config, LoraConfig):
            raise TypeError(f"config must be a torchlora LoraConfig, got {type(config).__name__}")
        return None

    def _unsupported_init(self, what: str) -> None:
        raise NotImplementedError(f"torchlora does not implement {what} for {type(self).__name__}: the config "
                                  "schema rejects it, so no layer has this initialisation")

    def pissa_init(self, adapter_name: str, init_lora_weights: str) -> None:
        """PiSSA initialisation; implemented by layers with a 2-D weight (``LoraLinear``)."""
        self._unsupported_init("PiSSA initialisation (init_lora_weights='pissa')")

    def olora_init(self, adapter_name: str) -> None:
        """OLoRA initialisation; implemented by layers with a 2-D weight (``LoraLinear``)."""
        self._unsupported_init("OLoRA initialisation (init_lora_weights='olora')")

    def corda_init(self, adapter_name: str, init_lora_weights: Any) -> None:
        """PEFT's CorDA initialisation: not implemented."""
        self._unsupported_init("CorDA initialisation (init_lora_weights='corda')")

    def loftq_init(self, adapter_name: str, config: Any = None) -> None:
        """PEFT's LoftQ initialisation: not implemented."""
        self._unsupported_init("LoftQ initialisation (init_lora_weights='loftq')")

    def lora_ga_init(self, adapter_name: str, lora_ga_config: Any = None) -> None:
        """PEFT's LoRA-GA initialisation: not implemented."""
        self._unsupported_init("LoRA-GA initialisation (init_lora_weights='lora_ga')")

    def mica_init(self, adapter_name: str) -> None:
        """PEFT's MiCA initialisation: not implemented."""
        self._unsupported_init("MiCA initialisation (init_lora_weights='mica')")

    def orthogonal_init(self, adapter_name: str) -> None:
        """PEFT's orthogonal initialisation: not implemented."""
        self._unsupported_init("orthogonal initialisation (init_lora_weights='orthogonal')")

    @property
    def active_adapter(self) -> str | list[str]:
        return self._active_adapter

    @property
    def active_adapters(self) -> list[str]:
        return [self._active_adapter] if isinstance(self._active_adapter, str) else list(self._active_adapter)

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def adapter_names(self) -> list[str]:
        """Every adapter this layer holds, in the order they were added."""
        names: list[str] = []
        for layer_name in ("lora_A", "lora_embedding_A"):
            names.extend(k for k in getattr(self, layer_name).keys() if k not in names)
        return names

    def adapter_tensors(self, adapter_name: str) -> dict[str, nn.Parameter]:
        """The parameters of ``adapter_name`` under PEFT's local names: ``lora_A.weight``,
        ``lora_B.weight``, ``lora_B.bias`` (with lora_bias), ``lora_embedding_A``,
        ``lora_embedding_B``. These are the live parameters, not copies; empty when this layer
        does not hold the adapter."""
        out: dict[str, nn.Parameter] = {}
        for layer_name in self.adapter_layer_names:
            container = getattr(self, layer_name)
            if adapter_name not in container:
                continue
            item = container[adapter_name]
            if isinstance(item, nn.Parameter):
                out[layer_name] = item
            else:
                out.update((f"{layer_name}.{name}", param) for name, param in item.named_parameters())
        return out

    def _scaling_for(self, r: int, lora_alpha: float, use_rslora: bool) -> float:
        return _C.peft.lora_scaling(lora_alpha, r, use_rslora)

    def _register_common(
        self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float, use_rslora: bool, lora_bias: bool
    ) -> None:
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = self._scaling_for(r, lora_alpha, use_rslora)
        self.use_rslora[adapter_name] = use_rslora
        self.lora_bias[adapter_name] = lora_bias
        self.lora_dropout[adapter_name] = nn.Dropout(p=lora_dropout) if lora_dropout > 0.0 else nn.Identity()

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        init_lora_weights: InitLoraWeights = True,
        use_rslora: bool = False,
        lora_bias: bool = False,
        low_cpu_mem_usage: bool = False,
        use_dora: bool = False,
    ) -> None:
        """Add (or replace) the adapter ``adapter_name`` and keep the active set trainable.

        With ``use_dora`` the adapter is DoRA: its magnitude starts at the row norms of the
        adapted weight, so the layer's output is unchanged at initialisation.

        With ``low_cpu_mem_usage`` the adapter's parameters are created on the meta device and
        not initialised: they take their values when a saved adapter is loaded into them
        (``set_peft_model_state_dict``). PiSSA and OLoRA still compute their factors, because
        they also rewrite the base weight, which the loaded factors need.
        """
        check_adapter_args(r, lora_alpha, lora_dropout, init_lora_weights)
        if not isinstance(use_dora, bool):
            raise TypeError(f"use_dora must be a bool, got {use_dora!r}")
        self._check_new_adapter(r, lora_bias)
        if use_dora:
            self._check_dora_supported()
        self._register_common(adapter_name, r, lora_alpha, lora_dropout, use_rslora, lora_bias)
        self.use_dora[adapter_name] = use_dora
        if adapter_name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[adapter_name]
        if low_cpu_mem_usage:
            with torch.device("meta"):
                self._create_adapter(adapter_name, r, lora_bias)
            self._init_from_base_weight(adapter_name, init_lora_weights)
            if use_dora:
                with torch.device("meta"):
                    self.lora_magnitude_vector[adapter_name] = dora.DoraMagnitude(
                        torch.empty(self._dora_magnitude_shape()))
        else:
            self._create_adapter(adapter_name, r, lora_bias)
            self.reset_lora_parameters(adapter_name, init_lora_weights)
            if use_dora:
                self._init_dora_magnitude(adapter_name)
        self._move_adapter_to_base(adapter_name)
        self.refresh_adapter_stack()
        self.set_adapter(self.active_adapters)

    def _check_new_adapter(self, r: int, lora_bias: bool) -> None:
        """Raise when this layer cannot hold an adapter of rank ``r`` (with ``lora_bias``)."""

    # ------------------------------------------------------------------ DoRA
    def _check_dora_supported(self) -> None:
        """Raise when this layer cannot hold a DoRA adapter."""

    def _dora_factors(self, adapter_name: str) -> tuple[Tensor, Tensor]:
        """(lora_A, lora_B) in the layout of :func:`torchlora.ops.dora_weight_norm`."""
        raise NotImplementedError

    def _dora_fan_in_fan_out(self) -> bool:
        """Whether the base weight is stored [in, out] (its DoRA norm runs over its columns)."""
        return False

    def _dora_magnitude_shape(self) -> tuple[int, ...]:
        """PEFT's shape of the magnitude parameter."""
        return (self.out_features,)

    def _dora_factor_view(self) -> tuple[int, ...]:
        """The shape that lines the per-feature factor up with the base weight for merging."""
        return (1, -1) if self._dora_fan_in_fan_out() else (-1, 1)

    def _init_dora_magnitude(self, adapter_name: str) -> None:
        norm = self.dora_weight_norm(adapter_name)
        self.lora_magnitude_vector[adapter_name] = dora.DoraMagnitude(norm.reshape(self._dora_magnitude_shape()))

    def _uses_dora(self, adapter_name: str) -> bool:
        return self.use_dora.get(adapter_name, False)

    def dora_weight_norm(self, adapter_name: str) -> Tensor:
        """``||W + scaling * B @ A||`` per output feature for ``adapter_name``, detached (DoRA's
        denominator); ``||W||^2`` comes from a cache while the base weight is unchanged."""
        lora_A, lora_B = self._dora_factors(adapter_name)
        base = self.get_base_layer()
        fan_in_fan_out = self._dora_fan_in_fan_out()
        sq_norm = self._dora_sq_norm.get(base, fan_in_fan_out)
        lora_B, _, scaling = self._operator_factors(adapter_name, lora_B)
        return dora.weight_norm(base, lora_A, lora_B, scaling, fan_in_fan_out, sq_norm)

    def _dora_gain(self, adapter_name: str, norm: Tensor) -> Tensor:
        """``magnitude / norm`` shaped to multiply the base weight."""
        magnitude = self.lora_magnitude_vector[adapter_name].weight.detach()
        return (magnitude.reshape(-1) / norm).reshape(self._dora_factor_view())

    def _create_adapter(self, adapter_name: str, r: int, lora_bias: bool) -> None:
        """Create the adapter's parameters under PEFT's names."""
        raise NotImplementedError

    def _init_from_base_weight(self, adapter_name: str, init_lora_weights: InitLoraWeights) -> None:
        """For an adapter created on the meta device: run an initialisation that derives the
        factors from the base weight and rewrites it (PiSSA, OLoRA). No other init applies here."""

    def reset_lora_parameters(self, adapter_name: str, init_lora_weights: InitLoraWeights) -> None:
        """PEFT's initialisation of ``lora_A``/``lora_B`` modules: True -> A kaiming-uniform, B zero;
        "gaussian" -> A ~ N(0, 1/r), B zero; False keeps the modules' default init (not a no-op)."""
        if init_lora_weights is False:
            return
        if init_lora_weights is True:
            nn.init.kaiming_uniform_(self.lora_A[adapter_name].weight, a=math.sqrt(5))
        elif isinstance(init_lora_weights, str) and init_lora_weights.lower() == "gaussian":
            nn.init.normal_(self.lora_A[adapter_name].weight, std=1 / self.r[adapter_name])
        else:
            raise ValueError(f"Unknown initialization init_lora_weights={init_lora_weights!r}")
        nn.init.zeros_(self.lora_B[adapter_name].weight)
        if self.lora_bias[adapter_name]:
            nn.init.zeros_(self.lora_B[adapter_name].bias)

    def _move_adapter_to_base(self, adapter_name: str) -> None:
        """Put the new adapter on the base weight's device, and in its dtype when floating."""
        weight = self.weight  # the base weight, or what a layer without one names so (MultiheadAttention)
        dtype = weight.dtype if weight.dtype.is_floating_point else None
        for tensor in self.adapter_tensors(adapter_name).values():
            # meta parameters take only the dtype; they get their device when they are loaded
            device = tensor.device if tensor.is_meta else weight.device
            tensor.data = tensor.data.to(device, dtype=dtype or tensor.dtype)

    def dropout_p(self, adapter_name: str) -> float:
        """The dropout probability in effect now (0 in eval mode)."""
        module = self.lora_dropout[adapter_name]
        return float(module.p) if (self.training and isinstance(module, nn.Dropout)) else 0.0

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        """Make ``adapter_names`` the active adapters; their parameters become trainable (frozen
        with ``inference_mode``) and every other adapter's are frozen."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in self.adapter_names():
            for tensor in self.adapter_tensors(name).values():
                tensor.requires_grad_(name in names and not inference_mode)
        self._active_adapter = adapter_names

    def set_requires_grad(self, adapter_names: str | Iterable[str], requires_grad: bool = True) -> None:
        """Enable (or with ``requires_grad=False`` disable) gradients of the parameters of the given
        adapters that this layer holds; the others are left as they are."""
        names = {adapter_names} if isinstance(adapter_names, str) else set(adapter_names)
        for name in names:
            for tensor in self.adapter_tensors(name).values():
                tensor.requires_grad_(requires_grad)

    def enable_adapters(self, enabled: bool) -> None:
        """Turn the adapters on or off (off: the base layer alone, adapters frozen)."""
        if enabled:
            self.set_adapter(self.active_adapters)
            self._disable_adapters = False
        else:
            for name in self.adapter_names():
                for tensor in self.adapter_tensors(name).values():
                    tensor.requires_grad_(False)
            self._disable_adapters = True

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter; if it was active, the first remaining one becomes active."""
        if adapter_name in self.merged_adapters:
            raise ValueError(f"adapter '{adapter_name}' is merged; unmerge it before deleting it")
        for attr in self.adapter_layer_names + self.other_param_names + ("lora_bias", "use_rslora", "use_dora"):
            container = getattr(self, attr)
            if adapter_name in container:
                del container[adapter_name]
        self.refresh_adapter_stack()
        if adapter_name in self.active_adapters:
            remaining = [n for n in self.active_adapters if n != adapter_name]
            if not remaining:
                remaining = self.adapter_names()[:1]
            if remaining:
                self.set_adapter(remaining[0] if len(remaining) == 1 else remaining)
            else:
                self._active_adapter = []

    # ------------------------------------------------------------------ merging
    def _adapters_to_merge(self, adapter_names: Iterable[str] | None) -> list[str]:
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        for name in names:
            if name not in self.adapter_names():
                raise ValueError(f"adapter '{name}' does not exist in this layer; it has {self.adapter_names()}")
        already = [n for n in names if n in self.merged_adapters]
        if already:
            warnings.warn(f"Already following adapters were merged {','.join(already)}. "
                          f"You are now additionally merging {','.join(n for n in names if n not in already)}.")
        return [n for n in names if n not in self.merged_adapters]

    def get_delta_weight(self, adapter: str) -> Tensor:
        """The change this adapter makes to the base weight, in the base weight's layout and the
        adapter's dtype (:func:`torchlora.ops.lora_delta_weight`)."""
        raise NotImplementedError

    def _delta_bias(self, adapter: str) -> Tensor | None:
        return None

    def _check_mergeable(self, adapter: str) -> None:
        """Raise when this adapter cannot be merged into the base layer."""

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the adapters' deltas into the base weights (and lora_bias into the base bias).

        With ``safe_merge`` the sum is formed on a copy and a ValueError is raised, leaving
        the weights untouched, if any value is not finite.
        """
        base = self.get_base_layer()
        for name in self._adapters_to_merge(adapter_names):
            self._check_mergeable(name)
            delta_b = self._delta_bias(name)
            if delta_b is not None and getattr(base, "bias", None) is None:
                raise RuntimeError("Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias.")
            new_w = self._merged_weight(name, quantized_weight.dequantized_weight(base))
            new_b = None if delta_b is None else base.bias.data + delta_b.to(base.bias.dtype)
            if safe_merge and (not torch.isfinite(new_w).all() or (new_b is not None and not torch.isfinite(new_b).all())):
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
            self._write_base_weight(new_w)
            if new_b is not None:
                base.bias.data.copy_(new_b)
            self.merged_adapters.append(name)

    def _merged_weight(self, adapter: str, weight: Tensor) -> Tensor:
        """The base weight with ``adapter`` merged into it (``weight`` is the current, dequantized
        one). DoRA (PEFT's rule): ``m / ||W0 + delta|| * (weight + delta)`` with ``W0`` the weight
        without the adapters merged before, the norm kept for unmerging."""
        delta = self.get_delta_weight(adapter)
        if not self._uses_dora(adapter):
            return weight + delta.to(weight.dtype)
        lora_A, lora_B = self._dora_factors(adapter)
        unmerged = self._weight_without_merged_adapters(weight)
        lora_B, _, scaling = self._operator_factors(adapter, lora_B)
        norm = dora.norm_of(unmerged, lora_A, lora_B, scaling, self._dora_fan_in_fan_out())
        self._dora_merge_norms[adapter] = norm
        gain = self._dora_gain(adapter, norm)
        return (gain * (weight + delta)).to(weight.dtype)

    def _unmerged_weight(self, adapter: str, weight: Tensor, forget: bool = True) -> Tensor:
        """The inverse of :meth:`_merged_weight`."""
        delta = self.get_delta_weight(adapter)
        if not self._uses_dora(adapter):
            return weight - delta.to(weight.dtype)
        norms = self._dora_merge_norms
        norm = norms.pop(adapter) if forget else norms[adapter]
        return (weight / self._dora_gain(adapter, norm) - delta).to(weight.dtype)

    def _weight_without_merged_adapters(self, weight: Tensor) -> Tensor:
        for name in reversed(self.merged_adapters):
            weight = self._unmerged_weight(name, weight, forget=False)
        return weight

    def _write_base_weight(self, value: Tensor, action: str = "Merge") -> None:
        base = self.get_base_layer()
        if quantized_weight.is_quantized(base):
            warnings.warn(f"{action} lora module to {quantized_weight.describe(base)} linear may get different "
                          "generations due to rounding errors.")
        quantized_weight.write_weight(base, value)

    def unmerge(self) -> None:
        """Subtract every merged adapter's delta again, newest first."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            self._write_base_weight(self._unmerged_weight(name, quantized_weight.dequantized_weight(base)), "Unmerge")
            delta_b = self._delta_bias(name)
            if delta_b is not None:
                base.bias.data -= delta_b.to(base.bias.dtype)

    # ------------------------------------------------------------------ forward
    def _holds(self, adapter_name: str) -> bool:
        return adapter_name in self.lora_A

    def _lora_update(self, adapter_name: str, x: Tensor, result: Tensor) -> Tensor:
        """``result`` plus this adapter's low-rank term for input ``x``."""
        raise NotImplementedError

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """The base layer's output plus every active adapter's low-rank term.

        ``adapter_names=[...]`` (one name per sample, ``"__base__"`` for none) runs a mixed
        batch at inference time, as in PEFT.
        """
        adapter_names = kwargs.pop("adapter_names", None)
        adapter_slots = kwargs.pop("adapter_slots", None)
        if self._bound_slots is not None:
            return self._forward_with_slots(*self._bound_slots, x, *args, **kwargs)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_slots is not None:
            return self._slot_batch_forward(x, *args, adapter_slots=adapter_slots, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        result_dtype = result.dtype
        for name in self.active_adapters:
            if self._holds(name):
                result = self._lora_update(name, x, result)
        return result.to(result_dtype)

    def bind_slots(self, stack: AdapterStack, sample_slots: Tensor) -> None:
        """Until :meth:`unbind_slots`, ``forward`` computes the base layer plus sample i's slot
        ``sample_slots[i]`` of ``stack`` (-1: none), whatever adapters the layer holds: an
        adapter pool's slots served through this layer (``torchlora.serving``)."""
        if self.merged:
            raise ValueError("slots cannot be bound to a layer with merged adapters; unmerge them first")
        if not self._stacks_adapters():
            raise NotImplementedError(f"{type(self).__name__} with this base layer cannot serve slots")
        self._bound_slots = (stack, sample_slots)

    def unbind_slots(self) -> None:
        """Back to the layer's own adapters."""
        self._bound_slots = None

    def _mixed_batch_forward(self, x: Tensor, *args: Any, adapter_names: list[str], **kwargs: Any) -> Tensor:
        """Sample i through ``adapter_names[i]``: the base layer, then one multi-adapter operator
        for every adapter in the batch (``_multi_lora_update``)."""
        self._check_mixed_batch(adapter_names, x)
        if not self._stacks_adapters() or any(self.use_dora.values()):
            return self._mixed_batch_loop(x, *args, adapter_names=adapter_names, **kwargs)
        stack = self.adapter_stack()
        slots = self._sample_slots(stack, adapter_names, x.device)
        if slots is None:
            return self.base_layer(x, *args, **kwargs)
        return self._forward_with_slots(stack, slots, x, *args, **kwargs)

    def _forward_with_slots(self, stack: AdapterStack, sample_slots: Tensor, x: Tensor, *args: Any,
                            **kwargs: Any) -> Tensor:
        """The base layer's output plus each sample's adapter."""
        return self._multi_lora_update(stack, sample_slots, x, self.base_layer(x, *args, **kwargs))

    def _slot_batch_forward(self, x: Tensor, *args: Any, adapter_slots: Tensor, **kwargs: Any) -> Tensor:
        """A mixed batch given as a tensor: ``adapter_slots[i]`` is sample i's index into
        :meth:`adapter_names` (-1: no adapter). Unlike ``adapter_names`` it is data, not Python
        values, so a ``torch.compile``d layer takes new assignments without recompiling."""
        if self.merged:
            raise ValueError("adapter_slots (mixed batches) cannot be used while adapters are merged")
        if not isinstance(adapter_slots, Tensor) or adapter_slots.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"adapter_slots must be an int32 or int64 tensor (one slot per sample), got {adapter_slots!r}")
        if adapter_slots.dim() != 1 or adapter_slots.shape[0] != x.shape[0]:
            raise ValueError(f"adapter_slots must have shape [{x.shape[0]}] (one per sample), got {tuple(adapter_slots.shape)}")
        if not self._stacks_adapters():
            raise NotImplementedError(f"adapter_slots is not supported by {type(self).__name__} with this base layer")
        if any(self.use_dora.values()):
            raise NotImplementedError("adapter_slots is not supported with DoRA adapters; pass adapter_names instead")
        return self._forward_with_slots(self.adapter_stack(), adapter_slots.to(x.device), x, *args, **kwargs)

    def _sample_slots(self, stack: AdapterStack, adapter_names: list[str], device: torch.device) -> Tensor | None:
        """The per-sample slot tensor (shared between layers of one forward through the memo of
        :class:`SampleAdapters`), or None when no sample uses an adapter of this layer."""
        memo = getattr(adapter_names, "memo", None)
        key = (stack.names, device)
        if memo is not None and key in memo:
            return memo[key]
        slot_of = stack.slot_of
        slots = None
        if any(n in slot_of for n in adapter_names):
            slots = stack.sample_slots(adapter_names, device)
        if memo is not None:
            memo[key] = slots
        return slots

    def _stacks_adapters(self) -> bool:
        """Whether mixed batches take the multi-adapter operator here (else a loop per adapter)."""
        return True

    def _multi_lora_update(self, stack: AdapterStack, sample_slots: Tensor, x: Tensor, result: Tensor) -> Tensor:
        """``result`` plus each sample's adapter for input ``x`` (``sample_slots``: one slot per sample)."""
        raise NotImplementedError

    def _stack_factors(self, name: str) -> tuple[Tensor, Tensor, Tensor | None]:
        """The adapter's (lora_A, lora_B, lora_bias) in the multi-adapter operator's layout."""
        raise NotImplementedError

    # rank dimension of lora_A and lora_B as _stack_factors gives them
    _stack_rank_dims: tuple[int, int] = (0, 1)

    def _stack_groups(self) -> int:
        return 1

    def refresh_adapter_stack(self) -> None:
        """Drop the cached stack of adapters that mixed batches use without autograd. In-place
        changes of the adapter weights are seen by their version counters; call this after
        replacing a parameter's ``.data`` by other means than torchlora's methods,
        ``load_state_dict`` or ``.to()``."""
        self._stack_cache = None
        self._stack_changes += 1

    def _apply(self, fn, *args, **kwargs):
        self.refresh_adapter_stack()  # .to(), .cuda(), .half(): the cached copies would stay behind
        return super()._apply(fn, *args, **kwargs)

    def adapter_stack(self) -> AdapterStack:
        """This layer's adapters stacked in slots (slot i = ``adapter_names()[i]``). Without
        autograd a cached copy; with autograd built from the parameters, so gradients reach them."""
        cacheable = (not torch.is_grad_enabled() and not torch.compiler.is_compiling()
                     and not gathered_by_fsdp(self))
        if cacheable and self._stack_cache is not None:
            changes, scaling_changes, sources, versions, stack = self._stack_cache
            if (changes == self._stack_changes and scaling_changes == getattr(self.scaling, "changes", 0)
                    and versions == sum(t._version for t in sources)):
                return stack
        names = [n for n in self.adapter_names() if self._holds(n)]
        factors = [self._stack_factors(n) for n in names]
        a_dim, b_dim = self._stack_rank_dims
        # a tensor scaling (compiled hot-swapping) is copied into the stack's scale vector
        scalings = [self.scaling[n] for n in names]
        stack = build_stack(names, factors, [float(s) for s in scalings],
                            [self._dropout_probability(n) for n in names], a_dim, b_dim, self._stack_groups())
        if cacheable:
            # in-place changes (optimizer steps, edits under no_grad) bump the tensors' versions
            sources = [t for f in factors for t in f if t is not None] + [s for s in scalings if isinstance(s, Tensor)]
            self._stack_cache = (self._stack_changes, getattr(self.scaling, "changes", 0), sources,
                                 sum(t._version for t in sources), stack)
        return stack

    def _dropout_probability(self, adapter_name: str) -> float:
        module = self.lora_dropout[adapter_name] if adapter_name in self.lora_dropout else None
        return float(module.p) if isinstance(module, nn.Dropout) else 0.0

    def _mixed_batch_loop(self, x: Tensor, *args: Any, adapter_names: list[str], **kwargs: Any) -> Tensor:
        """The per-adapter loop (PEFT's way), for the cases the stacked operator does not cover."""
        result = self.base_layer(x, *args, **kwargs)
        for name, rows in self._sub_batches(adapter_names, x.shape[0]).items():
            if name == BASE_ADAPTER_NAME or not self._holds(name):
                continue
            index = torch.tensor(rows, device=x.device)
            updated = self._lora_update(name, x[index], result[index])
            result = result.index_copy(0, index, updated.to(result.dtype))
        return result

    def _seed_for(self, adapter_name: str, device: torch.device) -> tuple[float, Tensor | None]:
        p = self.dropout_p(adapter_name)
        return p, (ops.make_seed(device) if p > 0.0 else None)

    @staticmethod
    def _sub_batches(adapter_names: list[str], batch: int) -> dict[str, list[int]]:
        if len(adapter_names) != batch:
            raise ValueError(
                f"adapter_names has {len(adapter_names)} entries but the batch has {batch} samples"
            )
        groups: dict[str, list[int]] = {}
        for index, name in enumerate(adapter_names):
            groups.setdefault(name, []).append(index)
        return groups

    def _check_mixed_batch(self, adapter_names: list[str], x: Tensor) -> None:
        if self.merged:
            raise ValueError("adapter_names (mixed-batch inference) cannot be used while adapters are merged")
        from_model = isinstance(adapter_names, SampleAdapters)  # its names were checked once for the whole model
        if not from_model and (not isinstance(adapter_names, (list, tuple))
                               or not all(isinstance(n, str) for n in adapter_names)):
            raise TypeError(f"adapter_names must be a list of strings (one per sample), got {adapter_names!r}")
        batch = x.shape[0] if x.dim() > 0 else 0
        if len(adapter_names) != batch:
            raise ValueError(f"adapter_names has {len(adapter_names)} entries but the batch has {batch} samples")
        if from_model:
            return  # names this layer lacks take no adapter here
        known = set(self.adapter_names()) | {BASE_ADAPTER_NAME}
        unknown = sorted(set(adapter_names) - known)
        if unknown:
            raise ValueError(f"adapter_names contains unknown adapters {unknown}; this layer has {self.adapter_names()}")

    def extra_repr(self) -> str:
        parts = [f"{n}: r={self.r[n]}, alpha={self.lora_alpha[n]}" for n in self.adapter_names()]
        return "adapters(" + "; ".join(parts) + ")"
