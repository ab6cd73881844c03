"""torchlora: LoRA (low-rank adaptation) for PyTorch with a native core.

The LoRA computations are PyTorch operators implemented in C++ and CUDA
(``torch.ops.torchlora.*``); the Python API mirrors Hugging Face PEFT.
"""

from ._native import build_info, cmake_prefix_path
from . import ops
from .nn import LoraConv2d, LoraEmbedding, LoraLayer, LoraLinear

__version__ = build_info()["version"]

__all__ = [
    "build_info",
    "cmake_prefix_path",
    "ops",
    "LoraLayer",
    "LoraLinear",
    "LoraEmbedding",
    "LoraConv2d",
]
