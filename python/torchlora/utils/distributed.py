"""Adapters in models sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``), whose
parameters are ``DTensor`` shards between forwards: gathering them for saving, loading full
tensors into them, and refusing adapters that FSDP would not synchronise."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
        return None
    return DTensor


def is_dtensor(tensor: object) -> bool:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor`` (a sharded or replicated parameter)."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(tensor, dtensor)


def is_fully_sharded(model: nn.Module) -> bool:
    """Whether ``fully_shard`` (FSDP2) was applied to ``model`` or to one of its submodules."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return any(isinstance(module, FSDPModule) for module in model.modules())


def gather_full_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` with every ``DTensor`` replaced by its full (unsharded) value on the host
    of its local shard; other tensors unchanged.

    Gathering is collective: every rank of the mesh must call this with the same keys (the
    order of ``tensors`` is the order of the collectives), also the ranks that will not use
    the result.
    """
    gathered: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if is_dtensor(value):
            value = value.detach().full_tensor()
        gathered[key] = value
    return gathered


def shard_like(value: torch.Tensor, parameter: torch.Tensor) -> torch.Tensor:
    """A full tensor ``value`` in the layout of ``parameter``: for a ``DTensor`` parameter, a
    ``DTensor`` with the same mesh and placements whose local part is this rank's piece of
    ``value`` (every rank holds the whole value, so nothing is communicated); otherwise
    ``value`` itself."""
    if not is_dtensor(parameter):
        return value
    from torch.distributed.tensor import distribute_tensor

    local = value.to(device=parameter.to_local().device, dtype=parameter.dtype)
    return distribute_tensor(local, parameter.device_mesh, parameter.placements, src_data_rank=None)


def check_adapter_synchronised(model: nn.Module, adapter_name: str) -> None:
    """Raise a ``ValueError`` when ``model`` is already sharded with ``fully_shard``: a trainable
    adapter added afterwards would hold plain parameters that FSDP neither shards nor
    reduces, so every rank would train its own copy."""
    if is_fully_sharded(model):
        raise ValueError(
            f"cannot add the trainable adapter {adapter_name!r} to a model sharded with fully_shard: FSDP would not "
            "synchronise its gradients. Add or load the adapter (get_peft_model, load_adapter(..., "
            "is_trainable=True)) before calling fully_shard, or use it for inference only "
            "(load_adapter(..., is_trainable=False), LoraConfig(inference_mode=True))."
        )


def gathered_by_fsdp(module: nn.Module) -> bool:
    """Whether ``fully_shard`` manages ``module``'s parameters. FSDP2 gathers them into the same
    tensors before every forward without moving their version counters, so a cache keyed on
    those tensors (identity, version) cannot see that the optimizer changed them."""
    return bool(getattr(module, "_is_fsdp_managed_module", False))


def end_process_group(completed: bool = True) -> None:
    """Destroy the default process group; after a ``completed`` run, once every process is there.

    The barriers matter on gloo. Its worker threads drop a finished collective under a lock that
    a barrier takes, and a barrier keeps the collectives that were still in flight when it began
    until it is dropped itself. A tensor whose Python object those threads release while the
    interpreter shuts down aborts the process with "terminate called without an active
    exception" (pytorch/pytorch#190489; ``destroy_process_group`` does not join the threads).
    The second barrier lets the first one, and what it kept, go while Python still runs. After a
    failure the other processes may be gone, so there is no barrier then.
    """
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return
    if completed:
        dist.barrier()
        dist.barrier()
    dist.destroy_process_group()
