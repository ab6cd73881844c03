"""Started once by tests/test_distributed_tp.py under torchrun (2 CPU processes, gloo), so the
processes pay for their start once: the operators' checks (distributed_tp_ops_worker.py), then
examples/distributed/train_tp.py's ``main`` once per argument list given as a JSON list of lists."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import torch.distributed as dist

import distributed_tp_ops_worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _example():
    path = os.path.join(ROOT, "examples", "distributed", "train_tp.py")
    spec = importlib.util.spec_from_file_location("train_tp_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    runs = json.loads(sys.argv[1])
    dist.init_process_group("gloo")
    try:
        distributed_tp_ops_worker.check_operators()
        example = _example()
        for argv in runs:
            example.main(argv)
            dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
