"""LoRA fine-tuning with DistributedDataParallel: every process holds the whole model, only the
adapter's weights are trained, and DDP averages their gradients.

    torchrun --nproc-per-node=2 examples/distributed/train_ddp.py --output-dir out
    torchrun --nproc-per-node=2 examples/distributed/train_ddp.py --output-dir out \\
        --gradient-checkpointing reentrant --lora-dropout 0.1 --model path/to/causal-lm

On GPUs each process takes one (NCCL); without GPUs the processes run on the CPU over gloo.
Every step's global batch (``--global-batch-size``) is split evenly over the processes, so N
processes compute the gradients of one process on the whole batch. The frozen base weights
take no gradients, and every adapter weight takes one in every step, so DDP runs with
``find_unused_parameters=False``. Rank 0 writes ``<output-dir>/adapter`` (PEFT's files:
``adapter_config.json`` + ``adapter_model.safetensors``) and ``<output-dir>/losses.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import training_setup as setup
from torchlora.utils.distributed import end_process_group


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    setup.add_common_args(parser)
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> list[float]:
    """Train, save the adapter on rank 0, and return the loss of every step (mean over processes)."""
    args = parse_args(argv)
    rank, world_size, device, started = setup.init_distributed()
    try:
        model = setup.build_peft_model(args).to(device)
        model.train()
        ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                            find_unused_parameters=False)
        optimizer = setup.make_optimizer(args, (p for p in ddp_model.parameters() if p.requires_grad))
        batches = setup.global_batches(args.steps, args.global_batch_size, args.seq_len, setup.vocab_size(model))
        losses = []
        for batch in batches:
            input_ids = setup.rank_share(batch, rank, world_size).to(device)
            loss = ddp_model(input_ids=input_ids, labels=input_ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(setup.mean_over_ranks(loss))
        # every process holds the same adapter; the main process alone writes it
        model.save_pretrained(os.path.join(args.output_dir, "adapter"), is_main_process=rank == 0)
        if rank == 0:
            setup.write_losses(args.output_dir, losses, {"world_size": world_size})
            print(f"losses: {[round(x, 5) for x in losses]}; adapter in {args.output_dir}/adapter")
        return losses
    finally:
        if started:
            end_process_group(completed=sys.exc_info()[0] is None)


if __name__ == "__main__":
    main()
