"""Which modules a LoraConfig targets, with PEFT's matching rules."""

from __future__ import annotations

import re
from typing import Optional

from torch import nn

from ..config import ALL_LINEAR, LoraConfig, TaskType
from ..nn import LoraLayer

# Names a sequence-classification head usually has, checked in this order.
SEQ_CLS_HEAD_NAMES = ("score", "classifier")


class Excluded:
    """Marks a module that ``exclude_modules`` or ``modules_to_save`` keeps from being targeted."""

    def __bool__(self) -> bool:
        return False


def _matches_name_list(names, key: str) -> bool:
    return key in names or any(key.endswith(f".{name}") for name in names)


def _layer_index(key: str, layers_pattern) -> Optional[int]:
    """The first ``.<pattern>.<N>.`` index in ``key`` (any ``.<x>.<N>.`` without a pattern)."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        match = None
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    return int(match.group("idx")) if match else None


def is_target(config: LoraConfig, key: str):
    """True when the module named ``key`` is a target; an ``Excluded`` (falsy) when it is
    excluded; False otherwise."""
    excluded = config.exclude_modules
    if excluded:
        if isinstance(excluded, str):
            if re.fullmatch(excluded, key):
                return Excluded()
        elif _matches_name_list(excluded, key):
            return Excluded()
    # a module saved whole is never also given an adapter
    if config.modules_to_save and any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in config.modules_to_save):
        return Excluded()
    targets = config.target_modules
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    if not any(key.endswith(f".{t}") for t in targets):
        return False
    layers = config.layers_to_transform
    if layers is None or (isinstance(layers, list) and not layers):
        return True
    index = _layer_index(key, config.layers_pattern)
    if index is None:
        return False
    return index == layers if isinstance(layers, int) else index in layers


def pattern_value(patterns: dict, key: str, default):
    """The value of the first regex in ``patterns`` that matches the end of ``key``."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2 style linear with an [in, out] weight)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional
        return False
    return isinstance(module, Conv1D)


def expand_all_linear(config: LoraConfig, model: nn.Module) -> None:
    """Replace ``target_modules="all-linear"`` by the names of every Linear / Conv1D except the
    output head (and, for SEQ_CLS without one, the classifier head)."""
    targets = config.target_modules
    if not (isinstance(targets, str) and targets.lower() == ALL_LINEAR):
        return
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or is_conv1d(module):
            names.add(name)
        elif isinstance(module, LoraLayer) and "Linear" in type(module).__name__:
            names.add(name)
    excluded = set()
    get_output_embeddings = getattr(model, "get_output_embeddings", None)
    if _is_transformers_model(model) and callable(get_output_embeddings):
        head = get_output_embeddings()
        if head is not None:
            excluded.add(next(n for n, m in model.named_modules() if m is head))
        elif config.task_type == TaskType.SEQ_CLS:
            for head_name in SEQ_CLS_HEAD_NAMES:
                head = getattr(model, head_name, None)
                if head is not None:
                    excluded.add(next(n for n, m in model.named_modules() if m is head))
                    break
    # never put LoRA on the inside of an existing LoRA layer
    for prefix, module in model.named_modules():
        if isinstance(module, LoraLayer):
            excluded.update(f"{prefix}.{suffix}" for suffix, _ in module.named_modules() if suffix)
    config.target_modules = names - excluded


def _is_transformers_model(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)
