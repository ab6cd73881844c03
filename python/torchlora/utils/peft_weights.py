"""PEFT's ``load_peft_weights``: the tensors of a saved adapter, from a folder or a Hub repository."""

from __future__ import annotations

import os
from typing import Any, Optional, Union

import torch
from torch import Tensor


def load_peft_weights(model_id: Union[str, os.PathLike], device: Optional[Union[str, torch.device]] = None,
                      key_mapping: Optional[dict[str, str]] = None, **hf_hub_download_kwargs: Any) -> dict[str, Tensor]:
    """The tensors of the adapter at ``model_id`` (a folder, or a Hub repository id resolved through
    ``huggingface_hub``, from its cache when offline), keyed as in the file
    (``base_model.model.<path>.lora_A.weight``, ...): ``adapter_model.safetensors``, else the
    older ``adapter_model.bin`` (read with ``weights_only=True``). Every tensor is checked to be
    floating point and finite.

    ``device``: where to put them; by default CUDA when available, else the CPU (PEFT's
    default). ``hf_hub_download_kwargs``: ``subfolder``, ``revision``, ``token``, ``cache_dir``, ...
    """
    from ..hub import HUB_KWARGS, resolve_adapter_folder
    from ..peft_format import read_adapter_weights

    if key_mapping:
        raise NotImplementedError("load_peft_weights: key_mapping is not supported by torchlora")
    kwargs = dict(hf_hub_download_kwargs)
    subfolder = kwargs.pop("subfolder", None)
    unexpected = sorted(set(kwargs) - HUB_KWARGS)
    if unexpected:
        raise TypeError(f"load_peft_weights() got unexpected arguments {unexpected} (supported: "
                        f"{sorted(HUB_KWARGS | {'subfolder'})})")
    folder = resolve_adapter_folder(model_id, subfolder, **kwargs)
    tensors, _ = read_adapter_weights(folder)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return {key: value.to(device) for key, value in tensors.items()}
