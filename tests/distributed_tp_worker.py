"""Started once by tests/test_distributed_tp.py under torchrun (2 CPU processes, gloo), so the
processes pay for their start once: the operators' checks (distributed_tp_ops_worker.py), the
replicated factors of parallelize_lora made equal on every rank, then
examples/distributed/train_tp.py's ``main`` once per argument list given as a JSON list of lists."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import torch.distributed as dist

import distributed_tp_ops_worker
from torchlora.utils.distributed import end_process_group

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _example():
    path = os.path.join(ROOT, "examples", "distributed", "train_tp.py")
    spec = importlib.util.spec_from_file_location("train_tp_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_replicated_factors_synchronised(example) -> None:
    """Ranks that initialised their adapters differently hold rank 0's replicated factors after
    parallelize_lora (the sharded ones are scattered from rank 0 by parallelize_module)."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh

    import torchlora
    import torchlora.distributed as tl_dist

    torch.manual_seed(0)
    base = example.TinyMLP()
    torch.manual_seed(100 + dist.get_rank())  # a different adapter on every rank
    model = torchlora.get_peft_model(base, torchlora.LoraConfig(target_modules=["up", "down"], init_lora_weights=False))
    tl_dist.parallelize_lora(model, init_device_mesh("cpu", (dist.get_world_size(),)), example.MLP_STYLES)
    for name, param in model.named_parameters():
        if "lora_" not in name:
            continue
        value = param.full_tensor() if hasattr(param, "full_tensor") else param.detach()
        gathered = [torch.empty_like(value) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, value.contiguous())
        assert all(torch.equal(g, gathered[0]) for g in gathered), f"{name} differs between ranks"
    if dist.get_rank() == 0:
        print("OK replicated factors synchronised", flush=True)


def main() -> None:
    runs = json.loads(sys.argv[1])
    dist.init_process_group("gloo")
    try:
        distributed_tp_ops_worker.check_operators()
        example = _example()
        check_replicated_factors_synchronised(example)
        for argv in runs:
            example.main(argv)
            dist.barrier()
    finally:
        end_process_group(completed=sys.exc_info()[0] is None)


if __name__ == "__main__":
    main()
