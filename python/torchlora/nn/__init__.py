"""LoRA layers backed by the native torchlora operators, with PEFT's parameter names."""

from .conv2d import LoraConv2d
from .embedding import LoraEmbedding
from .layer import LoraLayer
from .linear import LoraLinear

__all__ = ["LoraLayer", "LoraLinear", "LoraEmbedding", "LoraConv2d"]
