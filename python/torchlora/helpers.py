"""PEFT's ``peft.helpers``: rescaling the adapters for a while, checking whether a folder holds an
adapter, and giving a PeftModel's ``forward`` / ``generate`` the base model's signature."""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Iterator
from copy import deepcopy
from functools import update_wrapper
from types import MethodType
from typing import Union

from torch import nn

from .config import LoraConfig
from .nn import LoraLayer
from .peft_model import PeftModel

__all__ = [
    "check_if_peft_model",
    "rescale_adapter_scale",
    "update_forward_signature",
    "update_generate_signature",
    "update_signature",
]


def _only_args_and_kwargs(signature: inspect.Signature, kwargs_alone: bool) -> bool:
    names = set(signature.parameters)
    return names == {"args", "kwargs"} or (kwargs_alone and names == {"kwargs"})


def _adopt_signature(model: PeftModel, method: str) -> None:
    """Replace ``model.<method>`` (a generic ``*args, **kwargs`` one) by a copy that carries the
    base model's docstring, name and annotations, so that ``help()`` and tools that read the
    signature (the Trainer keeps only the dataset columns ``forward`` names) see them."""
    if not isinstance(model, PeftModel):
        raise TypeError(f"update_signature expects a PeftModel, got {type(model).__name__}")
    bound = getattr(model, method)
    if not _only_args_and_kwargs(inspect.signature(bound), kwargs_alone=method == "generate"):
        return  # a task model whose method already names its arguments
    function = deepcopy(bound.__func__)
    update_wrapper(function, getattr(type(model.get_base_model()), method),
                   assigned=("__doc__", "__name__", "__annotations__"))
    setattr(model, method, MethodType(function, model))


def update_forward_signature(model: PeftModel) -> None:
    """Give ``model.forward`` the base model's signature and docstring when it only takes
    ``*args, **kwargs``."""
    _adopt_signature(model, "forward")


def update_generate_signature(model: PeftModel) -> None:
    """Give ``model.generate`` the base model's signature and docstring when it only takes
    ``*args, **kwargs`` (nothing happens for a base model without ``generate``)."""
    if not hasattr(model.get_base_model(), "generate"):
        return
    _adopt_signature(model, "generate")


def update_signature(model: PeftModel, method: str = "all") -> None:
    """``update_forward_signature`` and/or ``update_generate_signature``: ``method`` is
    ``"forward"``, ``"generate"`` or ``"all"``."""
    if method == "forward":
        update_forward_signature(model)
    elif method == "generate":
        update_generate_signature(model)
    elif method == "all":
        update_forward_signature(model)
        update_generate_signature(model)
    else:
        raise ValueError(f"method {method} is not supported please choose one of ['forward', 'generate', 'all']")


def check_if_peft_model(model_name_or_path: Union[str, os.PathLike]) -> bool:
    """Whether ``model_name_or_path`` (a folder or a Hub repository id) holds a valid LoRA
    ``adapter_config.json``, read by the same rules as ``PeftModel.from_pretrained``."""
    try:
        LoraConfig.from_pretrained(os.fspath(model_name_or_path))
    except (OSError, ValueError, TypeError, RuntimeError):  # missing, unreachable or invalid
        return False
    return True


@contextlib.contextmanager
def rescale_adapter_scale(model: nn.Module, multiplier: Union[float, int]) -> Iterator[None]:
    """Multiply the scaling of every adapter of every LoRA layer of ``model`` by ``multiplier``
    for the duration of the ``with`` block; the previous values come back on exit, also after an
    exception. With a multiplier in [0, 1] this is wise-ft (interpolating between the base and
    the fine-tuned model).

    Raises TypeError if ``multiplier`` is not a float or an int, ValueError if ``model`` has no
    LoRA layer.
    """
    if not isinstance(multiplier, (float, int)):
        raise TypeError(f"Argument multiplier should be of type float, got {type(multiplier)}")
    layers = [module for module in model.modules() if isinstance(module, LoraLayer)]
    if not layers:
        raise ValueError("scaling is only supported for models with `LoraLayer`s")
    # set in place (not a new dict): layer.scaling counts its changes, so cached adapter stacks follow
    original = [(layer, dict(layer.scaling)) for layer in layers]
    for layer, scaling in original:
        for name, value in scaling.items():
            layer.scaling[name] = value * multiplier
    try:
        yield
    finally:
        for layer, scaling in original:
            for name, value in scaling.items():
                if name in layer.scaling:
                    layer.scaling[name] = value
