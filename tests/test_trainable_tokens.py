"""LoraConfig(trainable_token_indices=...) against the real ``peft``: only the chosen embedding
rows are trained and saved (PEFT's keys), tied output layers follow them, outputs, gradients,
merging and files both ways; the C++ loader reads the rows and serves them in C++ modules, and
the adapter pool rejects them by name."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

import tiny_models as tm  # noqa: E402
import torchlora  # noqa: E402
from peft_parity import grads, logits  # noqa: E402
from torchlora.tuners.trainable_tokens import TrainableTokensWrapper  # noqa: E402

cpp = torchlora._C.cpp
serve = torchlora._C.serve
ROWS = [3, 5, 11]
DELTA_KEY = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"


def tied_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=tm.VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def _config(lib, **kw):
    return lib.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                          **{"trainable_token_indices": ROWS, **kw})


def _pair(builder, **kw):
    """(peft model, torchlora model) with the same base, PEFT's rows changed and copied over."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.get_peft_model(builder(), _config(peft, **kw))
        ours = torchlora.get_peft_model(builder(), _config(torchlora, **kw))
    torch.manual_seed(7)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "trainable_tokens_delta" in name:
                p.add_(torch.randn_like(p))
    state = peft.get_peft_model_state_dict(ref)
    torchlora.set_peft_model_state_dict(ours, state)
    return ref, ours


# ----------------------------------------------------------------------------- config
def test_config_accepts_peft_forms_and_rejects_bad_values() -> None:
    assert torchlora.LoraConfig(trainable_token_indices=[1, 2]).trainable_token_indices == [1, 2]
    cfg = torchlora.LoraConfig(trainable_token_indices={"embed_tokens": [0]}, ensure_weight_tying=True)
    assert cfg.to_json_dict()["trainable_token_indices"] == {"embed_tokens": [0]}
    assert peft.LoraConfig(**cfg.to_json_dict()).trainable_token_indices == {"embed_tokens": [0]}
    with pytest.raises(TypeError, match="trainable_token_indices"):
        torchlora.LoraConfig(trainable_token_indices="embed_tokens")
    with pytest.raises(TypeError, match="trainable_token_indices"):
        torchlora.LoraConfig(trainable_token_indices=[1.5])
    with pytest.raises(ValueError, match="trainable_token_indices holds -1"):
        torchlora.LoraConfig(trainable_token_indices=[-1])
    with pytest.raises(ValueError, match="empty"):
        torchlora.LoraConfig(trainable_token_indices=[])
    with pytest.raises(TypeError, match="ensure_weight_tying"):
        torchlora.LoraConfig(ensure_weight_tying="yes")


def test_keys_come_from_the_cpp_rule() -> None:
    name = torchlora._C.peft.TRAINABLE_TOKENS_DELTA
    assert name == "token_adapter.trainable_tokens_delta"
    model_key = f"model.embed_tokens.{name}.other"
    assert torchlora._C.peft.to_peft_key(model_key, "other") == f"base_model.model.model.embed_tokens.{name}"
    assert torchlora._C.peft.from_peft_key(DELTA_KEY, "other") == model_key


# ----------------------------------------------------------------------------- layers, outputs, gradients
def test_untied_llama_matches_peft_outputs_gradients_and_trainable_set() -> None:
    ref, ours = _pair(tm.llama)
    emb = ours.base_model.model.model.embed_tokens
    assert isinstance(emb, TrainableTokensWrapper)
    assert not isinstance(ours.base_model.model.lm_head, TrainableTokensWrapper)
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        n for n, p in ref.named_parameters() if p.requires_grad}
    assert not emb.original_module.weight.requires_grad
    ids = tm.input_ids(length=12)
    ids[0, :3] = torch.tensor(ROWS)
    ref.train(), ours.train()
    out_ref, out_ours = logits(ref(ids)), logits(ours(ids))
    torch.testing.assert_close(out_ours, out_ref, rtol=1e-5, atol=1e-5)
    base = tm.llama()
    assert not torch.allclose(out_ours, logits(base(ids)), atol=1e-3)  # the rows are in use
    out_ref.square().mean().backward()
    out_ours.square().mean().backward()
    g_ref, g_ours = grads(ref), grads(ours)
    assert set(g_ours) == set(g_ref)
    for name in g_ref:
        torch.testing.assert_close(g_ours[name], g_ref[name], rtol=1e-4, atol=1e-6)
    delta = emb.token_adapter.trainable_tokens_delta["default"]
    assert delta.grad is not None and delta.shape == (len(ROWS), 32)


def test_tied_output_layer_follows_the_rows() -> None:
    ref, ours = _pair(tied_llama)
    lm_head = ours.base_model.model.lm_head
    assert isinstance(lm_head, TrainableTokensWrapper) and lm_head.is_tied
    ids = tm.input_ids(length=9)
    torch.testing.assert_close(logits(ours(ids)), logits(ref(ids)), rtol=1e-5, atol=1e-5)
    # one copy of the rows is saved, under the input embedding
    assert set(torchlora.get_peft_model_state_dict(ours)) == set(peft.get_peft_model_state_dict(ref))
    assert DELTA_KEY in torchlora.get_peft_model_state_dict(ours)
    with ours.disable_adapter(), ref.disable_adapter():
        torch.testing.assert_close(logits(ours(ids)), logits(ref(ids)), rtol=1e-5, atol=1e-5)


def test_ensure_weight_tying_conflicts_raise_like_peft() -> None:
    conflicting = {"embed_tokens": [1, 2], "lm_head": [3]}
    for lib in (peft, torchlora):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(ValueError, match="Cannot ensure weight tying"):
                lib.get_peft_model(tied_llama(), _config(lib, trainable_token_indices=conflicting,
                                                         ensure_weight_tying=True))
    both = {"lm_head": [1, 2], "embed_tokens": [1, 2]}
    ref, ours = _pair(tied_llama, trainable_token_indices=both, ensure_weight_tying=True)
    ids = tm.input_ids(length=6)
    torch.testing.assert_close(logits(ours(ids)), logits(ref(ids)), rtol=1e-5, atol=1e-5)


def test_weight_tying_of_lora_or_saved_copies_is_refused_not_ignored() -> None:
    cfg = dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"], ensure_weight_tying=True)
    with pytest.raises(NotImplementedError, match="ensure_weight_tying"):
        torchlora.get_peft_model(tied_llama(), torchlora.LoraConfig(**cfg))
    with pytest.raises(NotImplementedError, match="target_modules"):
        torchlora.get_peft_model(tied_llama(), torchlora.LoraConfig(target_modules=["q_proj", "lm_head"],
                                                                     ensure_weight_tying=True))
    torchlora.get_peft_model(tm.llama(), torchlora.LoraConfig(**cfg))  # nothing tied: nothing to refuse


def test_modules_to_save_and_trainable_tokens_on_one_layer_is_an_error() -> None:
    with pytest.raises(ValueError, match="already marked to be trained fully"):
        torchlora.get_peft_model(tm.llama(), _config(torchlora, modules_to_save=["embed_tokens"],
                                                     trainable_token_indices={"embed_tokens": [1]}))


def test_merge_unmerge_and_merge_and_unload_match_peft() -> None:
    ref, ours = _pair(tm.llama)
    ids = tm.input_ids(length=10)
    ids[1, :3] = torch.tensor(ROWS)
    expected = logits(ours(ids))
    ours.merge_adapter()
    torch.testing.assert_close(logits(ours(ids)), expected, rtol=1e-5, atol=1e-5)
    ours.unmerge_adapter()
    torch.testing.assert_close(ours.base_model.model.model.embed_tokens.original_module.weight,
                               tm.llama().model.embed_tokens.weight)
    merged_ours = ours.merge_and_unload()
    merged_ref = ref.merge_and_unload()
    assert isinstance(merged_ours.model.embed_tokens, nn.Embedding)
    torch.testing.assert_close(merged_ours.model.embed_tokens.weight, merged_ref.model.embed_tokens.weight)
    torch.testing.assert_close(logits(merged_ours(ids)), logits(merged_ref(ids)), rtol=1e-5, atol=1e-5)


def test_second_adapter_and_set_adapter() -> None:
    ours = torchlora.get_peft_model(tm.llama(), _config(torchlora))
    ours.add_adapter("other", _config(torchlora, trainable_token_indices=[1]))
    emb = ours.base_model.model.model.embed_tokens
    assert emb.active_adapters == ["default"]
    ours.set_adapter("other")
    assert emb.active_adapters == ["other"]
    assert emb.token_adapter.trainable_tokens_delta["other"].requires_grad
    assert not emb.token_adapter.trainable_tokens_delta["default"].requires_grad
    ours.delete_adapter("other")
    assert "other" not in emb.token_adapter.trainable_tokens_delta


def test_mixed_batch_rows_take_their_own_adapter_like_peft() -> None:
    ref, ours = _pair(tm.llama)
    ref.eval(), ours.eval()
    ids = tm.input_ids(batch=3, length=6)
    ids[:, :3] = torch.tensor(ROWS)
    names = ["default", "__base__", "default"]
    expected = logits(ref(ids, adapter_names=names))
    got = logits(ours(ids, adapter_names=names))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with ours.disable_adapter():
        base_row = logits(ours(ids[1:2]))
    torch.testing.assert_close(got[1:2], base_row, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- files
def test_peft_files_load_in_torchlora_and_back(tmp_path: Path) -> None:
    ref, ours = _pair(tm.llama)
    ids = tm.input_ids(length=8)
    ids[0, :3] = torch.tensor(ROWS)
    expected = logits(ref(ids))

    ref.save_pretrained(str(tmp_path / "peft"))
    loaded = torchlora.PeftModel.from_pretrained(tm.llama(), str(tmp_path / "peft"))
    torch.testing.assert_close(logits(loaded(ids)), expected, rtol=1e-5, atol=1e-5)

    ours.save_pretrained(str(tmp_path / "ours"))
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    assert DELTA_KEY in saved and saved[DELTA_KEY].shape == (len(ROWS), 32)
    assert not any(k.endswith("embed_tokens.weight") for k in saved)  # the rows, not the embedding
    assert set(saved) == set(peft.get_peft_model_state_dict(ref))
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == ROWS
    back = peft.PeftModel.from_pretrained(tm.llama(), str(tmp_path / "ours"))
    torch.testing.assert_close(logits(back(ids)), expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- C++ loader
class CppLayer(nn.Module):
    def __init__(self, layer) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def test_cpp_loader_reads_rows_and_cpp_modules_serve_them(tmp_path: Path) -> None:
    ref, _ = _pair(tm.llama)
    ref.save_pretrained(str(tmp_path))
    rows = cpp.load_trainable_tokens(str(tmp_path))
    assert list(rows) == ["model.embed_tokens"]
    indices, values = rows["model.embed_tokens"]
    assert indices == ROWS
    torch.testing.assert_close(values, ref.base_model.model.model.embed_tokens.token_adapter
                               .trainable_tokens_delta["default"].detach())

    # the targets and the embedding as C++ modules; load_adapter writes the rows into the embedding
    model = tm.llama()
    layers = {}
    for name, module in list(model.named_modules()):
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("q_proj", "v_proj"):
            layers[name] = cpp.LoraLinear(module.weight.detach().clone(), None)
        elif leaf == "embed_tokens":
            layers[name] = cpp.LoraEmbedding(module.weight.detach().clone())
        else:
            continue
        setattr(model.get_submodule(name.rsplit(".", 1)[0]), leaf, CppLayer(layers[name]))
    tree = cpp.ModuleTree(layers)
    cpp.load_adapter(tree, str(tmp_path), "default")
    cpp.set_adapter(tree, ["default"])
    ids = tm.input_ids(length=8)
    ids[0, :3] = torch.tensor(ROWS)
    with torch.no_grad():
        torch.testing.assert_close(layers["model.embed_tokens"](ids), ref.base_model.model.model.embed_tokens(ids))
        torch.testing.assert_close(logits(model(ids)), logits(ref(ids)), rtol=1e-5, atol=1e-5)


def test_cpp_loader_rejects_rows_the_config_does_not_name(tmp_path: Path) -> None:
    ref, _ = _pair(tm.llama)
    ref.save_pretrained(str(tmp_path))
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["trainable_token_indices"] = None
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no trainable_token_indices"):
        cpp.load_trainable_tokens(str(tmp_path))
    config["trainable_token_indices"] = [1, 2]
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"must be \[2, embedding_dim\]"):
        cpp.load_trainable_tokens(str(tmp_path))


class EmbMlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.fc1 = nn.Linear(4, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc1(self.emb(ids))


def test_adapter_pool_rejects_trainable_tokens_by_name(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=2, target_modules=["fc1"], trainable_token_indices={"emb": [1, 2]})
    peft.get_peft_model(EmbMlp(), cfg).save_pretrained(str(tmp_path))
    pool = serve.AdapterPool([serve.TargetLayer("fc1", "linear", [8, 4])], max_loras=2, max_lora_rank=4)
    with pytest.raises(Exception, match="trainable_token_indices"):
        pool.load("tokens", str(tmp_path))
