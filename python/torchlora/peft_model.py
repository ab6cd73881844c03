"""``PeftModel`` and its task subclasses: the model-level LoRA API of PEFT (adapters, merging,
disabling, trainable-parameter counts), wrapping a ``LoraModel``."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Collection, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
from torch import Tensor, nn

from . import peft_format
from .config import LoraConfig, PeftType, validate_config_dict
from .nn import LoraLayer
from .state_dict import get_peft_model_state_dict, load_adapter_tensors
from .tuners import LoraModel, ModulesToSaveWrapper
from .tuners.modules_to_save import set_trainable_modules
from .tuners.status import TunerLayerStatus, TunerModelStatus, get_layer_status, get_model_status
from .tuners.weight_conversion import check_loadable, prepare_for_saving
from .hub import HUB_KWARGS, push_to_hub, resolve_adapter_folder, split_hub_kwargs
from .utils.distributed import gather_full_tensors

if TYPE_CHECKING:
    from .serving import AdapterServer

_CLASSIFIER_NAMES = ("classifier", "score")
_QA_NAMES = ("qa_outputs",)


def _add_modules_to_save(config: LoraConfig, names: tuple[str, ...]) -> None:
    """Add the task head's names once (a reloaded config already lists them)."""
    if config.modules_to_save is None:
        config.modules_to_save = list(names)
    else:
        config.modules_to_save.extend(n for n in names if n not in config.modules_to_save)


class PeftModel(nn.Module):
    """A model with LoRA adapters: ``base_model`` is the ``LoraModel`` and
    ``base_model.model`` (also ``get_base_model()``) the adapted model itself."""

    def __init__(self, model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False) -> None:
        super().__init__()
        if not isinstance(peft_config, LoraConfig):
            raise TypeError(f"peft_config must be a torchlora LoraConfig, got {type(peft_config).__name__}")
        self.active_adapter: Union[str, list[str]] = adapter_name
        self.peft_type = PeftType.LORA
        self.special_peft_forward_args = {"adapter_names"}
        self.base_model = LoraModel(model, {adapter_name: peft_config}, adapter_name,
                                    autocast_adapter_dtype=autocast_adapter_dtype,
                                    low_cpu_mem_usage=low_cpu_mem_usage)
        checkpointing = getattr(model, "is_activation_checkpointing", None)
        if checkpointing is None:
            checkpointing = getattr(model, "is_gradient_checkpointing", True)
        if checkpointing:
            self._prepare_model_for_gradient_checkpointing(model)
        if hasattr(self.base_model, "config") and hasattr(self.base_model.config, "pretraining_tp"):
            self.base_model.config.pretraining_tp = 1
        self._adapters_disabled = False

    # ------------------------------------------------------------------ attributes
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    @property
    def peft_config(self) -> dict[str, LoraConfig]:
        return self.base_model.peft_config

    @property
    def active_adapters(self) -> list[str]:
        return self.base_model.active_adapters

    @property
    def active_peft_config(self) -> LoraConfig:
        return self.peft_config[self.active_adapter]

    @property
    def modules_to_save(self) -> Optional[set[str]]:
        names: set[str] = set()
        for config in self.peft_config.values():
            if config.modules_to_save:
                names.update(config.modules_to_save)
        return names or None

    def get_base_model(self) -> nn.Module:
        """The adapted model (with its LoRA layers)."""
        return self.base_model.model

    @property
    def base_model_torch_dtype(self) -> Optional[torch.dtype]:
        """The base model's ``dtype`` (transformers models have one), None otherwise."""
        return getattr(self.base_model, "dtype", None)

    @property
    def has_active_enabled_adapter(self) -> bool:
        """False only while the adapters are disabled (``disable_adapter``) and some are active."""
        return not self._adapters_disabled or not self.active_adapters

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """Whether the adapters are additive (``W + delta``), see ``LoraModel.supports_lora_conversion``."""
        return self.base_model.supports_lora_conversion()

    def get_prompt(self, batch_size: int, task_ids: Optional[Tensor] = None,
                   max_cache_len: Optional[int] = None) -> Tensor:
        """Prompt learning only; LoRA models have no prompt encoder, so this raises AttributeError
        (the error PEFT gives for a LoRA model)."""
        raise AttributeError("get_prompt is for prompt learning only; LoRA models have no prompt encoder")

    def get_prompt_embedding_to_save(self, adapter_name: str) -> Tensor:
        """Prompt learning only; LoRA models have no prompt encoder, so this raises AttributeError
        (the error PEFT gives for a LoRA model)."""
        raise AttributeError("get_prompt_embedding_to_save is for prompt learning only; LoRA models have no "
                             "prompt encoder")

    def prepare_model_for_gradient_checkpointing(self, model: nn.Module) -> None:
        """Make the inputs of checkpointed blocks require grad when the embeddings are frozen
        (not for quantized models), as ``PeftModel`` does at construction."""
        self._prepare_model_for_gradient_checkpointing(model)

    def create_or_update_model_card(self, output_dir: str) -> None:
        """Write (or update) ``<output_dir>/README.md`` as PEFT does: ``library_name: peft`` (the
        files are PEFT's format), the tags and base model, and the framework versions. Not
        called by ``save_pretrained``; needs ``huggingface_hub``."""
        from .model_card import update_model_card

        update_model_card(self, output_dir)

    @staticmethod
    def _prepare_model_for_gradient_checkpointing(model: nn.Module) -> nn.Module:
        # with a frozen embedding the checkpointed blocks would see inputs without grad
        if not any(getattr(model, a, False) for a in ("is_loaded_in_8bit", "is_loaded_in_4bit", "is_quantized")):
            if hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()
            elif hasattr(model, "get_input_embeddings"):
                def make_inputs_require_grad(module, inputs, output):
                    output.requires_grad_(True)

                model.get_input_embeddings().register_forward_hook(make_inputs_require_grad)
        return model

    # ------------------------------------------------------------------ forward
    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        if self._adapters_disabled:
            yield
            return
        with self.base_model._enable_peft_forward_hooks(*args, **kwargs):
            yield

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The adapted model's forward; ``adapter_names=[...]`` selects an adapter per sample."""
        with self._enable_peft_forward_hooks(*args, **kwargs):
            kwargs = {k: v for k, v in kwargs.items() if k not in self.special_peft_forward_args}
            return self.get_base_model()(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The adapted model's ``generate`` (``adapter_names`` allowed as in ``forward``)."""
        with self._enable_peft_forward_hooks(*args, **kwargs):
            kwargs = {k: v for k, v in kwargs.items() if k not in self.special_peft_forward_args}
            return self.get_base_model().generate(*args, **kwargs)

    # ------------------------------------------------------------------ parameters
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable parameters, all parameters)."""
        trainable, total = 0, 0
        for _, param in self.named_parameters():
            total += param.numel()
            if param.requires_grad:
                trainable += param.numel()
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Print ``trainable params: X || all params: Y || trainable%: Z`` (PEFT's format)."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")

    def serve_adapters(self, **kwargs: Any) -> "AdapterServer":
        """An :class:`torchlora.serving.AdapterServer` over this model: adapters loaded from PEFT
        folders into a pool of slots, served through this model's LoRA layers, one forward per
        batch whatever its adapters. ``kwargs``: the server's (``max_loras``, ``max_lora_rank``,
        ``max_cpu_loras``, ``max_batch_size``, ``max_wait_ms``, ...)."""
        from .serving import AdapterServer

        return AdapterServer(self, **kwargs)

    # ------------------------------------------------------------------ adapters
    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """``with model.disable_adapter(): ...`` runs the base model alone."""
        enabled_before = self._any_adapter_enabled()
        was_disabled = self._adapters_disabled
        try:
            self.base_model.disable_adapter_layers()
            self._adapters_disabled = True
            yield
        finally:
            if enabled_before:
                self.base_model.enable_adapter_layers()
            self._adapters_disabled = was_disabled

    def _any_adapter_enabled(self) -> bool:
        layers = [m for m in self.modules() if isinstance(m, (LoraLayer, ModulesToSaveWrapper))]
        return any(not m.disable_adapters for m in layers)

    def add_adapter(self, adapter_name: str, peft_config: LoraConfig, low_cpu_mem_usage: bool = False,
                    autocast_adapter_dtype: bool = True) -> None:
        """Add a new (untrained, inactive) adapter; ``set_adapter`` activates it.

        With ``low_cpu_mem_usage`` its LoRA weights are created on the meta device, to be filled
        by loading a saved adapter (``set_peft_model_state_dict``); not for training from scratch.
        """
        if not isinstance(peft_config, LoraConfig):
            raise TypeError(f"peft_config must be a torchlora LoraConfig, got {type(peft_config).__name__}")
        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter with name '{adapter_name}' already exists.")
        if adapter_name in "lora_":
            warnings.warn(f"Adapter name '{adapter_name}' should not be contained in the prefix 'lora_'. "
                          "This may lead to reinitialization of the adapter weights during loading.")
        self.peft_config[adapter_name] = peft_config
        try:
            self.base_model.inject_adapter(self.base_model.model, adapter_name,
                                           autocast_adapter_dtype=autocast_adapter_dtype,
                                           low_cpu_mem_usage=low_cpu_mem_usage)
        except Exception:
            del self.peft_config[adapter_name]
            raise

    def set_adapter(self, adapter_name: str, inference_mode: bool = False) -> None:
        """Make ``adapter_name`` the active adapter (trainable unless ``inference_mode``)."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} not found.")
        self.active_adapter = adapter_name
        self.base_model.set_adapter(adapter_name, inference_mode=inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter; if it was active another one becomes active."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} does not exist")
        self.base_model.delete_adapter(adapter_name)
        remaining = self.active_adapters
        if len(remaining) == 1:
            self.active_adapter = remaining[0]

    def set_requires_grad(self, adapter_names: Union[str, Sequence[str]], requires_grad: bool = True) -> None:
        """Enable (or with ``requires_grad=False`` disable) gradients of the given adapters."""
        self.base_model.set_requires_grad(adapter_names, requires_grad)

    def get_layer_status(self) -> list[TunerLayerStatus]:
        """The status of every adapter layer (:func:`torchlora.get_layer_status`)."""
        return get_layer_status(self)

    def get_model_status(self) -> TunerModelStatus:
        """The status of the model's adapters as a whole (:func:`torchlora.get_model_status`)."""
        return get_model_status(self)

    # ------------------------------------------------------------------ persistence (files: torchlora.peft_format)
    def save_pretrained(self, save_directory: str, safe_serialization: bool = True,
                        selected_adapters: Optional[list[str]] = None, save_embedding_layers: Union[str, bool] = "auto",
                        is_main_process: bool = True, path_initial_model_for_weight_conversion: Optional[str] = None,
                        **kwargs: Any) -> None:
        """Write the adapters as PEFT does: "default" in ``save_directory``, others in
        ``<dir>/<name>``, each as ``adapter_config.json`` + ``adapter_model.safetensors`` (or
        ``adapter_model.bin`` without ``safe_serialization``).

        ``save_embedding_layers`` ("auto", True or False) also saves the base embedding layers;
        ``is_main_process=False`` writes nothing, but still takes part in gathering the weights of
        a model sharded with FSDP2 (``fully_shard``): call this on every rank, with
        ``is_main_process=(rank == 0)``; ``state_dict=`` (keyword) takes the weights from
        that state dict instead of the model. ``path_initial_model_for_weight_conversion`` (PiSSA /
        OLoRA adapters): the folder of the adapter saved right after initialisation; the adapter
        is then written converted to a plain LoRA adapter for the original base weights.
        """
        _check_kwargs(kwargs, _SAVE_KWARGS, "save_pretrained")
        if os.path.isfile(save_directory):
            raise ValueError(f"save directory {save_directory!r} is a file, expected a folder")
        selected_adapters = self._check_selected_adapters(selected_adapters)
        for adapter_name in selected_adapters:
            tensors = get_peft_model_state_dict(self, state_dict=kwargs.get("state_dict"), adapter_name=adapter_name,
                                                save_embedding_layers=save_embedding_layers)
            # FSDP2 shards are gathered on every rank (a collective), then only the main process writes
            tensors = gather_full_tensors(tensors)
            if not is_main_process:
                continue
            tensors, config_dict = prepare_for_saving(tensors, self._saved_config_dict(adapter_name),
                                                      path_initial_model_for_weight_conversion)
            peft_format.write_adapter_files(peft_format.adapter_folder(save_directory, adapter_name),
                                            peft_format.config_to_peft_json(config_dict), tensors,
                                            safe_serialization=safe_serialization)

    def push_to_hub(self, repo_id: str, commit_message: Optional[str] = None, private: Optional[bool] = None,
                    token: Union[bool, str, None] = None, revision: Optional[str] = None, create_pr: bool = False,
                    commit_description: Optional[str] = None, **save_kwargs: Any) -> Any:
        """Save the adapters (``save_pretrained(folder, **save_kwargs)``) and upload the folder to
        the Hub repository ``repo_id``, created if needed, through ``huggingface_hub``."""
        return push_to_hub(self.save_pretrained, repo_id, commit_message=commit_message, private=private,
                           token=token, revision=revision, create_pr=create_pr,
                           commit_description=commit_description, **save_kwargs)

    def _check_selected_adapters(self, selected_adapters: Optional[list[str]]) -> list[str]:
        if selected_adapters is None:
            return list(self.peft_config)
        if isinstance(selected_adapters, str) or not all(isinstance(n, str) for n in selected_adapters):
            raise TypeError(f"selected_adapters must be a list of adapter names, got {selected_adapters!r}")
        unknown = [name for name in selected_adapters if name not in self.peft_config]
        if unknown:
            raise ValueError(f"You passed an invalid `selected_adapters` arguments, current supported adapter names are "
                             f"{list(self.peft_config)} - but you passed {unknown}")
        return list(selected_adapters)

    def _saved_config_dict(self, adapter_name: str) -> dict[str, Any]:
        """The config fields of a saved adapter (the config itself is not changed)."""
        config_dict = self.peft_config[adapter_name].to_dict()
        base = self.get_base_model()
        if config_dict.get("base_model_name_or_path") is None:
            config_dict["base_model_name_or_path"] = base.__dict__.get("name_or_path") or None
        config_dict["inference_mode"] = True  # a saved adapter is loaded for inference unless asked otherwise
        if config_dict.get("task_type") is None and config_dict.get("auto_mapping") is None:
            # without a task type, PEFT's AutoPeftModel finds the model class from this entry
            config_dict["auto_mapping"] = {"base_model_class": type(base).__name__,
                                           "parent_library": type(base).__module__}
        return config_dict

    def load_adapter(self, model_id: Union[str, os.PathLike], adapter_name: str, is_trainable: bool = False,
                     torch_device: Optional[str] = None, autocast_adapter_dtype: bool = True,
                     ephemeral_gpu_offload: bool = False, low_cpu_mem_usage: bool = False,
                     key_mapping: Optional[dict[str, str]] = None, **kwargs: Any) -> None:
        """Add ``adapter_name`` from the folder ``model_id`` (its config) and load its weights strictly.

        The adapter is not activated (``set_adapter`` does that) and is frozen unless
        ``is_trainable``. Files are read and checked before the model changes; the adapter's
        weights are created empty and filled from the file (never randomly initialised first,
        whatever ``low_cpu_mem_usage`` says); if the weights do not fit, the half-added adapter
        is removed again.
        """
        _check_kwargs(kwargs, _LOAD_KWARGS, "load_adapter")
        _check_unsupported_load_options(ephemeral_gpu_offload, key_mapping)
        if not isinstance(adapter_name, str) or not adapter_name:
            raise ValueError(f"adapter_name must be a non-empty string, got {adapter_name!r}")
        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter with name '{adapter_name}' already exists.")
        folder, config_json, tensors, weights_path = _read_adapter_folder(model_id, kwargs.get("subfolder"), **split_hub_kwargs(kwargs)[0])
        config = _config_from_json(config_json, os.path.join(folder, peft_format.CONFIG_NAME))
        check_loadable(config, folder)
        config.inference_mode = not is_trainable
        self.add_adapter(adapter_name, config, low_cpu_mem_usage=True, autocast_adapter_dtype=autocast_adapter_dtype)
        try:
            self._load_adapter_file(adapter_name, tensors, weights_path, torch_device)
        except BaseException:
            self.delete_adapter(adapter_name)
            raise
        self._finish_loading(adapter_name, is_trainable)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: Union[str, os.PathLike], adapter_name: str = "default",
                        is_trainable: bool = False, config: Optional[LoraConfig] = None,
                        autocast_adapter_dtype: bool = True, ephemeral_gpu_offload: bool = False,
                        low_cpu_mem_usage: bool = False, key_mapping: Optional[dict[str, str]] = None,
                        **kwargs: Any) -> "PeftModel":
        """Wrap ``model`` with the adapter saved in the folder or Hub repository ``model_id`` (PEFT's
        or torchlora's; a Hub id is resolved through ``huggingface_hub``, from its cache when offline).

        On ``PeftModel`` the task subclass comes from the config's ``task_type``. Loaded adapters
        are frozen and the model is in eval mode unless ``is_trainable``. The adapter's weights
        are created empty and filled from the file (as PEFT does with ``low_cpu_mem_usage=True``;
        torchlora always loads this way). If the weights do not fit, ``model`` is restored before
        the error is raised. ``subfolder=``, ``torch_device=`` and the Hub keywords (``revision=``,
        ``token=``, ``cache_dir=``, ``local_files_only=``, ``force_download=``) are accepted as in PEFT.
        """
        from .mapping import MODEL_TYPE_TO_PEFT_MODEL_MAPPING

        _check_kwargs(kwargs, _LOAD_KWARGS, "from_pretrained")
        _check_unsupported_load_options(ephemeral_gpu_offload, key_mapping)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        folder, config_json, tensors, weights_path = _read_adapter_folder(model_id, kwargs.get("subfolder"), **split_hub_kwargs(kwargs)[0])
        if config is None:
            config = _config_from_json(config_json, os.path.join(folder, peft_format.CONFIG_NAME))
        elif not isinstance(config, LoraConfig):
            raise TypeError(f"config must be a torchlora LoraConfig, got {type(config).__name__}")
        check_loadable(config, folder)
        config.inference_mode = not is_trainable
        if cls is PeftModel:
            cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(config.task_type, PeftModel)
        peft_model = cls(model, config, adapter_name=adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                         low_cpu_mem_usage=True)
        try:
            peft_model._load_adapter_file(adapter_name, tensors, weights_path, kwargs.get("torch_device"))
        except BaseException:
            peft_model.unload()  # give the caller its model back without LoRA layers
            raise
        peft_model._finish_loading(adapter_name, is_trainable)
        return peft_model

    def _load_adapter_file(self, adapter_name: str, tensors: dict[str, Tensor], weights_path: str,
                           torch_device: Optional[str]) -> None:
        """Fill the (empty) adapter with a file's tensors: keys and values checked by the format,
        shapes where they are loaded."""
        expected = get_peft_model_state_dict(self, adapter_name=adapter_name, save_embedding_layers=False)
        optional: Collection[str] = ()
        if any(key not in expected for key in tensors):
            optional = self._embedding_layer_keys(adapter_name)
        peft_format.check_adapter_file(weights_path, tensors, required=expected, optional=optional)
        if torch_device is not None:
            tensors = {key: value.to(torch_device) for key, value in tensors.items()}
        result = load_adapter_tensors(self, tensors, adapter_name, source=weights_path)
        if result.missing_keys:  # every required key was checked above; anything left is a bug, not a warning
            raise ValueError(f"{weights_path}: adapter weights not loaded: {result.missing_keys[:5]}")

    def _embedding_layer_keys(self, adapter_name: str) -> list[str]:
        """Keys of the base embedding layers PEFT saves beside an adapter that targets them (or
        after a vocabulary resize); a file may hold them and they load into the base model."""
        if not hasattr(self, "get_input_embeddings"):  # not a transformers model: no such layers
            return []
        try:
            return list(get_peft_model_state_dict(self, adapter_name=adapter_name, save_embedding_layers=True))
        except NotImplementedError:  # a transformers model without input embeddings (vision models)
            return []

    def _finish_loading(self, adapter_name: str, is_trainable: bool) -> None:
        self.set_requires_grad(adapter_name, requires_grad=is_trainable)
        if not is_trainable:
            self.eval()


_SAVE_KWARGS = frozenset({"state_dict"})
_LOAD_KWARGS = frozenset({"subfolder", "torch_device"}) | HUB_KWARGS


def _check_kwargs(kwargs: dict[str, Any], allowed: frozenset[str], function: str) -> None:
    unexpected = sorted(set(kwargs) - allowed)
    if unexpected:
        raise TypeError(f"{function}() got unexpected arguments {unexpected} (supported: {sorted(allowed)})")


def _check_unsupported_load_options(ephemeral_gpu_offload: bool, key_mapping: Optional[dict[str, str]]) -> None:
    if ephemeral_gpu_offload:
        raise NotImplementedError("ephemeral_gpu_offload=True is not supported by torchlora")
    if key_mapping:
        raise NotImplementedError("key_mapping is not supported by torchlora")


def _read_adapter_folder(model_id: Union[str, os.PathLike], subfolder: Optional[str],
                         **hub_kwargs: Any) -> tuple[str, dict[str, Any], dict[str, Tensor], str]:
    """(folder, adapter_config.json content, tensors, weights file) of a local folder or a Hub
    repository id (``hub_kwargs``: ``revision``, ``token``, ``cache_dir``, ...): everything is
    read and checked before a model changes."""
    folder = resolve_adapter_folder(model_id, subfolder, **hub_kwargs)
    config_json = peft_format.read_adapter_config(folder)
    tensors, weights_path = peft_format.read_adapter_weights(folder)
    return folder, config_json, tensors, weights_path


def _config_from_json(config_json: dict[str, Any], source: str) -> LoraConfig:
    """torchlora's ``LoraConfig`` from an ``adapter_config.json`` dict; errors name ``source``."""
    data = {key: value for key, value in config_json.items() if key != "runtime_config"}
    return LoraConfig(**validate_config_dict(data, source))


class _TaskForward(PeftModel):
    """Task models with PEFT's explicit ``forward`` signature (the Trainer keeps only the dataset
    columns a model's signature names)."""

    def _task_forward(self, task_ids: Any, named: dict[str, Any], kwargs: dict[str, Any]) -> Any:
        if task_ids is not None:
            raise TypeError("task_ids is only used by multitask prompt methods, not by LoRA")
        with self._enable_peft_forward_hooks(**kwargs):
            kwargs = {k: v for k, v in kwargs.items() if k not in self.special_peft_forward_args}
            return self.get_base_model()(**named, **kwargs)


class _LabelledForward(_TaskForward):
    """The forward signature of task models that take ``labels`` (the Trainer keeps only the
    dataset columns that ``forward`` names)."""

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, task_ids=None, **kwargs: Any) -> Any:
        named = dict(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, labels=labels,
                     output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                     return_dict=return_dict)
        return self._task_forward(task_ids, named, kwargs)


class PeftModelForCausalLM(_LabelledForward):
    """PeftModel for causal language models (``forward`` and ``generate`` pass through)."""


class PeftModelForSeq2SeqLM(_TaskForward):
    """PeftModel for encoder-decoder models (``forward`` and ``generate`` pass through)."""

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, decoder_input_ids=None,
                decoder_attention_mask=None, decoder_inputs_embeds=None, labels=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, task_ids=None, **kwargs: Any) -> Any:
        named = dict(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                     decoder_input_ids=decoder_input_ids, decoder_attention_mask=decoder_attention_mask,
                     decoder_inputs_embeds=decoder_inputs_embeds, labels=labels,
                     output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                     return_dict=return_dict)
        return self._task_forward(task_ids, named, kwargs)


class PeftModelForFeatureExtraction(_TaskForward):
    """PeftModel for models that return hidden states."""

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, task_ids=None, **kwargs: Any) -> Any:
        named = dict(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                     output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                     return_dict=return_dict)
        return self._task_forward(task_ids, named, kwargs)


class PeftModelForSequenceClassification(_LabelledForward):
    """PeftModel for sequence classification: the ``classifier`` / ``score`` head is trained
    and saved whole (added to ``modules_to_save``)."""

    def __init__(self, model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default",
                 **kwargs: Any) -> None:
        # before injection, so that LoRA layers are not put into the head
        _add_modules_to_save(peft_config, _CLASSIFIER_NAMES)
        super().__init__(model, peft_config, adapter_name, **kwargs)
        self.cls_layer_name = _first_child_named(self.base_model, self.modules_to_save)
        set_trainable_modules(self.base_model.model, adapter_name, peft_config.modules_to_save,
                              peft_config.inference_mode)

    def add_adapter(self, adapter_name: str, peft_config: LoraConfig, **kwargs: Any) -> None:
        _add_modules_to_save(peft_config, _CLASSIFIER_NAMES)
        super().add_adapter(adapter_name, peft_config, **kwargs)


class _HeadAfterInjection(_TaskForward):
    """Task models whose head joins ``modules_to_save`` after injection (as PEFT does)."""

    head_names: tuple[str, ...] = ()

    def __init__(self, model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default",
                 **kwargs: Any) -> None:
        super().__init__(model, peft_config, adapter_name, **kwargs)
        _add_modules_to_save(peft_config, self.head_names)
        self.cls_layer_name = _first_child_named(self.base_model, self.modules_to_save)
        set_trainable_modules(self.base_model.model, adapter_name, peft_config.modules_to_save,
                              peft_config.inference_mode)

    def add_adapter(self, adapter_name: str, peft_config: LoraConfig, **kwargs: Any) -> None:
        _add_modules_to_save(peft_config, self.head_names)
        super().add_adapter(adapter_name, peft_config, **kwargs)


class PeftModelForTokenClassification(_HeadAfterInjection):
    """PeftModel for token classification (the ``classifier`` / ``score`` head is saved whole)."""

    head_names = _CLASSIFIER_NAMES
    forward = _LabelledForward.forward


class PeftModelForQuestionAnswering(_HeadAfterInjection):
    """PeftModel for extractive question answering (the ``qa_outputs`` head is saved whole)."""

    head_names = _QA_NAMES

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, start_positions=None, end_positions=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, task_ids=None, **kwargs: Any) -> Any:
        named = dict(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                     position_ids=position_ids, inputs_embeds=inputs_embeds, start_positions=start_positions,
                     end_positions=end_positions, output_attentions=output_attentions,
                     output_hidden_states=output_hidden_states, return_dict=return_dict)
        return self._task_forward(task_ids, named, kwargs)


def _first_child_named(module: nn.Module, names: Optional[set[str]]) -> Optional[str]:
    for name, _ in module.named_children():
        if names and any(n in name for n in names):
            return name
    return None
