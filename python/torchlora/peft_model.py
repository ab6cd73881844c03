"""``PeftModel`` and its task subclasses: the model-level LoRA API of PEFT (adapters, merging,
disabling, trainable-parameter counts), wrapping a ``LoraModel``."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any, Optional, Union

from torch import nn

from .config import LoraConfig, PeftType
from .nn import LoraLayer
from .tuners import LoraModel, ModulesToSaveWrapper
from .tuners.modules_to_save import set_trainable_modules

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
        if low_cpu_mem_usage:
            raise NotImplementedError("low_cpu_mem_usage=True is not supported by torchlora")
        self.active_adapter: Union[str, list[str]] = adapter_name
        self.peft_type = PeftType.LORA
        self.special_peft_forward_args = {"adapter_names"}
        self.base_model = LoraModel(model, {adapter_name: peft_config}, adapter_name,
                                    autocast_adapter_dtype=autocast_adapter_dtype)
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
        """Add a new (untrained, inactive) adapter; ``set_adapter`` activates it."""
        if not isinstance(peft_config, LoraConfig):
            raise TypeError(f"peft_config must be a torchlora LoraConfig, got {type(peft_config).__name__}")
        if low_cpu_mem_usage:
            raise NotImplementedError("low_cpu_mem_usage=True is not supported by torchlora")
        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter with name '{adapter_name}' already exists.")
        if adapter_name in "lora_":
            warnings.warn(f"Adapter name '{adapter_name}' should not be contained in the prefix 'lora_'. "
                          "This may lead to reinitialization of the adapter weights during loading.")
        self.peft_config[adapter_name] = peft_config
        try:
            self.base_model.inject_adapter(self.base_model.model, adapter_name,
                                           autocast_adapter_dtype=autocast_adapter_dtype)
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

    # ------------------------------------------------------------------ persistence (torchlora.adapter_io)
    def save_pretrained(self, save_directory: str, selected_adapters: Optional[list[str]] = None,
                        safe_serialization: bool = True, path_initial_model_for_weight_conversion: Optional[str] = None,
                        **kwargs: Any) -> None:
        """Write the adapters as PEFT does (``adapter_config.json`` + ``adapter_model.safetensors``);
        with ``path_initial_model_for_weight_conversion`` (the folder of a PiSSA / OLoRA adapter
        saved before training) converted to plain LoRA adapters for the original base weights."""
        from . import adapter_io

        adapter_io.save_pretrained(self, save_directory, selected_adapters, safe_serialization,
                                   path_initial_model_for_weight_conversion, **kwargs)

    def load_adapter(self, model_id: str, adapter_name: str, is_trainable: bool = False, **kwargs: Any) -> Any:
        """Load a saved adapter under ``adapter_name`` (frozen unless ``is_trainable``)."""
        from . import adapter_io

        return adapter_io.load_adapter(self, model_id, adapter_name, is_trainable, **kwargs)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str, adapter_name: str = "default",
                        is_trainable: bool = False, config: Optional[LoraConfig] = None, **kwargs: Any) -> "PeftModel":
        """Wrap ``model`` with the adapter saved at ``model_id``."""
        from . import adapter_io

        return adapter_io.from_pretrained(cls, model, model_id, adapter_name, is_trainable, config, **kwargs)


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
