"""torchlora.trainer in one process: transformers' Trainer saves, resumes and reloads a torchlora
model through its adapter files, as it does for PEFT models (the plain Trainer would not)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import Dataset
from transformers import TrainingArguments

import tiny_models as tm
import torchlora
from torchlora.trainer import LoraTrainer, adapter_checkpoint_exists, load_adapter_checkpoint


class _Tokens(Dataset):
    def __init__(self, count: int = 16, length: int = 8) -> None:
        self.ids = torch.randint(2, tm.VOCAB, (count, length), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _model(task_type: str | None = "CAUSAL_LM") -> torchlora.PeftModel:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torchlora.get_peft_model(tm.opt(), torchlora.LoraConfig(task_type=task_type, r=4, lora_dropout=0.0,
                                                                       target_modules=["q_proj", "v_proj"]))


def _args(tmp_path, **overrides) -> TrainingArguments:
    values = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_train_epochs=1,
                  learning_rate=1e-2, report_to="none", disable_tqdm=True, use_cpu=True, save_strategy="no")
    values.update(overrides)
    return TrainingArguments(**values)


def _lora_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def test_save_model_writes_the_adapter_files_not_the_model(tmp_path):
    model = _model()
    LoraTrainer(model=model, args=_args(tmp_path)).save_model(str(tmp_path / "ours"))
    ours = set(os.listdir(tmp_path / "ours"))
    assert {"adapter_config.json", "adapter_model.safetensors", "training_args.bin"} <= ours
    assert not ours & {"model.safetensors", "pytorch_model.bin"}
    saved = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    assert sorted(saved) == sorted(torchlora.get_peft_model_state_dict(model))


def test_columns_and_labels_come_from_the_adapted_model(tmp_path):
    model = _model(task_type=None)  # PeftModel.forward(*args, **kwargs) names no column
    trainer = LoraTrainer(model=model, args=_args(tmp_path))
    trainer._set_signature_columns_if_needed()
    assert {"input_ids", "attention_mask", "labels"} <= set(trainer._signature_columns)
    assert trainer.label_names == ["labels"]


def test_training_runs_and_resumes_from_adapter_checkpoints(tmp_path):
    data = _Tokens()
    args = _args(tmp_path, save_strategy="steps", save_steps=2, num_train_epochs=2, logging_steps=1,
                 data_seed=0, seed=0)
    model = _model()
    before = _lora_state(model)
    LoraTrainer(model=model, args=args, train_dataset=data).train()
    uninterrupted = _lora_state(model)
    assert any(not torch.equal(before[k], uninterrupted[k]) for k in before)
    checkpoint = str(tmp_path / "out" / "checkpoint-4")
    assert adapter_checkpoint_exists(checkpoint) and not os.path.exists(os.path.join(checkpoint, "model.safetensors"))

    resumed = _model()
    LoraTrainer(model=resumed, args=_args(tmp_path, save_strategy="no", num_train_epochs=2, data_seed=0, seed=0,
                                          output_dir=str(tmp_path / "again")),
                train_dataset=data).train(resume_from_checkpoint=checkpoint)
    for key, value in _lora_state(resumed).items():
        torch.testing.assert_close(value, uninterrupted[key], rtol=1e-5, atol=1e-6, msg=key)


def test_the_best_checkpoint_is_reloaded_from_its_adapter_files(tmp_path):
    data = _Tokens()
    args = _args(tmp_path, save_strategy="steps", save_steps=1, eval_strategy="steps", eval_steps=1,
                 load_best_model_at_end=True, metric_for_best_model="loss", num_train_epochs=2, learning_rate=0.5)
    model = _model()
    trainer = LoraTrainer(model=model, args=args, train_dataset=data, eval_dataset=data)
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and adapter_checkpoint_exists(best)
    saved = load_file(os.path.join(best, "adapter_model.safetensors"))
    for key, value in torchlora.get_peft_model_state_dict(model).items():
        torch.testing.assert_close(value, saved[key], msg=key)


def test_load_adapter_checkpoint_restores_every_saved_adapter(tmp_path):
    model = _model()
    model.add_adapter("extra", torchlora.LoraConfig(target_modules=["k_proj"], r=2, init_lora_weights=False))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_()
    model.save_pretrained(str(tmp_path / "ckpt"))
    saved = _lora_state(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.zero_()
    assert load_adapter_checkpoint(model, str(tmp_path / "ckpt")) == ["default", "extra"]
    for key, value in _lora_state(model).items():
        torch.testing.assert_close(value, saved[key], msg=key)


def test_load_adapter_checkpoint_errors(tmp_path):
    model = _model()
    with pytest.raises(FileNotFoundError, match="active adapter 'default'"):
        load_adapter_checkpoint(model, str(tmp_path))
    with pytest.raises(TypeError, match="torchlora PeftModel"):
        load_adapter_checkpoint(tm.opt(), str(tmp_path))
    other = torchlora.get_peft_model(tm.opt(), torchlora.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    other.save_pretrained(str(tmp_path / "r8"))
    with pytest.raises(ValueError, match="shape"):
        load_adapter_checkpoint(model, str(tmp_path / "r8"))


def test_label_smoothing_of_a_causal_lm_is_refused(tmp_path):
    with pytest.raises(NotImplementedError, match="label_smoothing_factor"):
        LoraTrainer(model=_model(), args=_args(tmp_path, label_smoothing_factor=0.1))
