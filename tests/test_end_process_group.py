"""torchlora.utils.distributed.end_process_group in one process (a gloo group of one)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from distributed_launch import free_port
from torchlora.utils.distributed import end_process_group

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch built without torch.distributed")


def _start_group() -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)


def test_without_a_process_group_it_does_nothing():
    assert not dist.is_initialized()
    end_process_group()
    end_process_group(completed=False)
    assert not dist.is_initialized()


@pytest.mark.parametrize("completed", [True, False])
def test_it_destroys_the_default_group_after_its_collectives(completed):
    _start_group()
    try:
        value = torch.ones(3)
        dist.all_reduce(value)
        del value  # the worker thread may still hold the collective; the barriers let it go
        end_process_group(completed=completed)
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    _start_group()  # a new group can start after it
    end_process_group()
    assert not dist.is_initialized()
