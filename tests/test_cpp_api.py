"""The C++ API against PEFT: adapters saved by the real ``peft`` are served by the example
C++ server (examples/cpp, built through find_package(TorchLora) from this package's
share/cmake) on a TorchScript export of the base model, and its outputs must equal PEFT's.
Malformed adapter files must come back as errors naming the file and the problem."""

from __future__ import annotations

import copy
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
from safetensors.torch import load_file, save_file  # noqa: E402

import torchlora  # noqa: E402
from torchlora._native import _C  # noqa: E402
from torchscript_files import save_torchscript  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- models
class TokenModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc2(torch.relu(self.fc1(self.emb(ids)))))


class ConvModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 4, 1)
        self.fc = nn.Linear(4 * 5 * 5, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv2(torch.relu(self.conv1(x)))).flatten(1))


# ----------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def server_binary() -> Path:
    env = dict(os.environ, PYTHON=sys.executable, JOBS=os.environ.get("JOBS", "2"))
    out = subprocess.run(
        [str(ROOT / "scripts" / "build-cpp-example.sh")], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=1800,
    )
    assert out.returncode == 0, f"building examples/cpp failed:\n{out.stderr[-4000:]}"
    binary = ROOT / out.stdout.strip().splitlines()[-1]
    assert binary.exists()
    return binary


def run_server(binary: Path, model_path: Path, adapters: dict[str, Path], requests: list[dict]) -> list[dict]:
    args = [str(binary), "--jsonl", str(model_path)] + [f"{name}={path}" for name, path in adapters.items()]
    text = "".join(json.dumps(r) + "\n" for r in requests)
    out = subprocess.run(args, input=text, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"lora_server failed: {out.stderr}"
    responses = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(responses) == len(requests), out.stderr
    return responses


def save_peft_adapter(base: nn.Module, path: Path, seed: int, **config) -> nn.Module:
    """A PEFT adapter with random (non-zero) factors, saved to ``path``; returns the PEFT model."""
    torch.manual_seed(seed)
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **config))
    with torch.no_grad():  # make modules_to_save differ from the base
        for name, p in model.named_parameters():
            if "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(str(path))
    return model.eval()


def peft_reference(base: nn.Module, path: Path, x: torch.Tensor) -> torch.Tensor:
    """What PEFT computes with the adapter as loaded from disk."""
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()
    with torch.no_grad():
        return model(x)


def assert_output(response: dict, expected: torch.Tensor) -> None:
    assert "error" not in response, response
    got = torch.tensor(response["output"], dtype=torch.float64)
    assert list(got.shape) == list(expected.shape)
    torch.testing.assert_close(got, expected.double(), rtol=1e-5, atol=2e-6)


# ----------------------------------------------------------------------------- tests
def test_cmake_package_is_in_the_python_package() -> None:
    config = Path(torchlora.cmake_prefix_path) / "TorchLora" / "TorchLoraConfig.cmake"
    assert config.exists(), config
    text = config.read_text()
    assert "TorchLora::torch" in text and "TorchLora_WITH_ADAPTER_IO ON" in text
    # the build's own modules find torch and nlohmann_json for the programs that link torchlora
    for module in ("TorchLoraTorch.cmake", "TorchLoraJson.cmake"):
        assert (config.parent / module).is_file(), module
        assert f"/{module}" in text


def test_server_matches_peft_on_token_model(server_binary: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = TokenModel().eval()
    save_peft_adapter(base, tmp_path / "a", seed=1, target_modules=["emb", "fc1", "fc2"], r=4, lora_alpha=8,
                      rank_pattern={"fc2": 2}, use_rslora=True, modules_to_save=["head"])
    save_peft_adapter(base, tmp_path / "b", seed=2, target_modules=r"fc\d", r=2, lora_alpha=5,
                      alpha_pattern={"fc1": 3}, lora_bias=True)
    save_torchscript(base, tmp_path / "model.pt")

    ids = torch.randint(0, 20, (2, 5))
    expected = {"a": peft_reference(base, tmp_path / "a", ids), "b": peft_reference(base, tmp_path / "b", ids)}
    with torch.no_grad():
        expected["__base__"] = base(ids)
    assert not torch.allclose(expected["a"], expected["__base__"], atol=1e-3)
    assert not torch.allclose(expected["b"], expected["__base__"], atol=1e-3)

    order = ["a", "b", "__base__", "b", "a", "a", "__base__", "b"]
    requests = [{"id": i, "adapter": name, "input": ids.tolist(), "dtype": "int64"} for i, name in enumerate(order)]
    responses = run_server(server_binary, tmp_path / "model.pt", {"a": tmp_path / "a", "b": tmp_path / "b"}, requests)
    for i, (name, response) in enumerate(zip(order, responses)):
        assert response["id"] == i
        assert_output(response, expected[name])


def test_server_matches_peft_on_conv_model_and_half_precision_files(server_binary: Path, tmp_path: Path) -> None:
    torch.manual_seed(3)
    base = ConvModel().eval()
    save_peft_adapter(base, tmp_path / "c", seed=4, target_modules=["conv1", "conv2", "fc"], r=2, lora_alpha=4)
    # The same adapter stored as bfloat16 and float16 (loaders must accept both).
    for dtype, name in ((torch.bfloat16, "c_bf16"), (torch.float16, "c_f16")):
        (tmp_path / name).mkdir()
        tensors = load_file(str(tmp_path / "c" / "adapter_model.safetensors"))
        save_file({k: v.to(dtype) for k, v in tensors.items()}, str(tmp_path / name / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
        (tmp_path / name / "adapter_config.json").write_text((tmp_path / "c" / "adapter_config.json").read_text())
    x = torch.randn(2, 3, 5, 5)
    save_torchscript(base, tmp_path / "model.pt", x)
    expected = {name: peft_reference(base, tmp_path / name, x) for name in ("c", "c_bf16", "c_f16")}
    assert not torch.allclose(expected["c"], expected["c_bf16"], atol=1e-7)  # the rounding is visible

    adapters = {name: tmp_path / name for name in expected}
    requests = [{"id": n, "adapter": n, "input": x.tolist()} for n in ("c", "c_bf16", "c_f16", "c")]
    for response in run_server(server_binary, tmp_path / "model.pt", adapters, requests):
        assert_output(response, expected[response["id"]])


def test_server_loads_adapters_at_run_time_and_reports_errors(server_binary: Path, tmp_path: Path) -> None:
    torch.manual_seed(5)
    base = TokenModel().eval()
    save_peft_adapter(base, tmp_path / "a", seed=6, target_modules=["fc1"], r=3, lora_alpha=6)
    save_torchscript(base, tmp_path / "model.pt")
    ids = torch.randint(0, 20, (1, 4))
    requests = [
        {"id": 0, "adapter": "late", "input": ids.tolist(), "dtype": "int64"},
        {"id": 1, "load_adapter": "late", "path": str(tmp_path / "a")},
        {"id": 2, "adapter": "late", "input": ids.tolist(), "dtype": "int64"},
        {"id": 3, "adapter": "late", "input": [[1, 2], [3]], "dtype": "int64"},
        {"id": 4, "adapter": "late", "input": ids.tolist(), "dtype": "complex"},
    ]
    responses = run_server(server_binary, tmp_path / "model.pt", {}, requests)
    assert "unknown adapter 'late'" in responses[0]["error"]
    assert responses[1]["loaded"] == "late"
    assert_output(responses[2], peft_reference(base, tmp_path / "a", ids))
    assert "ragged" in responses[3]["error"]
    assert "dtype must be" in responses[4]["error"]


# ----------------------------------------------------------------------------- malformed files
def _header_file(header: dict | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


_GOOD_ENTRY = {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 32]}
_MALFORMED = {
    "too_short": (b"\x01\x02", "too short"),
    "header_too_large": (_header_file(b"{}", length=200_000_000), "exceeds the limit"),
    "header_past_end": (_header_file(b"{}", length=1000), "runs past the end"),
    "not_json": (_header_file(b"{not json"), "not valid JSON"),
    "not_object": (_header_file(b"[1, 2]"), "starting with '{'"),
    "too_deep": (_header_file(b'{"a": {"b": {"c": {"d": [[[1]]]}}}}'), "nests deeper"),
    "duplicate_key": (_header_file(b'{"x": 1, "x": 2}'), "twice"),
    "bad_dtype": (_header_file({"w.lora_A.weight": {**_GOOD_ENTRY, "dtype": "F8_E4M3"}}, bytes(32)), "unsupported dtype"),
    "negative_shape": (_header_file({"w.lora_A.weight": {**_GOOD_ENTRY, "shape": [-2, 4]}}, bytes(32)), "non-negative"),
    "overflow_shape": (
        _header_file({"w.lora_A.weight": {**_GOOD_ENTRY, "shape": [2**40, 2**40, 2**20]}}, bytes(32)),
        "too many elements",
    ),
    "size_mismatch": (_header_file({"w.lora_A.weight": {**_GOOD_ENTRY, "shape": [3, 4]}}, bytes(32)), "needs 48"),
    "reversed_offsets": (
        _header_file({"w.lora_A.weight": {**_GOOD_ENTRY, "shape": [0], "data_offsets": [8, 0]}}, bytes(32)),
        "reversed",
    ),
    "past_end": (_header_file({"w.lora_A.weight": _GOOD_ENTRY}, bytes(16)), "run past the end"),
    "gap": (_header_file({"w.lora_A.weight": {**_GOOD_ENTRY, "data_offsets": [4, 36]}}, bytes(36)), "gap"),
    "overlap": (
        _header_file({"a.lora_A.weight": _GOOD_ENTRY, "b.lora_A.weight": _GOOD_ENTRY}, bytes(32)),
        "overlap",
    ),
    "trailing_bytes": (_header_file({"w.lora_A.weight": _GOOD_ENTRY}, bytes(40)), "cover 32"),
    "missing_field": (_header_file({"w.lora_A.weight": {"dtype": "F32", "shape": [2, 4]}}, bytes(32)), "needs the fields"),
    "bad_metadata": (_header_file({"__metadata__": {"format": 1}}), "must be a string"),
}


@pytest.fixture(scope="module")
def token_model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_torchscript(TokenModel().eval(), path)
    return path


def _adapter_dir(root: Path, name: str, weights: bytes, config: dict | str | None = None) -> Path:
    folder = root / name
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(weights)
    text = config if isinstance(config, str) else json.dumps(
        config or {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["fc1"]})
    (folder / "adapter_config.json").write_text(text)
    return folder


def _good_weights(**overrides: torch.Tensor) -> bytes:
    tensors = {
        "base_model.model.fc1.lora_A.weight": torch.randn(2, 16),
        "base_model.model.fc1.lora_B.weight": torch.randn(32, 2),
        **overrides,
    }
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"torchlora-good-{os.getpid()}.safetensors"
    save_file({k: v for k, v in tensors.items() if v is not None}, str(path))
    data = path.read_bytes()
    path.unlink()
    return data


def test_every_malformed_file_gives_its_error(server_binary: Path, token_model_file: Path, tmp_path: Path) -> None:
    cases: dict[str, tuple[Path, str]] = {}
    for name, (weights, message) in _MALFORMED.items():
        cases[name] = (_adapter_dir(tmp_path, name, weights), message)
    # Adapter-level problems in well-formed files.
    cases["orphan_A"] = (
        _adapter_dir(tmp_path, "orphan_A", _good_weights(**{"base_model.model.fc1.lora_B.weight": None})),
        "has lora_A.weight but no lora_B.weight",
    )
    cases["rank_mismatch"] = (
        _adapter_dir(tmp_path, "rank_mismatch", _good_weights(), {"peft_type": "LORA", "r": 3, "lora_alpha": 2, "target_modules": ["fc1"]}),
        "has rank 2 but adapter_config.json gives it r=3",
    )
    cases["bad_shape_for_model"] = (
        _adapter_dir(tmp_path, "bad_shape_for_model", _good_weights(**{
            "base_model.model.fc1.lora_A.weight": torch.randn(2, 17)})),
        "changes a weight of shape",
    )
    cases["unknown_module"] = (
        _adapter_dir(tmp_path, "unknown_module", _good_weights(**{
            "base_model.model.fc1.lora_A.weight": None, "base_model.model.fc1.lora_B.weight": None,
            "base_model.model.nope.lora_A.weight": torch.randn(2, 16),
            "base_model.model.nope.lora_B.weight": torch.randn(32, 2)})),
        "has no parameter 'nope.weight'",
    )
    cases["int_factors"] = (
        _adapter_dir(tmp_path, "int_factors", _good_weights(**{
            "base_model.model.fc1.lora_A.weight": torch.ones(2, 16, dtype=torch.int32)})),
        "expected a floating point tensor",
    )
    cases["config_not_json"] = (_adapter_dir(tmp_path, "config_not_json", _good_weights(), "{r: 2"), "not valid JSON")
    cases["config_bad_r"] = (
        _adapter_dir(tmp_path, "config_bad_r", _good_weights(), {"peft_type": "LORA", "r": 0, "target_modules": ["fc1"]}),
        "positive integer",
    )
    cases["config_r_type"] = (
        _adapter_dir(tmp_path, "config_r_type", _good_weights(), {"peft_type": "LORA", "r": "2", "target_modules": ["fc1"]}),
        "r must be an int",
    )
    cases["config_dora"] = (
        _adapter_dir(tmp_path, "config_dora", _good_weights(), {"peft_type": "LORA", "r": 2, "use_dora": True, "target_modules": ["fc1"]}),
        "use_dora=true needs for every module",
    )
    cases["config_bad_bias"] = (
        _adapter_dir(tmp_path, "config_bad_bias", _good_weights(), {"peft_type": "LORA", "r": 2, "bias": "some", "target_modules": ["fc1"]}),
        "bias must be",
    )
    cases["config_other_peft_type"] = (
        _adapter_dir(tmp_path, "config_other_peft_type", _good_weights(), {"peft_type": "IA3", "target_modules": ["fc1"]}),
        "peft_type must be",
    )
    missing = tmp_path / "missing_weights"
    missing.mkdir()
    (missing / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    cases["missing_weights"] = (missing, "no adapter_model.safetensors")
    cases["missing_folder"] = (tmp_path / "does_not_exist", "does not exist")

    requests = [{"id": name, "load_adapter": name, "path": str(path)} for name, (path, _) in cases.items()]
    responses = run_server(server_binary, token_model_file, {}, requests)
    for response in responses:
        name = response["id"]
        path, message = cases[name]
        assert "error" in response, f"{name}: loaded a malformed adapter"
        assert message in response["error"], f"{name}: {response['error']}"
        if name not in ("missing_folder", "missing_weights", "config_not_json", "config_bad_r", "config_r_type",
                        "config_dora", "config_bad_bias", "config_other_peft_type", "bad_shape_for_model",
                        "unknown_module"):
            assert "adapter_model.safetensors" in response["error"], f"{name}: error does not name the file"


# ----------------------------------------------------------------------------- C++ modules vs Python layers


def _cpp():
    """The bound C++ API (torchlora._C.cpp)."""
    return torchlora._C.cpp


def _copy_adapter_params(py_layer: nn.Module, cpp_layer) -> None:
    cpp_params = cpp_layer.named_parameters()
    for name, p in py_layer.named_parameters():
        if name.startswith("base_layer"):
            continue
        assert name in cpp_params, f"C++ layer lacks {name}; has {sorted(cpp_params)}"
        with torch.no_grad():
            cpp_params[name].copy_(p)


def _compare(py_layer: nn.Module, cpp_layer, x: torch.Tensor) -> None:
    """Forward, gradients, merge and unmerge agree between the Python and the C++ layer."""
    py_out, cpp_out = py_layer(x), cpp_layer(x)
    torch.testing.assert_close(cpp_out, py_out, rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(py_out)
    py_out.backward(grad)
    cpp_out.backward(grad)
    cpp_params = cpp_layer.named_parameters()
    for name, p in py_layer.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(cpp_params[name].grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)
    with torch.no_grad():
        py_layer.merge()
        cpp_layer.merge()
        torch.testing.assert_close(cpp_params["base_layer.weight"], py_layer.base_layer.weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(cpp_layer(x), py_layer(x), rtol=1e-5, atol=1e-6)
        py_layer.unmerge()
        cpp_layer.unmerge()
        torch.testing.assert_close(cpp_params["base_layer.weight"], py_layer.base_layer.weight, rtol=1e-5, atol=1e-6)
    assert cpp_layer.merged is False and cpp_layer.active_adapters == py_layer.active_adapters


def test_cpp_lora_linear_matches_python_layer() -> None:
    torch.manual_seed(10)
    base = nn.Linear(6, 5)
    py_layer = torchlora.LoraLinear(base, "a", r=3, lora_alpha=6, init_lora_weights=False)
    py_layer.update_layer("b", r=2, lora_alpha=3, init_lora_weights=False, use_rslora=True, lora_bias=True)
    py_layer.set_adapter(["a", "b"])
    cpp_layer = _cpp().LoraLinear(base.weight.detach(), base.bias.detach())
    cpp_layer.update_layer("a", r=3, lora_alpha=6)
    cpp_layer.update_layer("b", r=2, lora_alpha=3, use_rslora=True, lora_bias=True)
    cpp_layer.set_adapter(["a", "b"])
    _copy_adapter_params(py_layer, cpp_layer)
    assert cpp_layer.scaling("b") == pytest.approx(py_layer.scaling["b"])
    _compare(py_layer, cpp_layer, torch.randn(4, 3, 6))
    py_layer.eval()
    cpp_layer.eval()
    x = torch.randn(3, 6)
    names = ["a", "__base__", "b"]
    torch.testing.assert_close(cpp_layer.forward_mixed(x, names), py_layer(x, adapter_names=names), rtol=1e-5, atol=1e-6)


def test_cpp_lora_embedding_matches_python_layer() -> None:
    torch.manual_seed(11)
    base = nn.Embedding(12, 5, padding_idx=0)
    py_layer = torchlora.LoraEmbedding(base, "default", r=3, lora_alpha=4, init_lora_weights=False)
    cpp_layer = _cpp().LoraEmbedding(base.weight.detach(), padding_idx=0)
    cpp_layer.update_layer("default", r=3, lora_alpha=4)
    cpp_layer.set_adapter("default")
    _copy_adapter_params(py_layer, cpp_layer)
    _compare(py_layer, cpp_layer, torch.randint(0, 12, (2, 7)))


@pytest.mark.parametrize("kernel, stride, padding", [(3, 1, 1), (1, 2, 0), (3, 2, 0)])
def test_cpp_lora_conv2d_matches_python_layer(kernel: int, stride: int, padding: int) -> None:
    torch.manual_seed(12)
    base = nn.Conv2d(3, 4, kernel, stride=stride, padding=padding)
    py_layer = torchlora.LoraConv2d(base, "default", r=2, lora_alpha=4, init_lora_weights=False, lora_bias=True)
    cpp_layer = _cpp().LoraConv2d(base.weight.detach(), base.bias.detach(), stride=[stride] * 2, padding=[padding] * 2)
    cpp_layer.update_layer("default", r=2, lora_alpha=4, lora_bias=True)
    cpp_layer.set_adapter("default")
    _copy_adapter_params(py_layer, cpp_layer)
    _compare(py_layer, cpp_layer, torch.randn(2, 3, 7, 7))


# The same layer three times: PEFT's, torchlora's Python layer and the C++ module (through _C),
# with adapters "a" and "b" holding the same random weights.
_LAYER_KINDS = {
    "linear": (lambda: nn.Linear(6, 5), lambda: torch.randn(4, 3, 6),
               lambda b: _cpp().LoraLinear(b.weight.detach(), b.bias.detach())),
    "embedding": (lambda: nn.Embedding(12, 5, padding_idx=0), lambda: torch.randint(0, 12, (4, 7)),
                  lambda b: _cpp().LoraEmbedding(b.weight.detach(), padding_idx=0)),
    "conv2d": (lambda: nn.Conv2d(3, 4, 3, padding=1), lambda: torch.randn(4, 3, 6, 6),
               lambda b: _cpp().LoraConv2d(b.weight.detach(), b.bias.detach(), padding=[1, 1])),
}


def _three_layers(kind: str, dropout: float):
    make_base, make_x, make_cpp = _LAYER_KINDS[kind]
    base = make_base()
    options = {
        "a": dict(r=3, lora_alpha=6, lora_dropout=dropout),
        "b": dict(r=2, lora_alpha=3, lora_dropout=dropout / 2, use_rslora=True, lora_bias=kind != "embedding"),
    }
    peft_cls = {"linear": peft.tuners.lora.layer.Linear, "embedding": peft.tuners.lora.layer.Embedding,
                "conv2d": peft.tuners.lora.layer.Conv2d}[kind]
    ours_cls = {"linear": torchlora.LoraLinear, "embedding": torchlora.LoraEmbedding, "conv2d": torchlora.LoraConv2d}[kind]
    configs = {name: peft.LoraConfig(init_lora_weights=False, **o) for name, o in options.items()}
    theirs = peft_cls(copy.deepcopy(base), "a", config=configs["a"], r=3, lora_alpha=6)
    theirs.update_layer("b", 2, 3, config=configs["b"])
    ours = ours_cls(copy.deepcopy(base), "a", init_lora_weights=False, **options["a"])
    ours.update_layer("b", init_lora_weights=False, **options["b"])
    ours.load_state_dict(theirs.state_dict())
    cpp_layer = make_cpp(base)
    for name, o in options.items():
        cpp_layer.update_layer(name, **o)
    _copy_adapter_params(ours, cpp_layer)
    return theirs, ours, cpp_layer, make_x()


def _torchlora_ops(fn) -> list[str]:
    """The torchlora operators that ``fn()`` runs, in order. A dispatch mode sees every
    dispatcher call of this thread, those the C++ modules make included."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "torchlora":
                seen.append(func.name())
            return func(*args, **(kwargs or {}))

    seen: list[str] = []
    with Record():
        fn()
    return seen


def _forward_backward(layer, params: dict[str, torch.Tensor], x: torch.Tensor, grad: torch.Tensor | None, **kwargs):
    """(output, {name: gradient}) of one forward and backward; ``x`` gets a gradient too."""
    for p in params.values():
        p.grad = None
    x = x.clone().requires_grad_(x.is_floating_point())
    out = layer(x, **kwargs) if kwargs else layer(x)
    out.backward(torch.ones_like(out) if grad is None else grad)
    grads = {name: p.grad for name, p in params.items() if p.grad is not None}
    if x.is_floating_point():
        grads["x"] = x.grad
    return out.detach(), grads


def _assert_same(got, want, what: str) -> None:
    (out, grads), (want_out, want_grads) = got, want
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5, msg=lambda m: f"{what} output: {m}")
    assert sorted(grads) == sorted(want_grads), what
    for name, g in grads.items():
        torch.testing.assert_close(g, want_grads[name], rtol=1e-5, atol=1e-5, msg=lambda m: f"{what} grad {name}: {m}")


@pytest.mark.parametrize("kind", sorted(_LAYER_KINDS))
@pytest.mark.parametrize("dropout", [0.0, 0.25], ids=["plain", "dropout_eval"])
def test_cpp_modules_match_python_layers_and_peft(kind: str, dropout: float) -> None:
    """Outputs and gradients (input, base and adapter weights) agree between PEFT, the Python
    layer and the C++ module, which also run the same torchlora operators (the C++ LoraLinear the
    fused linear_with_lora as the Python one does): one adapter, two, and mixed batches."""
    torch.manual_seed(20)
    theirs, ours, cpp_layer, x = _three_layers(kind, dropout)
    if dropout:
        for layer in (theirs, ours, cpp_layer):
            layer.eval()  # lora_dropout is set, eval mode applies none
    params = {
        "peft": dict(theirs.named_parameters()),
        "python": dict(ours.named_parameters()),
        "cpp": cpp_layer.named_parameters(),
    }
    grad = torch.randn_like(ours(x))
    for active in (["a"], ["b", "a"]):
        for layer in (theirs, ours, cpp_layer):
            layer.set_adapter(active)
        want = _forward_backward(theirs, params["peft"], x, grad)
        _assert_same(_forward_backward(ours, params["python"], x, grad), want, f"python {active}")
        _assert_same(_forward_backward(cpp_layer, params["cpp"], x, grad), want, f"cpp {active}")
        with torch.no_grad():
            cpp_ops, python_ops = _torchlora_ops(lambda: cpp_layer(x)), _torchlora_ops(lambda: ours(x))
        assert cpp_ops == python_ops and cpp_ops
        if kind == "linear":  # the forward ops under the public ops' autograd kernels
            fused, in_place = "torchlora::_linear_with_lora_forward", "torchlora::_lora_linear_forward_"
            assert cpp_ops == [fused] + [in_place] * (len(active) - 1), cpp_ops

    for layer in (theirs, ours, cpp_layer):
        layer.eval()
    names = ["b", "__base__", "a", "b"]
    want = _forward_backward(theirs, params["peft"], x, grad, adapter_names=names)
    _assert_same(_forward_backward(ours, params["python"], x, grad, adapter_names=names), want, "python mixed")
    got = _forward_backward(lambda x, adapter_names: cpp_layer.forward_mixed(x, adapter_names), params["cpp"], x, grad,
                            adapter_names=names)
    _assert_same(got, want, "cpp mixed")
    with torch.no_grad():
        assert _torchlora_ops(lambda: cpp_layer.forward_mixed(x, names)) == _torchlora_ops(
            lambda: ours(x, adapter_names=names))


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_cpp_modules_draw_the_python_layers_dropout_masks(kind: str) -> None:
    """In training the seeds come from the same generator in the same order, so the C++ module
    drops the same elements as the Python layer."""
    torch.manual_seed(21)
    _, ours, cpp_layer, x = _three_layers(kind, 0.4)
    params = {"python": dict(ours.named_parameters()), "cpp": cpp_layer.named_parameters()}
    grad = torch.randn_like(ours(x))
    for active in (["a"], ["a", "b"]):
        ours.set_adapter(active)
        cpp_layer.set_adapter(active)
        torch.manual_seed(22)
        want = _forward_backward(ours, params["python"], x, grad)
        torch.manual_seed(22)
        _assert_same(_forward_backward(cpp_layer, params["cpp"], x, grad), want, f"cpp {active}")
        torch.manual_seed(23)
        assert not torch.allclose(_forward_backward(cpp_layer, params["cpp"], x, grad)[0], want[0])


def test_cpp_layers_raise_python_errors() -> None:
    layer = _cpp().LoraLinear(torch.randn(3, 4))
    with pytest.raises(ValueError, match="positive integer"):
        layer.update_layer("a", r=0)
    with pytest.raises(ValueError, match="lora_alpha must be a positive finite number"):
        layer.update_layer("a", lora_alpha=0.0)
    with pytest.raises(RuntimeError, match="must not contain"):
        layer.update_layer("a.b")
    layer.update_layer("a", r=2)
    layer.set_adapter("a")
    layer.eval()
    with pytest.raises(ValueError, match="unknown adapter 'zz'"):
        layer.forward_mixed(torch.randn(2, 4), ["a", "zz"])
    with pytest.raises(ValueError, match="lora_bias"):
        _cpp().LoraEmbedding(torch.randn(5, 3)).update_layer("a", lora_bias=True)


# ----------------------------------------------------------------------------- C++ loader vs Python
def test_cpp_loader_reads_what_python_and_peft_write(tmp_path: Path) -> None:
    tensors = {"x": torch.randn(3, 4), "h": torch.randn(5).half(), "b": torch.randn(2, 2).bfloat16(), "i": torch.arange(4)}
    save_file(tensors, str(tmp_path / "t.safetensors"), metadata={"format": "pt"})
    got, metadata = _cpp().load_safetensors(str(tmp_path / "t.safetensors"))
    assert metadata == {"format": "pt"}
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v)
    # ... and Python reads what C++ writes.
    (tmp_path / "c.safetensors").write_bytes(_cpp().serialize_safetensors(tensors, {"format": "pt"}))
    for k, v in load_file(str(tmp_path / "c.safetensors")).items():
        assert torch.equal(v, tensors[k])

    torch.manual_seed(13)
    base = TokenModel()
    model = save_peft_adapter(base, tmp_path / "a", seed=14, target_modules=["emb", "fc1", "fc2"], r=4, lora_alpha=8,
                              rank_pattern={"fc1": 2}, alpha_pattern={"emb": 5}, modules_to_save=["head"])
    modules, other = _cpp().load_peft_adapter(str(tmp_path / "a"))
    assert sorted(modules) == ["emb", "fc1", "fc2"] and sorted(other) == ["head.bias", "head.weight"]
    for path, info in modules.items():
        layer = model.base_model.model.get_submodule(path)
        assert info["scaling"] == pytest.approx(layer.scaling["default"])
        torch.testing.assert_close(info["delta_weight"], layer.get_delta_weight("default"), rtol=1e-5, atol=1e-7)
    config = json.loads(_cpp().load_adapter_config(str(tmp_path / "a" / "adapter_config.json")))
    original = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    # written back unchanged, but for newer keys at their default, which the writer leaves out,
    # and PEFT's version stamp of the writer
    defaults = {name: default for name, default, _ in _C.peft.lora_config_fields()}
    _, baseline = _C.peft.peft_file_keys()
    config["target_modules"], original["target_modules"] = sorted(config["target_modules"]), sorted(original["target_modules"])
    assert {k: v for k, v in original.items() if k in config} == config
    dropped = {k: original[k] for k in set(original) - set(config) - {"peft_version"}}
    assert all(k not in baseline and v == defaults.get(k, v) for k, v in dropped.items()), dropped
    peft.LoraConfig(**{k: v for k, v in config.items() if k in peft.LoraConfig.__dataclass_fields__})


@pytest.mark.parametrize("case", sorted(_MALFORMED))
def test_cpp_safetensors_reader_rejects_malformed_bytes(case: str) -> None:
    data, message = _MALFORMED[case]
    with pytest.raises(RuntimeError, match="case.safetensors") as info:
        _cpp().parse_safetensors(data, "case.safetensors")
    assert message in str(info.value)
