"""``LoraModel``: injects LoRA layers into a model following a LoraConfig, and runs the
model-wide adapter lifecycle (activate, disable, merge, unload, delete), as PEFT's LoraModel."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, Optional, Union

import torch
from torch import nn

from ..config import LoraConfig
from ..nn import LoraLayer, quantized_weight
from ..target_defaults import DEFAULT_TARGET_MODULES, default_target_modules
from .dispatch import cast_adapter_dtype, create_lora_module
from .matching import Excluded, expand_all_linear, is_target, pattern_matches, rules_for
from .mixed_batch import adapter_names_hooks
from .modules_to_save import ModulesToSaveWrapper, get_submodules, set_trainable_modules
from .parameter_targets import (check_same_target_parameters, find_target_parameters, inject_parameters,
                                unload_param_wrappers)
from .trainable_tokens import TrainableTokensWrapper, reject_untied_adapters, set_trainable_tokens
from ..nn.param_wrapper import ParamWrapper
from ..utils.distributed import check_adapter_synchronised


class NoMatchingModuleError(ValueError):
    """No module of the model was selected by the config."""


def model_config_dict(model: nn.Module) -> dict[str, Any]:
    """The transformers config of ``model`` as a dict (``{"model_type": "custom"}`` otherwise)."""
    config = getattr(model, "config", None)
    if config is None:
        return {"model_type": "custom"}
    if hasattr(config, "to_dict"):
        return config.to_dict()
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    return dict(config)


class LoraModel(nn.Module):
    """Holds the adapted model (``self.model``) and the configs of its adapters (``peft_config``)."""

    prefix = "lora_"
    # PEFT's tuner attributes: the layer class, the per-architecture default targets (lists, or
    # a regex string), and whether adapters share state across layers (LoRA's do not)
    tuner_layer_cls = LoraLayer
    target_module_mapping: dict[str, Union[list[str], str]] = {
        model_type: (targets if isinstance(targets, str) else list(targets))
        for model_type, targets in DEFAULT_TARGET_MODULES.items()
    }
    uses_shared_state: bool = False

    def __init__(self, model: nn.Module, peft_config: Union[LoraConfig, dict[str, LoraConfig]],
                 adapter_name: str = "default", autocast_adapter_dtype: bool = True,
                 low_cpu_mem_usage: bool = False) -> None:
        super().__init__()
        self.model = model
        self.targeted_module_names: list[str] = []
        self.peft_config: dict[str, LoraConfig] = (
            dict(peft_config) if isinstance(peft_config, dict) else {adapter_name: peft_config}
        )
        self.active_adapter: Union[str, list[str]] = adapter_name
        self.inject_adapter(model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                            low_cpu_mem_usage=low_cpu_mem_usage)
        self.model.peft_config = self.peft_config

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model.forward(*args, **kwargs)

    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter] if isinstance(self.active_adapter, str) else list(self.active_adapter)

    @staticmethod
    def get_model_config(model: nn.Module) -> dict[str, Any]:
        """``model.config`` as a dict (``{"model_type": "custom"}`` for a model without one)."""
        return model_config_dict(model)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """Whether every adapter layer is additive (``W + delta``), as PEFT decides it: LoRA
        layers are, trainable-token layers are not."""
        if any(True for _ in self._token_wrappers()):
            return False
        return all(layer.supports_lora_conversion(adapter_name) for layer in self._lora_layers())

    def subtract_mutated_init(self, output_state_dict: dict[str, torch.Tensor], adapter_name: str,
                              kwargs: Optional[dict[str, Any]] = None) -> dict[str, torch.Tensor]:
        """PEFT's conversion of a trained PiSSA / OLoRA adapter (``output_state_dict``, PEFT's
        keys) to a plain LoRA adapter for the original base weights, given the initial adapter
        loaded into this model as ``adapter_name``: ``A' = cat(A, A0)``, ``B' = cat(B, -B0)``
        per module (the core's rule). Returns the ``lora_A`` / ``lora_B`` tensors only, as PEFT."""
        from .._native import _C
        from ..state_dict import get_peft_model_state_dict

        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} not found; the model has {list(self.peft_config)}")
        initial = get_peft_model_state_dict(self, state_dict=(kwargs or {}).get("state_dict"),
                                            adapter_name=adapter_name)
        converted: dict[str, torch.Tensor] = {}
        for key_A in output_state_dict:
            if not key_A.endswith(".lora_A.weight"):
                continue
            key_B = key_A[: -len(".lora_A.weight")] + ".lora_B.weight"
            local_A, local_B = (".".join(k.split(".")[1:]) for k in (key_A, key_B))
            missing = [k for k in (local_A, local_B) if k not in initial] + [k for k in (key_B,)
                                                                            if k not in output_state_dict]
            if missing:
                raise ValueError(f"subtract_mutated_init: no {missing} for {key_A!r} in the adapter "
                                 f"{adapter_name!r} or in output_state_dict")
            A, B = output_state_dict[key_A], output_state_dict[key_B]
            converted[key_A], converted[key_B] = _C.peft.factors_for_original_weights(
                A, B, initial[local_A].to(A.device, A.dtype), initial[local_B].to(B.device, B.dtype))
        return converted

    # ------------------------------------------------------------------ injection
    def _check_new_adapter_config(self, config: LoraConfig) -> None:
        if not isinstance(config, LoraConfig):
            raise TypeError(f"peft_config must be a torchlora LoraConfig, got {type(config).__name__}")
        biased = [name for name, conf in self.peft_config.items() if conf.bias != "none"]
        if len(self.peft_config) > 1 and len(biased) > 1:
            raise ValueError("LoraModel supports only 1 adapter with bias. When using multiple adapters, "
                             "set bias to 'none' for all adapters.")
        check_same_target_parameters(self.peft_config, config)

    def _prepare_config(self, config: LoraConfig, model: nn.Module) -> None:
        if config.target_modules is None:
            targets = default_target_modules(model_config_dict(model).get("model_type"))
            if targets is None and not config.target_parameters:
                raise ValueError("Please specify `target_modules` or `target_parameters` in `peft_config`")
            config.target_modules = targets
        expand_all_linear(config, model)

    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False) -> None:
        """Wrap every module ``peft_config[adapter_name]`` targets with a LoRA layer.

        With ``low_cpu_mem_usage`` the adapter's LoRA weights are created on the meta device
        and left for a saved adapter to fill (``set_peft_model_state_dict``), as in PEFT.
        """
        config = self.peft_config[adapter_name]
        self._check_new_adapter_config(config)
        if not config.inference_mode:
            check_adapter_synchronised(model, adapter_name)
        self._prepare_config(config, model)
        reject_untied_adapters(model, config, bool(model_config_dict(model).get("tie_word_embeddings", False)))

        named_modules = list(model.named_modules())
        lora_prefixes = [key + "." for key, module in named_modules if isinstance(module, LoraLayer)]
        # adding an adapter must not change the trainability of what was there before
        previous_requires_grad = []
        if lora_prefixes:
            seen = set()
            for key, module in named_modules:
                for pname, param in module.named_parameters(recurse=False):
                    full = f"{key}.{pname}" if key else pname
                    if id(param) in seen:
                        continue
                    seen.add(id(param))
                    if f".{adapter_name}." not in full and not full.endswith(f".{adapter_name}"):
                        previous_requires_grad.append((param, param.requires_grad))

        rules = rules_for(config)
        plan, excluded, unmatched = [], [], []
        for key, module in named_modules:
            if not key or any(key.startswith(p) for p in lora_prefixes):
                continue
            found = is_target(rules, key)
            if isinstance(found, Excluded):
                excluded.append(key)
            elif found:
                plan.append(key)
            else:
                unmatched.append(key)
        # LoRA on nn.Parameters: PEFT only warns when one of the two kinds of targets matched nothing
        param_targets = find_target_parameters(model, config.target_parameters) if config.target_parameters else []
        if not plan and not param_targets:
            self._raise_no_match(config, excluded, unmatched)
        if config.target_modules and not plan:
            warnings.warn(f"target_modules={config.target_modules} were set but no module was matched.", RuntimeWarning)
        elif config.target_parameters and not param_targets:
            warnings.warn(f"target_parameters={config.target_parameters} were set but no parameter was matched.",
                          RuntimeWarning)
        if config.exclude_modules and not excluded:
            warnings.warn(f"You have passed exclude_modules={config.exclude_modules} but no modules were excluded. "
                          "Please check that exclude_modules was set correctly.")
        self._warn_unused_patterns(config, plan)

        undo: list = []
        try:
            for key in plan:
                undo.append(self._create_and_replace(config, adapter_name, key, model, rules, low_cpu_mem_usage))
            undo.extend(inject_parameters(model, config, adapter_name, rules, param_targets, low_cpu_mem_usage))
        except Exception:
            for restore in reversed(undo):  # leave the model as it was before this adapter
                restore()
            raise
        for key in plan:
            if key not in self.targeted_module_names:
                self.targeted_module_names.append(key)

        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)
        self._mark_only_adapters_as_trainable(model)
        if config.modules_to_save:
            set_trainable_modules(model, adapter_name, config.modules_to_save, config.inference_mode,
                                  activate=adapter_name in self.active_adapters)
        if config.trainable_token_indices is not None:
            set_trainable_tokens(model, adapter_name, config.trainable_token_indices, config.modules_to_save,
                                 bool(model_config_dict(model).get("tie_word_embeddings", False)),
                                 config.ensure_weight_tying, config.inference_mode,
                                 activate=adapter_name in self.active_adapters)
        for param, requires_grad in previous_requires_grad:
            param.requires_grad = requires_grad
        cast_adapter_dtype(model, adapter_name, autocast_adapter_dtype)
        if getattr(model, "_device_mesh", None) is not None:  # transformers, loaded with tp_plan
            from ..distributed.tensor_parallel import shard_adapters_like_base

            shard_adapters_like_base(model)

    @staticmethod
    def _raise_no_match(config: LoraConfig, excluded: list[str], unmatched: list[str]) -> None:
        layer_note = ""
        if config.layers_to_transform is not None:
            layer_note += f" Note: You specified 'layers_to_transform': {config.layers_to_transform}."
        if config.layers_pattern is not None:
            layer_note += f" You also specified 'layers_pattern': {config.layers_pattern}."
        if excluded and not unmatched:
            raise NoMatchingModuleError(
                "All modules were excluded. This is likely unintended. "
                "Check your `target_modules`, `exclude_modules` and `modules_to_save` configuration.")
        if not excluded and not config.target_modules:
            raise NoMatchingModuleError("No `target_modules` passed. Please check the value of `target_modules`.")
        if not excluded:
            raise NoMatchingModuleError(
                f"Target modules {config.target_modules} not found in the base model. "
                f"Please check the target modules and try again.{layer_note}")
        raise NoMatchingModuleError(
            "No modules were targeted for adaptation. This might be caused by a combination of mismatched target "
            "modules and excluded modules. Please check your `target_modules` and `exclude_modules` configuration. "
            f"You may also have only targeted modules that are marked to be saved (`modules_to_save`).{layer_note}")

    @staticmethod
    def _warn_unused_patterns(config: LoraConfig, targeted: list[str]) -> None:
        for attr in ("rank_pattern", "alpha_pattern"):
            patterns = getattr(config, attr)
            unmatched = sorted(p for p in patterns if not any(pattern_matches(p, k) for k in targeted))
            if unmatched:
                warnings.warn(f"The following {attr} keys did not match any targeted module and were ignored: "
                              f"{unmatched}.", RuntimeWarning)

    def _create_and_replace(self, config: LoraConfig, adapter_name: str, key: str, model: nn.Module, rules=None,
                            low_cpu_mem_usage: bool = False):
        """Wrap (or extend) the module ``key``; returns a function that undoes it."""
        parent, target, target_name = get_submodules(model, key)
        rules = rules if rules is not None else rules_for(config)
        r = rules.rank_for(key)
        alpha = rules.alpha_for(key)
        base = target.get_base_layer() if isinstance(target, LoraLayer) else target
        # PiSSA / OLoRA replace the base weight's data; keep the original to restore on failure
        weight = getattr(base, "weight", None)
        original_data = weight.data if isinstance(weight, torch.Tensor) else None

        def restore_weight() -> None:
            if original_data is not None:
                base.weight.data = original_data

        if isinstance(target, LoraLayer):
            try:
                target.update_layer(adapter_name, r, alpha, config.lora_dropout, config.init_lora_weights,
                                    config.use_rslora, config.lora_bias, low_cpu_mem_usage=low_cpu_mem_usage,
                                    use_dora=config.use_dora)
            except Exception:
                self._drop_partial_adapter(target, adapter_name)
                restore_weight()
                raise

            def undo_update() -> None:
                self._drop_partial_adapter(target, adapter_name)
                restore_weight()

            return undo_update
        try:
            new_module = create_lora_module(config, adapter_name, target, r, alpha, low_cpu_mem_usage)
        except Exception:
            restore_weight()
            raise
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until activated
        setattr(parent, target_name, new_module)

        def undo_create() -> None:
            setattr(parent, target_name, target)
            restore_weight()

        return undo_create

    @staticmethod
    def _drop_partial_adapter(layer: LoraLayer, adapter_name: str) -> None:
        for attr in layer.adapter_layer_names + layer.other_param_names + ("lora_bias", "use_rslora"):
            container = getattr(layer, attr)
            if adapter_name in container:
                del container[adapter_name]

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        adapter_params: set[int] = set()
        for module in model.modules():
            if isinstance(module, LoraLayer):
                for name in module.adapter_names():
                    adapter_params.update(id(p) for p in module.adapter_tensors(name).values())
            elif isinstance(module, ModulesToSaveWrapper):
                adapter_params.update(id(p) for p in module.parameters())
            elif isinstance(module, TrainableTokensWrapper):
                adapter_params.update(id(p) for name in self.peft_config for p in module.adapter_parameters(name))
        for param in model.parameters():
            if id(param) not in adapter_params:
                param.requires_grad = False
        for name in self.active_adapters:
            bias = self.peft_config[name].bias
            if bias == "all":
                for pname, param in model.named_parameters():
                    if pname == "bias" or pname.endswith(".bias"):
                        param.requires_grad = True
            elif bias == "lora_only":
                for module in model.modules():
                    if isinstance(module, LoraLayer) and module.bias is not None:
                        module.bias.requires_grad = True

    # ------------------------------------------------------------------ adapters
    def _lora_layers(self) -> Iterator[LoraLayer]:
        return (m for m in self.model.modules() if isinstance(m, LoraLayer))

    def _wrappers(self) -> Iterator[ModulesToSaveWrapper]:
        return (m for m in self.model.modules() if isinstance(m, ModulesToSaveWrapper))

    def _token_wrappers(self) -> Iterator[TrainableTokensWrapper]:
        return (m for m in self.model.modules() if isinstance(m, TrainableTokensWrapper))

    def adapter_parameters(self, adapter_name: str) -> Iterator[nn.Parameter]:
        """The parameters that belong to ``adapter_name``: its LoRA factors and its
        modules_to_save copies (not the base weights that ``bias`` makes trainable)."""
        for layer in self._lora_layers():
            yield from layer.adapter_tensors(adapter_name).values()
        for wrapper in self._wrappers():
            if adapter_name in wrapper.modules_to_save:
                yield from wrapper.modules_to_save[adapter_name].parameters()
        for tokens in self._token_wrappers():
            yield from tokens.adapter_parameters(adapter_name)

    def set_requires_grad(self, adapter_names: Union[str, Sequence[str]], requires_grad: bool = True) -> None:
        """Enable (or with ``requires_grad=False`` disable) gradients of the given adapters."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"Adapter {unknown[0]} not found; the model has {list(self.peft_config)}")
        for name in names:
            for param in self.adapter_parameters(name):
                param.requires_grad_(requires_grad)

    def set_scale(self, adapter: str, scale: Union[float, int]) -> None:
        """Set the scaling of ``adapter`` in every LoRA layer that holds it to ``scale`` times its
        initial scaling (``LoraLayer.set_scale``)."""
        if adapter not in self.peft_config:
            raise ValueError(f"Adapter {adapter} not found; the model has {list(self.peft_config)}")
        for layer in self._lora_layers():
            layer.set_scale(adapter, scale)

    def set_adapter(self, adapter_name: Union[str, list[str]], inference_mode: bool = False) -> None:
        """Activate ``adapter_name`` (a name or a list) on every layer; its weights become trainable."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        missing = [n for n in names if n not in self.peft_config]
        if missing:
            raise ValueError(f"Adapter {missing[0]} not found; the model has {list(self.peft_config)}")
        for layer in self._lora_layers():
            if layer.merged:
                warnings.warn("Adapter cannot be set when the model is merged. Unmerging the model first.")
                layer.unmerge()
            layer.set_adapter(adapter_name, inference_mode=inference_mode)
        for wrapper in self._wrappers():
            held = [n for n in names if n in wrapper.modules_to_save]
            if len(held) > 1:
                raise ValueError(f"Only one adapter can be set at a time for modules_to_save, got {held}")
            wrapper.set_adapter(held, inference_mode=inference_mode)
        for tokens in self._token_wrappers():
            tokens.set_adapter(names, inference_mode=inference_mode)
        self.active_adapter = adapter_name

    def _set_adapter_layers(self, enabled: bool) -> None:
        for module in self.model.modules():
            if isinstance(module, (LoraLayer, ModulesToSaveWrapper, TrainableTokensWrapper)):
                module.enable_adapters(enabled)

    def enable_adapter_layers(self) -> None:
        """Turn every adapter layer back on."""
        self._set_adapter_layers(True)

    def disable_adapter_layers(self) -> None:
        """Run the base model alone (merged adapters are unmerged first)."""
        for name in self.active_adapters:
            if self.peft_config[name].bias != "none":
                warnings.warn(f"Careful, disabling adapter layers with bias configured to be "
                              f"'{self.peft_config[name].bias}' does not produce the same output as the base model "
                              "would without adaption.")
        self._set_adapter_layers(False)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter from every layer and from ``peft_config``."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} does not exist")
        if any(adapter_name in layer.merged_adapters for layer in self._lora_layers()):
            raise ValueError(f"Adapter '{adapter_name}' is merged; call unmerge_adapter() before deleting it")
        del self.peft_config[adapter_name]
        remaining = list(self.peft_config)
        new_active: list[str] = [n for n in self.active_adapters if n != adapter_name] or remaining[:1]
        for layer in self._lora_layers():
            layer.delete_adapter(adapter_name)
            if new_active:
                layer.set_adapter(new_active if len(new_active) > 1 else new_active[0])
        for wrapper in self._wrappers():
            wrapper.delete_adapter(adapter_name, new_active[:1] or None)
        for tokens in self._token_wrappers():
            tokens.delete_adapter(adapter_name, new_active)
        self.active_adapter = (new_active[0] if len(new_active) == 1 else new_active)

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: Optional[int] = None,
                             svd_clamp: Optional[float] = None, svd_full_matrices: bool = True,
                             svd_driver: Optional[str] = None, density: Optional[float] = None,
                             majority_sign_method: str = "total") -> None:
        """Add ``adapter_name``, the combination of ``adapters`` with ``weights`` (negative
        weights subtract), as PEFT's method; the new adapter is frozen and not activated.

        ``combination_type``: ``"cat"`` (exact; rank = the sum of the ranks), ``"svd"`` (the
        weighted delta weights factored again at ``svd_rank``, default the largest rank,
        optionally clamped at the ``svd_clamp`` quantile; ``svd_full_matrices`` / ``svd_driver``
        go to ``torch.linalg.svd``), ``"linear"`` (the factors themselves averaged, adapters of
        one rank), and the task-vector merges ``"ties"``, ``"dare_linear"``, ``"dare_ties"``,
        ``"magnitude_prune"`` (on the factors) and their ``"_svd"`` forms (on the delta
        weights), which keep a ``density`` fraction of the values; the TIES ones elect signs by
        ``majority_sign_method`` (``"total"`` or ``"frequency"``). The ``dare_*`` kinds draw from
        torch's default generator as PEFT does (same seed, same result). One adapter is always
        combined linearly. A name that exists already leaves everything unchanged (with a warning).
        """
        from .weighted_adapter import add_weighted_adapter

        add_weighted_adapter(self, adapters, weights, adapter_name, combination_type, svd_rank, svd_clamp,
                             svd_full_matrices, svd_driver, density, majority_sign_method)

    # ------------------------------------------------------------------ merging / unloading
    def _check_merge_allowed(self) -> None:
        for layer in self._lora_layers():
            base = layer.get_base_layer()
            if quantized_weight.is_quantized(base):
                continue  # dequantized, merged and quantized again with the layer's settings
            if getattr(base, "weight", None) is not None and base.weight.dtype not in (
                    torch.float32, torch.float16, torch.bfloat16, torch.float64):
                raise ValueError(f"Cannot merge LoRA into a base weight of dtype {base.weight.dtype}")

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        """Merge the active adapters (or ``adapter_names``) into the base weights."""
        if isinstance(adapter_names, str):
            raise TypeError(f"adapter_names should be a list of strings, got {adapter_names!r}.")
        self._check_merge_allowed()
        for layer in self._lora_layers():
            names = [n for n in (adapter_names or layer.active_adapters) if layer._holds(n)]
            if names:
                layer.merge(safe_merge=safe_merge, adapter_names=names)
        for tokens in self._token_wrappers():
            tokens.merge(adapter_names, safe_merge)

    def unmerge_adapter(self) -> None:
        """Undo ``merge_adapter`` on every layer."""
        for layer in self._lora_layers():
            if layer.merged:
                layer.unmerge()
        for tokens in self._token_wrappers():
            if tokens.merged:
                tokens.unmerge()

    def _unload_and_optionally_merge(self, merge: bool, progressbar: bool = False, safe_merge: bool = False,
                                     adapter_names: Optional[list[str]] = None) -> nn.Module:
        if merge:
            self._check_merge_allowed()
        keys = [key for key, _ in self.model.named_modules() if self.prefix not in key]
        iterator: Any = keys
        if progressbar:
            from tqdm import tqdm

            iterator = tqdm(keys, disable=not progressbar, desc="Unloading " + ("and merging " if merge else "") + "model")
        for key in iterator:
            try:
                parent, target, target_name = get_submodules(self.model, key)
            except AttributeError:
                continue  # inside a module already replaced
            if isinstance(target, ParamWrapper):  # nested ones are merged and removed together
                setattr(parent, target_name, unload_param_wrappers(target, merge, safe_merge, adapter_names))
            elif isinstance(target, LoraLayer):
                if merge:
                    names = [n for n in (adapter_names or target.active_adapters) if target._holds(n)]
                    if names:
                        target.merge(safe_merge=safe_merge, adapter_names=names)
                setattr(parent, target_name, target.unload_base_layer())
            elif isinstance(target, ModulesToSaveWrapper):
                setattr(parent, target_name, target.unwrapped_module())
            elif isinstance(target, TrainableTokensWrapper):
                if merge:
                    target.merge(adapter_names, safe_merge)
                setattr(parent, target_name, target.unwrapped_module())
        return self.model

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: Optional[list[str]] = None) -> nn.Module:
        """Merge the adapters into the base weights and return the model without LoRA layers."""
        return self._unload_and_optionally_merge(True, progressbar, safe_merge, adapter_names)

    def unload(self) -> nn.Module:
        """Return the base model with the LoRA layers removed and nothing merged."""
        return self._unload_and_optionally_merge(False)

    # ------------------------------------------------------------------ mixed batches
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any):
        """Pass ``adapter_names=[...]`` on to every LoRA layer and modules_to_save wrapper."""
        return adapter_names_hooks(self.model, self.training, *args, **kwargs)
