"""torchlora._C.serve.ExportedModel: a model exported with torchlora.export (AOTInductor .pt2) is
loaded by the C++ loader and run with an AdapterPool's slots; every row of mixed batches equals the
real ``peft`` running that row's adapter alone (rows without adapter: the base model), per-request
scales included, and swapping adapters changes the outputs without recompiling. One package per
module (each AOTInductor compile is slow)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

import torchlora  # noqa: E402
from torchlora.export import export_for_serving  # noqa: E402

serve = torchlora._C.serve
VOCAB = 20


class TokenMlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(self.emb(ids))))


def _base() -> TokenMlp:
    torch.manual_seed(0)
    return TokenMlp().eval()


TARGETS = [["fc1"], ["fc2"], ["fc1", "fc2"], ["emb"], ["emb", "fc1"], ["emb", "fc2"], ["emb", "fc1", "fc2"], ["fc1"]]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("exported")
    names = [f"a{i}" for i in range(8)]
    for i, name in enumerate(names):
        torch.manual_seed(200 + i)
        config = peft.LoraConfig(r=1 + i, lora_alpha=2 + 3 * i, target_modules=TARGETS[i], use_rslora=i == 4,
                                 init_lora_weights=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft.get_peft_model(_base(), config, adapter_name=name).save_pretrained(
                str(root), save_embedding_layers=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.PeftModel.from_pretrained(_base(), str(root / names[0]), adapter_name=names[0])
        for name in names[1:]:
            reference.load_adapter(str(root / name), adapter_name=name)
    ids = torch.randint(0, VOCAB, (3, 5))
    result = export_for_serving(_base(), ids, root / "model.pt2", max_loras=4, max_lora_rank=8,
                                target_modules=["emb", "fc1", "fc2"])
    return dict(root=root, names=names, reference=reference.eval(), path=result.package_path)


def _peft_row(reference, ids: torch.Tensor, adapter: str, scale: float) -> torch.Tensor:
    if adapter in ("", "__base__"):
        with reference.disable_adapter():
            return reference(ids)
    reference.set_adapter(adapter)
    layers = [m for m in reference.modules() if isinstance(m, peft.tuners.lora.LoraLayer) and adapter in m.scaling]
    for m in layers:
        m.scaling[adapter] *= scale
    try:
        return reference(ids)
    finally:
        for m in layers:
            m.scaling[adapter] /= scale


@torch.no_grad()
def test_exported_model_rows_match_peft(exported) -> None:
    model = serve.ExportedModel(exported["path"])
    info = model.info
    assert (info["format"], info["num_model_inputs"], info["max_loras"], info["max_lora_rank"]) == (1, 1, 4, 8)
    assert [t.name for t in info["layers"]] == ["emb", "fc1", "fc2"]
    assert info["dtype"] == torch.float32 and not info["lora_bias"]
    pool = model.make_pool(max_cpu_loras=5)
    assert pool.max_loras == 4 and [t.kind for t in pool.layers] == ["embedding", "linear", "linear"]
    names = exported["names"]
    for name in names:
        pool.load(name, str(exported["root"] / name))
    reference = exported["reference"]
    batches = [
        [(names[0], 1.0), ("", 1.0), (names[1], 1.0), (names[2], 1.0), (names[3], 1.0)],
        [(names[4], 1.0), (names[5], 0.5), ("__base__", 1.0), (names[6], 1.0), (names[7], 2.0), (names[4], 1.0)],
        [(names[3], 0.25), ("", 1.0)],
        [(n, 1.0) for n in names[:4]] + [("", 1.0)] * 3,
    ]
    for length, batch in zip((5, 7, 2, 3), batches):
        ids = torch.randint(0, VOCAB, (len(batch), length))
        with pool.acquire(batch) as lease:
            (served,) = model.forward([ids], pool, lease)
        base = _peft_row(reference, ids, "", 1.0)
        for row, (adapter, scale) in enumerate(batch):
            want = _peft_row(reference, ids[row : row + 1], adapter, scale)
            assert (adapter in ("", "__base__")) == torch.allclose(want, base[row : row + 1])
            torch.testing.assert_close(served[row : row + 1], want, rtol=1e-5, atol=5e-5,
                                       msg=lambda m: f"row {row} ({adapter}, scale {scale}): {m}")
    stats = pool.stats()
    assert stats["slot_evictions"] > 0 and stats["host_reloads"] > 0


@torch.no_grad()
def test_exported_model_checks_its_inputs(exported, tmp_path: Path) -> None:
    model = serve.ExportedModel(exported["path"])
    pool = model.make_pool()
    pool.load("a", str(exported["root"] / exported["names"][2]))
    ids = torch.randint(0, VOCAB, (2, 4))
    with pool.acquire([("a", 1.0), ("", 1.0)]) as lease:
        with pytest.raises(ValueError, match="takes 1 inputs, got 2"):
            model.forward([ids, ids], pool, lease)
        with pytest.raises(ValueError, match="batch size 3 but the lease has 2"):
            model.forward([torch.randint(0, VOCAB, (3, 4))], pool, lease)
        other = serve.AdapterPool(pool.layers, max_loras=2, max_lora_rank=8)
        with pytest.raises(ValueError, match="not made for this model"):
            model.forward([ids], other, lease)
        (out,) = model.forward([ids], pool, lease)
        assert out.shape == (2, 4, 4)
    with pytest.raises(ValueError, match="released"):
        model.forward([ids], pool, lease)
    junk = tmp_path / "junk.pt2"
    junk.write_bytes(b"not a package")
    with pytest.raises(RuntimeError, match="cannot load the AOTInductor package"):
        serve.ExportedModel(str(junk))


def test_exported_model_pools_reject_dora_adapters(exported, tmp_path: Path) -> None:
    """An exported model's slots have no DoRA factors: its pool refuses DoRA adapters by name."""
    torch.manual_seed(3)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["fc1"], init_lora_weights=False, use_dora=True)
    peft.get_peft_model(_base(), config).save_pretrained(str(tmp_path))
    pool = serve.ExportedModel(exported["path"]).make_pool()
    with pytest.raises(serve.AdapterRejectedError, match="'dora'.*DoRA.*ExportedModel.*do not") as e:
        pool.load("dora", str(tmp_path))
    assert "module 'fc1'" in str(e.value)
    assert not pool.has_adapter("dora")


@torch.no_grad()
def test_package_without_torchlora_metadata_is_refused(tmp_path: Path) -> None:
    program = torch.export.export(nn.Linear(2, 2), (torch.randn(2, 2),))
    path = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "plain.pt2"))
    with pytest.raises(RuntimeError, match="is not a torchlora export"):
        serve.ExportedModel(path)
