"""Model utilities at PEFT's ``peft.utils`` import paths."""

from .bnb_quantize import quantize_linear_layers
from .other import prepare_model_for_kbit_training

__all__ = ["prepare_model_for_kbit_training", "quantize_linear_layers"]
