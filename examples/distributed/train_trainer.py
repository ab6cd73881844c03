"""LoRA fine-tuning with transformers' Trainer on one process or several (data parallel).

    python examples/distributed/train_trainer.py --output-dir out
    torchrun --nproc-per-node=2 examples/distributed/train_trainer.py --output-dir out
    accelerate launch --multi_gpu --num_processes 2 examples/distributed/train_trainer.py --output-dir out
    torchrun --nproc-per-node=2 examples/distributed/train_trainer.py --output-dir out \
        --deepspeed examples/distributed/ds_zero2.json     # or ds_zero3.json

Without a GPU the processes run on the CPU and talk over gloo (``accelerate launch --cpu``
starts a single process unless MPI launches the others, so use ``--multi_gpu`` there: it only
means "torchrun under the hood"); DeepSpeed then uses its CPU accelerator (it compiles a small
shared-memory collective with the C++ compiler on its first run). By default a tiny OPT built
from a config learns a fixed random token data set, offline; ``--model`` takes a local
causal-LM folder instead.

The global batch (``--global-batch-size``) is split evenly over the processes and read in
order, so each optimizer step sees the same examples whatever the process count: one process
and N processes end with the same adapter. Checkpoints (every ``--save-steps``) hold the adapter
files, the optimizer, scheduler and RNG states; ``--resume-from-checkpoint DIR`` continues from
one. The main process writes ``<output-dir>/adapter`` (PEFT's format) and
``<output-dir>/log_history.json``.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Optional

import torch
from torch.utils.data import Dataset, Sampler, SequentialSampler
from transformers import TrainingArguments

from torchlora import LoraConfig, get_peft_model
from torchlora.trainer import LoraTrainer
from torchlora.utils.distributed import end_process_group

TINY_VOCAB = 64


def tiny_opt() -> torch.nn.Module:
    """A 2-layer OPT with 64-wide layers, random weights, no dropout (nothing downloaded)."""
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(vocab_size=TINY_VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=64, word_embed_proj_dim=64, dropout=0.0, attention_dropout=0.0)
    return OPTForCausalLM(config)


def load_model(path: Optional[str]) -> torch.nn.Module:
    if path is None:
        return tiny_opt()
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


class RandomTokens(Dataset):
    """``count`` fixed sequences of ``length`` random tokens (seeded), the labels being the inputs
    (causal LM); every sequence has the same length, so every process counts the same tokens."""

    def __init__(self, count: int, length: int, vocab_size: int, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(2, vocab_size, (count, length), generator=generator)

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "attention_mask": torch.ones_like(self.ids[index]),
                "labels": self.ids[index]}


class InOrderTrainer(LoraTrainer):
    """Reads the training set in order: with accelerate's sharding, process p of N takes the
    p-th micro-batch of each run of N, so global step k covers the same examples as one process
    with an N times larger batch."""

    def _get_train_sampler(self, train_dataset: Optional[Dataset] = None) -> Sampler:
        return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="local causal-LM folder (default: a tiny OPT from a config)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--global-batch-size", type=int, default=8, help="examples per optimizer step, all processes")
    p.add_argument("--num-examples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=16)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--learning-rate", type=float, default=1e-2)
    p.add_argument("--r", type=int, default=4)
    p.add_argument("--save-steps", type=int, default=4)
    p.add_argument("--resume-from-checkpoint", default=None)
    p.add_argument("--deepspeed", default=None, help="DeepSpeed config json (e.g. examples/distributed/ds_zero2.json)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def training_arguments(args: argparse.Namespace, world_size: int) -> TrainingArguments:
    if args.global_batch_size % world_size:
        raise ValueError(f"--global-batch-size {args.global_batch_size} does not split over {world_size} processes")
    return TrainingArguments(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.global_batch_size // world_size,
        num_train_epochs=args.epochs,
        learning_rate=args.learning_rate,
        lr_scheduler_type="linear",
        logging_steps=1,
        save_strategy="steps",
        save_steps=args.save_steps,
        report_to="none",
        disable_tqdm=True,
        seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
        ddp_find_unused_parameters=False,  # every LoRA weight gets a gradient
        deepspeed=args.deepspeed,
    )


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    training_args = training_arguments(args, world_size)
    # the process group before the model: under DeepSpeed ZeRO-3, from_pretrained partitions the
    # weights over the processes as it loads them
    print(f"process {training_args.process_index} of {world_size} on {training_args.device}")
    if args.deepspeed:
        import deepspeed

        deepspeed.init_distributed()  # DeepSpeed's own handle on that group, which ZeRO-3's loading reads
    torch.manual_seed(args.seed)
    model = get_peft_model(load_model(args.model), LoraConfig(task_type="CAUSAL_LM", r=args.r, lora_alpha=2 * args.r,
                                                              lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    vocab_size = model.get_base_model().config.vocab_size
    trainer = InOrderTrainer(model=model, args=training_args,
                             train_dataset=RandomTokens(args.num_examples, args.seq_len, vocab_size, args.seed))
    result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model(os.path.join(args.output_dir, "adapter"))
    if trainer.is_world_process_zero():
        with open(os.path.join(args.output_dir, "log_history.json"), "w", encoding="utf-8") as handle:
            json.dump(trainer.state.log_history, handle, indent=1)
        print(f"world size {world_size}: {result.global_step} steps, training loss {result.training_loss:.4f}; "
              f"adapter in {os.path.join(args.output_dir, 'adapter')}")
    return trainer.state.log_history


if __name__ == "__main__":
    main()
    end_process_group()  # the Trainer started the process group and leaves it to the script to end
