"""The state of a model's adapter layers at a glance: PEFT's ``get_layer_status`` and
``get_model_status`` with its ``TunerLayerStatus`` / ``TunerModelStatus`` dataclasses (same
fields, same values, so code that inspects PEFT models reads torchlora models alike)."""

from __future__ import annotations

import collections
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, Optional, Union

from torch import nn

from ..nn import LoraLayer
from .lora_model import LoraModel
from .modules_to_save import ModulesToSaveWrapper
from .trainable_tokens import TrainableTokensLayer, TrainableTokensWrapper

Irregular = Literal["irregular"]


@dataclass
class TunerLayerStatus:
    """The adapters of one adapter layer (a LoRA layer or a modules_to_save wrapper)."""

    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, Union[bool, Irregular]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: Optional[str]


@dataclass
class TunerModelStatus:
    """The adapters of a whole model; a value that differs between layers is ``"irregular"``."""

    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: Union[bool, Irregular]
    active_adapters: Union[list[str], Irregular]
    merged_adapters: Union[list[str], Irregular]
    requires_grad: dict[str, Union[bool, Irregular]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: Union[Optional[str], Irregular]


def _module_type(module: nn.Module) -> str:
    """PEFT's name of the layer type: ``lora.Linear`` for ``LoraLinear`` and so on."""
    if isinstance(module, LoraLayer):
        name = type(module).__name__
        return "lora." + (name[len("Lora"):] if name.startswith("Lora") else name)
    return type(module).__name__


def _adapter_parameters(module: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Adapter name -> its parameters in this layer (every adapter the layer holds, possibly
    with none, e.g. a DoRA-free dropout entry)."""
    if isinstance(module, ModulesToSaveWrapper):
        return {name: list(copy.parameters()) for name, copy in module.modules_to_save.items()}
    if isinstance(module, TrainableTokensLayer):
        return {name: [delta] for name, delta in module.trainable_tokens_delta.items()}
    return {name: list(module.adapter_tensors(name).values()) for name in module.adapter_names()}


def _all_true_false_or_irregular(values: Iterable[object]) -> Union[bool, Irregular]:
    values = list(values)
    if all(v is True for v in values):
        return True
    if all(v is False for v in values):
        return False
    return "irregular"


def _unwrap_peft_model(model: nn.Module) -> nn.Module:
    """The LoraModel of a PeftModel, else the model itself."""
    base_model = model._modules.get("base_model")
    return base_model if isinstance(base_model, LoraModel) else model


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """The status of every adapter layer (LoRA layers, modules_to_save wrappers and trainable
    tokens layers) of ``model``
    (a PeftModel, a model from ``inject_adapter_in_model``, or any module holding them): its
    name, type (``lora.Linear``, ...), whether enabled, active / merged / available adapters,
    whether each adapter's parameters require grad (``"irregular"`` for a mix), and the device
    types of each adapter's parameters. Raises ValueError when there is no adapter layer."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"get_layer_status expects a torch.nn.Module, got {type(model).__name__}")
    root = _unwrap_peft_model(model)
    layer_status: list[TunerLayerStatus] = []
    # a trainable tokens layer is reported (as in PEFT), with the state its wrapper keeps
    token_wrappers = {id(m.token_adapter): m for m in root.modules() if isinstance(m, TrainableTokensWrapper)}
    for name, module in root.named_modules():
        if not isinstance(module, (LoraLayer, ModulesToSaveWrapper, TrainableTokensLayer)):
            continue
        state = token_wrappers.get(id(module), module)
        params = _adapter_parameters(module)
        requires_grad = {key: _all_true_false_or_irregular(p.requires_grad for p in values)
                         for key, values in params.items() if values}
        devices = {key: sorted({p.device.type for p in values}) for key, values in params.items()}
        layer_status.append(TunerLayerStatus(
            name=name,
            module_type=_module_type(module),
            enabled=not state.disable_adapters,
            active_adapters=list(state.active_adapters),
            merged_adapters=list(getattr(module, "merged_adapters", [])),
            requires_grad=requires_grad,
            available_adapters=sorted(params),
            devices=devices,
            quantization_backend=None,  # PEFT's LoRA layers report none either
        ))
    if not layer_status:
        raise ValueError("No adapter layers found in the model, please ensure that it's a PEFT model or that you have "
                         "PEFT adapters injected in the model.")
    return layer_status


def _is_transformers_model(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # transformers is optional
        return False
    return isinstance(model, PreTrainedModel)


def _parameter_counts(model: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def get_model_status(model: nn.Module) -> TunerModelStatus:
    """The status of the adapters of the whole model: ``get_layer_status`` summarised, each value
    ``"irregular"`` where the layers disagree, with the base model's type, the adapters' PEFT
    types and the trainable / total parameter counts."""
    layer_status = get_layer_status(model)
    root = _unwrap_peft_model(model)
    if root is not model:
        base_model_type = type(root.model).__name__
        trainable_params, total_params = model.get_nb_trainable_parameters()
        peft_types = {key: str(config.peft_type).partition(".")[-1] for key, config in root.peft_config.items()}
        adapter_model_type = type(root).__name__
    else:
        base_model_type = type(model).__name__ if _is_transformers_model(model) else "other"
        trainable_params, total_params = _parameter_counts(model)
        peft_types, adapter_model_type = {}, "None"

    enabled_set = {status.enabled for status in layer_status}
    enabled: Union[bool, Irregular] = enabled_set.pop() if len(enabled_set) == 1 else "irregular"
    available_adapters = sorted(set().union(*(status.available_adapters for status in layer_status)))

    all_active = {tuple(status.active_adapters) for status in layer_status}
    active_adapters: Union[list[str], Irregular] = list(all_active.pop()) if len(all_active) == 1 else "irregular"

    # an adapter merged in one layer must be merged in every layer that holds it
    merged_all: set[str] = set().union(*(status.merged_adapters for status in layer_status))
    merged_adapters: Union[list[str], Irregular] = sorted(merged_all)
    for status in layer_status:
        if (set(status.available_adapters) - set(status.merged_adapters)) & merged_all:
            merged_adapters = "irregular"
            break

    requires_grad_all: dict[str, list] = collections.defaultdict(list)
    devices_all: dict[str, set[str]] = collections.defaultdict(set)
    for status in layer_status:
        for key, value in status.requires_grad.items():
            requires_grad_all[key].append(value)
        for key, value in status.devices.items():
            devices_all[key].update(value)

    backends = {status.quantization_backend for status in layer_status}
    return TunerModelStatus(
        base_model_type=base_model_type,
        adapter_model_type=adapter_model_type,
        peft_types=peft_types,
        trainable_params=trainable_params,
        total_params=total_params,
        num_adapter_layers=len(layer_status),
        enabled=enabled,
        active_adapters=active_adapters,
        merged_adapters=merged_adapters,
        requires_grad={key: _all_true_false_or_irregular(values) for key, values in requires_grad_all.items()},
        available_adapters=available_adapters,
        devices={key: sorted(value) for key, value in devices_all.items()},
        quantization_backend=backends.pop() if len(backends) == 1 else "irregular",
    )
