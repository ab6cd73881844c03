"""Mixed batches: ``model(..., adapter_names=[one per sample])`` reaches every LoRA layer and
modules_to_save wrapper through forward pre-hooks, as in PEFT. Each LoRA layer then runs one
multi-adapter operator for the whole batch. Unlike PEFT, this also works in training mode:
each sample's gradient reaches only its own adapter."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import partial
from typing import Any, Optional

from torch import nn

from ..nn import LoraLayer
from ..nn.layer import BASE_ADAPTER_NAME, SampleAdapters
from .modules_to_save import ModulesToSaveWrapper
from .trainable_tokens import TrainableTokensWrapper


def _adapter_names_hook(module: nn.Module, args: tuple, kwargs: dict, adapter_names: list[str]):
    # LoRA layers take the shared SampleAdapters as they are: an adapter that does not touch a
    # layer leaves its rows as the base layer computes them
    if isinstance(module, ModulesToSaveWrapper):
        adapter_names = [n if n in module.modules_to_save else BASE_ADAPTER_NAME for n in adapter_names]
    elif isinstance(module, TrainableTokensWrapper):
        adapter_names = [n if module.holds(n) else BASE_ADAPTER_NAME for n in adapter_names]
    kwargs["adapter_names"] = adapter_names
    return args, kwargs



@contextlib.contextmanager
def adapter_names_hooks(model: nn.Module, training: bool, *args: Any, **kwargs: Any) -> Iterator[None]:
    """While active, every forward of ``model`` routes sample i through ``adapter_names[i]``."""
    adapter_names = kwargs.pop("adapter_names", None)
    if adapter_names is None:
        yield
        return
    if not isinstance(adapter_names, (list, tuple)) or not all(isinstance(n, str) for n in adapter_names):
        raise TypeError(f"adapter_names must be a list of strings, got {adapter_names!r}")
    # one pass over the modules: the layers that take the names, and the adapters they know
    targets = [m for m in model.modules() if isinstance(m, (LoraLayer, ModulesToSaveWrapper, TrainableTokensWrapper))]
    known: set[str] = set()
    for layer in targets:
        if isinstance(layer, LoraLayer):
            known.update(layer.lora_A.keys())
            known.update(layer.lora_embedding_A.keys())
    unknown = sorted({n for n in adapter_names if n != BASE_ADAPTER_NAME} - known)
    if unknown:
        raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(unknown)}")
    adapter_names = SampleAdapters(adapter_names)
    num_beams = kwargs.get("num_beams")
    original = adapter_names
    if num_beams is not None and num_beams > 1:
        adapter_names = SampleAdapters([n for n in adapter_names for _ in range(num_beams)])
    handles = []
    try:
        hook = partial(_adapter_names_hook, adapter_names=adapter_names)
        handles.extend(module.register_forward_pre_hook(hook, with_kwargs=True) for module in targets)
        encoder = _get_encoder(model)
        if adapter_names is not original and encoder is not None:
            # the encoder sees the inputs before beams are expanded
            encoder_hook = partial(_adapter_names_hook, adapter_names=original)
            for module in encoder.modules():
                if isinstance(module, (LoraLayer, ModulesToSaveWrapper, TrainableTokensWrapper)):
                    handles.append(module.register_forward_pre_hook(encoder_hook, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _get_encoder(model: nn.Module) -> Optional[nn.Module]:
    get_encoder = getattr(model, "get_encoder", None)
    if not callable(get_encoder):
        return None
    try:
        encoder = get_encoder()
    except (AttributeError, NotImplementedError):
        return None
    # transformers 5 returns the model itself when it has no separate encoder
    return None if encoder is model else encoder
