"""Trainable tokens (``LoraConfig.trainable_token_indices``): only the chosen rows of an
embedding are trained and saved, instead of the whole layer through ``modules_to_save``, with
PEFT's module layout and keys (``<embedding>.token_adapter.trainable_tokens_delta.<adapter>``
in the model, ``...token_adapter.trainable_tokens_delta`` in files).

The "delta" holds the new values of the rows (not a difference): the layer computes with the
base weight whose rows are replaced (``torchlora._C.peft.with_trainable_tokens``). Output layers
tied to the input embedding (``tie_word_embeddings``) follow the same rows through a tied
adapter that owns nothing and saves nothing.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._native import _C
from ..nn.layer import BASE_ADAPTER_NAME
from .modules_to_save import ModulesToSaveWrapper, get_submodules


class TrainableTokensLayer(nn.Module):
    """PEFT's ``token_adapter``: the base layer and, per adapter, the token indices, the trained
    rows (``trainable_tokens_delta``) and the original rows (to unmerge)."""

    def __init__(self, base_layer: nn.Module, tied_adapter: Optional["TrainableTokensLayer"] = None) -> None:
        super().__init__()
        self.base_layer = base_layer
        # a list hides the tied adapter from named_modules(), so its rows are saved once
        self._tied_adapter = [tied_adapter] if tied_adapter is not None else []
        if tied_adapter is None:
            self.trainable_tokens_delta = nn.ParameterDict()
            self.trainable_tokens_original = _NonPersistentBuffers()
            self.token_indices: dict[str, list[int]] = {}
        else:
            self.trainable_tokens_delta = tied_adapter.trainable_tokens_delta
            self.trainable_tokens_original = tied_adapter.trainable_tokens_original
            self.token_indices = tied_adapter.token_indices
        self.merged_adapters: list[str] = []

    @property
    def tied_adapter(self) -> Optional["TrainableTokensLayer"]:
        return self._tied_adapter[0] if self._tied_adapter else None

    def _weight(self) -> Tensor:
        return self.base_layer.weight

    def update_layer(self, adapter_name: str, token_indices: list[int], init_weights: bool = True) -> None:
        """Create the adapter's rows from the base weight (``init_weights=False``: random)."""
        if self.tied_adapter is not None:
            return  # follows the adapter it is tied to
        if not isinstance(token_indices, (list, tuple)) or not token_indices or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in token_indices):
            raise TypeError(f"trainable_token_indices must be a non-empty list of ints, got {token_indices!r}")
        weight = self._weight()
        bad = [i for i in token_indices if not 0 <= i < weight.shape[0]]
        if bad:
            raise ValueError(f"trainable_token_indices {bad} are outside the {weight.shape[0]} rows of "
                             f"{type(self.base_layer).__name__}")
        self.token_indices[adapter_name] = list(token_indices)
        originals = weight.detach()[list(token_indices)].clone()
        values = originals.clone() if init_weights else torch.randn_like(originals)
        self.trainable_tokens_delta[adapter_name] = nn.Parameter(values)
        self.trainable_tokens_original[adapter_name] = originals

    def holds(self, adapter_name: str) -> bool:
        return adapter_name in self.trainable_tokens_delta

    def _check_disjoint(self, adapter_names: list[str]) -> None:
        seen: set[int] = set()
        for name in dict.fromkeys(self.merged_adapters + adapter_names):
            rows = set(self.token_indices[name])
            if seen & rows:
                raise ValueError(f"Token indices of adapter {name} are already defined and would result in undefined "
                                 "merging behavior. Only disjunct token indices are currently supported.")
            seen |= rows

    def merged_weight(self, adapter_names: list[str]) -> Tensor:
        """The base weight with the rows of ``adapter_names`` in place (differentiable in the rows)."""
        weight = self._weight()
        for name in adapter_names:
            weight = _C.peft.with_trainable_tokens(weight, self.token_indices[name], self.trainable_tokens_delta[name])
        return weight

    def merge(self, adapter_names: list[str], safe_merge: bool = False) -> None:
        """Write the rows into the base weight (PEFT's merge)."""
        names = [n for n in adapter_names if self.holds(n) and n not in self.merged_adapters]
        if not names:
            return
        self._check_disjoint(names)
        weight = self._weight()
        with torch.no_grad():
            merged = self.merged_weight(names).detach()
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {names} seems to be broken")
            weight.data = merged
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        """Put the original rows back."""
        weight = self._weight()
        with torch.no_grad():
            while self.merged_adapters:
                name = self.merged_adapters.pop()
                weight.data = _C.peft.with_trainable_tokens(weight.data, self.token_indices[name],
                                                            self.trainable_tokens_original[name])

    def forward_adapters(self, x: Tensor, adapter_names: list[str], *args: Any, **kwargs: Any) -> Tensor:
        """The base layer's output computed with the rows of ``adapter_names``."""
        names = [n for n in adapter_names if self.holds(n)]
        if not names:
            return self.base_layer(x, *args, **kwargs)
        self._check_disjoint(names)
        weight = self.merged_weight(names)
        base = self.base_layer
        if isinstance(base, nn.Embedding):
            out = F.embedding(x, weight, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq,
                              base.sparse)
            scale = getattr(base, "embed_scale", None)  # scaled word embeddings (e.g. Gemma 3) scale in forward
            return out if scale is None else out * torch.as_tensor(scale).to(out.dtype)
        if isinstance(base, nn.Linear):  # a tied output layer
            return F.linear(x, weight, base.bias)
        raise TypeError(f"trainable tokens wrap an Embedding (or a tied Linear output layer), got "
                        f"{type(base).__name__}")


class _NonPersistentBuffers(nn.Module):
    """Named tensors that move with the module but are not part of its state dict."""

    def __setitem__(self, key: str, value: Tensor) -> None:
        self.register_buffer(key, value, persistent=False)

    def __getitem__(self, key: str) -> Tensor:
        return self._buffers[key]

    def __contains__(self, key: object) -> bool:
        return key in self._buffers

    def __delitem__(self, key: str) -> None:
        del self._buffers[key]


class TrainableTokensWrapper(nn.Module):
    """Put in place of an embedding (or of an output layer tied to it): runs the active
    adapter's rows, the base layer when no adapter is active or adapters are disabled."""

    def __init__(self, module: nn.Module, adapter_name: str, token_indices: list[int],
                 tied_adapter: Optional[TrainableTokensLayer] = None) -> None:
        super().__init__()
        if not isinstance(module, (nn.Embedding, nn.Linear)):
            raise TypeError(f"trainable_token_indices can only target an Embedding (or a tied Linear output layer), "
                            f"got {type(module).__name__}")
        self.token_adapter = TrainableTokensLayer(module, tied_adapter)
        self._active_adapter: list[str] = []
        self._disable_adapters = False
        self.update(adapter_name, token_indices)

    @property
    def original_module(self) -> nn.Module:
        return self.token_adapter.base_layer

    @property
    def weight(self) -> Tensor:
        """The weight the layer computes with (the active adapter's rows in place)."""
        return self.token_adapter.merged_weight([] if self._disable_adapters else self.active_adapters)

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapter)

    @property
    def active_adapter(self) -> list[str]:
        return self.active_adapters

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    @property
    def is_tied(self) -> bool:
        return self.token_adapter.tied_adapter is not None

    def holds(self, adapter_name: str) -> bool:
        return self.token_adapter.holds(adapter_name)

    def update(self, adapter_name: str, token_indices: list[int]) -> None:
        """Add ``adapter_name``'s rows (not activated)."""
        if not self.holds(adapter_name):
            self.token_adapter.update_layer(adapter_name, token_indices)
        self.original_module.requires_grad_(False)

    def set_adapter(self, adapter_names: Union[str, list[str]], inference_mode: bool = False) -> None:
        """Activate the one adapter of ``adapter_names`` this layer holds (none: the base runs)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        held = [n for n in names if self.holds(n)]
        if len(held) > 1:
            raise ValueError(f"Only one adapter can be set at a time for trainable tokens, got {held}")
        if not self.is_tied:
            for name, param in self.token_adapter.trainable_tokens_delta.items():
                param.requires_grad_(name in held and not inference_mode)
        self._active_adapter = held

    def enable_adapters(self, enabled: bool) -> None:
        """Disabled: the base layer runs and the rows are frozen."""
        self._disable_adapters = not enabled
        if enabled:
            self.set_adapter(self.active_adapters)
        elif not self.is_tied:
            for param in self.token_adapter.trainable_tokens_delta.values():
                param.requires_grad_(False)

    def delete_adapter(self, adapter_name: str, new_active_adapters: Optional[list[str]]) -> None:
        """Drop ``adapter_name``'s rows; activate the first of ``new_active_adapters`` held here."""
        if adapter_name in self.token_adapter.merged_adapters:
            raise ValueError(f"Adapter '{adapter_name}' is merged; call unmerge_adapter() before deleting it")
        if not self.is_tied and self.holds(adapter_name):
            del self.token_adapter.trainable_tokens_delta[adapter_name]
            del self.token_adapter.trainable_tokens_original[adapter_name]
            del self.token_adapter.token_indices[adapter_name]
        self.set_adapter([n for n in (new_active_adapters or []) if n != adapter_name][:1])

    def adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        """The trained rows of ``adapter_name`` (none for a tied layer: they are the embedding's)."""
        if self.is_tied or not self.holds(adapter_name):
            return []
        return [self.token_adapter.trainable_tokens_delta[adapter_name]]

    def merge(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        self.token_adapter.merge(self.active_adapters if adapter_names is None else adapter_names, safe_merge)

    def unmerge(self) -> None:
        self.token_adapter.unmerge()

    @property
    def merged(self) -> bool:
        return bool(self.token_adapter.merged_adapters)

    def unwrapped_module(self) -> nn.Module:
        """The module that replaces this wrapper on unload."""
        return self.original_module

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if self._disable_adapters or (adapter_names is None and not self.active_adapters):
            if self.merged:
                self.unmerge()
            return self.original_module(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, adapter_names, *args, **kwargs)
        if self.merged:
            return self.original_module(x, *args, **kwargs)
        return self.token_adapter.forward_adapters(x, self.active_adapters, *args, **kwargs)

    def _mixed_batch_forward(self, x: Tensor, adapter_names: list[str], *args: Any, **kwargs: Any) -> Tensor:
        if self.merged:
            raise ValueError("Mixed adapter batches need unmerged trainable tokens; call unmerge_adapter() first")
        if len(x) != len(adapter_names):
            raise ValueError("Length of `adapter_names` should be the same as the number of inputs, but got "
                             f"{len(adapter_names)} and {len(x)} respectively.")
        results: list[Any] = [None] * len(x)
        for name in dict.fromkeys(adapter_names):
            rows = [i for i, n in enumerate(adapter_names) if n == name]
            names = [] if name == BASE_ADAPTER_NAME else [name]
            out = self.token_adapter.forward_adapters(x[rows], names, *args, **kwargs)
            for j, row in enumerate(rows):
                results[row] = out[j]
        return torch.stack(results)


def input_embedding_name(model: nn.Module) -> str:
    """The module path of ``model.get_input_embeddings()`` ("embed_tokens" when unknown)."""
    getter = getattr(model, "get_input_embeddings", None)
    if getter is not None:
        try:
            embedding = getter()
        except (AttributeError, NotImplementedError):
            embedding = None
        for name, module in model.named_modules():
            if embedding is not None and module is embedding:
                return name
    return "embed_tokens"


def _weight_of(module: nn.Module) -> Optional[Tensor]:
    if isinstance(module, TrainableTokensWrapper):
        return module.original_module.weight
    if isinstance(module, ModulesToSaveWrapper):
        return module.original_module.weight
    return getattr(module, "weight", None)


def modules_tied_to(model: nn.Module, embedding_name: str) -> list[str]:
    """Paths of the modules (other than the embedding) whose weight is the embedding's own
    parameter: the output layers of a model with ``tie_word_embeddings``."""
    weight = _weight_of(model.get_submodule(embedding_name))
    if weight is None:
        return []
    out = []
    for name, module in model.named_modules(remove_duplicate=False):
        if name == embedding_name or name.startswith(embedding_name + "."):
            continue
        if isinstance(module, (nn.Linear, nn.Embedding)) and module.weight is weight:
            out.append(name)
    return sorted(set(out))


def _wrap(model: nn.Module, adapter_name: str, key: str, token_indices: list[int], inference_mode: bool,
          activate: bool, tied_adapter: Optional[TrainableTokensLayer] = None) -> TrainableTokensWrapper:
    parent, target, target_name = get_submodules(model, key)
    if isinstance(target, TrainableTokensWrapper):
        target.update(adapter_name, token_indices)
        target.set_adapter(target.active_adapters, inference_mode=inference_mode)
        return target
    if isinstance(target, ModulesToSaveWrapper):
        raise ValueError(f"Module '{key}' is trained fully (modules_to_save); it cannot also have trainable tokens")
    wrapper = TrainableTokensWrapper(target, adapter_name, token_indices, tied_adapter)
    wrapper.set_adapter(adapter_name if activate else [], inference_mode=inference_mode)
    setattr(parent, target_name, wrapper)
    return wrapper


def _find(model: nn.Module, name: str) -> str:
    """The one module path that ends with ``name`` (PEFT's matching), skipping wrapper internals."""
    keys = [k for k, _ in model.named_modules() if k.endswith(name) and ".token_adapter" not in k
            and ".original_module" not in k and ".modules_to_save." not in k]
    if not keys:
        raise ValueError(f"Target module {name!r} of trainable_token_indices was not found in the base model.")
    return keys[0]


def set_trainable_tokens(model: nn.Module, adapter_name: str, token_indices: Union[list[int], dict[str, list[int]]],
                         modules_to_save: Optional[list[str]], tie_word_embeddings: bool, ensure_weight_tying: bool,
                         inference_mode: bool, activate: bool = True) -> None:
    """Wrap the layers ``token_indices`` names (a list: the input embedding), and the output
    layers tied to the input embedding, as PEFT's LoRA does for ``trainable_token_indices``."""
    targets = dict(token_indices) if isinstance(token_indices, dict) else {input_embedding_name(model): token_indices}
    for name in targets:
        if modules_to_save and name in modules_to_save:
            raise ValueError("The embedding layer is already marked to be trained fully, either specify "
                             f'`modules_to_save=[..., "{name}", ...]` or `trainable_tokens={{\'{name}\': x}}` but '
                             "not both.")
    embedding_name = input_embedding_name(model)
    tied_names = modules_tied_to(model, embedding_name) if tie_word_embeddings else []
    mismatch = False
    skip: set[str] = set()
    if len(targets) > 1 and tie_word_embeddings:
        tied_keys = [k for k in targets if embedding_name.endswith(k)
                     or any(t.endswith(k) or k in t.split(".") for t in tied_names)]
        if len(tied_keys) >= 2:
            first = targets[tied_keys[0]]
            mismatch = any(targets[k] != first for k in tied_keys[1:])
            if mismatch and ensure_weight_tying:
                layers = ", ".join(f"{k}: {targets[k]}" for k in tied_keys)
                raise ValueError("Cannot ensure weight tying when different token indices are specified for tied "
                                 f"layers. Conflicting layers: {layers}. Please use the same indices for all tied "
                                 "layers or set ensure_weight_tying=False.")
            if not mismatch:
                skip = {k for k in tied_keys if not embedding_name.endswith(k)}
    for name, indices in targets.items():
        if name not in skip:
            _wrap(model, adapter_name, _find(model, name), indices, inference_mode, activate)
    if ensure_weight_tying and not tie_word_embeddings:
        warnings.warn("ensure_weight_tying=True but the model does not have tied weights (tie_word_embeddings=False). "
                      "Weight tying will not be applied for trainable_token_indices.")
    if not tie_word_embeddings:
        return
    embedding = model.get_submodule(embedding_name)
    if isinstance(embedding, TrainableTokensWrapper) and (ensure_weight_tying or not mismatch):
        source = embedding.token_adapter
        for name in tied_names:
            _wrap(model, adapter_name, name, source.token_indices[adapter_name], inference_mode, activate,
                  tied_adapter=source)


_EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")


def reject_untied_adapters(model: nn.Module, config: Any, tie_word_embeddings: bool) -> None:
    """PEFT's ``ensure_weight_tying`` also ties the LoRA layers and modules_to_save copies of
    tied embedding layers; torchlora ties trainable tokens only, so asking for more raises
    NotImplementedError instead of leaving the copies untied."""
    if not (config.ensure_weight_tying and tie_word_embeddings):
        return
    if not modules_tied_to(model, input_embedding_name(model)):
        return
    from .matching import is_target, rules_for

    in_save = any(m.split(".")[-1] in _EMBEDDING_LAYER_NAMES for m in (config.modules_to_save or []))
    targets = config.target_modules
    if isinstance(targets, str):
        rules = rules_for(config)
        in_targets = any(is_target(rules, name) for name in _EMBEDDING_LAYER_NAMES)
    else:
        in_targets = any(m.split(".")[-1] in _EMBEDDING_LAYER_NAMES for m in (targets or []))
    if in_save or in_targets:
        raise NotImplementedError("ensure_weight_tying=True with tied embedding layers in "
                                  f"{'modules_to_save' if in_save else 'target_modules'} is not supported by "
                                  "torchlora (it ties trainable_token_indices only)")
