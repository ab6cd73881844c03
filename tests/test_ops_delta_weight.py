"""torchlora.ops.lora_delta_weight, the one definition of PEFT's delta weight: every layout
(Linear, fan_in_fan_out / Embedding, Conv2d 1x1 and k x k) and dtype against a pure-PyTorch
reference and against PEFT's own layers on the same weights; the layers of both languages and
the adapter-file loader through it; opcheck, gradcheck, torch.compile, Meta tensors, input
errors, and CUDA (skipped without a GPU)."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig
from peft.tuners.lora import layer as peft_layers
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

import torchlora
from torchlora import ops

OP = torch.ops.torchlora.lora_delta_weight

# layout -> (lora_A shape, lora_B shape, fan_in_fan_out) for rank r
LAYOUTS = {
    "linear": lambda r: ((r, 11), (7, r), False),
    "fan_in_fan_out": lambda r: ((r, 11), (7, r), True),
    "embedding": lambda r: ((r, 19), (6, r), True),  # lora_embedding_A [r, V], lora_embedding_B [D, r]
    "conv1x1": lambda r: ((r, 5, 1, 1), (7, r, 1, 1), False),
    "conv3x3": lambda r: ((r, 5, 3, 3), (7, r, 1, 1), False),
    "conv1x3": lambda r: ((r, 4, 1, 3), (6, r, 1, 1), False),
}
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def factors(layout: str, r: int, dtype: torch.dtype = torch.float32, device: str = "cpu",
            requires_grad: bool = False) -> tuple[Tensor, Tensor, bool]:
    a_shape, b_shape, fan_in_fan_out = LAYOUTS[layout](r)
    A = torch.randn(a_shape, dtype=torch.float64).to(dtype=dtype, device=device).requires_grad_(requires_grad)
    B = torch.randn(b_shape, dtype=torch.float64).to(dtype=dtype, device=device).requires_grad_(requires_grad)
    return A, B, fan_in_fan_out


def reference(A: Tensor, B: Tensor, scaling: float, fan_in_fan_out: bool) -> Tensor:
    """PEFT's formulas in float64: B @ A (transposed for [in, out] weights); for conv factors
    the squeezed matmul (1x1 kernels) or conv2d(A^T, B)^T (k x k)."""
    A, B = A.double(), B.double()
    if A.dim() == 2:
        delta = (B @ A) * scaling
        return delta.T if fan_in_fan_out else delta
    if A.shape[2:] == (1, 1):
        return (B.squeeze(3).squeeze(2) @ A.squeeze(3).squeeze(2))[:, :, None, None] * scaling
    return F.conv2d(A.transpose(0, 1), B).transpose(0, 1) * scaling


def assert_rounded_once(actual: Tensor, A: Tensor, B: Tensor, scaling: float, fan_in_fan_out: bool) -> None:
    """The contract: the float64 result, rounded once to the dtype (plus float32 noise for half
    types, whose products are formed in float32)."""
    expected = reference(A, B, scaling, fan_in_fan_out)
    scale = expected.abs().max().item() + 1e-30
    tolerances = {torch.float64: (1e-12, 1e-13), torch.float32: (2e-6, 5e-6)}
    rtol, atol = tolerances.get(actual.dtype, (torch.finfo(actual.dtype).eps / 2, 1e-5))
    torch.testing.assert_close(actual.double().cpu(), expected.cpu(), rtol=rtol, atol=atol * scale)


# ----------------------------------------------------------------------------- 1. reference grid
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("r", [1, 4, 16])
def test_matches_reference(layout: str, dtype: torch.dtype, r: int) -> None:
    A, B, fan_in_fan_out = factors(layout, r, dtype)
    scaling = 8 / r**0.5
    delta = ops.lora_delta_weight(A, B, scaling, fan_in_fan_out)
    assert delta.dtype == dtype and delta.is_contiguous()
    assert delta.shape == reference(A, B, scaling, fan_in_fan_out).shape
    assert_rounded_once(delta, A, B, scaling, fan_in_fan_out)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_factors_are_multiplied_in_float32(dtype: torch.dtype) -> None:
    """Exactly the float32 product rounded to the dtype (a scaling of 0.5 changes no bit), and
    with dtype=float32 not rounded at all."""
    A, B, _ = factors("linear", 8, dtype)
    product = B.float() @ A.float()
    assert torch.equal(ops.lora_delta_weight(A, B, 0.5), (product * 0.5).to(dtype))
    wide = ops.lora_delta_weight(A, B, 0.5, dtype=torch.float32)
    assert wide.dtype == torch.float32 and torch.equal(wide, product * 0.5)


def test_dtype_argument_sets_the_result_dtype() -> None:
    A, B, _ = factors("conv3x3", 4, torch.float64)
    for dtype in DTYPES:
        delta = ops.lora_delta_weight(A, B, 0.25, dtype=dtype)
        assert delta.dtype == dtype
        torch.testing.assert_close(delta, reference(A, B, 0.25, False).to(dtype))


# ----------------------------------------------------------------------------- 2. PEFT's layers
def peft_and_ours(kind: str, base: nn.Module, r: int, dtype: torch.dtype, **options) -> tuple[nn.Module, nn.Module]:
    """PEFT's layer and torchlora's around copies of ``base``, the same random adapter in both."""
    config = LoraConfig(r=r, lora_alpha=5, init_lora_weights=False, **options)
    peft_cls = {"linear": peft_layers.Linear, "embedding": peft_layers.Embedding, "conv2d": peft_layers.Conv2d}[kind]
    ours_cls = {"linear": torchlora.LoraLinear, "embedding": torchlora.LoraEmbedding, "conv2d": torchlora.LoraConv2d}[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft_cls(copy.deepcopy(base), "default", config=config, r=r, lora_alpha=5)
    ours = ours_cls(copy.deepcopy(base), "default", r=r, lora_alpha=5, init_lora_weights=False, **options)
    ours.load_state_dict(theirs.state_dict())
    return theirs.to(dtype), ours.to(dtype)


PEFT_CASES = {
    "linear": ("linear", lambda: nn.Linear(11, 7), {}),
    "linear_rslora": ("linear", lambda: nn.Linear(11, 7), {"use_rslora": True}),
    "conv1d_fan_in_fan_out": ("linear", lambda: Conv1D(7, 11), {"fan_in_fan_out": True}),
    "embedding": ("embedding", lambda: nn.Embedding(19, 6), {}),
    "conv1x1": ("conv2d", lambda: nn.Conv2d(5, 7, 1), {}),
    "conv3x3": ("conv2d", lambda: nn.Conv2d(5, 7, 3, padding=1), {}),
    "conv1x3": ("conv2d", lambda: nn.Conv2d(4, 6, (1, 3), stride=2), {}),
}


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("r", [1, 4])
def test_layers_match_peft_get_delta_weight(case: str, dtype: torch.dtype, r: int) -> None:
    kind, make_base, options = PEFT_CASES[case]
    theirs, ours = peft_and_ours(kind, make_base(), r, dtype, **options)
    with torch.no_grad():
        want = theirs.get_delta_weight("default")
        got = ours.get_delta_weight("default")
    assert got.dtype == want.dtype == dtype
    assert got.shape == want.shape == ours.get_base_layer().weight.shape
    # PEFT forms half-precision CPU deltas in float32 and rounds once, too: at most one step apart.
    eps = torch.finfo(dtype).eps if dtype != torch.float32 else 2e-6
    torch.testing.assert_close(got, want, rtol=eps, atol=1e-6 * want.abs().max().item())
    # ... and what the layer hands the op is the op's result on the layer's factors.
    if kind == "embedding":
        A, B, fan_in_fan_out = ours.lora_embedding_A["default"], ours.lora_embedding_B["default"], True
    else:
        A, B = ours.lora_A["default"].weight, ours.lora_B["default"].weight
        fan_in_fan_out = options.get("fan_in_fan_out", False)
    with torch.no_grad():
        assert torch.equal(got, ops.lora_delta_weight(A, B, ours.scaling["default"], fan_in_fan_out))


def test_grouped_conv_has_no_delta_in_peft_or_here() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs, ours = peft_and_ours("conv2d", nn.Conv2d(4, 4, 3, groups=2), 4, torch.float32)
    with pytest.raises(RuntimeError):  # PEFT's formula fails on the grouped shapes
        theirs.get_delta_weight("default")
    with pytest.raises(NotImplementedError, match="groups=2"):
        ops.lora_delta_weight(ours.lora_A["default"].weight, ours.lora_B["default"].weight, 1.0)
    with pytest.raises(NotImplementedError, match="groups > 1"):
        ours.merge()


# ----------------------------------------------------------------------------- 3. the C++ callers
def test_cpp_layers_match_python_layers_and_peft() -> None:
    cpp = torchlora._C.cpp
    cases = [
        ("linear", nn.Linear(11, 7), lambda b: cpp.LoraLinear(b.weight.detach(), b.bias.detach())),
        ("embedding", nn.Embedding(19, 6), lambda b: cpp.LoraEmbedding(b.weight.detach())),
        ("conv2d", nn.Conv2d(5, 7, 3), lambda b: cpp.LoraConv2d(b.weight.detach(), b.bias.detach())),
        ("conv2d", nn.Conv2d(5, 7, 1), lambda b: cpp.LoraConv2d(b.weight.detach(), b.bias.detach())),
    ]
    for kind, base, make_cpp in cases:
        theirs, ours = peft_and_ours(kind, base, 3, torch.float32, use_rslora=True)
        layer = make_cpp(base)
        layer.update_layer("default", r=3, lora_alpha=5, use_rslora=True)
        params = layer.named_parameters()
        with torch.no_grad():
            for name, p in ours.named_parameters():
                if not name.startswith("base_layer"):
                    params[name].copy_(p)
            got = layer.get_delta_weight("default")
            assert torch.equal(got, ours.get_delta_weight("default")), kind
            want = theirs.get_delta_weight("default")  # conv2d for k x k kernels: another summation order
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * want.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_adapter_loader_keeps_half_deltas_in_float32(dtype: torch.dtype, tmp_path: Path) -> None:
    """The loader's delta is merged into weights of any dtype: float32, unrounded."""
    model = nn.Sequential(nn.Embedding(19, 6), nn.Linear(6, 7), nn.Conv2d(7, 5, 3))
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=2, lora_alpha=3, target_modules=["0", "1", "2"], init_lora_weights=False)
    peft_model = peft.get_peft_model(model, config).to(dtype)
    peft_model.save_pretrained(str(tmp_path))
    modules, _ = torchlora._C.cpp.load_peft_adapter(str(tmp_path))
    for path, info in modules.items():
        assert info["lora_A"].dtype == dtype
        delta = info["delta_weight"]
        assert delta.dtype == torch.float32
        fan_in_fan_out = info["kind"] == "embedding"
        assert torch.equal(
            delta, ops.lora_delta_weight(info["lora_A"], info["lora_B"], info["scaling"], fan_in_fan_out, torch.float32)
        )
        layer = peft_model.base_model.model.get_submodule(path)
        torch.testing.assert_close(delta.to(dtype), layer.get_delta_weight("default"), rtol=torch.finfo(dtype).eps,
                                   atol=1e-6)


# ----------------------------------------------------------------------------- 4. opcheck, gradcheck
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_opcheck(layout: str) -> None:
    A, B, fan_in_fan_out = factors(layout, 3, requires_grad=True)
    torch.library.opcheck(OP.default, (A, B, 0.5, fan_in_fan_out))
    Ah, Bh = A.detach().half().requires_grad_(), B.detach().half().requires_grad_()
    torch.library.opcheck(OP.default, (Ah, Bh, 0.5, fan_in_fan_out), {"dtype": torch.float32})


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_gradcheck_float64(layout: str) -> None:
    A, B, fan_in_fan_out = factors(layout, 3, torch.float64, requires_grad=True)
    fn = lambda A, B: ops.lora_delta_weight(A, B, 0.7, fan_in_fan_out)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (A, B))
    assert torch.autograd.gradgradcheck(fn, (A, B))


def test_half_gradients_flow_back_in_the_factor_dtype() -> None:
    A, B, _ = factors("conv3x3", 4, torch.bfloat16, requires_grad=True)
    delta = ops.lora_delta_weight(A, B, 0.5)
    grad = torch.randn_like(delta)
    delta.backward(grad)
    A64, B64 = A.detach().double().requires_grad_(), B.detach().double().requires_grad_()
    reference(A64, B64, 0.5, False).backward(grad.double())
    assert A.grad.dtype == B.grad.dtype == torch.bfloat16
    torch.testing.assert_close(A.grad.double(), A64.grad, rtol=2e-2, atol=2e-2 * A64.grad.abs().max().item())
    torch.testing.assert_close(B.grad.double(), B64.grad, rtol=2e-2, atol=2e-2 * B64.grad.abs().max().item())


# ----------------------------------------------------------------------------- 5. torch.compile, Meta
@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile_fullgraph(dynamic: bool) -> None:
    def fn(A: Tensor, B: Tensor, fan_in_fan_out: bool) -> Tensor:
        return ops.lora_delta_weight(A, B, 0.5, fan_in_fan_out) * 2

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic)
    for layout, r in (("linear", 2), ("linear", 5), ("embedding", 3), ("conv3x3", 2), ("conv3x3", 4)):
        A, B, fan_in_fan_out = factors(layout, r, requires_grad=True)
        out = compiled(A, B, fan_in_fan_out)
        grad = torch.randn_like(out)
        got = torch.autograd.grad(out, (A, B), grad)
        eager = fn(A, B, fan_in_fan_out)
        want = torch.autograd.grad(eager, (A, B), grad)
        torch.testing.assert_close(out, eager)
        for ours, theirs in zip(got, want):
            torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_meta_tensors_give_shape_and_dtype(layout: str) -> None:
    A, B, fan_in_fan_out = factors(layout, 4, torch.bfloat16, device="meta")
    delta = ops.lora_delta_weight(A, B, 0.5, fan_in_fan_out)
    expected = reference(torch.empty_like(A, device="cpu"), torch.empty_like(B, device="cpu"), 0.5, fan_in_fan_out)
    assert delta.device.type == "meta" and delta.dtype == torch.bfloat16 and delta.shape == expected.shape
    assert ops.lora_delta_weight(A, B, 0.5, fan_in_fan_out, torch.float32).dtype == torch.float32
    with pytest.raises(ValueError, match="lora_B"):  # checked on Meta tensors too
        ops.lora_delta_weight(A, B[:, :3], 0.5, fan_in_fan_out)


# ----------------------------------------------------------------------------- 6. bad inputs
BAD_INPUTS = [
    (lambda: (torch.randn(2, 6), torch.randn(5, 3)), {}, ValueError, r"lora_B is \[5, 3\] but lora_A has rank 2"),
    (lambda: (torch.randn(2, 6), torch.randn(5, 2).double()), {}, TypeError, "lora_A is Float but lora_B is Double"),
    (lambda: (torch.ones(2, 6, dtype=torch.int32),) * 2, {}, TypeError, "lora_A must be float32"),
    (lambda: (torch.randn(2, 6), torch.randn(5, 2, 1, 1)), {}, ValueError, "must be 2-D"),
    (lambda: (torch.randn(2, 6), torch.randn(5, 2, device="meta")), {}, ValueError, "lora_B is on meta"),
    (lambda: (torch.randn(0, 6), torch.randn(5, 0)), {}, ValueError, "rank .* must be positive"),
    (lambda: (torch.randn(4, 3, 3, 3), torch.randn(6, 4, 1, 1)), {"fan_in_fan_out": True}, ValueError,
     "fan_in_fan_out applies to 2-D factors"),
    (lambda: (torch.randn(4, 3, 3, 3), torch.randn(6, 4, 3, 3)), {}, ValueError, r"lora_B \[out, r / groups, 1, 1\]"),
    (lambda: (torch.randn(4, 3, 3, 3), torch.randn(6, 3, 1, 1)), {}, ValueError, r"lora_B \[out, r / groups, 1, 1\]"),
    (lambda: (torch.randn(4, 3, 3, 3), torch.randn(6, 1, 1, 1)), {}, NotImplementedError, "groups=4"),
    (lambda: (torch.randn(2, 6), torch.randn(5, 2)), {"dtype": torch.int64}, TypeError, "dtype must be"),
    (lambda: (torch.randn(2, 6), torch.randn(5, 2)), {"scaling": float("inf")}, RuntimeError, "scaling must be finite"),
]


@pytest.mark.parametrize("case", range(len(BAD_INPUTS)))
def test_bad_inputs_raise(case: int) -> None:
    make, options, error, message = BAD_INPUTS[case]
    options = dict(options)
    scaling = options.pop("scaling", 1.0)
    with pytest.raises(error, match=message):
        ops.lora_delta_weight(*make(), scaling, **options)


# ----------------------------------------------------------------------------- 7. CUDA
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_matches_reference_and_cpu(layout: str, dtype: torch.dtype) -> None:
    """The same rule on every device: the CUDA delta is the float64 result rounded once, and
    (up to float32 summation order) the CPU one."""
    A, B, fan_in_fan_out = factors(layout, 8, dtype, device="cuda", requires_grad=True)
    delta = ops.lora_delta_weight(A, B, 0.5, fan_in_fan_out)
    assert delta.device.type == "cuda" and delta.dtype == dtype and delta.is_contiguous()
    assert_rounded_once(delta, A.detach(), B.detach(), 0.5, fan_in_fan_out)
    on_cpu = ops.lora_delta_weight(A.detach().cpu(), B.detach().cpu(), 0.5, fan_in_fan_out)
    eps = torch.finfo(dtype).eps if dtype in (torch.float16, torch.bfloat16) else 1e-6
    torch.testing.assert_close(delta.detach().cpu(), on_cpu, rtol=eps, atol=1e-6 * on_cpu.abs().max().item())
    delta.sum().backward()
    assert A.grad.device.type == "cuda" and A.grad.dtype == dtype


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_cuda_layers_match_peft(case: str) -> None:
    kind, make_base, options = PEFT_CASES[case]
    theirs, ours = peft_and_ours(kind, make_base(), 4, torch.float32, **options)
    theirs, ours = theirs.cuda(), ours.cuda()
    with torch.no_grad():
        torch.testing.assert_close(ours.get_delta_weight("default"), theirs.get_delta_weight("default"),
                                   rtol=1e-5, atol=1e-6)
