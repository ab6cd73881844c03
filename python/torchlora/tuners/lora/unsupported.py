"""PEFT LoRA entry points that torchlora does not implement, with PEFT's signatures.

Each raises ``NotImplementedError`` saying what is missing and why, instead of being absent
(an ``ImportError`` far from the cause) or doing nothing.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any, NoReturn, Optional, Union

from torch import nn


def _unsupported(what: str, why: str) -> NoReturn:
    raise NotImplementedError(f"torchlora does not implement {what}: {why}")


_CONVERSION_WHY = ("it converts adapters of other PEFT methods (LoHa, LoKr, ...) to LoRA by an SVD of their delta "
                   "weights, and torchlora holds LoRA adapters only; to change the rank of a LoRA adapter use "
                   "add_weighted_adapter(..., combination_type='svd', svd_rank=...)")


def convert_to_lora(model: nn.Module, rank: Union[int, float], adapter_name: str = "default",
                    progressbar: bool = False, compile_kwargs: Optional[dict] = None) -> NoReturn:
    """PEFT: convert a non-LoRA adapter to a LoRA config and state dict. Not implemented."""
    _unsupported("convert_to_lora", _CONVERSION_WHY)


def save_as_lora(path: Union[str, os.PathLike], model: nn.Module, rank: Union[int, float],
                 adapter_name: str = "default", progressbar: bool = False,
                 compile_kwargs: Optional[dict] = None) -> NoReturn:
    """PEFT: convert a non-LoRA adapter to LoRA and save it. Not implemented."""
    _unsupported("save_as_lora", _CONVERSION_WHY)


def create_arrow_model(base_model: nn.Module, task_specific_adapter_paths: list[str], arrow_config: Any,
                       general_adapter_paths: Optional[list[str]] = None, **adapter_kwargs: Any) -> NoReturn:
    """PEFT: a model routing between task adapters with Arrow. Not implemented."""
    _unsupported("Arrow routing (create_arrow_model, LoraConfig(arrow_config=...))",
                 "its per-token router over several adapters is a LoRA variant torchlora has no layer for")


_EVA_WHY = "the EVA data-driven initialisation (init_lora_weights='eva') is not one of torchlora's initialisations"


def get_eva_state_dict(model: nn.Module, dataloader: Iterable, peft_config: Any = None,
                       forward_fn: Optional[Callable] = None, prepare_model_inputs_fn: Optional[Callable] = None,
                       prepare_layer_inputs_fn: Any = None, adapter_name: str = "default",
                       gather_distributed_inputs: bool = True, show_progress_bar: bool = True) -> NoReturn:
    """PEFT: the EVA initial weights computed from activations. Not implemented."""
    _unsupported("get_eva_state_dict", _EVA_WHY)


def initialize_lora_eva_weights(model: nn.Module, dataloader: Optional[Iterable] = None,
                                eva_state_dict: Optional[dict] = None, forward_fn: Optional[Callable] = None,
                                prepare_model_inputs_fn: Optional[Callable] = None, prepare_layer_inputs_fn: Any = None,
                                adapter_name: str = "default", gather_distributed_inputs: bool = True,
                                show_progress_bar: bool = True) -> NoReturn:
    """PEFT: initialise LoRA weights with EVA. Not implemented."""
    _unsupported("initialize_lora_eva_weights", _EVA_WHY)


def preprocess_loraga(model: nn.Module, lora_config: Any, train_step: Callable[[], None],
                      cache_file: Optional[str] = None) -> NoReturn:
    """PEFT: collect the gradients LoRA-GA initialises from. Not implemented."""
    _unsupported("preprocess_loraga",
                 "the LoRA-GA gradient-based initialisation (init_lora_weights='lora_ga') is not one of torchlora's "
                 "initialisations")


def replace_lora_weights_loftq(peft_model: nn.Module, model_path: Optional[str] = None, adapter_name: str = "default",
                               callback: Optional[Callable[[nn.Module, str], bool]] = None) -> NoReturn:
    """PEFT: replace the LoRA weights of a quantized model by LoftQ's. Not implemented."""
    _unsupported("LoftQ initialisation (replace_lora_weights_loftq, init_lora_weights='loftq')",
                 "it needs LoftQ's alternating quantize / SVD loop, which torchlora's core does not have")


class GPTQLoraLinear(nn.Module):
    """PEFT's LoRA layer for GPTQ-quantized linear layers. Not implemented: constructing it raises."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: Any = None, r: int = 0,
                 lora_alpha: int = 1, **kwargs: Any) -> None:
        _unsupported("LoRA on GPTQ-quantized layers (GPTQLoraLinear)",
                     "its base layers need the GPTQ kernels (gptqmodel); torchlora wraps bitsandbytes and torchao "
                     "quantized layers only")


__all__ = ["GPTQLoraLinear", "convert_to_lora", "create_arrow_model", "get_eva_state_dict",
           "initialize_lora_eva_weights", "preprocess_loraga", "replace_lora_weights_loftq", "save_as_lora"]
