"""Data parallelism for ``torchlora finetune --nproc N``: the command relaunches itself under
``torch.distributed.run`` with N processes on this machine, each process trains on its share of
every global batch (DDP averages the gradients over gloo) and only rank 0 evaluates, prints and
writes files.

Each step's loss is weighted so that N processes compute exactly the gradient of one process on
the whole global batch, whatever the batch's size (the last one of an epoch may be smaller, or
smaller than N): the two runs differ only by floating-point rounding.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .utils.distributed import end_process_group


def launched_world_size() -> int | None:
    """The process count of the ``torchrun`` (or ``accelerate launch``) that started this
    process, or None outside one."""
    if "LOCAL_RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    return int(os.environ["WORLD_SIZE"])


def relaunch(nproc: int, argv: Sequence[str], threads_per_process: int | None = None) -> int:
    """Run ``python -m torchlora <argv>`` under ``torch.distributed.run`` with ``nproc`` processes
    on this machine (a free rendezvous port) and return its exit status.

    The children import the same torchlora as this process; each gets ``threads_per_process``
    torch threads (default: the CPU cores shared out), unless OMP_NUM_THREADS is set already.
    """
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 2:
        raise ValueError(f"nproc must be an integer >= 2 to relaunch, got {nproc!r}")
    import torchlora

    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(torchlora.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
    if "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(threads_per_process or max(1, (os.cpu_count() or 1) // nproc))
    # "--" ends torchrun's options: its parser would otherwise take abbreviations of its own
    # options (--nproc, --r) from the command's arguments
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "--", "torchlora", *argv]
    return subprocess.run(command, env=env, check=False).returncode


@contextlib.contextmanager
def process_group() -> Iterator[None]:
    """The default process group of a ``torchrun`` worker (gloo: the job trains on the CPU), for
    the duration of the block; nothing outside a launch or when one is initialized already."""
    if launched_world_size() is None or dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo")
    try:
        yield
    except BaseException:
        end_process_group(completed=False)
        raise
    end_process_group()


@dataclass(frozen=True)
class Replica:
    """This process's place in data-parallel training (rank 0 of 1 without a process group)."""

    rank: int
    world_size: int

    @classmethod
    def current(cls) -> "Replica":
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls(0, 1)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` under DDP with several processes (its gradients averaged), else itself."""
        if self.world_size == 1:
            return model
        return nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)

    def share(self, index: Tensor) -> tuple[Tensor, float]:
        """This process's rows of the global batch ``index`` and the factor of their summed loss.

        DDP averages the N gradients, so the factor N / len(index) makes the result the gradient
        of the global batch's mean loss. A process left without rows (a last batch smaller than
        N) still joins the gradient exchange, with one row weighted 0.
        """
        part = index.tensor_split(self.world_size)[self.rank]
        if part.numel() == 0:
            return index[:1], 0.0
        return part, self.world_size / index.numel()

    def global_sum(self, value: Tensor) -> Tensor:
        """``value`` summed over the processes (itself with one)."""
        if self.world_size == 1:
            return value
        total = value.detach().clone()
        dist.all_reduce(total)
        return total
