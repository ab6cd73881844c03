"""LoRA layers backed by the native torchlora operators, with PEFT's parameter names."""

from .conv import LoraConv1d, LoraConv3d
from .conv2d import LoraConv2d
from .embedding import LoraEmbedding
from .layer import LoraLayer
from .linear import LoraLinear
from .multihead_attention import LoraMultiheadAttention

__all__ = ["LoraLayer", "LoraLinear", "LoraEmbedding", "LoraConv1d", "LoraConv2d", "LoraConv3d",
           "LoraMultiheadAttention"]
