"""torchlora.lora_linear against the pure-PyTorch reference: shapes, dtypes, ranks, gradients,
opcheck, torch.compile and input errors."""

import pytest
import torch

import torchlora
from torchlora import ops

from reference import lora_linear as ref_linear

TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
}
# against a float64 reference, float32 accumulations over a few dozen terms
VS_FLOAT64 = {**TOL, torch.float32: dict(rtol=1e-4, atol=1e-4)}


def make(lead, d_in, d_out, r, dtype=torch.float32, bias=False, requires_grad=False):
    x = torch.randn(*lead, d_in, dtype=dtype)
    base = torch.randn(*lead, d_out, dtype=dtype)
    A = torch.randn(r, d_in, dtype=dtype) / d_in**0.5
    B = torch.randn(d_out, r, dtype=dtype)
    b = torch.randn(d_out, dtype=dtype) if bias else None
    tensors = [x, base, A, B] + ([b] if bias else [])
    for t in tensors:
        t.requires_grad_(requires_grad)
    return x, base, A, B, b


@pytest.mark.parametrize("lead", [(1,), (7,), (3, 5), (2, 3, 4)])
@pytest.mark.parametrize("d_in,d_out", [(1, 1), (13, 7), (64, 33)])
@pytest.mark.parametrize("r", [1, 3, 16, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_forward_matches_reference(lead, d_in, d_out, r, bias):
    x, base, A, B, b = make(lead, d_in, d_out, r, bias=bias)
    out = ops.lora_linear(x, base, A, B, b, 0.37)
    torch.testing.assert_close(out, ref_linear(x, base, A, B, b, 0.37), **TOL[torch.float32])


def max_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got.double() - want).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_forward_backward_dtypes(dtype, p):
    """Against a float64 reference, the op's error is at most about twice that of the plain
    PyTorch computation in the same dtype (and within tolerance for float32/64)."""
    x, base, A, B, b = make((4, 9), 24, 17, 8, dtype=dtype, bias=True, requires_grad=True)
    seed = ops.make_seed() if p else None
    inputs = (x, base, A, B, b)
    out = ops.lora_linear(x, base, A, B, b, 2.0, p, seed)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, inputs, grad)
    plain = ref_linear(x, base, A, B, b, 2.0, p, seed)
    plain_grads = torch.autograd.grad(plain, inputs, grad)
    leaves = [t.detach().double().requires_grad_() for t in inputs]
    ref = ref_linear(*leaves, 2.0, p, seed)
    want = torch.autograd.grad(ref, leaves, grad.double())
    for ours, theirs, exact in zip((out, *got), (plain, *plain_grads), (ref, *want)):
        assert ours.dtype == dtype
        if dtype in (torch.float32, torch.float64):
            torch.testing.assert_close(ours.double(), exact, **VS_FLOAT64[dtype])
        else:
            assert max_error(ours, exact) <= 2 * max_error(theirs, exact) + 1e-3


def test_non_contiguous_inputs():
    x = torch.randn(8, 30)[:, ::2]  # [8, 15], strided
    base = torch.randn(9, 8).T  # [8, 9], transposed
    A = torch.randn(15, 4).T  # [4, 15]
    B = torch.randn(4, 9).T  # [9, 4]
    assert not (x.is_contiguous() or base.is_contiguous() or A.is_contiguous() or B.is_contiguous())
    out = ops.lora_linear(x, base, A, B, None, 0.5)
    torch.testing.assert_close(out, ref_linear(x, base, A, B, None, 0.5))


def test_zero_tokens():
    x, base, A, B, _ = make((0,), 5, 6, 2)
    assert ops.lora_linear(x, base, A, B, None, 1.0).shape == (0, 6)


def test_base_out_dtype_may_differ_from_adapter():
    x, _, A, B, _ = make((3,), 8, 5, 2, dtype=torch.float32)
    base = torch.randn(3, 5, dtype=torch.float64)
    out = ops.lora_linear(x, base, A, B, None, 1.0)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref_linear(x, base, A, B, None, 1.0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gradcheck_float64(p):
    x, base, A, B, b = make((3, 2), 6, 5, 3, dtype=torch.float64, bias=True, requires_grad=True)
    seed = ops.make_seed() if p else None
    fn = lambda x, base, A, B, b: ops.lora_linear(x, base, A, B, b, 0.7, p, seed)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, base, A, B, b))


def test_only_requested_gradients_are_computed():
    x, base, A, B, _ = make((4,), 6, 5, 2, requires_grad=False)
    A.requires_grad_()
    out = ops.lora_linear(x, base, A, B, None, 1.0)
    out.sum().backward()
    assert A.grad is not None and x.grad is None and B.grad is None


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_opcheck(p):
    x, base, A, B, b = make((3, 4), 10, 6, 4, bias=True, requires_grad=True)
    seed = ops.make_seed() if p else None
    torch.library.opcheck(torch.ops.torchlora.lora_linear.default, (x, base, A, B, b, 0.5, p, seed))
    torch.library.opcheck(torch.ops.torchlora.lora_linear.default, (x, base, A, B, None, 0.5, p, seed))


def test_opcheck_private_ops():
    x, base, A, B, b = make((5,), 10, 6, 4, bias=True)
    out, shrunk = torch.ops.torchlora._lora_linear_forward(x, base, A, B, b, 0.5, 0.0, None)
    torch.library.opcheck(torch.ops.torchlora._lora_linear_forward.default, (x, base, A, B, b, 0.5, 0.0, None))
    grad = torch.randn_like(out)
    torch.library.opcheck(
        torch.ops.torchlora._lora_linear_backward.default,
        (grad, x, shrunk, A, B, True, 0.5, 0.0, None, [True, True, True]),
    )


@pytest.mark.parametrize("mask", [[False, True, False], [True, False, False], [False, False, True]])
def test_opcheck_backward_with_gradients_not_asked_for(mask):
    """Outputs not asked for are [0] placeholders, each its own tensor (the schema says no
    outputs alias)."""
    x, base, A, B, b = make((5,), 10, 6, 4, bias=True)
    _, shrunk = torch.ops.torchlora._lora_linear_forward(x, base, A, B, b, 0.5, 0.0, None)
    grad = torch.randn(5, 6)
    torch.library.opcheck(torch.ops.torchlora._lora_linear_backward.default,
                          (grad, x, shrunk, A, B, False, 0.5, 0.0, None, mask))


@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile_fullgraph(dynamic):
    layer = torchlora.LoraLinear(torch.nn.Linear(12, 7), r=4, lora_alpha=8, init_lora_weights=False)
    layer.train()
    compiled = torch.compile(layer, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    for tokens in (5, 9):
        x = torch.randn(2, tokens, 12, requires_grad=True)
        layer.lora_dropout["default"] = torch.nn.Identity()
        out = compiled(x)
        out.sum().backward()
        torch.testing.assert_close(out, layer(x))


def test_torch_compile_inductor_with_dropout_is_reproducible():
    layer = torchlora.LoraLinear(torch.nn.Linear(12, 7), r=4, lora_dropout=0.5, init_lora_weights=False).train()
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(3, 12)
    torch.manual_seed(5)
    a = compiled(x)
    torch.manual_seed(5)
    b = compiled(x)
    torch.testing.assert_close(a, b)


BAD_INPUTS = [
    (lambda x, base, A, B: (x, base, torch.randn(2, 7), B), "lora_A"),
    (lambda x, base, A, B: (x, base, A, torch.randn(5, 3)), "lora_B"),
    (lambda x, base, A, B: (x, torch.randn(4, 4), A, B), "base_out"),
    (lambda x, base, A, B: (x, torch.randn(3, 5), A, B), "base_out"),
    (lambda x, base, A, B: (x, base, A.double(), B), "dtype"),
    (lambda x, base, A, B: (x.long(), base, A, B), "x must be float"),
    (lambda x, base, A, B: (x, base, A.reshape(2, 6, 1), B), "lora_A must be 2-D"),
    (lambda x, base, A, B: (x, base, A[:0], B[:, :0]), "rank"),
]


@pytest.mark.parametrize("mutate,message", BAD_INPUTS)
def test_bad_inputs_raise_clear_errors(mutate, message):
    x, base, A, B = torch.randn(4, 6), torch.randn(4, 5), torch.randn(2, 6), torch.randn(5, 2)
    with pytest.raises(RuntimeError, match=message):
        ops.lora_linear(*mutate(x, base, A, B), None, 1.0)


def test_bad_dropout_arguments():
    x, base, A, B = torch.randn(4, 6), torch.randn(4, 5), torch.randn(2, 6), torch.randn(5, 2)
    with pytest.raises(RuntimeError, match="needs a seed"):
        ops.lora_linear(x, base, A, B, None, 1.0, 0.5)
    with pytest.raises(RuntimeError, match=r"dropout_p must be in \[0, 1\)"):
        ops.lora_linear(x, base, A, B, None, 1.0, 1.0, ops.make_seed())
    with pytest.raises(RuntimeError, match="seed must be an int64"):
        ops.lora_linear(x, base, A, B, None, 1.0, 0.5, torch.zeros(2, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="lora_bias must be"):
        ops.lora_linear(x, base, A, B, torch.randn(3), 1.0)
    with pytest.raises(RuntimeError, match="scaling must be finite"):
        ops.lora_linear(x, base, A, B, None, float("nan"))


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_backward_op_rejects_bad_operands(p):
    """The backward op validates through the shared checks (detail/checks.h), the ones the CUDA
    backward uses too: without dropout (ATen path) and with it (the CPU's own kernel)."""
    x, base, A, B, _ = make((6,), 10, 5, 3)
    seed = ops.make_seed() if p else None
    _, shrunk = torch.ops.torchlora._lora_linear_forward(x, base, A, B, None, 0.5, p, seed)
    g = torch.randn(6, 5)
    mask = [True, True, True]
    cases = [
        ((g, x, shrunk, A.double(), B), 0.5, "lora_A has dtype"),
        ((g, x, shrunk, A, B[:, :2]), 0.5, r"lora_A must be \[r, in\] and lora_B \[out, r\]"),
        ((g, x, shrunk[:, :2], A, B), 0.5, r"shrunk must be \[T, 3\]"),
        ((g[:5], x, shrunk, A, B), 0.5, "grad_out has 25 elements"),
        ((g.long(), x, shrunk, A, B), 0.5, "grad_out must be float32"),
        ((g, x, shrunk, A, B), float("nan"), "scaling must be finite"),
    ]
    for tensors, scaling, message in cases:
        with pytest.raises(RuntimeError, match=message):
            torch.ops.torchlora._lora_linear_backward(*tensors, False, scaling, p, seed, mask)
