"""Former home of adapter saving and loading, kept so that existing imports work.

The file format lives in ``torchlora.peft_format``; saving and loading a model are
``PeftModel.save_pretrained``, ``PeftModel.load_adapter`` and ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from torch import nn

from .peft_format import (
    CONFIG_NAME,
    PEFT_BASELINE_KEYS,
    PEFT_KEY_PREFIX,
    PEFT_LORA_CONFIG_KEYS,
    SAFETENSORS_WEIGHTS_NAME,
    WEIGHTS_NAME,
    adapter_folder,
    adapter_weights_path,
    atomic_write,
    check_adapter_file,
    config_to_peft_json,
    read_adapter_config,
    read_adapter_weights,
    write_adapter_files,
)

if TYPE_CHECKING:  # pragma: no cover
    from .config import LoraConfig
    from .peft_model import PeftModel


def config_from_json(config_json: dict[str, Any], source: str) -> "LoraConfig":
    """torchlora's ``LoraConfig`` from an ``adapter_config.json`` dict; errors name ``source``."""
    from .peft_model import _config_from_json

    return _config_from_json(config_json, source)


def save_pretrained(peft_model: "PeftModel", save_directory: str | os.PathLike[str], **kwargs: Any) -> None:
    """``peft_model.save_pretrained(save_directory, **kwargs)``."""
    peft_model.save_pretrained(os.fspath(save_directory), **kwargs)


def load_adapter(peft_model: "PeftModel", model_id: str | os.PathLike[str], adapter_name: str,
                 is_trainable: bool = False, **kwargs: Any) -> None:
    """``peft_model.load_adapter(model_id, adapter_name, is_trainable, **kwargs)``."""
    peft_model.load_adapter(model_id, adapter_name, is_trainable=is_trainable, **kwargs)


def from_pretrained(cls: type["PeftModel"], model: nn.Module, model_id: str | os.PathLike[str],
                    adapter_name: str = "default", is_trainable: bool = False, **kwargs: Any) -> "PeftModel":
    """``cls.from_pretrained(model, model_id, adapter_name, is_trainable, **kwargs)``."""
    return cls.from_pretrained(model, model_id, adapter_name, is_trainable, **kwargs)


__all__ = [
    "CONFIG_NAME",
    "SAFETENSORS_WEIGHTS_NAME",
    "WEIGHTS_NAME",
    "PEFT_KEY_PREFIX",
    "PEFT_LORA_CONFIG_KEYS",
    "PEFT_BASELINE_KEYS",
    "adapter_folder",
    "atomic_write",
    "config_to_peft_json",
    "write_adapter_files",
    "read_adapter_config",
    "read_adapter_weights",
    "adapter_weights_path",
    "check_adapter_file",
    "config_from_json",
    "save_pretrained",
    "load_adapter",
    "from_pretrained",
]
