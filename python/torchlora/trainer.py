"""transformers' ``Trainer`` for torchlora models: checkpoints hold the adapter files
(``adapter_config.json`` + ``adapter_model.safetensors``), as they do for PEFT models.

transformers recognises a PEFT model only by ``isinstance(model, peft.PeftModel)``. A torchlora
``PeftModel`` is not one, so the plain ``Trainer`` would write the whole model's state dict into
every checkpoint and inspect the wrapper instead of the adapted model. ``LoraTrainerMixin``
gives a torchlora model PEFT's treatment: it is saved with ``save_pretrained`` (from the main
process only), resumed and reloaded as the best model from those adapter files, and its data
columns and labels come from the adapted model's ``forward``. Mix it into any ``Trainer``
subclass (``class MyTrainer(LoraTrainerMixin, SomeTrainer)``) or use :class:`LoraTrainer`.
Everything else (DDP, ``accelerate launch``, DeepSpeed, FSDP) is the Trainer's own.
"""

from __future__ import annotations

import inspect
import logging
import os
from typing import Any, Optional

import torch
import transformers
from torch import nn
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.utils import can_return_loss, find_labels

from . import peft_format
from .peft_model import PeftModel

logger = logging.getLogger(__name__)

TRAINING_ARGS_NAME = "training_args.bin"  # the Trainer's name for the saved TrainingArguments


def adapter_checkpoint_exists(checkpoint_dir: str, adapter_name: str = "default") -> bool:
    """Whether ``checkpoint_dir`` holds the files of ``adapter_name`` (PEFT's layout: "default"
    in the folder itself, any other adapter in ``<folder>/<name>``)."""
    folder = peft_format.adapter_folder(checkpoint_dir, adapter_name)
    if not os.path.isfile(os.path.join(folder, peft_format.CONFIG_NAME)):
        return False
    try:
        peft_format.adapter_weights_path(folder)
    except FileNotFoundError:
        return False
    return True


def load_adapter_checkpoint(model: PeftModel, checkpoint_dir: str) -> list[str]:
    """Load the weights of every adapter of ``model`` saved in ``checkpoint_dir`` into that
    adapter (which keeps its config, trainability and place in the model); returns their names.

    The active adapter must be there: a checkpoint without it raises FileNotFoundError. Keys and
    shapes are checked strictly (ValueError naming the file and key).
    """
    if not isinstance(model, PeftModel):
        raise TypeError(f"model must be a torchlora PeftModel, got {type(model).__name__}")
    active = model.active_adapters[0]
    if not adapter_checkpoint_exists(checkpoint_dir, active):
        raise FileNotFoundError(f"{checkpoint_dir}: no files of the active adapter {active!r} "
                                f"({peft_format.CONFIG_NAME} and adapter weights)")
    loaded = []
    for name in model.peft_config:
        if adapter_checkpoint_exists(checkpoint_dir, name):
            tensors, path = peft_format.read_adapter_weights(peft_format.adapter_folder(checkpoint_dir, name))
            model._load_adapter_file(name, tensors, path, torch_device=None)
            loaded.append(name)
    return loaded


class LoraTrainerMixin:
    """Treats a torchlora ``PeftModel`` as transformers' ``Trainer`` treats PEFT's (see the module
    docstring); any other model goes through the Trainer unchanged. Put it first among the bases."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        adapted = self._torchlora_adapted_model()
        if adapted is not None:
            # the Trainer looks at the adapted model, not at the wrapper, for a PEFT model
            if self.args.label_names is None:
                self.label_names = find_labels(type(adapted))
            self.can_return_loss = can_return_loss(type(adapted))
            if self.label_smoother is not None and type(adapted).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
                # the Trainer finds "causal LM, shift the labels" by PEFT's class only
                raise NotImplementedError("label_smoothing_factor > 0 with a causal LM is not supported for torchlora "
                                          "models: the Trainer would smooth unshifted labels")
            if hasattr(adapted, "accepts_loss_kwargs"):
                self.model_accepts_loss_kwargs = adapted.accepts_loss_kwargs
            else:
                self.model_accepts_loss_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD
                                                     for p in inspect.signature(adapted.forward).parameters.values())

    def _torchlora_model(self, model: Optional[nn.Module] = None) -> Optional[PeftModel]:
        """The torchlora PeftModel inside ``model`` (default: the Trainer's), or None."""
        unwrapped = self.accelerator.unwrap_model(model if model is not None else self.model, keep_torch_compile=False)
        return unwrapped if isinstance(unwrapped, PeftModel) else None

    def _torchlora_adapted_model(self) -> Optional[nn.Module]:
        model = self._torchlora_model()
        return None if model is None else model.get_base_model()

    def _set_signature_columns_if_needed(self) -> None:
        adapted = self._torchlora_adapted_model()
        if adapted is not None and self._signature_columns is None:
            columns = list(inspect.signature(adapted.forward).parameters)
            self._signature_columns = columns + sorted({"label", "label_ids", *self.label_names} - set(columns))
        super()._set_signature_columns_if_needed()

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict[str, torch.Tensor]] = None) -> None:
        model = self._torchlora_model()
        if model is None:
            super()._save(output_dir, state_dict=state_dict)
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        if state_dict is not None and not state_dict:
            # DeepSpeed ZeRO-3 without stage3_gather_16bit_weights_on_model_save: the Trainer
            # passes an empty dict and writes DeepSpeed's own checkpoint instead
            logger.warning("no gathered weights to save: the adapter files are not written (set "
                           "stage3_gather_16bit_weights_on_model_save in the DeepSpeed config)")
        else:
            model.save_pretrained(output_dir, state_dict=state_dict, is_main_process=True)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Optional[nn.Module] = None) -> None:
        target = self._torchlora_model(model)
        if target is None or not adapter_checkpoint_exists(resume_from_checkpoint, target.active_adapters[0]):
            super()._load_from_checkpoint(resume_from_checkpoint, model=model)
            return
        loaded = load_adapter_checkpoint(target, resume_from_checkpoint)
        logger.info("resumed adapters %s from %s", loaded, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        target = self._torchlora_model()
        best = self.state.best_model_checkpoint
        if (target is None or self.is_deepspeed_enabled or self.is_fsdp_enabled
                or not adapter_checkpoint_exists(best, target.active_adapters[0])):
            super()._load_best_model()
            return
        load_adapter_checkpoint(target, best)


class LoraTrainer(LoraTrainerMixin, transformers.Trainer):
    """``transformers.Trainer`` that saves, resumes and reloads torchlora models through their
    adapter files (PEFT's format), from the main process only."""
