"""torchlora._C.serve: the adapter pool's Python API and its errors, and a tiny Llama whose LoRA
layers are torchlora's C++ modules served from the pool: every row of mixed batches equals the
real ``peft`` running that row's adapter alone (or the base model), per-request scales included."""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

import tiny_models as tm  # noqa: E402
import torchlora  # noqa: E402

serve = torchlora._C.serve
cpp = torchlora._C.cpp

MLP_LAYERS = [("fc1", "linear", [8, 4]), ("fc2", "linear", [3, 8])]


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def _save_mlp_adapter(path: Path, r: int, seed: int, **config) -> Path:
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=config.pop("target_modules", ["fc1", "fc2"]),
                          init_lora_weights=False, **config)
    peft.get_peft_model(Mlp(), cfg).save_pretrained(str(path))
    return path


def _pool(**kw) -> "serve.AdapterPool":
    layers = [serve.TargetLayer(n, k, s) for n, k, s in MLP_LAYERS]
    return serve.AdapterPool(layers, **{"max_loras": 2, "max_lora_rank": 4, **kw})


# ----------------------------------------------------------------------------- API and errors
def test_target_layer_and_pool_properties() -> None:
    t = serve.TargetLayer("conv", "conv2d", [4, 3, 3, 3], groups=2)
    assert (t.name, t.kind, t.weight_shape, t.groups) == ("conv", "conv2d", [4, 3, 3, 3], 2)
    assert "conv2d" in repr(t)
    with pytest.raises(ValueError, match="kind must be"):
        serve.TargetLayer("x", "lstm", [2, 2])
    pool = _pool(max_cpu_loras=3, dtype=torch.float64, device=torch.device("cpu"))
    assert (pool.max_loras, pool.max_lora_rank, pool.max_cpu_loras, pool.lora_bias) == (2, 4, 3, False)
    assert pool.dtype == torch.float64 and pool.device == torch.device("cpu")
    assert [layer.name for layer in pool.layers] == ["fc1", "fc2"]
    a, b, bias, scale = pool.stacks("fc1")
    assert a.shape == (2, 4, 4) and b.shape == (2, 8, 4) and bias is None and scale.shape == (2,)
    assert a.dtype == torch.float64 and scale.dtype == torch.float32
    assert len(pool.all_stacks()) == 2
    with pytest.raises(RuntimeError, match="no target layer 'nope'"):
        pool.stacks("nope")
    with pytest.raises(ValueError, match="max_loras must be >= 1"):
        _pool(max_loras=0)
    with pytest.raises(ValueError, match="max_cpu_loras"):
        _pool(max_cpu_loras=1)


def test_pool_load_acquire_status_and_errors(tmp_path: Path) -> None:
    pool = _pool()
    for i, r in enumerate([1, 2, 3]):
        _save_mlp_adapter(tmp_path / f"a{i}", r, seed=i)
        pool.load(f"a{i}", str(tmp_path / f"a{i}"))
    assert pool.adapter_names() == ["a0", "a1", "a2"] and pool.has_adapter("a1")
    status = {s["name"]: s for s in pool.status()}
    assert set(status["a0"]) == {"name", "rank", "folder", "slot", "on_host", "in_use"}
    assert status["a2"]["rank"] == 3 and status["a0"]["folder"] == str(tmp_path / "a0")
    assert not status["a0"]["on_host"]  # host tier of max_loras = 2: the oldest left it

    with pool.acquire([("a0", 0.5), ("", 1.0), ("a1", 1.0), ("a0", 0.5)]) as lease:
        slots = lease.slots
        assert slots[1] == -1 and slots[0] == slots[3] != slots[2]
        assert lease.sample_slots.tolist() == slots and lease.sample_slots.dtype == torch.int64
        assert lease.slot_scale[slots[0]].item() == 0.5 and lease.slot_scale[slots[2]].item() == 1.0
        assert {s["name"]: s["in_use"] for s in pool.status()} == {"a0": 1, "a1": 1, "a2": 0}
        # every slot is held: a third adapter cannot come in, and the pool says so at once
        with pytest.raises(serve.PoolExhaustedError, match="not held by running batches") as e:
            pool.acquire([("a2", 1.0)])
        assert isinstance(e.value, RuntimeError)
        # the slot holds the adapter PEFT saved, zero-padded, with PEFT's scaling
        a, b, _, scale = pool.stacks("fc1")
        loaded = peft.PeftModel.from_pretrained(Mlp(), str(tmp_path / "a0"))
        torch.testing.assert_close(a[slots[0], :1], loaded.base_model.model.fc1.lora_A["default"].weight)
        assert a[slots[0], 1:].abs().sum() == 0
        assert scale[slots[0]].item() == pytest.approx(loaded.base_model.model.fc1.scaling["default"])
    assert all(s["in_use"] == 0 for s in pool.status())
    lease.release()  # idempotent
    stats = pool.stats()
    assert set(stats) == {"slot_hits", "slot_loads", "slot_evictions", "host_evictions", "host_reloads"}
    assert stats["host_reloads"] == 1 and stats["slot_loads"] == 2

    with pytest.raises(serve.AdapterNotFoundError, match="'nope' is not loaded") as e:
        pool.acquire([("nope", 1.0)])
    assert isinstance(e.value, KeyError)
    with pytest.raises(ValueError, match="two scales"):
        pool.acquire([("a1", 1.0), ("a1", 2.0)])
    _save_mlp_adapter(tmp_path / "big", 5, seed=9)
    with pytest.raises(serve.AdapterRejectedError, match="rank 5 .* max_lora_rank 4") as e:
        pool.load("big", str(tmp_path / "big"))
    assert isinstance(e.value, ValueError) and not pool.has_adapter("big")
    _save_mlp_adapter(tmp_path / "saved", 2, seed=9, modules_to_save=["fc2"], target_modules=["fc1"])
    with pytest.raises(serve.AdapterRejectedError, match="modules_to_save"):
        pool.load("saved", str(tmp_path / "saved"))
    with pytest.raises(serve.AdapterRejectedError, match="cannot be read"):
        pool.load("missing", str(tmp_path / "missing"))
    assert pool.fits([("a0", 1.0)], ("a1", 1.0)) and not pool.fits([("a0", 1.0), ("a1", 1.0)], ("a2", 1.0))
    assert not pool.fits([("a0", 1.0)], ("a0", 2.0))
    assert pool.unload("a1") and not pool.unload("a1")


def test_lease_and_binding_arguments_are_checked() -> None:
    pool = _pool()
    with pytest.raises(TypeError):
        pool.acquire("a0")
    layer = cpp.LoraLinear(torch.randn(8, 4))
    lease = pool.acquire([("", 1.0)])
    with pytest.raises(TypeError, match="expected a C\\+\\+ module"):
        serve.PoolBinding(nn.Linear(2, 2), pool, lease)
    with pytest.raises(ValueError, match="is not a target layer of the pool"):
        with serve.PoolBinding(layer, pool, lease):  # its module path is "", not fc1
            pass
    with pytest.raises(ValueError, match="given twice|empty"):
        cpp.ModuleTree({"": layer})


# ----------------------------------------------------------------------------- C++ modules vs peft
class CppLayer(nn.Module):
    """A C++ LoRA layer in place of a Linear / Embedding of a transformers model."""

    def __init__(self, layer) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens"]


def _adapter_config(i: int) -> "peft.LoraConfig":
    """Eight adapters of different ranks, targets and scalings."""
    targets = TARGETS[: 3 + i % 6] if i % 3 else TARGETS
    return peft.LoraConfig(r=1 + i, lora_alpha=3 + 2 * i, target_modules=targets, use_rslora=i == 5,
                           init_lora_weights=False)


def _cpp_llama(model: nn.Module):
    """A copy of ``model`` whose target layers are C++ LoRA modules (no adapters of their own),
    and a ModuleTree of them under their module paths."""
    model = copy.deepcopy(model)
    layers = {}
    for name, module in list(model.named_modules()):
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in TARGETS:
            continue
        if isinstance(module, nn.Embedding):
            layer = cpp.LoraEmbedding(module.weight.detach())
        else:
            layer = cpp.LoraLinear(module.weight.detach(), None if module.bias is None else module.bias.detach())
        layers[name] = layer
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        setattr(parent, leaf, CppLayer(layer))
    return model, cpp.ModuleTree(layers), sorted(layers)


@pytest.fixture(scope="module")
def llama_adapters(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("pool_llama")
    names = [f"a{i}" for i in range(8)]
    for i, name in enumerate(names):
        torch.manual_seed(100 + i)
        model = peft.get_peft_model(tm.llama(), _adapter_config(i), adapter_name=name)
        model.save_pretrained(str(root), save_embedding_layers=False)  # root/<name>
        if i == 0:  # PEFT's default for targeted embeddings also saves their base weights
            model.save_pretrained(str(root / "with_base"), save_embedding_layers=True)
    reference = peft.PeftModel.from_pretrained(tm.llama(), str(root / names[0]), adapter_name=names[0])
    for name in names[1:]:
        reference.load_adapter(str(root / name), adapter_name=name)
    return root, names, reference.eval()


def _peft_row(reference, ids: torch.Tensor, adapter: str, scale: float) -> torch.Tensor:
    if adapter == "":
        with reference.disable_adapter():
            return reference(input_ids=ids).logits
    reference.set_adapter(adapter)
    lora_layers = [m for m in reference.modules() if isinstance(m, peft.tuners.lora.LoraLayer) and adapter in m.scaling]
    for m in lora_layers:
        m.scaling[adapter] *= scale
    try:
        return reference(input_ids=ids).logits
    finally:
        for m in lora_layers:
            m.scaling[adapter] /= scale


@torch.no_grad()
def test_cpp_modules_served_from_the_pool_match_peft(llama_adapters) -> None:
    root, names, reference = llama_adapters
    model, tree, paths = _cpp_llama(tm.llama())
    layers = serve.target_layers(tree)
    assert sorted(t.name for t in layers) == paths and len(paths) == 2 * 7 + 1
    # fewer device slots and host entries than adapters: batches evict and read folders again
    pool = serve.AdapterPool(layers, max_loras=4, max_lora_rank=8, max_cpu_loras=5)
    with pytest.raises(serve.AdapterRejectedError, match="save_embedding_layers=False"):
        pool.load("with_base", str(root / "with_base" / names[0]))
    for name in names:
        pool.load(name, str(root / name))
    batches = [
        [(names[0], 1.0), ("", 1.0), (names[1], 1.0), (names[2], 1.0), (names[3], 1.0), (names[0], 1.0)],
        [(names[4], 1.0), (names[5], 0.5), ("__base__", 1.0), (names[6], 1.0), (names[7], 2.0)],
        [(names[7], 1.0), (names[1], 0.25), ("", 1.0), (names[3], 1.0)],
        [(n, 1.0) for n in names[:4]],
    ]
    for batch in batches:
        ids = torch.randint(0, tm.VOCAB, (len(batch), 5))
        with pool.acquire(batch) as lease, serve.PoolBinding(tree, pool, lease):
            served = model(input_ids=ids).logits
        base = _peft_row(reference, ids, "", 1.0)
        for row, (adapter, scale) in enumerate(batch):
            adapter = "" if adapter == "__base__" else adapter
            want = _peft_row(reference, ids[row : row + 1], adapter, scale)
            assert (adapter == "") == torch.allclose(want, base[row : row + 1]), "adapters must change the output"
            torch.testing.assert_close(served[row : row + 1], want, rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"row {row} ({adapter}, scale {scale}): {m}")
    stats = pool.stats()
    assert stats["slot_evictions"] > 0 and stats["host_reloads"] > 0
    # without a binding the C++ layers compute the base model alone
    ids = torch.randint(0, tm.VOCAB, (2, 5))
    with reference.disable_adapter():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@torch.no_grad()
def test_cuda_pool_serves_what_the_cpu_pool_serves(llama_adapters) -> None:
    """Slots on the GPU (host tier pinned on the CPU, copies on the current stream) give the rows
    the CPU pool gives, through evictions and reloads."""
    root, names, _ = llama_adapters
    outputs = {}
    ids = torch.randint(0, tm.VOCAB, (6, 5))
    batches = [[(names[k % 8], 1.0 + 0.25 * (k % 2)) if k % 3 else ("", 1.0) for k in range(j, j + 6)] for j in range(4)]
    for device in ("cpu", "cuda"):
        model, tree, _ = _cpp_llama(tm.llama().to(device))
        pool = serve.AdapterPool(serve.target_layers(tree), max_loras=3, max_lora_rank=8, max_cpu_loras=4, device=device)
        for name in names:
            pool.load(name, str(root / name))
        for j, batch in enumerate(batches):
            # one adapter per request, at most 3 distinct: split each batch where the pool says so
            start = 0
            while start < len(batch):
                end = start + 1
                while end < len(batch) and pool.fits(batch[start:end], batch[end]):
                    end += 1
                with pool.acquire(batch[start:end]) as lease, serve.PoolBinding(tree, pool, lease):
                    outputs[(device, j, start)] = model(input_ids=ids[start:end].to(device)).logits.cpu()
                start = end
        assert pool.stats()["slot_evictions"] > 0
    for key in [k for k in outputs if k[0] == "cpu"]:
        torch.testing.assert_close(outputs[("cuda", *key[1:])], outputs[key], rtol=1e-4, atol=1e-4)
