"""The adapter folder format, crash-safe writing, and an error for every malformed file."""

from __future__ import annotations

import json
import os
import struct
import warnings

import peft
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import tiny_models as tm
import torchlora
from torchlora import peft_format
from torchlora.nn import LoraLayer

IDS = tm.input_ids()
PREFIX = "base_model.model."


def _model(config: dict | None = None, builder=tm.bert_seq_cls):
    config = config or {"task_type": "SEQ_CLS", "target_modules": ["query", "value"], "r": 4,
                        "init_lora_weights": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torchlora.get_peft_model(builder(), torchlora.LoraConfig(**config)).eval()


def _out(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.fixture
def saved(tmp_path):
    """(folder, model that wrote it)."""
    model = _model()
    model.save_pretrained(str(tmp_path))
    return str(tmp_path), model


def _load(folder, builder=tm.bert_seq_cls):
    return torchlora.PeftModel.from_pretrained(builder(), folder)


def _weights(folder):
    with safe_open(os.path.join(folder, "adapter_model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _rewrite_weights(folder, tensors):
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})


def _rewrite_config(folder, **changes):
    path = os.path.join(folder, "adapter_config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(changes)
    with open(path, "w") as f:
        json.dump(config, f)


# ------------------------------------------------------------------------------- format
def test_config_keys_are_peft_keys(saved):
    folder, _ = saved
    with open(os.path.join(folder, "adapter_config.json")) as f:
        config = json.load(f)
    peft_fields = set(peft.LoraConfig.__dataclass_fields__)
    assert set(config) <= peft_fields and set(config) <= peft_format.PEFT_LORA_CONFIG_KEYS
    assert config["peft_type"] == "LORA" and config["inference_mode"] is True
    assert sorted(config["target_modules"]) == ["query", "value"]
    assert sorted(config["modules_to_save"]) == ["classifier", "score"]
    peft.LoraConfig(**{k: v for k, v in config.items() if k != "peft_type"})  # PEFT accepts the file
    # no newer feature used: only long-standing keys, so older PEFT versions read the file too
    assert set(config) <= peft_format.PEFT_BASELINE_KEYS


def test_newer_config_keys_are_written_when_used(tmp_path):
    _model({"target_modules": ["query"], "exclude_modules": ["nothing"], "lora_bias": True, "r": 2},
           builder=tm.bert).save_pretrained(str(tmp_path))
    with open(tmp_path / "adapter_config.json") as f:
        config = json.load(f)
    assert config["lora_bias"] is True and config["exclude_modules"] == ["nothing"]


def test_all_linear_is_written_as_module_names(tmp_path):
    model = _model({"target_modules": "all-linear", "r": 2})
    model.save_pretrained(str(tmp_path))
    with open(tmp_path / "adapter_config.json") as f:
        targets = json.load(f)["target_modules"]
    assert isinstance(targets, list) and "all-linear" not in targets
    wrapped = {n for n, m in model.get_base_model().named_modules() if isinstance(m, LoraLayer)}
    assert {t for t in targets} and all(any(w == t or w.endswith("." + t) for w in wrapped) for t in targets)


def test_tensor_keys_metadata_and_values(saved):
    folder, model = saved
    with safe_open(os.path.join(folder, "adapter_model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
    layer0 = f"{PREFIX}bert.encoder.layer.0.attention.self.query"
    assert f"{layer0}.lora_A.weight" in keys and f"{layer0}.lora_B.weight" in keys
    assert f"{PREFIX}classifier.weight" in keys and f"{PREFIX}classifier.bias" in keys
    assert not any(".default" in k for k in keys)
    state = torchlora.get_peft_model_state_dict(model)
    weights = _weights(folder)
    assert set(weights) == set(state)
    for key in state:
        torch.testing.assert_close(weights[key], state[key], rtol=0, atol=0)


def test_embedding_lora_bias_and_conv_key_names(tmp_path):
    _model({"target_modules": ["word_embeddings"], "r": 2}, builder=tm.bert).save_pretrained(str(tmp_path / "emb"))
    keys = set(_weights(str(tmp_path / "emb")))
    emb = f"{PREFIX}embeddings.word_embeddings"
    assert keys == {f"{emb}.lora_embedding_A", f"{emb}.lora_embedding_B"}
    _model({"target_modules": ["query"], "lora_bias": True, "r": 2}, builder=tm.bert).save_pretrained(
        str(tmp_path / "bias"))
    assert f"{PREFIX}encoder.layer.0.attention.self.query.lora_B.bias" in set(_weights(str(tmp_path / "bias")))

    conv = _model({"target_modules": r".*\.convolution", "r": 2}, builder=tm.resnet)
    conv.save_pretrained(str(tmp_path / "conv"))
    shapes = {k: tuple(v.shape) for k, v in _weights(str(tmp_path / "conv")).items()}
    a_key = next(k for k in shapes if k.endswith("lora_A.weight"))
    assert len(shapes[a_key]) == 4 and shapes[a_key][0] == 2


def test_other_adapters_go_to_subfolders_and_selected_adapters(tmp_path):
    model = _model()
    model.add_adapter("second", torchlora.LoraConfig(task_type="SEQ_CLS", target_modules=["key"], r=2))
    model.save_pretrained(str(tmp_path / "all"))
    assert os.path.isfile(tmp_path / "all" / "adapter_config.json")
    assert os.path.isfile(tmp_path / "all" / "second" / "adapter_model.safetensors")
    model.save_pretrained(str(tmp_path / "one"), selected_adapters=["second"])
    assert not os.path.exists(tmp_path / "one" / "adapter_config.json")
    assert os.path.isfile(tmp_path / "one" / "second" / "adapter_config.json")
    with pytest.raises(ValueError, match="nope"):
        model.save_pretrained(str(tmp_path / "bad"), selected_adapters=["nope"])
    with pytest.raises(TypeError, match="bogus"):
        model.save_pretrained(str(tmp_path / "bad"), bogus=1)


def test_is_main_process_false_writes_nothing(tmp_path):
    _model().save_pretrained(str(tmp_path / "x"), is_main_process=False)
    assert not os.path.exists(tmp_path / "x")


def test_legacy_bin_round_trip_and_stale_file_removed(tmp_path):
    model = _model()
    model.save_pretrained(str(tmp_path))
    model.save_pretrained(str(tmp_path), safe_serialization=False)
    assert os.path.isfile(tmp_path / "adapter_model.bin")
    assert not os.path.exists(tmp_path / "adapter_model.safetensors")  # would shadow the new .bin
    torch.testing.assert_close(_out(_load(str(tmp_path))), _out(model))
    peft_model = peft.PeftModel.from_pretrained(tm.bert_seq_cls(), str(tmp_path))
    torch.testing.assert_close(_out(peft_model), _out(model))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_files_load_into_float32(saved, dtype):
    folder, model = saved
    _rewrite_weights(folder, {k: v.to(dtype) for k, v in _weights(folder).items()})
    loaded = _load(folder)
    params = [p for n, p in loaded.named_parameters() if "lora_" in n]
    assert params and all(p.dtype == torch.float32 for p in params)
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(_out(loaded), _out(model), rtol=tol, atol=tol)


def test_loaded_adapter_is_frozen_unless_trainable(saved):
    folder, _ = saved
    frozen = _load(folder)
    assert not any(p.requires_grad for p in frozen.parameters()) and not frozen.training
    assert frozen.peft_config["default"].inference_mode is True
    trainable = torchlora.PeftModel.from_pretrained(tm.bert_seq_cls(), folder, is_trainable=True)
    names = {n for n, p in trainable.named_parameters() if p.requires_grad}
    assert names and all(("lora_" in n or "modules_to_save" in n) for n in names)
    assert trainable.peft_config["default"].inference_mode is False
    assert type(frozen).__name__ == "PeftModelForSequenceClassification"


def test_load_adapter_adds_a_second_adapter(saved):
    folder, model = saved
    loaded = _load(folder)
    loaded.load_adapter(folder, adapter_name="again")
    assert set(loaded.peft_config) == {"default", "again"}
    assert not any(p.requires_grad for n, p in loaded.named_parameters() if ".again" in n)
    loaded.set_adapter("again")
    torch.testing.assert_close(_out(loaded), _out(model))
    with pytest.raises(ValueError, match="already exists"):
        loaded.load_adapter(folder, adapter_name="again")


# ------------------------------------------------------------------------------- atomicity
def test_atomic_write_keeps_old_file_on_error(tmp_path):
    path = str(tmp_path / "f.txt")
    peft_format.atomic_write(path, lambda h: h.write(b"old"))

    def fail(handle):
        handle.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        peft_format.atomic_write(path, fail)
    assert open(path, "rb").read() == b"old"
    assert os.listdir(tmp_path) == ["f.txt"]  # no temporary file left behind


def test_interrupted_save_never_loads_as_another_adapter(tmp_path, monkeypatch):
    """Overwrite a folder and fail after the new weights are in place: the folder must refuse to
    load (no config) instead of pairing the new weights with the old config."""
    folder = str(tmp_path)
    old = _model()
    old.save_pretrained(folder)
    new = _model({"task_type": "SEQ_CLS", "target_modules": ["query", "value"], "r": 4,
                  "lora_alpha": 32, "init_lora_weights": False})
    real_write = peft_format.atomic_write

    def crash_on_config(path, write):
        if path.endswith("adapter_config.json"):
            raise KeyboardInterrupt("power cut")
        real_write(path, write)

    monkeypatch.setattr(peft_format, "atomic_write", crash_on_config)
    with pytest.raises(KeyboardInterrupt):
        new.save_pretrained(folder)
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        _load(folder)
    assert not [n for n in os.listdir(folder) if n.endswith(".tmp")]
    new.save_pretrained(folder)  # a complete save then loads as the new adapter
    torch.testing.assert_close(_out(_load(folder)), _out(new))


def test_interrupted_weights_write_leaves_no_loadable_mix(tmp_path, monkeypatch):
    folder = str(tmp_path)
    _model().save_pretrained(folder)

    def crash(path, write):
        raise OSError("disk full")

    monkeypatch.setattr(peft_format, "atomic_write", crash)
    with pytest.raises(OSError):
        _model().save_pretrained(folder)
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError):
        _load(folder)


def test_save_into_a_file_path_is_an_error(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        _model().save_pretrained(str(path))


# ------------------------------------------------------------------------------- errors
def test_missing_folder_config_and_weights(tmp_path, saved):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _load(str(tmp_path / "nowhere"))
    folder, _ = saved
    os.remove(os.path.join(folder, "adapter_model.safetensors"))
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        _load(folder)
    os.remove(os.path.join(folder, "adapter_config.json"))
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        _load(folder)


@pytest.mark.parametrize(
    "text, match",
    [
        ('{"r": 4, ', "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"r": 4}', "'peft_type' is missing"),
        ('{"peft_type": "IA3"}', "only implements LoRA"),
        ('{"peft_type": "LORA", "r": "four"}', "r must be an int"),
        ('{"peft_type": "LORA", "target_modules": ["query"], "made_up_key": 1}', "made_up_key"),
        ('{"peft_type": "LORA", "target_modules": ["query"], "use_qalora": true}', "use_qalora"),
        ('{"peft_type": "LORA", "target_modules": ["query"], "bias": "some"}', "bias"),
    ],
)
def test_malformed_config_is_an_error_naming_the_file(saved, text, match):
    folder, _ = saved
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        f.write(text)
    model = tm.bert_seq_cls()
    # a value of the wrong type is a TypeError and an option torchlora lacks NotImplementedError,
    # as in LoraConfig(r="four") and LoraConfig(use_qalora=True)
    with pytest.raises((ValueError, TypeError, NotImplementedError), match=match) as info:
        torchlora.PeftModel.from_pretrained(model, folder)
    assert "adapter_config.json" in str(info.value)
    assert not any(isinstance(m, LoraLayer) for m in model.modules())  # the model was not touched


def test_truncated_safetensors(saved):
    folder, _ = saved
    path = os.path.join(folder, "adapter_model.safetensors")
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) - 100])
    with pytest.raises(ValueError, match="adapter_model.safetensors"):
        _load(folder)


@pytest.mark.parametrize("payload", [b"", b"\x00" * 4, struct.pack("<Q", 10**9) + b"{}", struct.pack("<Q", 8) + b"not json"])
def test_malformed_safetensors(saved, payload):
    folder, _ = saved
    with open(os.path.join(folder, "adapter_model.safetensors"), "wb") as f:
        f.write(payload)
    with pytest.raises(ValueError, match="adapter_model.safetensors"):
        _load(folder)


def test_wrong_shape_names_the_key(saved):
    folder, _ = saved
    weights = _weights(folder)
    key = f"{PREFIX}bert.encoder.layer.1.attention.self.value.lora_A.weight"
    weights[key] = torch.zeros(5, weights[key].shape[1])
    _rewrite_weights(folder, weights)
    with pytest.raises(ValueError, match=r"layer\.1\.attention\.self\.value\.lora_A\.weight.*shape"):
        _load(folder)


def test_key_matching_nothing_names_the_key(saved):
    folder, _ = saved
    weights = _weights(folder)
    weights[f"{PREFIX}bert.encoder.layer.0.attention.self.key.lora_A.weight"] = torch.zeros(4, 32)
    _rewrite_weights(folder, weights)
    with pytest.raises(ValueError, match=r"self\.key\.lora_A\.weight.*matches no adapter parameter"):
        _load(folder)


def test_targeted_module_missing_from_file_names_the_key(saved):
    folder, _ = saved
    weights = _weights(folder)
    del weights[f"{PREFIX}bert.encoder.layer.0.attention.self.query.lora_B.weight"]
    _rewrite_weights(folder, weights)
    with pytest.raises(ValueError, match=r"lacks key .*layer\.0\.attention\.self\.query\.lora_B\.weight"):
        _load(folder)


def test_modules_to_save_missing_from_file(saved):
    folder, _ = saved
    weights = _weights(folder)
    del weights[f"{PREFIX}classifier.bias"]
    _rewrite_weights(folder, weights)
    with pytest.raises(ValueError, match=r"classifier\.bias"):
        _load(folder)


@pytest.mark.parametrize("bad", ["int", "nan", "prefix"])
def test_bad_tensor_values(saved, bad):
    folder, _ = saved
    weights = _weights(folder)
    key = f"{PREFIX}bert.encoder.layer.0.attention.self.query.lora_A.weight"
    if bad == "int":
        weights[key] = weights[key].to(torch.int32)
    elif bad == "nan":
        weights[key] = torch.full_like(weights[key], float("nan"))
    else:
        weights["bert.encoder.layer.0.attention.self.query.lora_A.weight"] = weights.pop(key)
    _rewrite_weights(folder, weights)
    with pytest.raises(ValueError, match=r"query\.lora_A\.weight"):
        _load(folder)


def test_legacy_bin_is_loaded_with_weights_only(saved):
    folder, model = saved
    os.remove(os.path.join(folder, "adapter_model.safetensors"))
    torch.save(torchlora.get_peft_model_state_dict(model), os.path.join(folder, "adapter_model.bin"))
    torch.testing.assert_close(_out(_load(folder)), _out(model))

    class Payload:  # an arbitrary object: a weights_only load must refuse to build it
        def __reduce__(self):
            return (print, ("unpickled code ran",))

    torch.save({"x": Payload()}, os.path.join(folder, "adapter_model.bin"))
    with pytest.raises(ValueError, match="adapter_model.bin"):
        _load(folder)
    with open(os.path.join(folder, "adapter_model.bin"), "wb") as f:
        f.write(b"garbage")
    with pytest.raises(ValueError, match="adapter_model.bin"):
        _load(folder)


def test_failed_load_adapter_removes_the_half_added_adapter(saved, tmp_path):
    folder, _ = saved
    model = _load(folder)
    other = tmp_path / "other"
    _model({"task_type": "SEQ_CLS", "target_modules": ["query", "value"], "r": 4}).save_pretrained(str(other))
    weights = _weights(str(other))
    weights.pop(next(iter(weights)))
    _rewrite_weights(str(other), weights)
    with pytest.raises(ValueError, match="lacks key"):
        model.load_adapter(str(other), adapter_name="other")
    assert list(model.peft_config) == ["default"]
    assert not any(".other" in n for n, _ in model.named_parameters())


def test_failed_from_pretrained_gives_the_model_back(saved):
    folder, _ = saved
    weights = _weights(folder)
    weights.pop(next(k for k in weights if "lora_A" in k))
    _rewrite_weights(folder, weights)
    model = tm.bert_seq_cls()
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="lacks key"):
        torchlora.PeftModel.from_pretrained(model, folder)
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    assert set(model.state_dict()) == set(reference)


def test_unknown_load_kwargs_are_errors(saved):
    folder, _ = saved
    with pytest.raises(TypeError, match="bogus"):
        torchlora.PeftModel.from_pretrained(tm.bert_seq_cls(), folder, bogus=True)


def test_peft_legacy_bin_folder_loads(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.get_peft_model(tm.bert_seq_cls(), peft.LoraConfig(
            task_type="SEQ_CLS", target_modules=["query", "value"], r=4, init_lora_weights=False)).eval()
    ref.save_pretrained(str(tmp_path), safe_serialization=False)
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.bin"]
    torch.testing.assert_close(_out(_load(str(tmp_path))), _out(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_model_saves_and_loads(tmp_path):
    model = _model().cuda()
    model.save_pretrained(str(tmp_path))
    loaded = torchlora.PeftModel.from_pretrained(tm.bert_seq_cls().cuda(), str(tmp_path))
    assert all(p.is_cuda for p in loaded.parameters())
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS.cuda()).logits, model(input_ids=IDS.cuda()).logits)


def test_resaving_a_loaded_task_adapter_keeps_modules_to_save_unique(saved, tmp_path):
    folder, _ = saved
    _load(folder).save_pretrained(str(tmp_path / "again"))
    with open(tmp_path / "again" / "adapter_config.json") as f:
        assert sorted(json.load(f)["modules_to_save"]) == ["classifier", "score"]
