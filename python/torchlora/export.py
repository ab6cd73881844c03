"""Export a model for multi-adapter serving: ``torch.export`` + AOTInductor, a ``.pt2`` package
that C++ (``torchlora::serve::ExportedModel``) or Python (``torch._inductor.aoti_load_package``)
runs without Python model code.

Every LoRA layer becomes its base layer plus a multi-adapter operator that reads slot stacks
given as graph inputs, so one forward serves rows of different adapters and swapping an adapter
only rewrites those tensors (nothing recompiles). The exported forward takes, in this order:

    the model's inputs (batch first, in example_inputs' order),
    sample_slots [B] int64 (-1: no adapter), request_scale [S] float32,
    then for every layer in the metadata's order: lora_A, lora_B, [lora_bias,] scale [S] float32

(layouts in :mod:`torchlora.slot_layers`; a layer's effective scale is ``scale * request_scale``)
and returns the model's output tensors, flattened. The package's AOTInductor metadata key
``"torchlora"`` holds the JSON document that describes this (:func:`serving_metadata`).
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from .config import LoraConfig
from .nn import LoraLayer
from .slot_layers import LayerSlots, SlotInputs, SlotLayer, slot_layer_for
from .tuners import ModulesToSaveWrapper
from .tuners.matching import is_target, rules_for

__all__ = ["ExportResult", "export_for_serving", "export_program", "serving_metadata", "METADATA_KEY", "FORMAT"]

METADATA_KEY = "torchlora"
FORMAT = 1

ExampleInputs = Union[Tensor, Sequence[Tensor], Mapping[str, Tensor]]


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_for_serving` built: the package, its metadata and the time each step took."""

    package_path: str
    export_seconds: float
    compile_seconds: float
    layers: list[str]
    metadata: dict[str, Any] = field(repr=False)


def export_for_serving(
    model: nn.Module,
    example_inputs: ExampleInputs,
    package_path: Union[str, os.PathLike],
    max_loras: int,
    max_lora_rank: int,
    *,
    lora_bias: bool = False,
    target_modules: Optional[Union[str, Sequence[str]]] = None,
    dynamic_shapes: Optional[Union[Sequence[Any], Mapping[str, Any]]] = None,
    model_kwargs: Optional[Mapping[str, Any]] = None,
    inductor_configs: Optional[Mapping[str, Any]] = None,
) -> ExportResult:
    """Export ``model`` as a ``.pt2`` package whose LoRA layers serve ``max_loras`` adapter slots
    of rank up to ``max_lora_rank`` (:func:`export_program`, then AOTInductor).

    ``model``: a torchlora or ``peft`` PeftModel / LoraModel (its LoRA layers are the targets and
    their base layers' weights are the model; its own adapters are not exported), or a plain
    module with ``target_modules`` (PEFT's matching rules). ``example_inputs``: one tensor, a
    sequence of tensors (positional) or a mapping of keyword tensors, batch first; transformers
    models need ``model_kwargs={"use_cache": False}`` (caches are not tensors): constant keyword
    arguments of every forward, fixed in the package. ``dynamic_shapes``: one
    entry per input (a dict ``{dim: torch.export.Dim}`` or None), keyed like ``example_inputs``;
    by default dim 0 of every input is a shared batch dim and dim 1 of integer inputs with two
    or more dims a dynamic token dim (examples need at least 2 along each; the package then
    accepts any size, 1 included). ``inductor_configs`` are passed on to AOTInductor. The model is left as it was (its LoRA layers are swapped for
    the time of the export only: do not run it meanwhile). Raises ValueError / TypeError naming
    what is wrong.
    """
    path = _check_package_path(package_path)
    start = time.perf_counter()
    program, metadata = export_program(model, example_inputs, max_loras, max_lora_rank, lora_bias=lora_bias,
                                       target_modules=target_modules, dynamic_shapes=dynamic_shapes,
                                       model_kwargs=model_kwargs)
    export_seconds = time.perf_counter() - start
    configs = dict(inductor_configs or {})
    configs["always_keep_tensor_constants"] = True  # small constants would be inlined otherwise
    # torch.export gives dynamic dims a lower bound of 2 (sizes 0 and 1 specialise); the kernels
    # are generic in the size, so one-row requests must pass the run-time input checks.
    configs.setdefault("aot_inductor.check_lowerbound", False)
    aoti_metadata = dict(configs.get("aot_inductor.metadata", {}))
    aoti_metadata[METADATA_KEY] = json.dumps(metadata)
    configs["aot_inductor.metadata"] = aoti_metadata
    start = time.perf_counter()
    built = torch._inductor.aoti_compile_and_package(program, package_path=path, inductor_configs=configs)
    compile_seconds = time.perf_counter() - start
    return ExportResult(os.fspath(built), export_seconds, compile_seconds,
                        [layer["name"] for layer in metadata["layers"]], metadata)


def export_program(
    model: nn.Module,
    example_inputs: ExampleInputs,
    max_loras: int,
    max_lora_rank: int,
    *,
    lora_bias: bool = False,
    target_modules: Optional[Union[str, Sequence[str]]] = None,
    dynamic_shapes: Optional[Union[Sequence[Any], Mapping[str, Any]]] = None,
    model_kwargs: Optional[Mapping[str, Any]] = None,
) -> tuple[torch.export.ExportedProgram, dict[str, Any]]:
    """The ``torch.export`` step of :func:`export_for_serving` (same arguments): the exported
    program, whose inputs and outputs are the package's, and its metadata document."""
    _check_limits(max_loras, max_lora_rank, lora_bias)
    names, tensors = _normalise_inputs(example_inputs)
    constants = _check_model_kwargs(model_kwargs, names)
    root, targets = _find_targets(model, target_modules)
    slot_inputs = SlotInputs()
    with _rewritten(root, targets, slot_inputs) as layers:
        dtype, device = _stack_dtype_device(layers)
        metadata = serving_metadata(layers, len(tensors), max_loras, max_lora_rank, lora_bias, dtype, device)
        wrapper = _ServingForward(root, names, slot_inputs, len(layers), lora_bias, constants)
        flat = list(tensors) + _example_slot_inputs(layers, tensors[0].shape[0], max_loras, max_lora_rank, lora_bias,
                                                    dtype, device)
        specs = _dynamic_specs(names, tensors, dynamic_shapes, len(flat))
        with torch.no_grad():
            # the forward takes *flat: its dynamic shapes are one entry, a tuple for the varargs
            program = torch.export.export(wrapper, tuple(flat), dynamic_shapes=(specs,), strict=False)
    return program, metadata


def serving_metadata(layers: Sequence[tuple[str, SlotLayer]], num_model_inputs: int, max_loras: int,
                     max_lora_rank: int, lora_bias: bool, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    """The ``"torchlora"`` metadata document (format 1) of a package with these slot layers."""
    return {
        "format": FORMAT,
        "num_model_inputs": num_model_inputs,
        "max_loras": max_loras,
        "max_lora_rank": max_lora_rank,
        "lora_bias": lora_bias,
        "dtype": str(dtype).removeprefix("torch."),
        "device": device.type,
        "layers": [{"name": name, "kind": layer.kind, "weight_shape": layer.weight_shape, "groups": layer.groups}
                   for name, layer in layers],
    }


# ---- arguments ----------------------------------------------------------------------------------

def _check_limits(max_loras: Any, max_lora_rank: Any, lora_bias: Any) -> None:
    for name, value in (("max_loras", max_loras), ("max_lora_rank", max_lora_rank)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r}")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not isinstance(lora_bias, bool):
        raise TypeError(f"lora_bias must be a bool, got {lora_bias!r}")


def _check_package_path(package_path: Any) -> str:
    if not isinstance(package_path, (str, os.PathLike)):
        raise TypeError(f"package_path must be a path, got {package_path!r}")
    path = os.fspath(package_path)
    if not path.endswith(".pt2"):
        raise ValueError(f"package_path must end with .pt2, got {path!r}")
    return path


def _normalise_inputs(example_inputs: Any) -> tuple[Optional[list[str]], list[Tensor]]:
    """(keyword names or None, the input tensors), checked: tensors with one batch size."""
    if isinstance(example_inputs, Tensor):
        names, tensors = None, [example_inputs]
    elif isinstance(example_inputs, Mapping):
        names, tensors = [str(k) for k in example_inputs], list(example_inputs.values())
    elif isinstance(example_inputs, Sequence) and not isinstance(example_inputs, str):
        names, tensors = None, list(example_inputs)
    else:
        raise TypeError(f"example_inputs must be a tensor, a sequence or a mapping of tensors, got "
                        f"{type(example_inputs).__name__}")
    if not tensors:
        raise ValueError("example_inputs is empty; the model needs at least one input tensor")
    labels = names or [str(i) for i in range(len(tensors))]
    for label, tensor in zip(labels, tensors):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"example input {label} must be a tensor, got {type(tensor).__name__}")
        if tensor.dim() == 0:
            raise ValueError(f"example input {label} is a scalar; inputs are batch first")
    batches = {int(t.shape[0]) for t in tensors}
    if len(batches) != 1:
        raise ValueError(f"example inputs have different batch sizes {sorted(batches)}; dim 0 is the batch of all")
    return names, tensors


def _check_model_kwargs(model_kwargs: Any, names: Optional[list[str]]) -> dict[str, Any]:
    if model_kwargs is None:
        return {}
    if not isinstance(model_kwargs, Mapping) or not all(isinstance(k, str) for k in model_kwargs):
        raise TypeError(f"model_kwargs must be a mapping of keyword arguments, got {model_kwargs!r}")
    tensors = sorted(k for k, v in model_kwargs.items() if isinstance(v, Tensor))
    if tensors:
        raise TypeError(f"model_kwargs {tensors} are tensors; tensors are inputs and go in example_inputs")
    both = sorted(set(model_kwargs) & set(names or ()))
    if both:
        raise ValueError(f"{both} are both in example_inputs and model_kwargs")
    return dict(model_kwargs)


def _find_targets(model: nn.Module, target_modules: Any) -> tuple[nn.Module, list[tuple[str, nn.Module]]]:
    """The module to export and its (name, LoRA layer or target base module) pairs."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    root = _base_model_of(model)
    lora_layers = [(n, m) for n, m in root.named_modules() if _is_lora_layer(m)]
    if lora_layers and target_modules is not None:
        raise ValueError("target_modules is for plain modules; this model's LoRA layers already define the targets")
    if lora_layers:
        for name, layer in lora_layers:
            _check_lora_layer(name, layer)
        return root, lora_layers
    if target_modules is None:
        raise ValueError("the model has no LoRA layers and no target_modules were given; pass a PeftModel or "
                         "target_modules naming the layers to serve adapters on")
    if isinstance(target_modules, str):
        targets: Union[str, list[str]] = target_modules
    elif isinstance(target_modules, Sequence) and all(isinstance(t, str) for t in target_modules):
        targets = list(target_modules)
    else:
        raise TypeError(f"target_modules must be a string or a sequence of strings, got {target_modules!r}")
    rules = rules_for(LoraConfig(target_modules=targets))
    matched = [(n, m) for n, m in root.named_modules() if n and is_target(rules, n)]
    if not matched:
        raise ValueError(f"target_modules={target_modules!r} matches no module of the model")
    return root, matched


def _base_model_of(model: nn.Module) -> nn.Module:
    """The model under PeftModel / LoraModel wrappers (whose module paths are PEFT's keys)."""
    for _ in range(3):
        get_base_model = getattr(model, "get_base_model", None)
        inner = get_base_model() if callable(get_base_model) else getattr(model, "model", None)
        if inner is None or inner is model or not (_is_peft_wrapper(model)):
            break
        model = inner
    return model


def _is_peft_wrapper(module: nn.Module) -> bool:
    from .peft_model import PeftModel
    from .tuners import LoraModel

    if isinstance(module, (PeftModel, LoraModel)):
        return True
    peft_types = _peft_classes("PeftModel", "LoraModel")
    return bool(peft_types) and isinstance(module, peft_types)


@functools.lru_cache(maxsize=None)
def _peft_classes(*names: str) -> tuple[type, ...]:
    """peft's classes of these names (none where peft is not installed)."""
    try:
        import peft
        import peft.tuners.lora
        import peft.utils
    except ImportError:  # peft is optional
        return ()
    table = {"PeftModel": getattr(peft, "PeftModel", None), "LoraModel": getattr(peft, "LoraModel", None),
             "LoraLayer": getattr(peft.tuners.lora, "LoraLayer", None),
             "ModulesToSaveWrapper": getattr(peft.utils, "ModulesToSaveWrapper", None)}
    return tuple(c for c in (table[n] for n in names) if c is not None)


def _is_lora_layer(module: nn.Module) -> bool:
    return isinstance(module, (LoraLayer, *_peft_classes("LoraLayer")))


def _check_lora_layer(name: str, layer: nn.Module) -> None:
    if any(getattr(layer, "use_dora", {}).values()):
        raise ValueError(f"LoRA layer {name!r} uses DoRA, which served models do not support")
    if getattr(layer, "merged", False):
        raise ValueError(f"LoRA layer {name!r} has merged adapters; unmerge them before exporting (the base "
                         "weights are the served model)")


# ---- the rewrite --------------------------------------------------------------------------------

class _rewritten:
    """Puts slot layers in place of the targets (and unwraps modules_to_save wrappers) for the
    time of the export, and puts everything back afterwards (also the training flags)."""

    def __init__(self, root: nn.Module, targets: list[tuple[str, nn.Module]], inputs: SlotInputs) -> None:
        self.root, self.targets, self.inputs = root, targets, inputs
        self.undo: list[tuple[nn.Module, str, nn.Module]] = []
        self.training = {m: m.training for m in root.modules()}

    def __enter__(self) -> list[tuple[str, SlotLayer]]:
        try:
            layers = []
            for index, (name, module) in enumerate(self.targets):
                base = module.get_base_layer() if _is_lora_layer(module) else module
                layer = slot_layer_for(base, self.inputs, index, name)
                self._replace(name, layer)
                layers.append((name, layer))
            wrappers = (ModulesToSaveWrapper, *_peft_classes("ModulesToSaveWrapper"))
            for name, module in list(self.root.named_modules()):
                if isinstance(module, wrappers):
                    self._replace(name, module.original_module)
            self.root.eval()
            return layers
        except BaseException:
            self.__exit__()
            raise

    def _replace(self, name: str, new: nn.Module) -> None:
        parent_name, _, child = name.rpartition(".")
        parent = self.root.get_submodule(parent_name)
        self.undo.append((parent, child, getattr(parent, child)))
        setattr(parent, child, new)

    def __exit__(self, *exc: Any) -> None:
        while self.undo:
            parent, child, old = self.undo.pop()
            setattr(parent, child, old)
        for module, training in self.training.items():
            module.training = training


def _stack_dtype_device(layers: list[tuple[str, SlotLayer]]) -> tuple[torch.dtype, torch.device]:
    """The slots' dtype and device: the base weights' (one for all layers)."""
    found = {(layer.base_layer.weight.dtype, layer.base_layer.weight.device) for _, layer in layers}
    if len(found) != 1:
        raise ValueError(f"the served layers' base weights must share one dtype and device, got {sorted(map(str, found))}")
    dtype, device = found.pop()
    if not dtype.is_floating_point:
        raise TypeError(f"the served layers' base weights must be floating point, got {dtype}")
    return dtype, device


class _ServingForward(nn.Module):
    """The exported forward: model inputs, slot inputs and stacks in, flat output tensors out."""

    def __init__(self, model: nn.Module, names: Optional[list[str]], inputs: SlotInputs, num_layers: int,
                 lora_bias: bool, constants: dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.constants = constants
        self.names = names
        self.slot_inputs = inputs
        self.num_layers = num_layers
        self.per_layer = 4 if lora_bias else 3

    def forward(self, *flat: Tensor) -> tuple[Tensor, ...]:
        n = len(flat) - 2 - self.num_layers * self.per_layer
        model_inputs, sample_slots, request_scale = flat[:n], flat[n], flat[n + 1]
        stacks = flat[n + 2:]
        layers = []
        for i in range(self.num_layers):
            group = stacks[i * self.per_layer:(i + 1) * self.per_layer]
            layers.append(LayerSlots(group[0], group[1], group[2] if self.per_layer == 4 else None, group[-1]))
        self.slot_inputs.set(sample_slots, request_scale, layers)
        try:
            if self.names is None:
                out = self.model(*model_inputs, **self.constants)
            else:
                out = self.model(**dict(zip(self.names, model_inputs)), **self.constants)
        finally:
            self.slot_inputs.clear()
        return tuple(_flat_tensors(out))


def _flat_tensors(out: Any) -> list[Tensor]:
    """The output's tensors in order (tuples, lists, dicts and transformers' ModelOutput; None skipped)."""
    if isinstance(out, Tensor):
        return [out]
    if out is None:
        return []
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _flat_tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _flat_tensors(v)]
    raise TypeError(f"the model returns a {type(out).__name__}, which is not a tensor; served models return "
                    "tensors (for transformers models pass model_kwargs={'use_cache': False})")


def _example_slot_inputs(layers: list[tuple[str, SlotLayer]], batch: int, max_loras: int, max_lora_rank: int,
                         lora_bias: bool, dtype: torch.dtype, device: torch.device) -> list[Tensor]:
    """Example slot inputs for tracing (empty slots)."""
    flat = [torch.full((batch,), -1, dtype=torch.int64, device=device),
            torch.ones(max_loras, dtype=torch.float32, device=device)]
    for name, layer in layers:
        if layer.kind == "conv2d" and max_lora_rank % layer.groups:
            raise ValueError(f"max_lora_rank={max_lora_rank} is not divisible by the groups ({layer.groups}) of "
                             f"conv layer {name!r}")
        a_shape, b_shape, bias_len = layer.stack_shapes(max_loras, max_lora_rank)
        flat += [torch.zeros(a_shape, dtype=dtype, device=device), torch.zeros(b_shape, dtype=dtype, device=device)]
        if lora_bias:
            flat.append(torch.zeros(max_loras, bias_len, dtype=dtype, device=device))
        flat.append(torch.zeros(max_loras, dtype=torch.float32, device=device))
    return flat


def _dynamic_specs(names: Optional[list[str]], tensors: list[Tensor], dynamic_shapes: Any, total: int) -> tuple:
    """dynamic_shapes of the whole flat input list: the caller's (or the default) for the model's
    inputs, the batch dim for sample_slots, static slot stacks."""
    if dynamic_shapes is None:
        # a named batch dim, shared with sample_slots; the token dim may be bounded by the model
        # (position embeddings), which Dim.DYNAMIC accepts
        batch, tokens = torch.export.Dim("batch"), torch.export.Dim.DYNAMIC
        specs = []
        for tensor in tensors:
            spec = {0: batch}
            if not tensor.dtype.is_floating_point and not tensor.dtype.is_complex and tensor.dim() >= 2:
                spec[1] = tokens
            specs.append(spec)
    else:
        specs = _caller_specs(names, dynamic_shapes, len(tensors))
    for label, (tensor, spec) in enumerate(zip(tensors, specs)):
        for dim in (spec or {}):
            if not isinstance(dim, int) or not 0 <= dim < tensor.dim():
                raise ValueError(f"dynamic_shapes of input {names[label] if names else label} names dim {dim!r}, "
                                 f"which a {tensor.dim()}-d input does not have")
            if tensor.shape[dim] < 2:
                raise ValueError(f"example input {names[label] if names else label} has size {tensor.shape[dim]} "
                                 f"along dynamic dim {dim}; examples need at least 2 there (torch.export "
                                 "specialises sizes 0 and 1)")
    batch_dim = (specs[0] or {}).get(0)
    slots_spec = {0: batch_dim} if batch_dim is not None else None
    return tuple(specs) + (slots_spec,) + (None,) * (total - len(tensors) - 1)


def _caller_specs(names: Optional[list[str]], dynamic_shapes: Any, count: int) -> list[Optional[dict]]:
    if names is not None and isinstance(dynamic_shapes, Mapping):
        unknown = sorted(set(dynamic_shapes) - set(names))
        if unknown:
            raise ValueError(f"dynamic_shapes names inputs {unknown} that example_inputs does not have ({names})")
        specs = [dynamic_shapes.get(n) for n in names]
    elif isinstance(dynamic_shapes, Sequence) and not isinstance(dynamic_shapes, str):
        specs = list(dynamic_shapes)
        if len(specs) != count:
            raise ValueError(f"dynamic_shapes has {len(specs)} entries for {count} example inputs")
    else:
        raise TypeError("dynamic_shapes must be a sequence with one entry per input (or a mapping by name for "
                        f"keyword inputs), got {type(dynamic_shapes).__name__}")
    for spec in specs:
        if spec is not None and not isinstance(spec, Mapping):
            raise TypeError(f"each dynamic_shapes entry must be a dict {{dim: torch.export.Dim}} or None, got {spec!r}")
    return [dict(s) if s is not None else None for s in specs]
