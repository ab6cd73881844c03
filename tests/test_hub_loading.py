"""Loading adapters by Hub id (PeftModel.from_pretrained, load_adapter, LoraConfig.from_pretrained,
the AutoPeftModel classes) through huggingface_hub, against the real PEFT reading the same cache,
and push_to_hub's upload. No network: each test builds a Hub cache in huggingface_hub's layout
(models--org--name/refs/<revision>, snapshots/<commit>/..., blobs/<sha256>) and HF_HUB_OFFLINE=1."""

import hashlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file

import tiny_models
import torchlora

pytestmark = pytest.mark.filterwarnings("ignore")


def add_snapshot(cache: Path, repo_id: str, folder: Path, revision: str = "main", subfolder: str = "") -> str:
    """Put ``folder``'s files into the Hub cache as repository ``repo_id`` at ``revision`` (under
    ``subfolder``); returns the commit hash the revision points to."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    for src in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = src.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        dst = repo / "snapshots" / commit / subfolder / src.relative_to(folder)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.exists():
            dst.symlink_to(os.path.relpath(blob, dst.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return commit


def peft_adapter(folder: Path, model, target_modules, seed: int, task_type=None, base_name=None) -> Path:
    """A PEFT adapter (non-zero factors) saved to ``folder``, naming ``base_name`` as its base model."""
    torch.manual_seed(seed)
    config = peft.LoraConfig(target_modules=target_modules, r=4, lora_alpha=8, init_lora_weights=False,
                             task_type=task_type)
    peft.get_peft_model(model, config).save_pretrained(folder)
    if base_name is not None:
        path = folder / "adapter_config.json"
        data = json.loads(path.read_text())
        data["base_model_name_or_path"] = base_name
        path.write_text(json.dumps(data))
    return folder


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A cache with org/adapter at main (also in subfolder "sub") and at v2, and org/missing-weights."""
    root = tmp_path_factory.mktemp("hub")
    cache = root / "cache"
    main = peft_adapter(root / "main", tiny_models.llama(), ["q_proj", "v_proj"], seed=1)
    other = peft_adapter(root / "v2", tiny_models.llama(), ["k_proj"], seed=2)
    commits = {"main": add_snapshot(cache, "org/adapter", main), "v2": add_snapshot(cache, "org/adapter", other, "v2")}
    add_snapshot(cache, "org/adapter", other, subfolder="sub")
    only_config = root / "only-config"
    only_config.mkdir()
    (only_config / "adapter_config.json").write_bytes((main / "adapter_config.json").read_bytes())
    add_snapshot(cache, "org/missing-weights", only_config)
    return cache, root, commits


def outputs(model) -> torch.Tensor:
    with torch.no_grad():
        return model(tiny_models.input_ids()).logits


@pytest.mark.parametrize("revision, local", [(None, "main"), ("v2", "v2"), ("commit-of-v2", "v2")])
def test_from_pretrained_by_hub_id_and_revision(hub, revision, local):
    cache, root, commits = hub
    if revision == "commit-of-v2":
        revision = commits["v2"]
    ours = torchlora.PeftModel.from_pretrained(tiny_models.llama(), "org/adapter", revision=revision,
                                               cache_dir=str(cache))
    ref = peft.PeftModel.from_pretrained(tiny_models.llama(), "org/adapter", revision=revision, cache_dir=str(cache))
    from_folder = torchlora.PeftModel.from_pretrained(tiny_models.llama(), root / local)
    torch.testing.assert_close(outputs(ours), outputs(ref), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outputs(ours), outputs(from_folder), rtol=0, atol=0)
    assert not any(p.requires_grad for p in ours.parameters())


def test_subfolder_and_load_adapter(hub):
    cache, root, _ = hub
    ours = torchlora.PeftModel.from_pretrained(tiny_models.llama(), "org/adapter", subfolder="sub",
                                               cache_dir=str(cache))
    # (PEFT 0.21.2 itself cannot load a Hub subfolder offline: it joins the subfolder twice into the
    # weights file name; the subfolder holds the v2 adapter, compared with its local folder)
    from_folder = torchlora.PeftModel.from_pretrained(tiny_models.llama(), root / "v2")
    torch.testing.assert_close(outputs(ours), outputs(from_folder), rtol=0, atol=0)
    ours.load_adapter("org/adapter", adapter_name="main", cache_dir=str(cache))
    ours.set_adapter("main")
    torch.testing.assert_close(outputs(ours), outputs(
        torchlora.PeftModel.from_pretrained(tiny_models.llama(), root / "main")), rtol=0, atol=0)


def test_config_from_pretrained_by_hub_id(hub):
    cache, _, _ = hub
    for revision, subfolder in ((None, None), ("v2", None), (None, "sub")):
        ours = torchlora.LoraConfig.from_pretrained("org/adapter", subfolder=subfolder, revision=revision,
                                                    cache_dir=str(cache))
        ref = peft.LoraConfig.from_pretrained("org/adapter", subfolder=subfolder, revision=revision,
                                              cache_dir=str(cache))
        assert ours.target_modules == ref.target_modules and ours.r == ref.r and ours.lora_alpha == ref.lora_alpha
    assert torchlora.PeftConfig.from_pretrained("org/adapter", cache_dir=str(cache)).target_modules == {"q_proj",
                                                                                                       "v_proj"}
    with pytest.raises(TypeError, match="unexpected arguments"):
        torchlora.LoraConfig.from_pretrained("org/adapter", cache_dir=str(cache), r=4)


def test_missing_repository_and_files_raise_clear_errors(hub):
    cache, root, _ = hub
    with pytest.raises(ValueError, match="Can't find 'adapter_config.json' at 'org/absent'"):
        torchlora.PeftModel.from_pretrained(tiny_models.llama(), "org/absent", cache_dir=str(cache))
    with pytest.raises(ValueError, match="Can't find 'adapter_config.json' at 'org/adapter'"):
        torchlora.LoraConfig.from_pretrained("org/adapter", revision="no-such-branch", cache_dir=str(cache))
    with pytest.raises(ValueError, match="adapter_model.safetensors' or 'adapter_model.bin"):
        torchlora.PeftModel.from_pretrained(tiny_models.llama(), "org/missing-weights", cache_dir=str(cache))
    with pytest.raises(TypeError, match="unexpected arguments"):
        torchlora.PeftModel.from_pretrained(tiny_models.llama(), "org/adapter", cache_dir=str(cache), bogus=1)
    # a local path that does not exist is reported as such, not looked up on the Hub
    with pytest.raises((ValueError, FileNotFoundError), match="no-such-folder"):
        torchlora.PeftModel.from_pretrained(tiny_models.llama(), str(root / "no-such-folder"))


def test_hub_cache_from_the_environment(hub, tmp_path):
    """HF_HOME (hence the cache at $HF_HOME/hub) and HF_HUB_OFFLINE as huggingface_hub reads them."""
    cache, root, _ = hub
    home = tmp_path / "home"
    home.mkdir()
    (home / "hub").symlink_to(cache)
    script = (
        "import torch, tiny_models, torchlora\n"
        "m = torchlora.PeftModel.from_pretrained(tiny_models.llama(), 'org/adapter', revision='v2')\n"
        f"ref = torchlora.PeftModel.from_pretrained(tiny_models.llama(), {str(root / 'v2')!r})\n"
        "ids = tiny_models.input_ids()\n"
        "assert torch.equal(m(ids).logits, ref(ids).logits)\n"
        "print('ok')\n"
    )
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    env.pop("HF_HUB_CACHE", None)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


# ---------------------------------------------------------------------- AutoPeftModel*
TASKS = {
    "CAUSAL_LM": (tiny_models.llama, ["q_proj", "v_proj"], "AutoPeftModelForCausalLM"),
    "SEQ_2_SEQ_LM": (tiny_models.t5, ["q", "v"], "AutoPeftModelForSeq2SeqLM"),
    "SEQ_CLS": (tiny_models.bert_seq_cls, ["query", "value"], "AutoPeftModelForSequenceClassification"),
    "TOKEN_CLS": (tiny_models.bert_token_cls, ["query", "value"], "AutoPeftModelForTokenClassification"),
    "QUESTION_ANS": (tiny_models.bert_qa, ["query", "value"], "AutoPeftModelForQuestionAnswering"),
    "FEATURE_EXTRACTION": (tiny_models.bert, ["query", "value"], "AutoPeftModelForFeatureExtraction"),
}


def task_outputs(model, task):
    ids = tiny_models.input_ids()
    with torch.no_grad():
        if task == "SEQ_2_SEQ_LM":
            return model(input_ids=ids, decoder_input_ids=ids[:, :3]).logits
        out = model(input_ids=ids)
    if task == "QUESTION_ANS":
        return torch.stack([out.start_logits, out.end_logits])
    return out.last_hidden_state if task == "FEATURE_EXTRACTION" else out.logits


@pytest.mark.parametrize("task", list(TASKS))
def test_auto_peft_models_load_base_and_adapter_from_the_hub(task, tmp_path):
    builder, targets, class_name = TASKS[task]
    cache = tmp_path / "cache"
    builder().save_pretrained(tmp_path / "base")
    add_snapshot(cache, "org/base", tmp_path / "base")
    add_snapshot(cache, "org/task-adapter", peft_adapter(tmp_path / "adapter", builder(), targets, seed=3,
                                                         task_type=task, base_name="org/base"))
    ours = getattr(torchlora, class_name).from_pretrained("org/task-adapter", cache_dir=str(cache))
    ref = getattr(peft, class_name).from_pretrained("org/task-adapter", cache_dir=str(cache))
    assert type(ours).__name__ == type(ref).__name__
    assert type(ours.get_base_model()) is type(ref.get_base_model())
    torch.testing.assert_close(task_outputs(ours, task), task_outputs(ref, task), rtol=1e-5, atol=1e-5)
    assert getattr(torchlora.auto, class_name) is getattr(torchlora, class_name)


def test_auto_peft_model_by_auto_mapping_and_its_checks(tmp_path):
    cache = tmp_path / "cache"
    tiny_models.llama().save_pretrained(tmp_path / "base")
    add_snapshot(cache, "org/base", tmp_path / "base")
    model = tiny_models.llama()
    model.name_or_path = "org/base"
    torch.manual_seed(4)
    adapted = torchlora.get_peft_model(model, torchlora.LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    adapted.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["auto_mapping"]["base_model_class"] == "LlamaForCausalLM"
    add_snapshot(cache, "org/plain", tmp_path / "adapter")
    ours = torchlora.AutoPeftModel.from_pretrained("org/plain", cache_dir=str(cache))
    ref = peft.AutoPeftModel.from_pretrained("org/plain", cache_dir=str(cache))
    assert type(ours.get_base_model()).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(outputs(ours), outputs(ref), rtol=1e-5, atol=1e-5)

    with pytest.raises(ValueError, match="Expected target PEFT class: PeftModelForCausalLM"):
        add_snapshot(cache, "org/causal", peft_adapter(tmp_path / "causal", tiny_models.llama(), ["q_proj"], 5,
                                                       task_type="CAUSAL_LM", base_name="org/base"))
        torchlora.AutoPeftModelForSequenceClassification.from_pretrained("org/causal", cache_dir=str(cache))
    with pytest.raises(ValueError, match="Cannot use `AutoPeftModel` with a task type"):
        torchlora.AutoPeftModel.from_pretrained("org/causal", cache_dir=str(cache))
    saved["auto_mapping"]["parent_library"] = "os"
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(saved))
    add_snapshot(cache, "org/evil", tmp_path / "adapter")
    with pytest.raises(ValueError, match="not in the import allowlist"):
        torchlora.AutoPeftModel.from_pretrained("org/evil", cache_dir=str(cache))
    with pytest.raises(EnvironmentError, match="from_pretrained"):
        torchlora.AutoPeftModelForCausalLM()


# ---------------------------------------------------------------------- push_to_hub
def test_push_to_hub_uploads_the_saved_folder(monkeypatch, tmp_path):
    import huggingface_hub

    calls = {}

    def fake_create_repo(repo_id, **kwargs):
        calls["create"] = (repo_id, kwargs)

    def fake_upload_folder(**kwargs):
        folder = Path(kwargs["folder_path"])
        calls["upload"] = kwargs
        calls["files"] = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        calls["config"] = json.loads((folder / "adapter_config.json").read_text())
        weights = folder / "adapter_model.safetensors"
        calls["tensors"] = load_file(weights) if weights.exists() else None
        return "commit"

    monkeypatch.setattr(huggingface_hub, "create_repo", fake_create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", fake_upload_folder)
    model = torchlora.get_peft_model(tiny_models.llama(), torchlora.LoraConfig(target_modules=["q_proj"],
                                                                               init_lora_weights=False))
    result = model.push_to_hub("me/adapter", commit_message="first", private=True, token="tok", revision="dev")
    assert result == "commit"
    assert calls["create"] == ("me/adapter", {"token": "tok", "private": True, "exist_ok": True})
    upload = calls["upload"]
    assert (upload["repo_id"], upload["commit_message"], upload["token"], upload["revision"]) == (
        "me/adapter", "first", "tok", "dev")
    assert calls["files"] == ["adapter_config.json", "adapter_model.safetensors"]
    assert calls["config"]["target_modules"] == ["q_proj"] and calls["config"]["peft_type"] == "LORA"
    expected = torchlora.get_peft_model_state_dict(model)
    assert sorted(calls["tensors"]) == sorted(expected)
    for key, value in expected.items():
        torch.testing.assert_close(calls["tensors"][key], value, rtol=0, atol=0)
    assert not Path(upload["folder_path"]).exists()  # the temporary folder is gone

    torchlora.LoraConfig(target_modules=["q_proj"]).push_to_hub("me/config-only")
    assert calls["files"] == ["adapter_config.json"]
    with pytest.raises(ValueError, match="repo_id"):
        model.push_to_hub("")
