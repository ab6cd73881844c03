"""DoRA adapters saved by the real ``peft`` in the C++ core: the loader reads the magnitude
vectors, the C++ modules (Linear, Embedding, Conv2d) compute PEFT's outputs unmerged and merged,
the files round-trip, and the adapter pool serves mixed batches of DoRA, plain-LoRA and
no-adapter rows as PEFT computes each row alone. Unsupported cases raise clear errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
from safetensors.torch import load_file, save_file  # noqa: E402

import tiny_models as tm  # noqa: E402
import torchlora  # noqa: E402
from torchlora._native import _C  # noqa: E402

cpp = _C.cpp
serve = _C.serve
TARGETS = ["fc", "emb", "conv"]
MAGNITUDE = "lora_magnitude_vector"


class Tiny(nn.Module):
    """Embedding -> Linear, and a Conv2d on its own input."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 6)
        self.fc = nn.Linear(6, 5)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, ids: torch.Tensor, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fc(self.emb(ids)), self.conv(img)


def _randomise_magnitudes(model: nn.Module, seed: int, adapter: str = "") -> None:
    """DoRA starts at magnitude = norm (a no-op rescale): move it away from there (only
    `adapter`'s, if given)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if MAGNITUDE in name and f".{adapter}." in name if adapter else MAGNITUDE in name:
                p.mul_(0.5 + torch.rand(p.shape, generator=g, dtype=torch.float64).to(p.dtype))


def _dora_peft(dtype: torch.dtype, seed: int = 0, **config) -> peft.PeftModel:
    torch.manual_seed(seed)
    base = Tiny().to(dtype).eval()
    cfg = peft.LoraConfig(r=config.pop("r", 2), lora_alpha=config.pop("lora_alpha", 3),
                          target_modules=config.pop("target_modules", TARGETS), init_lora_weights=False,
                          use_dora=config.pop("use_dora", True), **config)
    model = peft.get_peft_model(base, cfg, adapter_name="dora").eval()
    _randomise_magnitudes(model, seed)
    return model


def _inputs(dtype: torch.dtype, batch: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, 12, (batch, 4), generator=g), torch.randn(batch, 3, 5, 5, generator=g, dtype=dtype)


def _cpp_layers(base: Tiny) -> dict:
    """C++ LoRA layers around copies of base's layers (no adapters yet)."""
    return {
        "emb": cpp.LoraEmbedding(base.emb.weight.detach().clone()),
        "fc": cpp.LoraLinear(base.fc.weight.detach().clone(), base.fc.bias.detach().clone()),
        "conv": cpp.LoraConv2d(base.conv.weight.detach().clone(), base.conv.bias.detach().clone(), padding=[1, 1]),
    }


def _cpp_outputs(layers: dict, ids: torch.Tensor, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return layers["fc"](layers["emb"](ids)), layers["conv"](img)


def _peft_outputs(model: peft.PeftModel, ids: torch.Tensor, img: torch.Tensor):
    return model(ids, img)


def _close(dtype: torch.dtype) -> dict:
    return {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}


def _assert_outputs_equal(got, want, dtype, what: str) -> None:
    for name, g, w in zip(("fc(emb)", "conv"), got, want):
        torch.testing.assert_close(g, w, **_close(dtype), msg=lambda m: f"{what}, {name}: {m}")


# ----------------------------------------------------------------------------- loader
def test_loader_reads_the_magnitude_vectors(tmp_path: Path) -> None:
    model = _dora_peft(torch.float32)
    model.save_pretrained(str(tmp_path))
    tmp_path = tmp_path / "dora"
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    modules, other = cpp.load_peft_adapter(str(tmp_path))
    assert other == {} and set(modules) == set(TARGETS)
    for path, w in modules.items():
        want = saved[f"base_model.model.{path}.{MAGNITUDE}"]
        assert w["magnitude"] is not None and w["magnitude"].shape == want.shape
        torch.testing.assert_close(w["magnitude"], want, rtol=0, atol=0)
    assert modules["fc"]["magnitude"].shape == (5,)
    assert modules["emb"]["magnitude"].shape == (6,)
    assert modules["conv"]["magnitude"].shape == (1, 4, 1, 1)


def test_files_round_trip_through_the_cpp_writer(tmp_path: Path) -> None:
    model = _dora_peft(torch.float32, seed=3)
    model.save_pretrained(str(tmp_path / "src"))
    cpp.copy_peft_adapter(str(tmp_path / "src" / "dora"), str(tmp_path / "dst"))
    src = load_file(str(tmp_path / "src" / "dora" / "adapter_model.safetensors"))
    dst = load_file(str(tmp_path / "dst" / "adapter_model.safetensors"))
    assert set(src) == set(dst) and any(MAGNITUDE in k for k in dst)
    for k in src:
        torch.testing.assert_close(dst[k], src[k], rtol=0, atol=0)
    assert json.loads((tmp_path / "dst" / "adapter_config.json").read_text())["use_dora"] is True
    # PEFT reads the rewritten folder and computes what the original computes
    again = peft.PeftModel.from_pretrained(_base_copy(model).eval(), str(tmp_path / "dst"), adapter_name="dora").eval()
    ids, img = _inputs(torch.float32)
    _assert_outputs_equal(again(ids, img), model(ids, img), torch.float32, "reloaded")


def _rewrite(folder: Path, edit_tensors=None, edit_config=None) -> None:
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, str(path))
    if edit_config:
        cfg = json.loads((folder / "adapter_config.json").read_text())
        edit_config(cfg)
        (folder / "adapter_config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("case, match", [
    ("missing", "has no 'base_model.model.fc.lora_magnitude_vector'.*use_dora=true needs"),
    ("without_dora", "is a DoRA magnitude vector but adapter_config.json has use_dora=false"),
    ("shape", r"lora_magnitude_vector' must have shape \[5\]"),
    ("conv_shape", r"lora_magnitude_vector' must have shape \[1, 4, 1, 1\]"),
    ("nonfinite", "non-finite"),
    ("integer", "expected a floating point tensor"),
])
def test_loader_rejects_bad_magnitudes(tmp_path: Path, case: str, match: str) -> None:
    _dora_peft(torch.float32).save_pretrained(str(tmp_path))
    tmp_path = tmp_path / "dora"
    key = f"base_model.model.fc.{MAGNITUDE}"

    def tensors(t: dict) -> None:
        if case == "missing":
            del t[key]
        elif case == "shape":
            t[key] = torch.ones(4)
        elif case == "conv_shape":
            t[f"base_model.model.conv.{MAGNITUDE}"] = torch.ones(4)
        elif case == "nonfinite":
            t[key] = torch.full((5,), float("inf"))
        elif case == "integer":
            t[key] = torch.ones(5, dtype=torch.int32)

    config = (lambda c: c.update(use_dora=False)) if case == "without_dora" else None
    _rewrite(tmp_path, tensors, config)
    with pytest.raises(ValueError, match=match) as e:
        cpp.load_peft_adapter(str(tmp_path))
    assert "adapter_model.safetensors" in str(e.value)


# ----------------------------------------------------------------------------- C++ modules
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpp_modules_match_peft_unmerged_and_merged(tmp_path: Path, dtype: torch.dtype) -> None:
    model = _dora_peft(dtype)
    model.save_pretrained(str(tmp_path))
    layers = _cpp_layers(_base_copy(model))
    tree = cpp.ModuleTree(layers)
    cpp.load_adapter(tree, str(tmp_path / "dora"), "dora")
    cpp.set_adapter(tree, ["dora"])
    for layer in layers.values():
        layer.eval()
        assert layer.uses_dora("dora")
    # PEFT's parameter name and value
    peft_params = dict(model.named_parameters())
    for path, layer in layers.items():
        mine = layer.named_parameters()[f"{MAGNITUDE}.dora.weight"]
        torch.testing.assert_close(mine, peft_params[f"base_model.model.{path}.{MAGNITUDE}.dora.weight"], rtol=0, atol=0)
    ids, img = _inputs(dtype)
    with torch.no_grad():
        want = _peft_outputs(model, ids, img)
        with model.disable_adapter():
            base = _peft_outputs(model, ids, img)
        got = _cpp_outputs(layers, ids, img)
        assert not torch.allclose(want[0], base[0]) and not torch.allclose(want[1], base[1])
        _assert_outputs_equal(got, want, dtype, "unmerged")

        model.merge_adapter()
        cpp.merge_adapter(tree)
        assert all(layer.merged for layer in layers.values())
        _assert_outputs_equal(_cpp_outputs(layers, ids, img), _peft_outputs(model, ids, img), dtype, "merged")
        torch.testing.assert_close(layers["fc"].named_parameters()["base_layer.weight"],
                                   model.base_model.model.fc.base_layer.weight, **_close(dtype))
        model.unmerge_adapter()
        cpp.unmerge_adapter(tree)
        _assert_outputs_equal(_cpp_outputs(layers, ids, img), want, dtype, "unmerged again")


def _base_copy(model: peft.PeftModel) -> Tiny:
    """The base model's layers (PEFT wraps them; the base weights are the originals)."""
    inner = model.base_model.model
    base = Tiny().to(next(inner.parameters()).dtype)
    with torch.no_grad():
        for name in TARGETS:
            layer = getattr(inner, name)
            getattr(base, name).load_state_dict(getattr(layer, "base_layer", layer).state_dict())
    return base


def test_two_dora_adapters_in_turn_and_merged_match_peft(tmp_path: Path) -> None:
    dtype = torch.float64
    model = _dora_peft(dtype, seed=1)
    model.save_pretrained(str(tmp_path))  # tmp/dora
    torch.manual_seed(5)
    model.add_adapter("b", peft.LoraConfig(r=3, lora_alpha=5, target_modules=["fc", "conv"], init_lora_weights=False,
                                           use_dora=True))
    _randomise_magnitudes(model, 11, adapter="b")
    model.save_pretrained(str(tmp_path), selected_adapters=["b"])  # tmp/b
    layers = _cpp_layers(_base_copy(model))
    tree = cpp.ModuleTree(layers)
    cpp.load_adapter(tree, str(tmp_path / "dora"), "dora")
    cpp.load_adapter(tree, str(tmp_path / "b"), "b")
    model.base_model.set_adapter(["dora", "b"])
    cpp.set_adapter(tree, ["dora", "b"])
    for layer in layers.values():
        layer.eval()
    ids, img = _inputs(dtype)
    with torch.no_grad():
        want = _peft_outputs(model, ids, img)
        _assert_outputs_equal(_cpp_outputs(layers, ids, img), want, dtype, "a then b")
        # merged in turn: each norm from the unmerged base weight
        model.merge_adapter(["dora", "b"])
        cpp.merge_adapter(tree, ["dora", "b"])
        _assert_outputs_equal(_cpp_outputs(layers, ids, img), _peft_outputs(model, ids, img), dtype, "merged a, b")
        model.unmerge_adapter()
        cpp.unmerge_adapter(tree)
        _assert_outputs_equal(_cpp_outputs(layers, ids, img), want, dtype, "unmerged a, b")


def test_mixed_batches_of_own_adapters_match_peft_per_row(tmp_path: Path) -> None:
    dtype = torch.float64
    model = _dora_peft(dtype, seed=2, target_modules=["fc", "conv"])
    model.save_pretrained(str(tmp_path))
    torch.manual_seed(9)
    model.add_adapter("p", peft.LoraConfig(r=2, lora_alpha=2, target_modules=["fc", "conv"], init_lora_weights=False))
    model.save_pretrained(str(tmp_path), selected_adapters=["p"])
    base = _base_copy(model)
    layers = {"fc": cpp.LoraLinear(base.fc.weight.detach(), base.fc.bias.detach()),
              "conv": cpp.LoraConv2d(base.conv.weight.detach(), base.conv.bias.detach(), padding=[1, 1])}
    tree = cpp.ModuleTree(layers)
    cpp.load_adapter(tree, str(tmp_path / "dora"), "dora")
    cpp.load_adapter(tree, str(tmp_path / "p"), "p")
    for layer in layers.values():
        layer.eval()
    rows = ["dora", "__base__", "p", "dora"]
    x = torch.randn(4, 3, 6, dtype=dtype)
    img = torch.randn(4, 3, 5, 5, dtype=dtype)
    inner = model.base_model.model
    with torch.no_grad():
        got_fc = layers["fc"].forward_mixed(x, rows)
        got_conv = layers["conv"].forward_mixed(img, rows)
        for i, name in enumerate(rows):
            if name == "__base__":
                with model.disable_adapter():
                    want_fc, want_conv = inner.fc(x[i : i + 1]), inner.conv(img[i : i + 1])
            else:
                model.base_model.set_adapter(name)
                want_fc, want_conv = inner.fc(x[i : i + 1]), inner.conv(img[i : i + 1])
            torch.testing.assert_close(got_fc[i : i + 1], want_fc, **_close(dtype))
            torch.testing.assert_close(got_conv[i : i + 1], want_conv, **_close(dtype))


def test_magnitude_trains_and_norm_is_detached() -> None:
    """The magnitude gets PEFT's gradient; lora_A / lora_B get theirs through z only."""
    torch.manual_seed(0)
    base = nn.Linear(4, 3).double()
    ours = cpp.LoraLinear(base.weight.detach(), base.bias.detach())
    ours.update_layer("a", r=2, lora_alpha=2, init_lora_weights=False, use_dora=True)
    ours.set_adapter("a")
    ref = peft.get_peft_model(copy.deepcopy(nn.Sequential(base)), peft.LoraConfig(
        r=2, lora_alpha=2, target_modules=["0"], init_lora_weights=False, use_dora=True), adapter_name="a")
    layer = ref.base_model.model[0]
    params = ours.named_parameters()
    with torch.no_grad():
        layer.lora_A["a"].weight.copy_(params["lora_A.a.weight"])
        layer.lora_B["a"].weight.copy_(params["lora_B.a.weight"])
        # the magnitude starts at the norm of W + s B A
        torch.testing.assert_close(params[f"{MAGNITUDE}.a.weight"], ours.dora_weight_norm("a"))
        want = (base.weight + 1.0 * params["lora_B.a.weight"] @ params["lora_A.a.weight"]).norm(dim=1)
        torch.testing.assert_close(ours.dora_weight_norm("a"), want)
        params[f"{MAGNITUDE}.a.weight"].mul_(torch.tensor([0.7, 1.2, 0.9], dtype=torch.float64))
        layer.lora_magnitude_vector["a"].weight.copy_(params[f"{MAGNITUDE}.a.weight"])
    x = torch.randn(5, 4, dtype=torch.float64)
    ours(x).square().sum().backward()
    layer(x).square().sum().backward()
    for mine, theirs in ((f"{MAGNITUDE}.a.weight", layer.lora_magnitude_vector["a"].weight),
                         ("lora_A.a.weight", layer.lora_A["a"].weight), ("lora_B.a.weight", layer.lora_B["a"].weight)):
        assert params[mine].grad is not None, mine
        torch.testing.assert_close(params[mine].grad, theirs.grad, rtol=1e-9, atol=1e-12, msg=lambda m: f"{mine}: {m}")


def test_cpp_modules_reject_what_dora_does_not_support() -> None:
    lin = cpp.LoraLinear(torch.randn(3, 4), torch.zeros(3))
    with pytest.raises(ValueError, match="lora_bias=true is not supported for DoRA"):
        lin.update_layer("a", r=2, lora_bias=True, use_dora=True)
    conv = cpp.LoraConv2d(torch.randn(4, 1, 3, 3), None, groups=4)
    with pytest.raises(NotImplementedError, match="groups > 1"):
        conv.update_layer("a", r=4, use_dora=True)
    lin.update_layer("d", r=2, lora_dropout=0.1, use_dora=True, init_lora_weights=False)
    lin.set_adapter("d")
    lin.train()
    with pytest.raises(NotImplementedError, match="lora_dropout=0.1"):
        lin(torch.randn(2, 4))
    lin.eval()
    assert lin(torch.randn(2, 4)).shape == (2, 3)
    with pytest.raises(ValueError, match="does not use DoRA"):
        lin.update_layer("plain", r=2)
        lin.magnitude("plain")


# ----------------------------------------------------------------------------- multi_dora_scale
def _multi_dora_reference(z, factor, bias, slots, dim):
    out = z.clone()
    for t, s in enumerate(slots.tolist()):
        if s < 0:
            continue
        shape = [1] * (z.dim() - 1)
        shape[dim - 1 if dim > 0 else dim] = -1
        g = factor[s].view(shape)
        b = 0 if bias is None else bias.view(shape)
        out[t] = g * (z[t] - b) + b
    return out


@pytest.mark.parametrize("dim, shape", [(-1, (5, 3, 4)), (1, (5, 4, 2, 2))])
@pytest.mark.parametrize("with_bias", [True, False])
def test_multi_dora_scale_matches_a_reference_and_opcheck(dim, shape, with_bias) -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(*shape, dtype=torch.float64, generator=g, requires_grad=True)
    factor = torch.rand(3, 4, dtype=torch.float64, generator=g).add(0.5).requires_grad_()
    bias = torch.randn(4, dtype=torch.float64, generator=g).requires_grad_() if with_bias else None
    slots = torch.tensor([0, -1, 2, 1, 0])
    got = torchlora.ops.multi_dora_scale(z, factor, bias, slots, dim)
    torch.testing.assert_close(got, _multi_dora_reference(z, factor, bias, slots, dim))
    torch.testing.assert_close(got[1], z[1], rtol=0, atol=0)
    inputs = (z, factor) + ((bias,) if with_bias else ())
    assert torch.autograd.gradcheck(
        lambda *t: torchlora.ops.multi_dora_scale(t[0], t[1], t[2] if with_bias else None, slots, dim), inputs)
    torch.library.opcheck(torch.ops.torchlora.multi_dora_scale.default, (z, factor, bias, slots, dim))
    z32 = z.detach().float()
    got32 = torchlora.ops.multi_dora_scale(z32, factor.detach().float(), None, slots.int(), dim)
    assert got32.dtype == torch.float32


def test_multi_dora_scale_errors() -> None:
    z = torch.randn(2, 3)
    with pytest.raises(RuntimeError, match=r"factor must be \[slots, 3\]"):
        torchlora.ops.multi_dora_scale(z, torch.ones(2, 4), None, torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match=r"slot_index must be \[2\]"):
        torchlora.ops.multi_dora_scale(z, torch.ones(2, 3), None, torch.tensor([0]))
    with pytest.raises(RuntimeError, match="not dimension 0"):
        torchlora.ops.multi_dora_scale(z, torch.ones(2, 2), None, torch.tensor([0, 1]), 0)
    with pytest.raises(IndexError):
        torchlora.ops.multi_dora_scale(z, torch.ones(2, 3), None, torch.tensor([0, 2]))


# ----------------------------------------------------------------------------- adapter pool
class CppLayer(nn.Module):
    def __init__(self, layer) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj", "embed_tokens"]


def _cpp_llama(model: nn.Module):
    model = copy.deepcopy(model)
    layers = {}
    for name, module in list(model.named_modules()):
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in LLAMA_TARGETS:
            continue
        if isinstance(module, nn.Embedding):
            layer = cpp.LoraEmbedding(module.weight.detach())
        else:
            layer = cpp.LoraLinear(module.weight.detach(), None if module.bias is None else module.bias.detach())
        layers[name] = layer
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        setattr(parent, leaf, CppLayer(layer))
    return model, cpp.ModuleTree(layers)


@pytest.fixture(scope="module")
def llama_dora(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("dora_llama")
    specs = {"d0": dict(r=2, lora_alpha=4, use_dora=True), "d1": dict(r=3, lora_alpha=3, use_dora=True,
             target_modules=["q_proj", "down_proj"]), "plain": dict(r=2, lora_alpha=5)}
    for i, (name, spec) in enumerate(specs.items()):
        torch.manual_seed(200 + i)
        cfg = peft.LoraConfig(target_modules=spec.pop("target_modules", LLAMA_TARGETS), init_lora_weights=False, **spec)
        model = peft.get_peft_model(tm.llama(), cfg, adapter_name=name)
        _randomise_magnitudes(model, 300 + i)
        model.save_pretrained(str(root), save_embedding_layers=False)
    reference = peft.PeftModel.from_pretrained(tm.llama(), str(root / "d0"), adapter_name="d0")
    for name in list(specs)[1:]:
        reference.load_adapter(str(root / name), adapter_name=name)
    return root, list(specs), reference.eval()


def _peft_row(reference, ids: torch.Tensor, adapter: str) -> torch.Tensor:
    if adapter in ("", "__base__"):
        with reference.disable_adapter():
            return reference(input_ids=ids).logits
    reference.set_adapter(adapter)
    return reference(input_ids=ids).logits


@torch.no_grad()
def test_pool_serves_dora_plain_and_base_rows_as_peft(llama_dora) -> None:
    root, names, reference = llama_dora
    model, tree = _cpp_llama(tm.llama())
    pool = serve.AdapterPool(serve.target_layers(tree), max_loras=2, max_lora_rank=4, max_cpu_loras=3)
    for name in names:
        pool.load(name, str(root / name))
    batches = [[("d0", 1.0), ("", 1.0), ("plain", 1.0), ("d0", 1.0)],
               [("d1", 1.0), ("plain", 0.5), ("__base__", 1.0)],
               [("d0", 1.0), ("d1", 1.0)]]
    for batch in batches:
        ids = torch.randint(0, tm.VOCAB, (len(batch), 5))
        with pool.acquire(batch) as lease, serve.PoolBinding(tree, pool, lease):
            assert lease.uses_dora
            served = model(input_ids=ids).logits
        for row, (adapter, scale) in enumerate(batch):
            if scale != 1.0:
                layers = [m for m in reference.modules() if isinstance(m, peft.tuners.lora.LoraLayer)
                          and adapter in m.scaling]
                for m in layers:
                    m.scaling[adapter] *= scale
                try:
                    want = _peft_row(reference, ids[row : row + 1], adapter)
                finally:
                    for m in layers:
                        m.scaling[adapter] /= scale
            else:
                want = _peft_row(reference, ids[row : row + 1], adapter)
            torch.testing.assert_close(served[row : row + 1], want, rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"row {row} ({adapter}): {m}")
    # a DoRA slot's factors are not 1, the plain slot's are
    with pool.acquire([("plain", 1.0), ("d0", 1.0)]) as lease:
        plain_slot, dora_slot = lease.slots
        factors = pool.dora_factors("model.layers.0.self_attn.q_proj")
        assert torch.all(factors[plain_slot] == 1) and not torch.allclose(factors[dora_slot], torch.ones(()))


def test_pool_rejects_dora_at_other_scales_and_without_base_weights(llama_dora) -> None:
    root, names, _ = llama_dora
    _, tree = _cpp_llama(tm.llama())
    pool = serve.AdapterPool(serve.target_layers(tree), max_loras=2, max_lora_rank=4)
    pool.load("d0", str(root / "d0"))
    pool.load("plain", str(root / "plain"))
    with pytest.raises(serve.AdapterRejectedError, match="uses DoRA, which the pool serves at scale 1 only") as e:
        pool.acquire([("plain", 1.0), ("d0", 0.5)])
    assert "'d0'" in str(e.value)
    with pytest.raises(serve.AdapterRejectedError, match="scale 1 only"):
        pool.fits([("plain", 1.0)], ("d0", 2.0))
    assert pool.fits([("plain", 1.0)], ("d0", 1.0))
    with pool.acquire([("plain", 0.5)]) as lease:  # plain LoRA keeps any scale
        assert not lease.uses_dora
    # target layers given without their base weights (as an exported model's) cannot serve DoRA
    shapes = [serve.TargetLayer(t.name, t.kind, t.weight_shape) for t in serve.target_layers(tree)]
    bare = serve.AdapterPool(shapes, max_loras=2, max_lora_rank=4)
    bare.load("plain", str(root / "plain"))
    with pytest.raises(serve.AdapterRejectedError, match="DoRA.*needs the base weight.*ExportedModel"):
        bare.load("d0", str(root / "d0"))
    with pytest.raises(ValueError, match="base_weight has shape"):
        serve.AdapterPool([serve.TargetLayer("x", "linear", [3, 4], base_weight=torch.zeros(4, 3))], max_loras=1,
                          max_lora_rank=2)


@torch.no_grad()
def test_pool_serves_dora_conv_rows_as_peft(tmp_path: Path) -> None:
    model = _dora_peft(torch.float32, seed=4, target_modules=["conv"])
    model.save_pretrained(str(tmp_path))
    base = _base_copy(model)
    layer = cpp.LoraConv2d(base.conv.weight.detach(), base.conv.bias.detach(), padding=[1, 1])
    tree = cpp.ModuleTree({"conv": layer})
    pool = serve.AdapterPool(serve.target_layers(tree), max_loras=2, max_lora_rank=2)
    pool.load("dora", str(tmp_path / "dora"))
    img = torch.randn(3, 3, 5, 5)
    with pool.acquire([("dora", 1.0), ("", 1.0), ("dora", 1.0)]) as lease, serve.PoolBinding(tree, pool, lease):
        served = layer(img)
    inner = model.base_model.model.conv
    torch.testing.assert_close(served[[0, 2]], inner(img[[0, 2]]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(served[1:2], inner.base_layer(img[1:2]), rtol=1e-5, atol=1e-6)
