"""LoRA fine-tuning with FSDP2 (``torch.distributed.fsdp.fully_shard``): every weight, frozen base
and trainable adapter alike, is sharded over the processes and gathered only while a layer runs.

    torchrun --nproc-per-node=2 examples/distributed/train_fsdp2.py --output-dir out
    torchrun --nproc-per-node=2 examples/distributed/train_fsdp2.py --output-dir out \\
        --mixed-precision bf16 --cpu-offload --model path/to/causal-lm

Add the adapter (``get_peft_model``) before ``fully_shard``, so that FSDP shards its weights and
reduces their gradients. Each decoder layer is sharded on its own, then the whole model.

- ``--mixed-precision bf16``: layers compute in bfloat16 on gathered bfloat16 copies; the
  sharded weights, the optimizer and the gradient reduction stay in float32.
- ``--cpu-offload``: the shards of the wrapped (frozen) base layers live in CPU memory and are
  copied to the device when gathered; the adapters stay on the device. Pinned memory is used
  where there is a GPU.

The saved adapter is gathered from the shards on every process (``save_pretrained`` must be
called by all of them) and written by rank 0 alone, in PEFT's files, to
``<output-dir>/adapter``; the losses go to ``<output-dir>/losses.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

import training_setup as setup
from torchlora import LoraLayer, PeftModel
from torchlora.utils.distributed import end_process_group


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    setup.add_common_args(parser)
    parser.add_argument("--mixed-precision", choices=("off", "bf16"), default="off")
    parser.add_argument("--cpu-offload", action="store_true", help="keep the frozen base layers' shards on the CPU")
    return parser.parse_args(argv)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformers model (the classes it names in ``_no_split_modules``)."""
    names = set(getattr(model.get_base_model(), "_no_split_modules", None) or ())
    return [module for module in model.modules() if type(module).__name__ in names]


def shard_model(model: PeftModel, mesh: DeviceMesh, mixed_precision: str = "off", cpu_offload: bool = False) -> None:
    """``fully_shard`` each LoRA layer's frozen base layer (offloaded with ``cpu_offload``), each
    decoder layer (with its adapters) and the whole model."""
    mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if mixed_precision == "bf16" else MixedPrecisionPolicy()
    if cpu_offload:
        # pinned host memory needs a GPU driver
        base_policy: OffloadPolicy = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
        for module in model.modules():
            if isinstance(module, LoraLayer):
                fully_shard(module.get_base_layer(), mesh=mesh, mp_policy=mp_policy, offload_policy=base_policy)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=mp_policy)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy)


def main(argv: Optional[Sequence[str]] = None) -> list[float]:
    """Train, save the adapter (gathered on every process, written by rank 0), and return the loss
    of every step (mean over processes)."""
    args = parse_args(argv)
    rank, world_size, device, started = setup.init_distributed()
    try:
        mesh = init_device_mesh(device.type, (world_size,))
        model = setup.build_peft_model(args).to(device)
        model.train()
        shard_model(model, mesh, args.mixed_precision, args.cpu_offload)
        optimizer = setup.make_optimizer(args, (p for p in model.parameters() if p.requires_grad))
        batches = setup.global_batches(args.steps, args.global_batch_size, args.seq_len, setup.vocab_size(model))
        losses = []
        for batch in batches:
            input_ids = setup.rank_share(batch, rank, world_size).to(device)
            loss = model(input_ids=input_ids, labels=input_ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(setup.mean_over_ranks(loss))
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
