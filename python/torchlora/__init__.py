"""torchlora: LoRA (low-rank adaptation) for PyTorch with a native core.

The LoRA computations are PyTorch operators implemented in C++ and CUDA
(``torch.ops.torchlora.*``); the Python API mirrors Hugging Face PEFT, so
``from peft import ...`` becomes ``from torchlora import ...``.
"""

from ._native import build_info, cmake_prefix_path
from . import ops
from .config import LoraConfig, PeftConfig, PeftType, TaskType
from .mapping import get_peft_model, inject_adapter_in_model
from .auto import (
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForFeatureExtraction,
    AutoPeftModelForQuestionAnswering,
    AutoPeftModelForSeq2SeqLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
)
from .nn import LoraConv1d, LoraConv2d, LoraConv3d, LoraEmbedding, LoraLayer, LoraLinear, LoraMultiheadAttention
from .peft_model import (
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
    get_layer_status,
    get_model_status,
)
from .state_dict import get_peft_model_state_dict, set_peft_model_state_dict
from .tuners import LoraModel, ModulesToSaveWrapper
from .export import export_for_serving
from .serving import AdapterServer
from .utils import cast_mixed_precision_params, load_peft_weights, prepare_model_for_kbit_training
from .tuners.lora import (ArrowConfig, BdLoraConfig, EvaConfig, KasaConfig, LoftQConfig, LoraGAConfig,
                          LoraRuntimeConfig, MontecloraConfig, VeloraConfig, convert_to_lora, create_arrow_model,
                          get_eva_state_dict, initialize_lora_eva_weights, preprocess_loraga,
                          replace_lora_weights_loftq, save_as_lora)

__version__ = build_info()["version"]

__all__ = [
    "build_info",
    "cmake_prefix_path",
    "ops",
    "LoraConfig",
    "PeftConfig",
    "PeftType",
    "TaskType",
    "LoraModel",
    "ModulesToSaveWrapper",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftModelForQuestionAnswering",
    "PeftModelForFeatureExtraction",
    "get_peft_model",
    "get_layer_status",
    "get_model_status",
    "inject_adapter_in_model",
    "get_peft_model_state_dict",
    "set_peft_model_state_dict",
    "LoraLayer",
    "LoraLinear",
    "LoraEmbedding",
    "LoraConv1d",
    "LoraConv2d",
    "LoraConv3d",
    "LoraMultiheadAttention",
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
    "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForFeatureExtraction",
    "export_for_serving",
    "AdapterServer",
    "prepare_model_for_kbit_training",
    "cast_mixed_precision_params",
    "load_peft_weights",
    "ArrowConfig",
    "BdLoraConfig",
    "EvaConfig",
    "KasaConfig",
    "LoftQConfig",
    "LoraGAConfig",
    "LoraRuntimeConfig",
    "MontecloraConfig",
    "VeloraConfig",
    "convert_to_lora",
    "create_arrow_model",
    "get_eva_state_dict",
    "initialize_lora_eva_weights",
    "preprocess_loraga",
    "replace_lora_weights_loftq",
    "save_as_lora",
]
