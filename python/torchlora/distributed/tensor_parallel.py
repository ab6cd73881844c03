"""Tensor parallelism (DTensor) for LoRA layers.

Two ways of sharding a ``LoraLinear`` work, and both end in :func:`lora_linear_on_mesh`:

- a plan on the submodules, as with PEFT: ``ColwiseParallel`` on ``<name>.base_layer`` and
  ``<name>.lora_B.<adapter>``, ``RowwiseParallel`` on ``<name>.base_layer`` and
  ``<name>.lora_A.<adapter>`` (what :func:`lora_tp_plan` builds from ``{"name": "colwise"}``);
- transformers models loaded with ``tp_plan="auto"``: their LoRA factors are sharded after the
  injection (:func:`shard_adapters_like_base`).

The base layer runs under its own plan and gives back a local tensor; the factors are
DTensors (or plain tensors, taken as replicated). The local input and base output are viewed
as DTensors in the layout the factors imply (``lora_A`` sharded on ``in``: the input is
sharded on its last dimension; ``lora_B`` sharded on ``out``: the output is), the
``torchlora.lora_linear`` operator runs under the rules of :mod:`.sharding_rules`, and the
result goes back to the base output's layout (a rowwise partial sum is reduced here).
Embeddings (``LoraEmbedding``) take the same way through :func:`lora_embedding_on_mesh`.

What it costs: a colwise layer reduces the gradients of its input and of the replicated
``lora_A`` in backward; a rowwise layer reduces its adapter's partial output ``[T, out]`` in
forward (besides the base layer's own reduction) and the ``[T, r]`` shrink in backward. With
dropout in training, a rowwise layer gathers its input and ``lora_A`` (the masks are then those
of one process) and every dropout seed is broadcast from rank 0 (one int64 per layer and step).
DoRA adapters, mixed-adapter batches and merging are not supported on sharded layers (they
raise).
"""

from __future__ import annotations

import fnmatch
import re
import sys
from collections.abc import Mapping
from typing import Any, Optional

import torch
from torch import Tensor, nn

from .. import ops
from .sharding_rules import register_sharding_rules

__all__ = ["TP_STYLES", "broadcast_replicated_factors", "is_dtensor", "lora_embedding_on_mesh", "lora_linear_on_mesh",
           "lora_tp_plan", "parallelize_lora", "shard_adapters_like_base", "transformers_tp_mesh"]

TP_STYLES = ("colwise", "rowwise")


def is_dtensor(tensor: Any) -> bool:
    """Whether ``tensor`` is a DTensor; never imports ``torch.distributed.tensor`` (if it is not
    imported, no DTensor exists)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def _replicate(mesh: Any) -> tuple:
    from torch.distributed.tensor import Replicate
    return (Replicate(),) * mesh.ndim


def _as_dtensor(tensor: Tensor, mesh: Any, placements: tuple, global_shape: Optional[torch.Size] = None) -> Any:
    """A local tensor viewed as a DTensor (differentiable: its gradient comes back local, reduced
    where the placement is replicated)."""
    from torch.distributed.tensor import DTensor
    if is_dtensor(tensor):
        return tensor
    if global_shape is None:
        return DTensor.from_local(tensor, mesh, placements, run_check=False)
    stride = torch.empty(global_shape, device="meta").stride()
    return DTensor.from_local(tensor, mesh, placements, run_check=False, shape=global_shape, stride=stride)


def _input_placements(lora_A: Any, mesh: Any, ndim: int) -> tuple:
    """The layout of the layer's input implied by ``lora_A [r, in]``: sharded on ``in`` means the
    input is sharded on its last dimension."""
    from torch.distributed.tensor import Replicate, Shard
    if not is_dtensor(lora_A):
        return _replicate(mesh)
    out = []
    for placement in lora_A.placements:
        if placement == Shard(1):
            out.append(Shard(ndim - 1))
        elif placement == Replicate():
            out.append(Replicate())
        else:
            raise ValueError(f"lora_A [r, in] must be replicated or sharded on dim 1 (rowwise), got {placement}")
    return tuple(out)


def _output_placements(lora_B: Any, mesh: Any, ndim: int) -> tuple:
    """The layout of the base output implied by ``lora_B [out, r]``: sharded on ``out`` means the
    output is sharded on its last dimension."""
    from torch.distributed.tensor import Replicate, Shard
    if not is_dtensor(lora_B):
        return _replicate(mesh)
    out = []
    for placement in lora_B.placements:
        if placement == Shard(0):
            out.append(Shard(ndim - 1))
        elif placement == Replicate():
            out.append(Replicate())
        else:
            raise ValueError(f"lora_B [out, r] must be replicated or sharded on dim 0 (colwise), got {placement}")
    return tuple(out)


def _same_on_every_rank(seed: Tensor, mesh: Any) -> Tensor:
    """Rank 0's dropout seed on every rank of ``mesh``: replicated inputs need one mask."""
    import torch.distributed as dist
    seed = seed.clone()
    for dim in range(mesh.ndim):
        group = mesh.get_group(dim)
        dist.broadcast(seed, src=dist.get_global_rank(group, 0), group=group)
    return seed


def lora_linear_on_mesh(x: Tensor, base_out: Tensor, lora_A: Tensor, lora_B: Tensor, lora_bias: Optional[Tensor],
                        scaling: float, dropout_p: float = 0.0, seed: Optional[Tensor] = None) -> Tensor:
    """:func:`torchlora.ops.lora_linear` where some factors are DTensors and ``x`` / ``base_out``
    may be the local tensors of a tensor-parallel base layer.

    Local ``x`` and ``base_out`` are taken in the layouts the factors imply (see the module
    docstring); plain factors are taken as replicated (they must be equal on every rank). The
    result has ``base_out``'s layout: local if it was local, with a rowwise partial sum reduced.
    With dropout, rank 0's seed is used on every rank, so replicated inputs get one mask.
    """
    from torch.distributed.tensor import DTensor
    register_sharding_rules()
    mesh = next(t.device_mesh for t in (lora_A, lora_B, lora_bias, x, base_out) if is_dtensor(t))
    x_placements = x.placements if is_dtensor(x) else _input_placements(lora_A, mesh, x.dim())
    out_placements = base_out.placements if is_dtensor(base_out) else _output_placements(lora_B, mesh,
                                                                                           base_out.dim())
    x_global = torch.Size((*x.shape[:-1], lora_A.shape[1]))
    out_global = torch.Size((*base_out.shape[:-1], lora_B.shape[0]))
    bias_placements = lora_B.placements if is_dtensor(lora_B) else _replicate(mesh)
    args = (
        _as_dtensor(x, mesh, x_placements, x_global),
        _as_dtensor(base_out, mesh, out_placements, out_global),
        _as_dtensor(lora_A, mesh, _replicate(mesh)),
        _as_dtensor(lora_B, mesh, _replicate(mesh)),
        None if lora_bias is None else _as_dtensor(lora_bias, mesh, bias_placements,
                                                   torch.Size((lora_B.shape[0],))),
    )
    if seed is not None and not is_dtensor(seed):
        seed = DTensor.from_local(_same_on_every_rank(seed, mesh), mesh, _replicate(mesh), run_check=False)
    out = ops.lora_linear(*args, scaling, dropout_p, seed)
    out = out.redistribute(mesh, out_placements)
    return out if is_dtensor(base_out) else out.to_local()


def lora_embedding_on_mesh(ids: Tensor, base_out: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
                           padding_idx: int = -1, scale_grad_by_freq: bool = False) -> Tensor:
    """:func:`torchlora.ops.lora_embedding` where some factors are DTensors and ``ids`` /
    ``base_out`` may be the local tensors of a tensor-parallel embedding.

    The ids are replicated (as every parallel embedding takes them); ``base_out`` is taken sharded
    on its last dimension where ``lora_embedding_B [D, r]`` is sharded on ``D``, replicated
    otherwise. A vocabulary-sharded ``lora_embedding_A [r, V]`` is gathered for the lookup (the
    operator reads global ids). The result has ``base_out``'s layout.
    """
    register_sharding_rules()
    mesh = next(t.device_mesh for t in (lora_A, lora_B, ids, base_out) if is_dtensor(t))
    out_placements = base_out.placements if is_dtensor(base_out) else _output_placements(lora_B, mesh,
                                                                                           base_out.dim())
    out_global = torch.Size((*base_out.shape[:-1], lora_B.shape[0]))
    out = torch.ops.torchlora.lora_embedding(
        _as_dtensor(ids, mesh, _replicate(mesh)), _as_dtensor(base_out, mesh, out_placements, out_global),
        _as_dtensor(lora_A, mesh, _replicate(mesh)), _as_dtensor(lora_B, mesh, _replicate(mesh)), scaling,
        padding_idx, scale_grad_by_freq)
    out = out.redistribute(mesh, out_placements)
    return out if is_dtensor(base_out) else out.to_local()


# ---- plans --------------------------------------------------------------------------------------------

def _matches(name: str, key: str) -> bool:
    """A plan key names a module by its full name, a dotted suffix of it, or a glob pattern."""
    return name == key or name.endswith("." + key) or fnmatch.fnmatchcase(name, key)


def lora_tp_plan(model: nn.Module, styles: Mapping[str, str]) -> dict[str, Any]:
    """The ``parallelize_module`` plan that shards the layers named in ``styles`` and their LoRA
    adapters.

    ``styles`` maps a module name (full name, dotted suffix such as ``"up"`` or
    ``"mlp.down_proj"``, or glob such as ``"layers.*.q_proj"``) to ``"colwise"`` or
    ``"rowwise"``. A ``LoraLinear`` gets ``ColwiseParallel`` on ``base_layer`` and every
    ``lora_B.<adapter>`` (``lora_A`` replicated), or ``RowwiseParallel`` on ``base_layer`` and every
    ``lora_A.<adapter>`` (``lora_B`` replicated); a plain ``nn.Linear`` gets the style itself.
    A ``LoraEmbedding`` takes ``"rowwise"`` only (the vocabulary sharded, as transformers'
    ``embedding_rowwise``; its output is reduced, whole): ``RowwiseParallel`` (replicated ids) on
    ``base_layer`` and ``lora_embedding_A`` sharded on the vocabulary. Every key must match at least one
    linear layer or LoRA embedding.
    """
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    from ..nn import LoraEmbedding, LoraLinear

    if not isinstance(styles, Mapping):
        raise TypeError(f"styles must map module names to 'colwise' or 'rowwise', got {type(styles).__name__}")
    for key, style in styles.items():
        if style not in TP_STYLES:
            raise ValueError(f"style of {key!r} must be one of {TP_STYLES}, got {style!r}")
    make = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    plan: dict[str, Any] = {}
    used: set[str] = set()
    for name, module in model.named_modules():
        keys = [key for key in styles if _matches(name, key)]
        if not keys:
            continue
        if len({styles[key] for key in keys}) > 1:
            raise ValueError(f"module {name!r} is matched by keys with different styles: {keys}")
        style = styles[keys[0]]
        if isinstance(module, LoraLinear):
            if type(module.get_base_layer()) is not nn.Linear:
                raise TypeError(f"{name}: tensor parallelism shards a torch.nn.Linear base layer, "
                                f"got {type(module.get_base_layer()).__name__}")
            if any(module.use_dora.values()):
                raise NotImplementedError(f"{name}: DoRA adapters are not supported with tensor parallelism")
            plan[f"{name}.base_layer"] = make[style]()
            factors = module.lora_B if style == "colwise" else module.lora_A
            for adapter in factors:
                plan[f"{name}.{'lora_B' if style == 'colwise' else 'lora_A'}.{adapter}"] = make[style]()
        elif isinstance(module, LoraEmbedding):
            if style != "rowwise" or type(module.get_base_layer()) is not nn.Embedding:
                raise ValueError(f"{name}: a LoRA embedding is sharded 'rowwise' (on the vocabulary, its output "
                                 f"reduced), got {style!r}")
            if any(module.use_dora.values()):
                raise NotImplementedError(f"{name}: DoRA adapters are not supported with tensor parallelism")
            from torch.distributed.tensor import Replicate
            plan[f"{name}.base_layer"] = RowwiseParallel(input_layouts=Replicate())  # the ids are whole
            plan[f"{name}.lora_embedding_A"] = _vocabulary_sharded_tables()
        elif type(module) is nn.Linear and not _inside_lora_layer(model, name):
            plan[name] = make[style]()
        else:
            continue
        used.update(keys)
    unused = [key for key in styles if key not in used]
    if unused:
        raise ValueError(f"no linear layer (torch.nn.Linear or LoraLinear) or LoRA embedding matches {unused}")
    return plan


def _vocabulary_sharded_tables() -> Any:
    """The parallel style of a ``lora_embedding_A`` ParameterDict: every ``[r, V]`` table sharded on
    the vocabulary (rank 0's values)."""
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ParallelStyle

    class VocabularySharded(ParallelStyle):
        def _apply(self, module: nn.Module, device_mesh: Any) -> nn.Module:
            for key, table in list(module.items()):
                if not is_dtensor(table):
                    module[key] = nn.Parameter(distribute_tensor(table.detach(), device_mesh, [Shard(1)],
                                                                 src_data_rank=0), requires_grad=table.requires_grad)
            return module

    return VocabularySharded()


def _inside_lora_layer(model: nn.Module, name: str) -> bool:
    """Whether ``name`` is a submodule of a LoRA layer (its base_layer or an adapter factor)."""
    from ..nn import LoraLayer
    parts = name.split(".")
    for end in range(len(parts) - 1, 0, -1):
        if isinstance(model.get_submodule(".".join(parts[:end])), LoraLayer):
            return True
    return False


def broadcast_replicated_factors(model: nn.Module, mesh: Any) -> None:
    """Copy rank 0's plain (replicated) LoRA factors of the sharded LoRA layers to every rank of
    ``mesh``: each rank initialised its own, and replicated parameters must be equal."""
    import torch.distributed as dist

    from ..nn import LoraLayer
    for module in model.modules():
        if not isinstance(module, LoraLayer) or not is_dtensor(module.get_base_layer().weight):
            continue
        for adapter in module.adapter_names():
            for tensor in module.adapter_tensors(adapter).values():
                if is_dtensor(tensor):
                    continue
                with torch.no_grad():
                    for dim in range(mesh.ndim):
                        group = mesh.get_group(dim)
                        dist.broadcast(tensor.data, src=dist.get_global_rank(group, 0), group=group)


def parallelize_lora(model: nn.Module, device_mesh: Any, styles: Mapping[str, str]) -> nn.Module:
    """Shard ``model`` in place with :func:`lora_tp_plan` (``torch.distributed.tensor.parallel.
    parallelize_module``) and make its replicated LoRA factors equal on every rank (rank 0's).
    Returns ``model``."""
    from torch.distributed.tensor.parallel import parallelize_module
    register_sharding_rules()
    parallelize_module(model, device_mesh, lora_tp_plan(model, styles))
    broadcast_replicated_factors(model, device_mesh)
    return model


# ---- transformers tp_plan ------------------------------------------------------------------------------

def _plan_key(name: str) -> str:
    """transformers' plan keys write layer numbers as ``*``."""
    return re.sub(r"\.\d+(\.|$)", lambda m: ".*" + m.group(1), name)


def transformers_tp_mesh(model: nn.Module) -> tuple[Optional[dict], Any]:
    """(the tensor-parallel plan, its mesh) of a transformers model loaded with ``tp_plan``, or
    (None, None)."""
    mesh = getattr(model, "_device_mesh", None)
    plan = getattr(model, "tp_plan", None)
    if mesh is None or not plan:
        return None, None
    names = getattr(mesh, "mesh_dim_names", None)
    if names is not None and "tp" not in names:
        return None, None
    return dict(plan), (mesh["tp"] if mesh.ndim > 1 else mesh)


_EMBEDDING_STYLES = ("embedding_rowwise", "embedding_colwise")


def shard_adapters_like_base(model: nn.Module) -> int:
    """Shard the LoRA factors of a transformers model loaded with ``tp_plan`` like their base
    layers: ``colwise`` bases get ``lora_B`` (and its bias) sharded on ``out``, ``rowwise``
    bases ``lora_A`` sharded on ``in``, vocabulary-sharded embeddings (``embedding_rowwise``)
    ``lora_embedding_A`` sharded on the vocabulary (gathered for each lookup); the other factors
    stay replicated, rank 0's copy on every rank (so do both factors of an ``embedding_colwise``
    table, whose output is gathered). Idempotent; returns the number of LoRA layers it sharded.

    Raises ``NotImplementedError`` for other styles of a base layer that holds adapters, and for DoRA.
    """
    from torch.distributed.tensor import Shard, distribute_tensor

    from ..nn import LoraEmbedding, LoraLayer, LoraLinear
    plan, mesh = transformers_tp_mesh(model)
    if plan is None:
        return 0
    register_sharding_rules()
    count = 0
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        style = plan.get(_plan_key(name))
        if style is None or not is_dtensor(module.get_base_layer().weight):
            continue
        if any(module.use_dora.values()):
            raise NotImplementedError(f"{name}: DoRA adapters are not supported with tensor parallelism")
        if isinstance(module, LoraEmbedding) and style in _EMBEDDING_STYLES:
            if style == "embedding_rowwise":
                for adapter, table in list(module.lora_embedding_A.items()):
                    if not is_dtensor(table):
                        module.lora_embedding_A[adapter] = nn.Parameter(
                            distribute_tensor(table.detach(), mesh, [Shard(1)], src_data_rank=0),
                            requires_grad=table.requires_grad)
            count += 1
            continue
        if not isinstance(module, LoraLinear) or style not in TP_STYLES:
            raise NotImplementedError(f"{name}: LoRA under the tensor-parallel style {style!r} of "
                                      f"{type(module).__name__} is not supported (colwise and rowwise linear layers, "
                                      "embedding_rowwise and embedding_colwise embeddings are)")
        sharded = module.lora_B if style == "colwise" else module.lora_A
        placement = Shard(0) if style == "colwise" else Shard(1)
        for adapter, factor in sharded.items():
            for pname, param in list(factor.named_parameters(recurse=False)):
                if is_dtensor(param):
                    continue
                spec = Shard(0) if pname == "bias" else placement
                # src_data_rank=0: rank 0's values, as a single process initialised them
                factor._parameters[pname] = nn.Parameter(
                    distribute_tensor(param.detach(), mesh, [spec], src_data_rank=0),
                    requires_grad=param.requires_grad)
        count += 1
    broadcast_replicated_factors(model, mesh)
    return count
