"""``AutoPeftModel`` and its task classes: load the base model named in an adapter's config with
transformers' matching ``AutoModel*`` class, then the adapter on it, from a local folder or a Hub
repository id, as PEFT's ``peft.auto`` does.

transformers is imported only when one of these classes loads a model.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Optional, Union

from torch import nn

from .config import LoraConfig, TaskType
from .hub import has_tokenizer, split_hub_kwargs
from .mapping import MODEL_TYPE_TO_PEFT_MODEL_MAPPING
from .peft_model import (
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)

# What PeftModel.from_pretrained takes besides the Hub options; everything else goes to the base model.
_ADAPTER_KWARGS = frozenset({"subfolder", "torch_device", "autocast_adapter_dtype", "ephemeral_gpu_offload",
                             "low_cpu_mem_usage", "key_mapping"})


def get_default_import_allowlist() -> list[str]:
    """The packages an adapter's ``auto_mapping`` may name (PEFT's defaults)."""
    return ["diffusers", "lerobot", "megatron-core", "transformers"]


def check_import_allowlist(allowlist: list[str], parent_name: str) -> bool:
    """Whether ``parent_name`` is in ``allowlist`` or inside one of its packages: ``auto_mapping``
    comes from a downloaded file, and importing what it names must not run arbitrary code."""
    return parent_name in allowlist or any(parent_name.startswith(f"{allowed}.") for allowed in allowlist)


class _BaseAutoPeftModel:
    _target_class: Optional[str] = None  # the transformers Auto class, by name
    _target_peft_class: type[PeftModel] = PeftModel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise EnvironmentError(  # noqa: UP024 - the error transformers' Auto classes raise
            f"{type(self).__name__} is designed to be instantiated using the "
            f"`{type(self).__name__}.from_pretrained(pretrained_model_name_or_path)` method.")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], adapter_name: str = "default",
                        is_trainable: bool = False, config: Optional[LoraConfig] = None,
                        revision: Optional[str] = None, import_allowlist: Optional[list[str]] = None,
                        **kwargs: Any) -> PeftModel:
        """The base model of the adapter at ``pretrained_model_name_or_path`` (a folder or a Hub id,
        at ``revision``), loaded from the config's ``base_model_name_or_path`` at the config's
        ``revision``, with the adapter on it (``PeftModel.from_pretrained``).

        Hub options (``token``, ``cache_dir``, ``local_files_only``, ``force_download``) apply to
        the adapter and to the base model; ``subfolder`` and ``torch_device`` to the adapter only;
        other keywords (``torch_dtype``, ``device_map``, ...) go to the base model's
        ``from_pretrained``. ``import_allowlist``: the packages an ``auto_mapping`` may import.
        """
        hub_kwargs, rest = split_hub_kwargs(kwargs)
        hub_kwargs.pop("revision", None)  # the argument of this function, not a keyword
        adapter_kwargs = {k: v for k, v in rest.items() if k in _ADAPTER_KWARGS}
        model_kwargs = {k: v for k, v in rest.items() if k not in _ADAPTER_KWARGS}
        peft_config = LoraConfig.from_pretrained(pretrained_model_name_or_path, subfolder=adapter_kwargs.get("subfolder"),
                                                 revision=revision, **hub_kwargs)
        target_class = cls._resolve_target_class(peft_config, import_allowlist)
        if peft_config.base_model_name_or_path is None:
            raise ValueError(f"the adapter at {os.fspath(pretrained_model_name_or_path)!r} names no base model "
                             "(base_model_name_or_path); load the base model yourself and use PeftModel.from_pretrained")
        base_model = target_class.from_pretrained(peft_config.base_model_name_or_path,
                                                  revision=peft_config.revision, **hub_kwargs, **model_kwargs)
        cls._resize_to_tokenizer(base_model, pretrained_model_name_or_path, revision, hub_kwargs,
                                 model_kwargs.get("trust_remote_code", False))
        return cls._target_peft_class.from_pretrained(
            base_model, pretrained_model_name_or_path, adapter_name=adapter_name, is_trainable=is_trainable,
            config=config if config is not None else peft_config, revision=revision, **hub_kwargs, **adapter_kwargs)

    @classmethod
    def _resolve_target_class(cls, peft_config: LoraConfig, import_allowlist: Optional[list[str]]) -> Any:
        """The class that loads the base model: this class's Auto class, checked against the
        config's task type, or for ``AutoPeftModel`` the config's ``auto_mapping``."""
        task_type = peft_config.task_type
        if cls._target_class is None and task_type is not None:
            raise ValueError("Cannot use `AutoPeftModel` with a task type, please use a specific class for your task "
                             "type. (e.g. `AutoPeftModelForCausalLM` for `task_type='CAUSAL_LM'`)")
        if task_type is not None:
            expected = MODEL_TYPE_TO_PEFT_MODEL_MAPPING[TaskType(task_type)]
            if cls._target_peft_class is not expected:
                raise ValueError(f"Expected target PEFT class: {expected.__name__}, but you have asked for: "
                                 f"{cls._target_peft_class.__name__} make sure that you are loading the correct model "
                                 "for your task type.")
        if cls._target_class is not None:
            return getattr(importlib.import_module("transformers"), cls._target_class)
        auto_mapping = peft_config.auto_mapping
        if not auto_mapping:
            raise ValueError("Cannot infer the auto class from the config, please make sure that you are loading the "
                             "correct model for your task type.")
        if not isinstance(auto_mapping, dict) or not {"base_model_class", "parent_library"} <= set(auto_mapping):
            raise ValueError(f"auto_mapping must name base_model_class and parent_library, got {auto_mapping!r}")
        parent = auto_mapping["parent_library"]
        allowlist = get_default_import_allowlist() if import_allowlist is None else import_allowlist
        if not check_import_allowlist(allowlist, parent):
            raise ValueError(f"The auto mapping wants to import '{parent}' which is not in the import allowlist. If you "
                             f"are sure that importing this library is safe, specify `import_allowlist=['{parent}']` "
                             "in `from_pretrained()`.")
        target = getattr(importlib.import_module(parent), auto_mapping["base_model_class"], None)
        if target is None or not hasattr(target, "from_pretrained"):
            raise ValueError(f"auto_mapping names {auto_mapping['base_model_class']!r} in {parent!r}, which is not a "
                             "class with from_pretrained")
        return target

    @staticmethod
    def _resize_to_tokenizer(base_model: nn.Module, model_id: Union[str, os.PathLike], revision: Optional[str],
                             hub_kwargs: dict[str, Any], trust_remote_code: bool) -> None:
        """As PEFT: an adapter saved with a tokenizer larger than the base vocabulary (new tokens
        added while training) grows the base model's embeddings to it before the adapter loads."""
        if not hasattr(base_model, "get_input_embeddings"):
            return
        if not has_tokenizer(model_id, revision=revision, **hub_kwargs):
            return
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_id, revision=revision, token=hub_kwargs.get("token"),
                                                  cache_dir=hub_kwargs.get("cache_dir"),
                                                  trust_remote_code=trust_remote_code)
        if len(tokenizer) > base_model.get_input_embeddings().weight.shape[0]:
            base_model.resize_token_embeddings(len(tokenizer))


class AutoPeftModel(_BaseAutoPeftModel):
    """A base model of the class its adapter's ``auto_mapping`` names, with the adapter (no task type)."""

    _target_class = None
    _target_peft_class = PeftModel


class AutoPeftModelForCausalLM(_BaseAutoPeftModel):
    """``AutoModelForCausalLM`` + ``PeftModelForCausalLM``."""

    _target_class = "AutoModelForCausalLM"
    _target_peft_class = PeftModelForCausalLM


class AutoPeftModelForSeq2SeqLM(_BaseAutoPeftModel):
    """``AutoModelForSeq2SeqLM`` + ``PeftModelForSeq2SeqLM``."""

    _target_class = "AutoModelForSeq2SeqLM"
    _target_peft_class = PeftModelForSeq2SeqLM


class AutoPeftModelForSequenceClassification(_BaseAutoPeftModel):
    """``AutoModelForSequenceClassification`` + ``PeftModelForSequenceClassification``."""

    _target_class = "AutoModelForSequenceClassification"
    _target_peft_class = PeftModelForSequenceClassification


class AutoPeftModelForTokenClassification(_BaseAutoPeftModel):
    """``AutoModelForTokenClassification`` + ``PeftModelForTokenClassification``."""

    _target_class = "AutoModelForTokenClassification"
    _target_peft_class = PeftModelForTokenClassification


class AutoPeftModelForQuestionAnswering(_BaseAutoPeftModel):
    """``AutoModelForQuestionAnswering`` + ``PeftModelForQuestionAnswering``."""

    _target_class = "AutoModelForQuestionAnswering"
    _target_peft_class = PeftModelForQuestionAnswering


class AutoPeftModelForFeatureExtraction(_BaseAutoPeftModel):
    """``AutoModel`` + ``PeftModelForFeatureExtraction``."""

    _target_class = "AutoModel"
    _target_peft_class = PeftModelForFeatureExtraction

