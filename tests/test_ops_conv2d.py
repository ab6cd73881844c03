"""torchlora.lora_conv2d against F.conv2d: kernel sizes, strides, padding, groups, odd spatial
sizes, channels-last inputs, dtypes, gradients, opcheck, torch.compile and errors."""

import pytest
import torch
import torch.nn.functional as F

from torchlora import ops

from reference import lora_conv2d as ref_conv2d


def make(n, cin, cout, hw, k, stride, padding, groups, r, dtype=torch.float32, bias=False):
    x = torch.randn(n, cin, *hw, dtype=dtype, requires_grad=True)
    W = torch.randn(cout, cin, k, k, dtype=dtype)
    base = F.conv2d(x.detach(), W, None, stride, padding).requires_grad_()
    A = (torch.randn(r, cin, k, k, dtype=dtype) / (cin * k * k) ** 0.5).requires_grad_()
    B = torch.randn(cout, r // groups, 1, 1, dtype=dtype, requires_grad=True)
    b = torch.randn(cout, dtype=dtype, requires_grad=True) if bias else None
    return x, base, A, B, b


GRID = [
    # k, stride, padding, groups, hw
    (1, 1, 0, 1, (5, 5)),
    (3, 1, 1, 1, (7, 9)),
    (3, 2, 1, 2, (9, 7)),
    (5, 2, 2, 1, (11, 6)),
    (5, 1, 0, 4, (8, 8)),
    (3, 3, 2, 1, (10, 13)),
]


@pytest.mark.parametrize("k,stride,padding,groups,hw", GRID)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_forward_backward_match_reference(k, stride, padding, groups, hw, bias, p):
    x, base, A, B, b = make(2, 4, 8, hw, k, stride, padding, groups, 8, bias=bias)
    seed = ops.make_seed() if p else None
    inputs = [t for t in (x, base, A, B, b) if t is not None]
    out = ops.lora_conv2d(x, base, A, B, b, [stride] * 2, [padding] * 2, [1, 1], groups, 0.7, p, seed)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, inputs, grad)
    ref = ref_conv2d(x, base, A, B, b, stride, padding, 1, groups, 0.7, p, seed)
    want = torch.autograd.grad(ref, inputs, grad)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_channels_last_input():
    x, base, A, B, _ = make(2, 4, 6, (9, 9), 3, 1, 1, 1, 4)
    xc = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    bc = base.detach().to(memory_format=torch.channels_last)
    out = ops.lora_conv2d(xc, bc, A, B, None, [1, 1], [1, 1], [1, 1], 1, 1.0)
    torch.testing.assert_close(out, ref_conv2d(xc, bc, A, B, None, 1, 1, 1, 1, 1.0), rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert xc.grad is not None and xc.grad.shape == xc.shape


def test_dilation():
    x, _, A, B, _ = make(1, 3, 5, (12, 12), 3, 1, 2, 1, 2)
    base = torch.randn(1, 5, 12, 12)
    out = ops.lora_conv2d(x, base, A, B, None, [1, 1], [2, 2], [2, 2], 1, 1.0)
    torch.testing.assert_close(out, ref_conv2d(x, base, A, B, None, 1, 2, 2, 1, 1.0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_dtypes(dtype):
    x, base, A, B, b = make(1, 4, 4, (6, 6), 3, 1, 1, 1, 4, dtype=dtype, bias=True)
    out = ops.lora_conv2d(x, base, A, B, b, [1, 1], [1, 1], [1, 1], 1, 2.0)
    assert out.dtype == dtype
    exact = ref_conv2d(*(t.detach().double() for t in (x, base, A, B, b)), 1, 1, 1, 1, 2.0)
    if dtype == torch.float64:
        torch.testing.assert_close(out, exact)
    else:
        plain = ref_conv2d(*(t.detach().float() for t in (x, base, A, B, b)), 1, 1, 1, 1, 2.0).to(dtype)
        assert (out.double() - exact).abs().max() <= 2 * (plain.double() - exact).abs().max() + 2e-2


def test_gradcheck_float64():
    x, base, A, B, b = make(1, 2, 4, (5, 4), 3, 2, 1, 2, 2, dtype=torch.float64, bias=True)
    seed = ops.make_seed()
    fn = lambda x, base, A, B, b: ops.lora_conv2d(x, base, A, B, b, [2, 2], [1, 1], [1, 1], 2, 0.5, 0.2, seed)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, base, A, B, b))


def test_opcheck():
    x, base, A, B, b = make(2, 4, 6, (7, 7), 3, 1, 1, 2, 4, bias=True)
    torch.library.opcheck(
        torch.ops.torchlora.lora_conv2d.default, (x, base, A, B, b, [1, 1], [1, 1], [1, 1], 2, 0.5, 0.0, None)
    )
    torch.library.opcheck(
        torch.ops.torchlora.lora_conv2d.default,
        (x, base, A, B, None, [1, 1], [1, 1], [1, 1], 2, 0.5, 0.1, ops.make_seed()),
    )


def test_torch_compile_fullgraph():
    x, base, A, B, _ = make(2, 4, 6, (7, 7), 3, 1, 1, 1, 4)
    fn = torch.compile(
        lambda x, base: ops.lora_conv2d(x, base, A, B, None, [1, 1], [1, 1], [1, 1], 1, 0.5), fullgraph=True
    )
    out = fn(x, base)
    out.sum().backward()
    torch.testing.assert_close(out, ref_conv2d(x, base, A, B, None, 1, 1, 1, 1, 0.5), rtol=1e-5, atol=1e-5)


def test_bad_inputs():
    x, base, A, B, _ = make(1, 4, 6, (5, 5), 3, 1, 1, 2, 4)
    with pytest.raises(RuntimeError, match="divisible by groups"):
        ops.lora_conv2d(x, base, torch.randn(3, 4, 3, 3), torch.randn(6, 1, 1, 1), None, [1, 1], [1, 1], [1, 1], 2, 1.0)
    with pytest.raises(RuntimeError, match="base_out"):
        ops.lora_conv2d(x, base[:, :, :4], A, B, None, [1, 1], [1, 1], [1, 1], 2, 1.0)
    with pytest.raises(RuntimeError, match="x must be 4-D"):
        ops.lora_conv2d(x[0], base, A, B, None, [1, 1], [1, 1], [1, 1], 2, 1.0)
    with pytest.raises(RuntimeError, match="stride must be positive"):
        ops.lora_conv2d(x, base, A, B, None, [0, 1], [1, 1], [1, 1], 2, 1.0)
    with pytest.raises(RuntimeError, match="channels"):
        ops.lora_conv2d(x, base, torch.randn(4, 3, 3, 3), B, None, [1, 1], [1, 1], [1, 1], 2, 1.0)


def test_backward_op_rejects_bad_operands():
    """The backward op validates through the shared checks (detail/checks.h) on every backend."""
    x, base, A, B, _ = make(2, 4, 6, (5, 5), 3, 1, 1, 1, 4)
    x, base, A, B = (t.detach() for t in (x, base, A, B))
    args = ([1, 1], [1, 1], [1, 1], 1, 0.5, 0.0, None, [True, True, True])
    _, shrunk = torch.ops.torchlora._lora_conv2d_forward(x, base, A, B, None, *args[:-1])
    g = torch.randn_like(base)
    backward = torch.ops.torchlora._lora_conv2d_backward
    with pytest.raises(RuntimeError, match="grad_out .* does not match shrunk"):
        backward(g[:, :, :4], x, shrunk, A, B, False, *args)
    with pytest.raises(RuntimeError, match=r"shrunk must be \[N, r, H', W'\]"):
        backward(g, x, shrunk[:1], A, B, False, *args)
    with pytest.raises(RuntimeError, match="lora_B has dtype"):
        backward(g, x, shrunk, A, B.double(), False, *args)
    with pytest.raises(RuntimeError, match="scaling must be finite"):
        backward(g, x, shrunk, A, B, False, [1, 1], [1, 1], [1, 1], 1, float("inf"), 0.0, None, [True, True, True])
