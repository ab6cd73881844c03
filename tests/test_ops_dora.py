"""The DoRA operators (dora_weight_norm, dora_weight_sq_norm, dora_scale) against the pure-PyTorch
statement in reference.py and against PEFT's DoRA layers: every layout (Linear, Conv1D-like
transposed weight, Embedding, conv 1x1 and 3x3), ranks 1/4/16, odd sizes, all float dtypes, mixed
weight/adapter dtypes, non-contiguous inputs, gradcheck, opcheck, torch.compile, errors, and the
CUDA kernels against the CPU ones (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import reference
from torchlora import ops

torch.manual_seed(0)

# (weight shape, lora_A shape, lora_B shape, fan_in_fan_out) for a rank r.
def layouts(r: int) -> dict[str, tuple]:
    return {
        "linear": ((13, 7), (r, 7), (13, r), False),
        "conv1d_like": ((7, 13), (r, 7), (13, r), True),
        "conv1x1": ((9, 5, 1, 1), (r, 5, 1, 1), (9, r, 1, 1), False),
        "conv3x3": ((6, 3, 3, 3), (r, 3, 3, 3), (6, r, 1, 1), False),
    }


LAYOUTS = ["linear", "conv1d_like", "conv1x1", "conv3x3"]
RANKS = [1, 4, 16]


def make(layout: str, r: int, dtype=torch.float64, weight_dtype=None, device="cpu"):
    w_shape, a_shape, b_shape, fan = layouts(r)[layout]
    W = torch.randn(w_shape, dtype=torch.float64).to(weight_dtype or dtype).to(device)
    A = (torch.randn(a_shape, dtype=torch.float64) / 2).to(dtype).to(device)
    B = (torch.randn(b_shape, dtype=torch.float64) / 2).to(dtype).to(device)
    return W, A, B, fan


def ref_norm(W, A, B, s, fan):
    return reference.dora_weight_norm(W.double(), A.double(), B.double(), s, fan)


# ---- dora_weight_norm: values ------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_sq", [False, True])
def test_weight_norm_matches_reference(layout, r, dtype, with_sq):
    W, A, B, fan = make(layout, r, dtype)
    sq = ops.dora_weight_sq_norm(W, fan) if with_sq else None
    n = ops.dora_weight_norm(W, A, B, 0.7, fan, sq)
    assert n.dtype == dtype and n.shape == (B.shape[0],)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(n.double(), ref_norm(W, A, B, 0.7, fan), rtol=tol, atol=tol)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_weight_norm_half_precision_is_accumulated_in_float32(layout, dtype):
    W, A, B, fan = make(layout, 4, dtype)
    n = ops.dora_weight_norm(W, A, B, 2.0, fan)
    assert n.dtype == dtype
    # Only the result is rounded: within half an ulp of the exact norm of the rounded inputs.
    expected = ref_norm(W, A, B, 2.0, fan)
    torch.testing.assert_close(n.double(), expected, rtol=torch.finfo(dtype).eps, atol=0)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("weight_dtype,factor_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                                       (torch.float32, torch.float64), (torch.float64, torch.float32),
                                                       (torch.float32, torch.bfloat16)])
def test_weight_norm_mixed_weight_and_adapter_dtypes(layout, weight_dtype, factor_dtype):
    W, A, B, fan = make(layout, 4, factor_dtype, weight_dtype=weight_dtype)
    n = ops.dora_weight_norm(W, A, B, 0.5, fan)
    assert n.dtype == factor_dtype
    expected = ref_norm(W, A, B, 0.5, fan)
    tol = {torch.float64: 1e-6, torch.float32: 2e-5}.get(factor_dtype, torch.finfo(factor_dtype).eps)
    torch.testing.assert_close(n.double(), expected, rtol=tol, atol=tol)


def test_weight_norm_half_weight_in_many_row_blocks():
    # Wide enough that a bfloat16 weight is upcast in several blocks of rows.
    W = torch.randn(300, 20000).to(torch.bfloat16)
    A = torch.randn(3, 20000) / 100
    B = torch.randn(300, 3)
    n = ops.dora_weight_norm(W, A, B, 1.5)
    torch.testing.assert_close(n.double(), ref_norm(W, A, B, 1.5, False), rtol=1e-5, atol=1e-5)
    sq = ops.dora_weight_sq_norm(W)
    torch.testing.assert_close(ops.dora_weight_norm(W, A, B, 1.5, False, sq), n, rtol=1e-5, atol=1e-5)


def test_weight_norm_non_contiguous_inputs():
    W_t = torch.randn(11, 17, dtype=torch.float64)        # a [out=17, in=11] weight stored transposed
    A = torch.randn(11, 5, dtype=torch.float64).T          # [5, 11], non-contiguous
    B = torch.randn(5, 17, dtype=torch.float64).T          # [17, 5], non-contiguous
    n = ops.dora_weight_norm(W_t.T, A, B, 0.3)
    torch.testing.assert_close(n, ref_norm(W_t.T, A, B, 0.3, False), rtol=1e-12, atol=1e-12)
    # A strided conv kernel (every other output channel).
    Wc = torch.randn(8, 3, 3, 3, dtype=torch.float64)[::2]
    Ac = torch.randn(2, 3, 3, 3, dtype=torch.float64)
    Bc = torch.randn(8, 2, 1, 1, dtype=torch.float64)[::2]
    torch.testing.assert_close(ops.dora_weight_norm(Wc, Ac, Bc, 1.0), ref_norm(Wc, Ac, Bc, 1.0, False),
                               rtol=1e-12, atol=1e-12)


def test_weight_norm_of_a_cancelled_row_is_zero_without_nan_gradients():
    # W = -s B A exactly: the norm is 0 (the clamped rounding), and its gradient is 0, not NaN.
    A = torch.randn(2, 6, dtype=torch.float64)
    B = torch.randn(4, 2, dtype=torch.float64)
    W = (-0.5 * B @ A).requires_grad_()
    A.requires_grad_()
    B.requires_grad_()
    n = ops.dora_weight_norm(W, A, B, 0.5)
    assert torch.all(n.abs() < 1e-6)
    n.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (W, A, B))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_weight_sq_norm_matches_reference(layout, dtype):
    W, _, _, fan = make(layout, 2, dtype)
    sq = ops.dora_weight_sq_norm(W, fan)
    assert sq.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(sq.double(), reference.dora_weight_sq_norm(W.double(), fan), rtol=tol, atol=tol)


# ---- dora_weight_norm: gradients ---------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("r", [1, 4])
def test_weight_norm_gradcheck(layout, r):
    W, A, B, fan = make(layout, r)
    args = [t.requires_grad_() for t in (W, A, B)]
    assert torch.autograd.gradcheck(lambda w, a, b: ops.dora_weight_norm(w, a, b, 0.8, fan), args)


@pytest.mark.parametrize("layout", ["linear", "conv1d_like", "conv3x3"])
def test_weight_norm_gradcheck_with_cached_sq_norm(layout):
    W, A, B, fan = make(layout, 3)
    # The cached ||W||^2 as an input of its own, and as the function of W it stands for.
    sq = ops.dora_weight_sq_norm(W, fan).requires_grad_()
    args = [t.requires_grad_() for t in (W, A, B)]
    assert torch.autograd.gradcheck(lambda w, a, b, q: ops.dora_weight_norm(w, a, b, 0.8, fan, q), args + [sq])
    assert torch.autograd.gradcheck(
        lambda w, a, b: ops.dora_weight_norm(w, a, b, 0.8, fan, ops.dora_weight_sq_norm(w, fan)), args)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_weight_norm_gradients_match_reference_autograd(layout):
    W, A, B, fan = make(layout, 4, torch.float32)
    mine = [t.clone().requires_grad_() for t in (W, A, B)]
    refs = [t.double().requires_grad_() for t in (W, A, B)]
    go = torch.randn(B.shape[0])
    ops.dora_weight_norm(*mine, 1.3, fan).backward(go)
    reference.dora_weight_norm(*refs, 1.3, fan).backward(go.double())
    for m, r_ in zip(mine, refs):
        assert m.grad.dtype == m.dtype and m.grad.shape == m.shape
        torch.testing.assert_close(m.grad.double(), r_.grad, rtol=1e-4, atol=1e-5)


def test_weight_norm_only_needed_gradients():
    W, A, B, fan = make("linear", 4)
    A.requires_grad_()
    ops.dora_weight_norm(W, A, B, 0.5, fan).sum().backward()
    assert A.grad is not None and W.grad is None and B.grad is None


# ---- dora_scale ----------------------------------------------------------------------------------

SCALE_CASES = {
    "linear_2d": ((7, 13), -1),
    "linear_3d": ((2, 5, 13), -1),
    "linear_3d_dim2": ((2, 5, 13), 2),
    "conv_nchw": ((2, 13, 3, 5), 1),
    "conv_neg_dim": ((2, 13, 3, 5), -3),
    "first_dim": ((13, 4), 0),
}


def scale_inputs(shape, dim, dtype=torch.float64, bias=True, device="cpu"):
    C = shape[dim]
    z = torch.randn(shape, dtype=torch.float64).to(dtype).to(device)
    m = (torch.rand(C, dtype=torch.float64) + 0.5).to(device)
    n = (torch.rand(C, dtype=torch.float64) + 0.5).to(device)
    b = torch.randn(C, dtype=torch.float64).to(device) if bias else None
    return z, m, n, b


@pytest.mark.parametrize("case", list(SCALE_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_scale_matches_reference(case, dtype, bias):
    shape, dim = SCALE_CASES[case]
    z, m, n, b = scale_inputs(shape, dim, dtype, bias)
    m, n = m.to(torch.float32), n.to(torch.float32)
    out = ops.dora_scale(z, m, n, b, dim)
    assert out.dtype == dtype and out.shape == z.shape
    expected = reference.dora_scale(z.double(), m.double(), n.double(), None if b is None else b.double(), dim)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 2 * torch.finfo(dtype).eps)
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol * expected.abs().max().item())


def test_scale_non_contiguous_and_channels_last():
    z = torch.randn(3, 13, 8, dtype=torch.float64).transpose(1, 2)  # [3, 8, 13], strided
    _, m, n, b = scale_inputs((13,), 0)
    torch.testing.assert_close(ops.dora_scale(z, m, n, b), reference.dora_scale(z, m, n, b))
    zc = torch.randn(2, 13, 4, 5, dtype=torch.float64).to(memory_format=torch.channels_last)
    torch.testing.assert_close(ops.dora_scale(zc, m.view(1, 13, 1, 1), n, b, 1), reference.dora_scale(zc, m, n, b, 1))


@pytest.mark.parametrize("case", ["linear_3d", "conv_nchw", "first_dim"])
@pytest.mark.parametrize("bias", [False, True])
def test_scale_gradcheck(case, bias):
    shape, dim = SCALE_CASES[case]
    tensors = [t for t in scale_inputs(shape, dim, bias=bias) if t is not None]
    for t in tensors:
        t.requires_grad_()
    if bias:
        fn = lambda z, m, n, b: ops.dora_scale(z, m, n, b, dim)  # noqa: E731
    else:
        fn = lambda z, m, n: ops.dora_scale(z, m, n, None, dim)  # noqa: E731
    assert torch.autograd.gradcheck(fn, tensors)


def test_scale_gradcheck_non_contiguous_z():
    z = torch.randn(4, 6, 5, dtype=torch.float64).transpose(0, 2).requires_grad_()  # [5, 6, 4]
    _, m, n, b = scale_inputs((6,), 0)
    args = [z] + [t.requires_grad_() for t in (m, n, b)]
    assert torch.autograd.gradcheck(lambda z, m, n, b: ops.dora_scale(z, m, n, b, 1), args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scale_gradients_match_reference_autograd(dtype):
    z, m, n, b = scale_inputs((3, 7, 11), -1, dtype)
    mine = [z.clone().requires_grad_()] + [t.float().requires_grad_() for t in (m, n, b)]
    refs = [t.detach().double().requires_grad_() for t in mine]
    go = torch.randn(z.shape).to(dtype)
    ops.dora_scale(*mine, -1).backward(go)
    reference.dora_scale(*refs, -1).backward(go.double())
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for m_, r_ in zip(mine, refs):
        assert m_.grad.dtype == m_.dtype
        torch.testing.assert_close(m_.grad.double(), r_.grad, rtol=tol, atol=tol)


def test_scale_vectors_keep_their_shapes_in_gradients():
    # PEFT's conv magnitude is [1, out, 1, 1].
    z, m, n, b = scale_inputs((2, 5, 3, 3), 1)
    m = m.view(1, 5, 1, 1).requires_grad_()
    n.requires_grad_()
    b.requires_grad_()
    ops.dora_scale(z, m, n, b, 1).sum().backward()
    assert m.grad.shape == (1, 5, 1, 1) and n.grad.shape == (5,) and b.grad.shape == (5,)


# ---- opcheck and torch.compile ---------------------------------------------------------------------

def _opcheck_cases():
    W, A, B, fan = make("linear", 3)
    Wf, Af, Bf, fanf = make("conv1d_like", 2, torch.float32)
    Wc, Ac, Bc, _ = make("conv3x3", 2)
    z, m, n, b = scale_inputs((2, 5, 7), -1)
    zc, mc, nc, bc = scale_inputs((2, 7, 3, 3), 1, torch.float32)
    return {
        "norm_linear_grad": (torch.ops.torchlora.dora_weight_norm.default,
                             (W.requires_grad_(), A.requires_grad_(), B.requires_grad_(), 0.5, fan, None)),
        "norm_fan_sq": (torch.ops.torchlora.dora_weight_norm.default,
                        (Wf, Af.requires_grad_(), Bf, 1.5, fanf, ops.dora_weight_sq_norm(Wf, fanf))),
        "norm_conv": (torch.ops.torchlora.dora_weight_norm.default, (Wc, Ac.requires_grad_(), Bc, 0.5, False, None)),
        "sq_norm": (torch.ops.torchlora.dora_weight_sq_norm.default, (Wc, False)),
        "sq_norm_fan": (torch.ops.torchlora.dora_weight_sq_norm.default, (Wf, True)),
        "scale_grad": (torch.ops.torchlora.dora_scale.default,
                       (z.requires_grad_(), m.requires_grad_(), n.requires_grad_(), b.requires_grad_(), -1)),
        "scale_conv_nobias": (torch.ops.torchlora.dora_scale.default, (zc.requires_grad_(), mc.float(), nc.float(),
                                                                       None, 1)),
    }


@pytest.mark.parametrize("case", list(_opcheck_cases()))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


def test_torch_compile_fullgraph():
    W, A, B, fan = make("linear", 4, torch.float32)
    x = torch.randn(3, 7)
    bias = torch.randn(13)
    m = ops.dora_weight_norm(W, A, B, 0.5).detach() * 1.1

    def dora_linear(x, W, bias, A, B, m):
        z = x @ W.T + bias + 0.5 * (x @ A.T) @ B.T
        n = ops.dora_weight_norm(W, A, B, 0.5, False, ops.dora_weight_sq_norm(W)).detach()
        return ops.dora_scale(z, m, n, bias)

    compiled = torch.compile(dora_linear, fullgraph=True, backend="aot_eager")
    args = (x, W, bias, A.requires_grad_(), B.requires_grad_(), m.requires_grad_())
    out = compiled(*args)
    torch.testing.assert_close(out, dora_linear(*args))
    out.sum().backward()
    assert A.grad is not None and m.grad is not None


# ---- errors ------------------------------------------------------------------------------------------

def test_weight_norm_errors():
    W, A, B, _ = make("linear", 3, torch.float32)
    with pytest.raises(ValueError, match="lora_A .* has 7"):
        ops.dora_weight_norm(torch.randn(13, 8), A, B, 1.0)
    with pytest.raises(ValueError, match="output features but lora_B"):
        ops.dora_weight_norm(torch.randn(12, 7), A, B, 1.0)
    with pytest.raises(ValueError, match="has rank 3"):
        ops.dora_weight_norm(W, A, torch.randn(13, 4), 1.0)
    with pytest.raises(ValueError, match="must be 2-D"):
        ops.dora_weight_norm(W, A[0], B, 1.0)
    with pytest.raises(ValueError, match="2-D factors need a 2-D weight"):
        ops.dora_weight_norm(W.view(13, 7, 1, 1), A, B, 1.0)
    with pytest.raises(TypeError, match="weight must be float32"):
        ops.dora_weight_norm(W.to(torch.int32), A, B, 1.0)
    with pytest.raises(TypeError, match="lora_A is Float but lora_B is Double"):
        ops.dora_weight_norm(W, A, B.double(), 1.0)
    with pytest.raises(ValueError, match="scaling must be finite"):
        ops.dora_weight_norm(W, A, B, float("nan"))
    with pytest.raises(ValueError, match="is on meta"):
        ops.dora_weight_norm(W, A.to("meta"), B, 1.0)
    with pytest.raises(TypeError, match="weight_sq_norm must be Float"):
        ops.dora_weight_norm(W, A, B, 1.0, False, torch.ones(13, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"weight_sq_norm must be \[13\]"):
        ops.dora_weight_norm(W, A, B, 1.0, False, torch.ones(12))
    with pytest.raises(ValueError, match="fan_in_fan_out applies to 2-D factors"):
        Wc, Ac, Bc, _ = make("conv3x3", 2)
        ops.dora_weight_norm(Wc, Ac, Bc, 1.0, True)


def test_weight_norm_grouped_conv_is_not_supported():
    W = torch.randn(6, 2, 3, 3)      # a groups=2 conv's kernel
    A = torch.randn(4, 2, 3, 3)
    B = torch.randn(6, 2, 1, 1)      # r / groups input channels
    with pytest.raises(NotImplementedError, match="DoRA on a conv with groups > 1 is not supported"):
        ops.dora_weight_norm(W, A, B, 1.0)


def test_weight_norm_conv_shape_errors():
    W, A, B, _ = make("conv3x3", 2, torch.float32)
    with pytest.raises(ValueError, match="kernel size must match"):
        ops.dora_weight_norm(W, torch.randn(2, 3, 1, 1), B, 1.0)
    with pytest.raises(ValueError, match=r"must be \[out, r, 1, 1\]"):
        ops.dora_weight_norm(W, A, torch.randn(6, 2, 3, 3), 1.0)
    with pytest.raises(ValueError, match="output channels but lora_B"):
        ops.dora_weight_norm(W, A, torch.randn(5, 2, 1, 1), 1.0)


def test_sq_norm_errors():
    with pytest.raises(TypeError, match="weight must be float32"):
        ops.dora_weight_sq_norm(torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="weight must be 2-D"):
        ops.dora_weight_sq_norm(torch.ones(3))
    with pytest.raises(ValueError, match="fan_in_fan_out applies to a 2-D weight"):
        ops.dora_weight_sq_norm(torch.ones(3, 4, 1, 1), True)


def test_scale_errors():
    z, m, n, b = scale_inputs((2, 5), -1, torch.float32)
    m, n, b = m.float(), n.float(), b.float()
    with pytest.raises(ValueError, match="magnitude .* must have 5 elements"):
        ops.dora_scale(z, m[:4], n, b)
    with pytest.raises(ValueError, match="weight_norm .* must have 5 elements"):
        ops.dora_scale(z, m, n[:4], b)
    with pytest.raises(ValueError, match="bias .* must have 5 elements"):
        ops.dora_scale(z, m, n, b[:4])
    with pytest.raises(ValueError, match="must have 2 elements"):
        ops.dora_scale(z, m, n, b, 0)
    with pytest.raises(ValueError, match="dim 2 is out of range"):
        ops.dora_scale(z, m, n, b, 2)
    with pytest.raises(TypeError, match="z must be float32"):
        ops.dora_scale(z.long(), m, n, b)
    with pytest.raises(ValueError, match="magnitude is on meta"):
        ops.dora_scale(z, m.to("meta"), n, b)


# ---- PEFT ----------------------------------------------------------------------------------------------

def _peft_dora():
    return pytest.importorskip("peft.tuners.lora.dora")


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_weight_norm_equals_peft_linear(fan_in_fan_out):
    dora = _peft_dora()
    W, A, B, _ = make("conv1d_like" if fan_in_fan_out else "linear", 4, torch.float32)
    layer = dora.DoraLinearLayer(fan_in_fan_out=fan_in_fan_out)
    expected = layer.get_weight_norm(W, B @ A, 0.75)
    torch.testing.assert_close(ops.dora_weight_norm(W, A, B, 0.75, fan_in_fan_out), expected, rtol=2e-6, atol=2e-6)


def test_weight_norm_equals_peft_embedding():
    dora = _peft_dora()
    emb = nn.Embedding(11, 6)
    A = torch.randn(3, 11)   # lora_embedding_A [r, V]
    B = torch.randn(6, 3)    # lora_embedding_B [D, r]
    layer = dora.DoraEmbeddingLayer(fan_in_fan_out=True)
    # PEFT passes lora_embedding_A.T and lora_embedding_B.T to its layer.
    lora_weight = layer.get_lora_weight(A.T, B.T)
    expected = layer.get_weight_norm(emb.weight.detach(), lora_weight, 2.0)
    torch.testing.assert_close(ops.dora_weight_norm(emb.weight.detach(), A, B, 2.0, True), expected,
                               rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("layout", ["conv1x1", "conv3x3"])
def test_weight_norm_equals_peft_conv(layout):
    dora = _peft_dora()
    W, A, B, _ = make(layout, 4, torch.float32)
    layer = dora.DoraConv2dLayer(fan_in_fan_out=False)
    lora_weight = torch.mm(B.flatten(1), A.flatten(1)).reshape(W.shape)
    expected = layer.get_weight_norm(W, lora_weight, 0.5)  # [1, out, 1, 1]
    torch.testing.assert_close(ops.dora_weight_norm(W, A, B, 0.5), expected.reshape(-1), rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("with_bias", [False, True])
def test_scale_equals_peft_linear_forward(with_bias):
    dora = _peft_dora()
    base = nn.Linear(7, 13, bias=with_bias)
    lora_A, lora_B = nn.Linear(7, 4, bias=False), nn.Linear(4, 13, bias=False)
    layer = dora.DoraLinearLayer(fan_in_fan_out=False)
    layer.update_layer(base_layer=base, lora_A=lora_A.weight, lora_B=lora_B.weight, scaling=0.5)
    with torch.no_grad():
        layer.weight.mul_(1.2)  # a trained magnitude differs from the norm
    x = torch.randn(3, 5, 7)
    with torch.no_grad():
        base_out = base(x)
        expected = base_out + layer(x, lora_A=lora_A, lora_B=lora_B, scaling=0.5, base_layer=base,
                                    base_result=base_out)
        z = base_out + 0.5 * lora_B(lora_A(x))
        n = ops.dora_weight_norm(base.weight, lora_A.weight, lora_B.weight, 0.5)
        out = ops.dora_scale(z, layer.weight, n, base.bias)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


# ---- CUDA against CPU --------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype,weight_dtype", [(torch.float32, torch.float32), (torch.float64, torch.float64),
                                                (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                                (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("with_sq", [False, True])
def test_cuda_weight_norm_matches_cpu(layout, dtype, weight_dtype, with_sq):
    W, A, B, fan = make(layout, 4, dtype, weight_dtype=weight_dtype)
    sq = ops.dora_weight_sq_norm(W, fan) if with_sq else None
    cpu = ops.dora_weight_norm(W, A, B, 0.7, fan, sq)
    dev = ops.dora_weight_norm(W.cuda(), A.cuda(), B.cuda(), 0.7, fan, None if sq is None else sq.cuda())
    assert dev.device.type == "cuda" and dev.dtype == cpu.dtype
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, torch.finfo(dtype).eps)
    torch.testing.assert_close(dev.cpu().double(), cpu.double(), rtol=tol, atol=tol)
    torch.testing.assert_close(ops.dora_weight_sq_norm(W.cuda(), fan).cpu(), ops.dora_weight_sq_norm(W, fan),
                               rtol=1e-5, atol=1e-5)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_weight_norm_gradients_match_cpu(layout):
    W, A, B, fan = make(layout, 4)
    go = torch.randn(B.shape[0], dtype=torch.float64)
    grads = []
    for device in ("cpu", "cuda"):
        ts = [t.to(device).requires_grad_() for t in (W, A, B)]
        ops.dora_weight_norm(*ts, 0.9, fan).backward(go.to(device))
        grads.append([t.grad.cpu() for t in ts])
    for c, d in zip(*grads):
        torch.testing.assert_close(d, c, rtol=1e-10, atol=1e-10)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("case", list(SCALE_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cuda_scale_matches_cpu_forward_and_backward(case, dtype):
    shape, dim = SCALE_CASES[case]
    z, m, n, b = scale_inputs(shape, dim, dtype)
    go = torch.randn(shape).to(dtype)
    results = []
    for device in ("cpu", "cuda"):
        ts = [z.to(device).requires_grad_()] + [t.float().to(device).requires_grad_() for t in (m, n, b)]
        out = ops.dora_scale(*ts, dim)
        out.backward(go.to(device))
        results.append([out.detach().cpu()] + [t.grad.cpu() for t in ts])
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 2 * torch.finfo(dtype).eps)
    for c, d in zip(*results):
        torch.testing.assert_close(d.double(), c.double(), rtol=tol, atol=tol * (c.abs().max().item() + 1))


@cuda
@pytest.mark.cuda
def test_cuda_scale_non_contiguous_and_opcheck():
    z = torch.randn(3, 13, 8, device="cuda").transpose(1, 2)
    m, n, b = (torch.rand(13, device="cuda") + 0.5 for _ in range(3))
    torch.testing.assert_close(ops.dora_scale(z, m, n, b), reference.dora_scale(z, m, n, b))
    torch.library.opcheck(torch.ops.torchlora.dora_scale.default, (z.requires_grad_(), m, n.requires_grad_(), b, -1))
    W, A, B, _ = make("linear", 4, torch.float32, device="cuda")
    torch.library.opcheck(torch.ops.torchlora.dora_weight_norm.default,
                          (W, A.requires_grad_(), B.requires_grad_(), 0.5, False, None))
