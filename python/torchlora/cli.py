"""The ``torchlora`` command: ``finetune``, ``inspect`` and ``merge``.

    torchlora finetune [--epochs 2] [--output-dir DIR] ...   LoRA-fine-tune a text classifier
    torchlora inspect ADAPTER_DIR                           config, modules, ranks, parameter counts
    torchlora merge BASE ADAPTER_DIR OUT                    base + adapter -> merged transformers model

Exit status: 0 on success, 1 when a check of the fine-tuning job fails, 2 on a user error
(see :class:`UserError`), with a one-line message. Any other exception is a failure of
torchlora or of a library it uses: it propagates with its traceback (exit status 1).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

EXIT_OK, EXIT_CHECK_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class UserError(Exception):
    """Something the person at the command line gave and can fix: a bad option value, or an
    input file or folder that is malformed or not a valid adapter / model / data set. Raised
    from the ValueError, TypeError or NotImplementedError of the steps that check and read the
    user's input (:func:`user_input`)."""


# What main() reports in one line (exit status 2): the above, and paths that do not exist.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, FileNotFoundError, NotADirectoryError)


@contextlib.contextmanager
def user_input() -> Iterator[None]:
    """Marks the steps that check or read what the user gave: their ValueError, TypeError and
    NotImplementedError (the library's documented errors for bad input) become UserError.
    Everything outside such a step keeps its own type, and so its traceback."""
    try:
        yield
    except (ValueError, TypeError, NotImplementedError) as exc:
        raise UserError(str(exc)) from exc


_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


@contextlib.contextmanager
def offline_quiet_transformers() -> Iterator[None]:
    """What the commands need from transformers in this process, for their duration only:
    models are local folders, so the Hub stays offline (unless the user set these variables);
    its deprecation notices and download bars say nothing about the command. Undone on exit,
    so that main() called from Python leaves nothing behind."""
    added = [name for name in _OFFLINE_VARIABLES if name not in os.environ]
    for name in added:
        os.environ[name] = "1"
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\..*")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        for name in added:
            os.environ.pop(name, None)


# ----------------------------------------------------------------------------------- finetune
MIN_QUANTIZED_MERGE_AGREEMENT = 0.9
def _add_finetune_parser(subparsers: Any) -> None:
    from .finetune import FinetuneConfig

    defaults = FinetuneConfig()
    p = subparsers.add_parser(
        "finetune",
        help="LoRA-fine-tune a sentence encoder for text classification (default: all-MiniLM-L6-v2 on topics.jsonl)",
        description="Fine-tune with LoRA, report held-out accuracy before/after, save the adapter in PEFT's "
                    "format, check the reloaded and merged models predict the same, plot the training loss.",
    )
    p.add_argument("--model", default=None, help="transformers model folder (default: the packaged all-MiniLM-L6-v2)")
    p.add_argument("--data", default=None, help='JSONL file of {"text", "label"} rows (default: packaged topics.jsonl)')
    p.add_argument("--output-dir", default=defaults.output_dir,
                   help="where the adapter, merged model, plot and metrics go (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=defaults.epochs, help="passes over the training set (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="(default: %(default)s)")
    p.add_argument("--learning-rate", "--lr", type=float, default=defaults.learning_rate, help="AdamW learning rate, "
                   "decayed linearly to 0 (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help="(default: %(default)s)")
    p.add_argument("--r", "--rank", type=int, default=defaults.r, help="LoRA rank (default: %(default)s)")
    p.add_argument("--lora-alpha", type=float, default=defaults.lora_alpha, help="(default: %(default)s)")
    p.add_argument("--lora-dropout", type=float, default=defaults.lora_dropout, help="(default: %(default)s)")
    p.add_argument("--target-modules", default=",".join(defaults.target_modules),
                   help="comma-separated module names to adapt (default: %(default)s)")
    p.add_argument("--eval-fraction", type=float, default=defaults.eval_fraction,
                   help="share of each label held out for evaluation (default: %(default)s)")
    p.add_argument("--max-train-examples", type=int, default=None, help="use at most this many training examples")
    p.add_argument("--max-eval-examples", type=int, default=None, help="evaluate on at most this many examples")
    p.add_argument("--max-length", type=int, default=defaults.max_length,
                   help="token limit per sentence (default: %(default)s)")
    p.add_argument("--seed", type=int, default=defaults.seed,
                   help="seed of the split, the head's init, shuffling and dropout (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plot", action="store_true", help="do not write the loss plot")
    p.add_argument("--no-peft-check", action="store_true", help="skip reloading the adapter with PEFT")
    p.add_argument("--nproc", type=int, default=1,
                   help="data-parallel processes on this machine: the command relaunches itself under "
                        "torch.distributed.run with N processes, each training on its share of every batch (the "
                        "same steps as one process); only the first one prints and writes files (default: %(default)s)")
    quantized = p.add_mutually_exclusive_group()
    quantized.add_argument("--load-in-4bit", action="store_true",
                           help="QLoRA: quantize the encoder's Linear layers to bitsandbytes 4-bit nf4 (runs on the "
                                "CPU too; needs bitsandbytes); the merged model is then not saved, and must keep at "
                                f"least {round(100 * MIN_QUANTIZED_MERGE_AGREEMENT)}%% of the held-out predictions")
    quantized.add_argument("--load-in-8bit", action="store_true",
                           help="quantize the encoder's Linear layers to bitsandbytes int8 (needs bitsandbytes; the merged "
                                "model is handled as with --load-in-4bit)")
    p.set_defaults(handler=_run_finetune)


def _run_finetune(args: argparse.Namespace) -> int:
    from .finetune import FinetuneConfig, load_inputs, run_finetune
    from .finetune_parallel import launched_world_size, process_group, relaunch

    launched = launched_world_size()
    if args.nproc < 1:
        raise UserError(f"--nproc must be a positive integer, got {args.nproc}")
    if launched is not None and args.nproc not in (1, launched):
        raise UserError(f"--nproc {args.nproc} differs from the {launched} processes this launch started")

    config = FinetuneConfig(
        model=args.model,
        data=args.data,
        output_dir=args.output_dir,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        r=args.r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=[name.strip() for name in args.target_modules.split(",") if name.strip()],
        eval_fraction=args.eval_fraction,
        max_train_examples=args.max_train_examples,
        max_eval_examples=args.max_eval_examples,
        max_length=args.max_length,
        seed=args.seed,
        threads=args.threads,
        progress=not args.no_progress,
        plot=not args.no_plot,
        check_peft=not args.no_peft_check,
        load_in_4bit=args.load_in_4bit,
        load_in_8bit=args.load_in_8bit,
    )
    with offline_quiet_transformers():
        with user_input():
            inputs = load_inputs(config)  # user errors surface here, before any process is started
        if launched is None and args.nproc > 1:
            return relaunch(args.nproc, args.argv, threads_per_process=args.threads)
        with process_group():
            result = run_finetune(config, inputs=inputs)
    if result is None:  # a process other than rank 0: rank 0 checks and reports
        return EXIT_OK
    failed = [
        name
        for name, ok in (
            ("reload by torchlora", result.torchlora_reload_same_predictions),
            ("reload by PEFT", result.peft_reload_same_predictions),
            # a quantized base rounds the merged weights again: most predictions must survive it
            ("merged model", result.merged_same_predictions if result.quantization is None
             else result.merged_prediction_agreement >= MIN_QUANTIZED_MERGE_AGREEMENT),
        )
        if ok is False
    ]
    if failed:
        print(f"error: predictions changed after: {', '.join(failed)}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    return EXIT_OK


# ----------------------------------------------------------------------------------- inspect
def _add_inspect_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("inspect", help="print an adapter folder's config, modules, ranks and parameter counts")
    p.add_argument("adapter_dir", help="folder with adapter_config.json and adapter_model.safetensors (or .bin)")
    p.set_defaults(handler=_run_inspect)


def _lora_suffixes() -> tuple[str, ...]:
    from .peft_format import LORA_TENSOR_NAMES

    return tuple("." + name for name in LORA_TENSOR_NAMES)


def describe_adapter(adapter_dir: str) -> dict[str, Any]:
    """Summary of one adapter folder: config, per-module ranks/shapes, parameter counts."""
    from .adapter_io import PEFT_KEY_PREFIX, read_adapter_config, read_adapter_weights

    with user_input():
        config = read_adapter_config(adapter_dir)
        tensors, weights_path = read_adapter_weights(adapter_dir)
    modules: dict[str, dict[str, Any]] = {}
    other: dict[str, tuple[int, ...]] = {}
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in tensors.values()})
    for key, tensor in sorted(tensors.items()):
        name = key[len(PEFT_KEY_PREFIX):]
        suffix = next((s for s in _lora_suffixes() if name.endswith(s)), None)
        if suffix is None:
            other[name] = tuple(tensor.shape)
            continue
        entry = modules.setdefault(name[: -len(suffix)], {"params": 0})
        entry["params"] += tensor.numel()
        if suffix in (".lora_A.weight", ".lora_embedding_A"):
            entry["rank"] = int(tensor.shape[0])
            entry["kind"] = "embedding" if suffix == ".lora_embedding_A" else ("conv" if tensor.dim() == 4 else "linear")
            entry["A"] = tuple(tensor.shape)
        elif suffix in (".lora_B.weight", ".lora_embedding_B"):
            entry["B"] = tuple(tensor.shape)
        else:
            entry["bias"] = True
    return {
        "config": config,
        "weights_file": weights_path,
        "dtypes": dtypes,
        "modules": modules,
        "other_tensors": other,
        "lora_params": sum(m["params"] for m in modules.values()),
        "other_params": sum(int(_numel(s)) for s in other.values()),
    }


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for size in shape:
        out *= size
    return out


def _print_adapter(title: str, info: dict[str, Any]) -> None:
    config = info["config"]
    print(f"== {title}")
    print(f"weights: {info['weights_file']} ({', '.join(info['dtypes'])})")
    for key in ("peft_type", "task_type", "base_model_name_or_path", "r", "lora_alpha", "use_rslora", "lora_dropout",
                "bias", "lora_bias", "fan_in_fan_out", "init_lora_weights", "inference_mode"):
        if key in config:
            print(f"  {key}: {config[key]}")
    targets = config.get("target_modules")
    if isinstance(targets, list):
        targets = ", ".join(sorted(targets))
    print(f"  target_modules: {targets}")
    for key in ("exclude_modules", "modules_to_save", "rank_pattern", "alpha_pattern", "layers_to_transform"):
        if config.get(key):
            print(f"  {key}: {config[key]}")
    modules = info["modules"]
    print(f"LoRA modules: {len(modules)}")
    if modules:
        width = max(len(name) for name in modules)
        print(f"  {'module':<{width}}  kind       rank  A shape          B shape          params")
        for name, m in modules.items():
            a = "x".join(map(str, m.get("A", ())))
            b = "x".join(map(str, m.get("B", ())))
            kind = m.get("kind", "?") + ("+bias" if m.get("bias") else "")
            print(f"  {name:<{width}}  {kind:<10} {m.get('rank', '?'):>4}  {a:<16} {b:<16} {m['params']:>8,}")
    if info["other_tensors"]:
        print(f"other tensors (modules_to_save, biases, embedding layers): {len(info['other_tensors'])}")
        for name, shape in info["other_tensors"].items():
            print(f"  {name}: {'x'.join(map(str, shape))}")
    print(f"parameters: LoRA {info['lora_params']:,} + other {info['other_params']:,} "
          f"= {info['lora_params'] + info['other_params']:,}")


def _run_inspect(args: argparse.Namespace) -> int:
    from .adapter_io import CONFIG_NAME

    root = args.adapter_dir
    found = False
    if os.path.isfile(os.path.join(root, CONFIG_NAME)):
        _print_adapter(f"adapter 'default' in {root}", describe_adapter(root))
        found = True
    if os.path.isdir(root):
        for name in sorted(os.listdir(root)):
            sub = os.path.join(root, name)
            if os.path.isfile(os.path.join(sub, CONFIG_NAME)):
                _print_adapter(f"adapter '{name}' in {sub}", describe_adapter(sub))
                found = True
    if not found:
        describe_adapter(root)  # raises the precise FileNotFoundError
    return EXIT_OK


# ----------------------------------------------------------------------------------- merge
_AUTO_CLASS_BY_TASK = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}
_HEAD_KEYS = ("base_model.model.classifier.weight", "base_model.model.score.weight")


def _add_merge_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("merge", help="merge an adapter into its base model and save the merged model")
    p.add_argument("base", help="transformers model folder of the base model")
    p.add_argument("adapter", help="adapter folder (PEFT or torchlora)")
    p.add_argument("out", help="output folder for the merged model")
    p.add_argument("--model-class", default=None,
                   help="transformers Auto class (default: from the adapter's task_type, e.g. "
                        "AutoModelForSequenceClassification for SEQ_CLS; AutoModel without one)")
    p.add_argument("--num-labels", type=int, default=None,
                   help="classification labels (default: from the adapter's classifier/score weights)")
    p.add_argument("--no-safe-merge", action="store_true", help="skip the finiteness check while merging")
    p.set_defaults(handler=_run_merge)


def _num_labels_from_adapter(adapter_dir: str) -> int | None:
    from safetensors import SafetensorError, safe_open

    from .adapter_io import adapter_weights_path, read_adapter_weights

    path = adapter_weights_path(adapter_dir)
    if path.endswith(".safetensors"):
        try:
            with safe_open(path, framework="pt") as handle:
                for key in _HEAD_KEYS:
                    if key in handle.keys():
                        return int(handle.get_slice(key).get_shape()[0])
            return None
        except (SafetensorError, OSError) as exc:
            raise UserError(f"{path}: malformed or truncated safetensors file: {exc}") from exc
    with user_input():
        tensors, _ = read_adapter_weights(adapter_dir)
    return next((int(tensors[k].shape[0]) for k in _HEAD_KEYS if k in tensors), None)


def merge_adapter_into_base(base: str, adapter: str, out: str, model_class: str | None = None,
                            num_labels: int | None = None, safe_merge: bool = True) -> str:
    """Load ``base`` with transformers, apply ``adapter``, merge_and_unload, save to ``out``.

    Returns the transformers class name used. The tokenizer is copied when ``base`` has one.
    Bad input (a missing folder, an invalid adapter, a class that is not a transformers
    model) raises FileNotFoundError or UserError.
    """
    import transformers

    from .adapter_io import read_adapter_config
    from .peft_model import PeftModel

    if not os.path.isdir(base):
        raise FileNotFoundError(f"base model folder {base!r} does not exist")
    with user_input():
        config = read_adapter_config(adapter)
    task = config.get("task_type")
    class_name = model_class or _AUTO_CLASS_BY_TASK.get(str(task), "AutoModel")
    auto_class = getattr(transformers, class_name, None)
    if auto_class is None or not hasattr(auto_class, "from_pretrained"):
        raise UserError(f"--model-class {class_name!r} is not a transformers model class")
    load_kwargs: dict[str, Any] = {}
    if num_labels is not None or task in ("SEQ_CLS", "TOKEN_CLS"):
        labels = num_labels if num_labels is not None else _num_labels_from_adapter(adapter)
        if labels is not None:
            load_kwargs["num_labels"] = labels
    model = auto_class.from_pretrained(base, **load_kwargs)
    # the adapter's files against this base model: missing, unknown or mis-shaped keys are
    # ValueErrors naming the file and key
    with user_input():
        adapted = PeftModel.from_pretrained(model, adapter)
    merged = adapted.merge_and_unload(safe_merge=safe_merge)
    merged.save_pretrained(out)
    if os.path.isfile(os.path.join(base, "tokenizer_config.json")):
        transformers.AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return type(merged).__name__


def _run_merge(args: argparse.Namespace) -> int:
    with offline_quiet_transformers():
        class_name = merge_adapter_into_base(args.base, args.adapter, args.out, args.model_class, args.num_labels,
                                             safe_merge=not args.no_safe_merge)
    print(f"merged {args.adapter} into {args.base} ({class_name}); saved {args.out}")
    return EXIT_OK


# ----------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torchlora", description="LoRA adapters with torchlora (PEFT-compatible).")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_finetune_parser(subparsers)
    _add_inspect_parser(subparsers)
    _add_merge_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``torchlora`` console script; returns the exit status.

    User errors (:data:`USER_ERRORS`; argparse handles bad arguments itself) end in one line
    on stderr and status 2; every other exception propagates with its traceback.
    """
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for a command that relaunches itself
    try:
        return args.handler(args)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
