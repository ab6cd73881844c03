"""PEFT's ``peft.tuners.lora`` import path: the LoRA config, model and layers under PEFT's names
(``Linear`` is :class:`torchlora.LoraLinear`, ...), PEFT's sub-configurations, and the entry
points torchlora does not implement (they raise ``NotImplementedError`` saying why)."""

from ...config import LoraConfig
from ...nn import LoraConv2d as Conv2d
from ...nn import LoraConv3d as Conv3d
from ...nn import LoraEmbedding as Embedding
from ...nn import LoraLayer
from ...nn import LoraLinear as Linear
from ...nn.param_wrapper import ParamWrapper
from ..lora_model import LoraModel
from .unsupported import (GPTQLoraLinear, convert_to_lora, create_arrow_model, get_eva_state_dict,
                          initialize_lora_eva_weights, preprocess_loraga, replace_lora_weights_loftq, save_as_lora)
from .variant_configs import (ArrowConfig, BdLoraConfig, EvaConfig, KasaConfig, LoftQConfig, LoraGAConfig,
                              LoraRuntimeConfig, MontecloraConfig, VeloraConfig)

__all__ = [
    "ArrowConfig",
    "BdLoraConfig",
    "Conv2d",
    "Conv3d",
    "Embedding",
    "EvaConfig",
    "GPTQLoraLinear",
    "KasaConfig",
    "Linear",
    "LoftQConfig",
    "LoraConfig",
    "LoraGAConfig",
    "LoraLayer",
    "LoraModel",
    "LoraRuntimeConfig",
    "MontecloraConfig",
    "ParamWrapper",
    "VeloraConfig",
    "convert_to_lora",
    "create_arrow_model",
    "get_eva_state_dict",
    "initialize_lora_eva_weights",
    "preprocess_loraga",
    "save_as_lora",
]
