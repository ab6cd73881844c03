"""Model utilities at PEFT's ``peft.utils`` import paths."""

from .bnb_quantize import quantize_linear_layers
from .mixed_precision import cast_mixed_precision_params
from .other import prepare_model_for_kbit_training
from .peft_weights import load_peft_weights

__all__ = ["cast_mixed_precision_params", "load_peft_weights", "prepare_model_for_kbit_training",
           "quantize_linear_layers"]
