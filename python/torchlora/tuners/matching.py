"""Which modules a LoraConfig targets, with PEFT's matching rules."""

from __future__ import annotations

from torch import nn

from .._native import _C
from ..config import LoraConfig, TaskType
from ..nn import LoraLayer

# TargetRules.match results (torchlora::apply::TargetMatch)
_TARGET, _EXCLUDED = 1, 2

# Names a sequence-classification head usually has, checked in this order.
SEQ_CLS_HEAD_NAMES = ("score", "classifier")


class Excluded:
    """Marks a module that ``exclude_modules`` or ``modules_to_save`` keeps from being targeted."""

    def __bool__(self) -> bool:
        return False


def rules_for(config: LoraConfig) -> "_C.peft.TargetRules":
    """The config's per-module rules (targets, rank_pattern, alpha_pattern, scaling), parsed
    once by the C++ core, which defines them for Python and C++ alike."""
    return _C.peft.TargetRules(config.to_dict())


def is_target(rules: "_C.peft.TargetRules", key: str):
    """True when the module named ``key`` is a target; an ``Excluded`` (falsy) when it is
    excluded; False otherwise."""
    found = rules.match(key)
    return Excluded() if found == _EXCLUDED else found == _TARGET


def pattern_matches(pattern: str, key: str) -> bool:
    """Whether a rank_pattern / alpha_pattern key applies to the module named ``key``."""
    return _C.peft.pattern_matches(pattern, key)


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
    if not (isinstance(targets, str) and _C.peft.is_all_linear(targets)):
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
