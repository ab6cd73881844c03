"""AdapterPool.compose (torchlora._C.serve): a weighted composition of loaded adapters, served
like any adapter, equals PEFT's add_weighted_adapter of the same adapters, for every
combination_type; composition errors name what is wrong."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

import tiny_models as tm  # noqa: E402
import torchlora  # noqa: E402

serve = torchlora._C.serve
cpp = torchlora._C.cpp

ALL_TYPES = ["svd", "linear", "cat", "ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd",
             "dare_linear_svd", "magnitude_prune", "magnitude_prune_svd"]
CONFIGS = {
    "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"]),
    "b": dict(r=4, lora_alpha=2, target_modules=["v_proj", "o_proj", "embed_tokens"], use_rslora=True),
}


class CppLayer(nn.Module):
    """A C++ LoRA layer in place of a Linear / Embedding of a transformers model."""

    def __init__(self, layer) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def _served_llama():
    """A tiny Llama whose target layers are C++ LoRA modules, their tree, and the pool's target
    layers in the model's module order (the order PEFT combines, and draws, in)."""
    model = tm.llama()
    targets = {t for c in CONFIGS.values() for t in c["target_modules"]}
    layers, order = {}, []
    for name, module in list(model.named_modules()):
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in targets:
            continue
        if isinstance(module, nn.Embedding):
            layer = cpp.LoraEmbedding(module.weight.detach())
        else:
            layer = cpp.LoraLinear(module.weight.detach(), None if module.bias is None else module.bias.detach())
        layers[name] = layer
        order.append(name)
        setattr(model.get_submodule(name.rsplit(".", 1)[0]), leaf, CppLayer(layer))
    tree = cpp.ModuleTree(layers)
    pool_layers = sorted(serve.target_layers(tree), key=lambda t: order.index(t.name))
    return model, tree, pool_layers


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("compose")
    for i, (name, cfg) in enumerate(CONFIGS.items()):
        torch.manual_seed(10 + i)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = peft.get_peft_model(tm.llama(), peft.LoraConfig(init_lora_weights=False, **cfg), adapter_name=name)
        model.save_pretrained(str(root), save_embedding_layers=False)
    return root


def _reference(root: Path):
    ref = peft.PeftModel.from_pretrained(tm.llama(), str(root / "a"), adapter_name="a")
    ref.load_adapter(str(root / "b"), adapter_name="b")
    return ref.eval()


def _seed_at_first_combination(monkeypatch, seed: int) -> None:
    """PEFT creates the new adapter's layers (drawing their initial weights) before it combines;
    compose creates none. Seeding PEFT where its combination starts gives both the same draws."""
    started = []
    lora_model = peft.tuners.lora.LoraModel
    for name in ("_generalized_task_arithmetic_weighted_adapter", "_svd_generalized_task_arithmetic_weighted_adapter"):
        original = getattr(lora_model, name)

        def seeded(self, *args, _original=original, **kwargs):
            if not started:
                started.append(True)
                torch.manual_seed(seed)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(lora_model, name, seeded)


@torch.no_grad()
@pytest.mark.parametrize("combination_type", ALL_TYPES)
def test_composed_adapter_serves_peft_add_weighted_adapter(saved, monkeypatch, combination_type):
    model, tree, layers = _served_llama()
    pool = serve.AdapterPool(layers, max_loras=2, max_lora_rank=8)
    pool.load("a", str(saved / "a"))
    pool.load("b", str(saved / "b"))
    options = dict(combination_type=combination_type)
    if combination_type not in ("svd", "linear", "cat"):
        options.update(density=0.5, majority_sign_method="frequency" if "ties" in combination_type else "total")
    ref = _reference(saved)
    _seed_at_first_combination(monkeypatch, 3)
    ref.add_weighted_adapter(["a", "b"], [0.7, -0.4], "mix", **options)
    ref.set_adapter("mix")
    torch.manual_seed(3)
    pool.compose("mix", [("a", 0.7), ("b", -0.4)], **options)
    status = {s["name"]: s for s in pool.status()}
    assert status["mix"]["rank"] == ref.peft_config["mix"].r and status["mix"]["folder"] == ""

    ids = tm.input_ids(batch=3, seed=2)
    with pool.acquire([("mix", 1.0), ("", 1.0), ("a", 1.0)]) as lease, serve.PoolBinding(tree, pool, lease):
        served = model(input_ids=ids).logits
    want = ref(input_ids=ids).logits
    torch.testing.assert_close(served[0], want[0], rtol=1e-4, atol=1e-5)
    ref.set_adapter("a")
    torch.testing.assert_close(served[2], ref(input_ids=ids).logits[2], rtol=1e-4, atol=1e-5)
    with ref.disable_adapter():
        base = ref(input_ids=ids).logits
    torch.testing.assert_close(served[1], base[1], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(served[0], base[0]), "the composed adapter must change the output"


def test_compose_is_a_snapshot_and_serves_at_a_scale(saved):
    model, tree, layers = _served_llama()
    pool = serve.AdapterPool(layers, max_loras=2, max_lora_rank=8)
    pool.load("a", str(saved / "a"))
    pool.load("b", str(saved / "b"))
    pool.compose("half", [("a", 0.5)], combination_type="cat")
    ref = _reference(saved)
    ref.set_adapter("a")
    ids = tm.input_ids(batch=1, seed=4)
    with torch.no_grad():
        with pool.acquire([("half", 2.0)]) as lease, serve.PoolBinding(tree, pool, lease):
            served = model(input_ids=ids).logits
        torch.testing.assert_close(served, ref(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
        assert pool.unload("a")
        with pool.acquire([("half", 2.0)]) as lease, serve.PoolBinding(tree, pool, lease):
            torch.testing.assert_close(model(input_ids=ids).logits, served, rtol=1e-6, atol=1e-6)


def test_compose_errors(saved):
    _, _, layers = _served_llama()
    pool = serve.AdapterPool(layers, max_loras=2, max_lora_rank=6)
    pool.load("a", str(saved / "a"))
    pool.load("b", str(saved / "b"))
    with pytest.raises(serve.AdapterNotFoundError, match="'zz' is not loaded"):
        pool.compose("mix", [("a", 1.0), ("zz", 1.0)])
    with pytest.raises(ValueError, match="Invalid combination_type: average"):
        pool.compose("mix", [("a", 1.0), ("b", 1.0)], combination_type="average")
    with pytest.raises(TypeError, match="needs density"):
        pool.compose("mix", [("a", 1.0), ("b", 1.0)], combination_type="dare_linear")
    with pytest.raises(serve.AdapterRejectedError, match="max_lora_rank 6"):
        pool.compose("mix", [("a", 1.0), ("b", 1.0)], combination_type="cat")  # rank 8
    with pytest.raises(ValueError, match="base model"):
        pool.compose("__base__", [("a", 1.0)])
    with pytest.raises(ValueError, match="at least one adapter"):
        pool.compose("mix", [])
    assert pool.adapter_names() == ["a", "b"]
