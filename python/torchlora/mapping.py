"""``get_peft_model`` and ``inject_adapter_in_model``: the entry points that add LoRA to a model."""

from __future__ import annotations

import warnings
from typing import Optional

from torch import nn

from .config import LoraConfig, TaskType
from .nn import LoraLayer
from .peft_model import (
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)
from .tuners import LoraModel

MODEL_TYPE_TO_PEFT_MODEL_MAPPING: dict[TaskType, type[PeftModel]] = {
    TaskType.SEQ_CLS: PeftModelForSequenceClassification,
    TaskType.SEQ_2_SEQ_LM: PeftModelForSeq2SeqLM,
    TaskType.CAUSAL_LM: PeftModelForCausalLM,
    TaskType.TOKEN_CLS: PeftModelForTokenClassification,
    TaskType.QUESTION_ANS: PeftModelForQuestionAnswering,
    TaskType.FEATURE_EXTRACTION: PeftModelForFeatureExtraction,
}


def _check_config(peft_config: object) -> None:
    if not isinstance(peft_config, LoraConfig):
        raise TypeError(f"peft_config must be a torchlora LoraConfig, got {type(peft_config).__name__}")


def get_peft_model(model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default", mixed: bool = False,
                   autocast_adapter_dtype: bool = True, revision: Optional[str] = None,
                   low_cpu_mem_usage: bool = False) -> PeftModel:
    """Wrap ``model`` in a ``PeftModel`` (the subclass for ``peft_config.task_type``) with one
    LoRA adapter named ``adapter_name``; only the adapter's weights are left trainable. With
    ``low_cpu_mem_usage`` the LoRA weights are created on the meta device, to be filled by
    loading a saved adapter (``set_peft_model_state_dict``); not for training from scratch."""
    _check_config(peft_config)
    if mixed:
        raise NotImplementedError("mixed=True (PeftMixedModel) is not supported by torchlora")
    old_name = peft_config.base_model_name_or_path
    new_name = model.__dict__.get("name_or_path", None) or None
    peft_config.base_model_name_or_path = new_name
    if any(isinstance(module, LoraLayer) for module in model.modules()):
        warnings.warn("You are trying to modify a model with PEFT for a second time. If you want to reload the model "
                      "with a different config, make sure to call `.unload()` before.")
    if old_name is not None and old_name != new_name:
        warnings.warn(f"The PEFT config's `base_model_name_or_path` was renamed from '{old_name}' to '{new_name}'. "
                      "Please ensure that the correct base model is loaded when loading this checkpoint.")
    if revision is not None:
        if peft_config.revision is not None and peft_config.revision != revision:
            warnings.warn(f"peft config has already set base model revision to {peft_config.revision}, "
                          f"overwriting with revision {revision}")
        peft_config.revision = revision
    if adapter_name in "lora_":
        warnings.warn(f"Adapter name '{adapter_name}' should not be contained in the prefix 'lora_'. "
                      "This may lead to reinitialization of the adapter weights during loading.")
    cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(peft_config.task_type, PeftModel)
    return cls(model, peft_config, adapter_name=adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
               low_cpu_mem_usage=low_cpu_mem_usage)


def inject_adapter_in_model(peft_config: LoraConfig, model: nn.Module, adapter_name: str = "default",
                            low_cpu_mem_usage: bool = False, state_dict: Optional[dict] = None) -> nn.Module:
    """Put LoRA layers into ``model`` in place and return it (no ``PeftModel`` wrapper); the
    model gets a ``peft_config`` dict attribute. With ``low_cpu_mem_usage`` the LoRA weights
    are created on the meta device, to be filled by ``set_peft_model_state_dict``."""
    _check_config(peft_config)
    if state_dict is not None:
        raise NotImplementedError("inject_adapter_in_model(state_dict=...) is not supported by torchlora")
    return LoraModel(model, peft_config, adapter_name=adapter_name, low_cpu_mem_usage=low_cpu_mem_usage).model
