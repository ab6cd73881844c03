"""Adapters saved by the real ``peft`` for the serving tests, the peft model that runs each of
them alone (the oracle), and slot stacks filled from the saved files by hand (zero-padded ranks,
scale = peft's scaling), independently of torchlora's pool."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import peft
import torch
from safetensors.torch import load_file
from torch import nn

PREFIX = "base_model.model."


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    r: int
    alpha: float
    targets: tuple[str, ...]
    rslora: bool = False


def save_peft_adapters(build, specs: list[AdapterSpec], root: str) -> dict[str, str]:
    """Save each adapter with peft (init_lora_weights=False: non-zero factors); {name: folder}."""
    folders = {}
    for index, spec in enumerate(specs):
        torch.manual_seed(100 + index)
        config = peft.LoraConfig(r=spec.r, lora_alpha=spec.alpha, target_modules=list(spec.targets),
                                 use_rslora=spec.rslora, init_lora_weights=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = peft.get_peft_model(build(), config)
        folder = os.path.join(root, spec.name)
        model.save_pretrained(folder, save_embedding_layers=False)  # adapters over one shared base
        folders[spec.name] = folder
    return folders


def peft_reference(build, folders: dict[str, str]) -> peft.PeftModel:
    """A fresh base model with every saved adapter loaded by peft (eval mode)."""
    names = list(folders)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.PeftModel.from_pretrained(build(), folders[names[0]], adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(folders[name], adapter_name=name)
    return model.eval()


@torch.no_grad()
def peft_rows(ref: peft.PeftModel, inputs: dict, row_adapters: list, row_scales: list | None = None,
              output=lambda out: out) -> list:
    """Row i of peft's output with adapter ``row_adapters[i]`` alone (None: the base model),
    its scaling multiplied by ``row_scales[i]``; ``output`` picks a tensor or a tuple of them."""
    rows = []
    for i, adapter in enumerate(row_adapters):
        one = {k: v[i:i + 1] for k, v in inputs.items()}
        if adapter is None:
            with ref.disable_adapter():
                out = output(ref(**one))
        else:
            ref.set_adapter(adapter)
            scale = 1.0 if row_scales is None else row_scales[i]
            layers = [m for m in ref.modules() if isinstance(m, peft.tuners.lora.LoraLayer) and adapter in m.scaling]
            saved = [m.scaling[adapter] for m in layers]
            for m in layers:
                m.scaling[adapter] *= scale
            try:
                out = output(ref(**one))
            finally:
                for m, s in zip(layers, saved):
                    m.scaling[adapter] = s
        rows.append(out)
    return rows


def peft_scaling(ref: peft.PeftModel, adapter: str, layer: str) -> float:
    """peft's scaling of ``adapter`` at module path ``layer`` (0 when it does not adapt it)."""
    module = ref.base_model.model.get_submodule(layer)
    return float(module.scaling.get(adapter, 0.0)) if hasattr(module, "scaling") else 0.0


class HandStacks:
    """Slot stacks in the exported layout (metadata order), filled from the saved safetensors."""

    def __init__(self, metadata: dict, dtype=torch.float32) -> None:
        self.meta = metadata
        S, R = metadata["max_loras"], metadata["max_lora_rank"]
        self.layers = []
        for layer in metadata["layers"]:
            shape = layer["weight_shape"]
            if layer["kind"] == "linear":
                a, b, out = [S, R, shape[1]], [S, shape[0], R], shape[0]
            elif layer["kind"] == "embedding":
                a, b, out = [S, R, shape[0]], [S, shape[1], R], shape[1]
            else:
                groups = layer["groups"]
                a, b, out = [S, R, shape[1] * groups, shape[2], shape[3]], [S, shape[0], R // groups, 1, 1], shape[0]
            entry = {"A": torch.zeros(a, dtype=dtype), "B": torch.zeros(b, dtype=dtype),
                     "scale": torch.zeros(S, dtype=torch.float32)}
            if metadata["lora_bias"]:
                entry["bias"] = torch.zeros(S, out, dtype=dtype)
            self.layers.append(entry)

    def fill(self, slot: int, folder: str, ref: peft.PeftModel, adapter: str) -> None:
        """Slot ``slot`` = the adapter in ``folder`` (zeros and scale 0 where it adapts nothing)."""
        tensors = load_file(os.path.join(folder, "adapter_model.safetensors"))
        for layer, entry in zip(self.meta["layers"], self.layers):
            for key in ("A", "B", "bias"):
                if key in entry:
                    entry[key][slot].zero_()
            entry["scale"][slot] = 0.0
            base = PREFIX + layer["name"]
            if layer["kind"] == "embedding":
                a, b = tensors.get(base + ".lora_embedding_A"), tensors.get(base + ".lora_embedding_B")
            else:
                a, b = tensors.get(base + ".lora_A.weight"), tensors.get(base + ".lora_B.weight")
            if a is None:
                continue
            r = a.shape[0]
            entry["A"][slot, :r] = a
            entry["B"][slot, :, :r // layer["groups"]] = b
            bias = tensors.get(base + ".lora_B.bias")
            if bias is not None:
                entry["bias"][slot] = bias
            entry["scale"][slot] = peft_scaling(ref, adapter, layer["name"])

    def clear(self, slot: int) -> None:
        for entry in self.layers:
            for tensor in entry.values():
                tensor[slot].zero_()

    def flat(self) -> list[torch.Tensor]:
        out = []
        for entry in self.layers:
            out += [entry["A"], entry["B"]] + ([entry["bias"]] if "bias" in entry else []) + [entry["scale"]]
        return out


def count_lora_layers(model: nn.Module) -> int:
    return sum(isinstance(m, peft.tuners.lora.LoraLayer) for m in model.modules())
