"""The LoRA tuner: finds the modules a config targets and replaces them with LoRA layers."""

from .lora_model import LoraModel
from .modules_to_save import ModulesToSaveWrapper

__all__ = ["LoraModel", "ModulesToSaveWrapper"]
