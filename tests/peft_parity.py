"""Helpers that build the same model with PEFT and with torchlora and compare them."""

from __future__ import annotations

import warnings

import peft
import torch

import torchlora
from torchlora.nn import LoraLayer


def lora_layer_names(model) -> dict[str, tuple]:
    """{module path: (r per adapter, scaling per adapter)} for every LoRA layer."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, (LoraLayer, peft.tuners.lora.LoraLayer)):
            out[name] = (dict(module.r), {k: float(v) for k, v in module.scaling.items()})
    return out


def trainable(model) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters()}


def build_pair(builder, make_config, adapter_name: str = "default"):
    """(peft model, torchlora model) from identical base weights, torchlora given PEFT's adapter."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = torchlora.get_peft_model(builder(), make_config(torchlora), adapter_name=adapter_name)
        ref = peft.get_peft_model(builder(), make_config(peft), adapter_name=adapter_name)
    copy_adapter(ref, ours, adapter_name)
    return ref, ours


def copy_adapter(ref, ours, adapter_name: str = "default") -> None:
    """Load PEFT's adapter weights (and any base weights PEFT rewrote, e.g. PiSSA) into ours."""
    state = peft.get_peft_model_state_dict(ref, adapter_name=adapter_name)
    torchlora.set_peft_model_state_dict(ours, state, adapter_name=adapter_name)


def sync_all_weights(ref, ours) -> None:
    """Copy every tensor of PEFT's model into ours (same keys on both sides)."""
    ref_state = ref.state_dict()
    ours_state = ours.state_dict()
    missing = set(ours_state) - set(ref_state)
    assert not missing, f"keys only in torchlora: {sorted(missing)[:5]}"
    ours.load_state_dict({k: ref_state[k] for k in ours_state}, strict=True)


def logits(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if hasattr(output, "last_hidden_state"):
        return output.last_hidden_state
    return output[0]


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
