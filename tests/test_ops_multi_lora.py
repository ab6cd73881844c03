"""The multi-adapter operators (one slot per row) against the pure-PyTorch reference: a grid of
shapes, slot layouts and dtypes, gradients (gradcheck in float64 and reference gradients),
opcheck, torch.compile without graph breaks or recompiles, and bad input."""

from __future__ import annotations

import pytest
import torch

import multi_lora_reference as ref
from torchlora import ops

torch.manual_seed(0)


def _slots(T: int, S: int, layout: str, dtype=torch.int64, gen=None) -> torch.Tensor:
    """Slot indices: 'random' rows (decode), 'runs' of equal slots (prefill), with -1 rows."""
    if T == 0:
        return torch.zeros(0, dtype=dtype)
    if layout == "random":
        return torch.randint(-1, S, (T,), generator=gen).to(dtype)
    bounds = sorted(torch.randint(0, T, (min(S, 8),), generator=gen).tolist())
    slots = torch.empty(T, dtype=dtype)
    start = 0
    for i, b in enumerate(bounds + [T]):
        slots[start:b] = (i % (S + 1)) - 1  # -1 first, then slots 0, 1, ...
        start = b
    return slots


def _operands(T, i, o, S, r, dtype, bias=True, layout="random", index_dtype=torch.int64):
    gen = torch.Generator().manual_seed(T * 131 + S * 7 + r)
    x = torch.randn(T, i, generator=gen).to(dtype)
    base = torch.randn(T, o, generator=gen).to(dtype)
    A = (torch.randn(S, r, i, generator=gen) / i**0.5).to(dtype)
    B = (torch.randn(S, o, r, generator=gen) / r**0.5).to(dtype)
    b = torch.randn(S, o, generator=gen).to(dtype) if bias else None
    scale = (torch.rand(S, generator=gen) * 2).to(torch.float64 if dtype == torch.float64 else torch.float32)
    return x, base, A, B, b, scale, _slots(T, S, layout, index_dtype, gen)


TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float64: dict(atol=1e-10, rtol=1e-10),
       torch.bfloat16: dict(atol=5e-2, rtol=2e-2), torch.float16: dict(atol=5e-3, rtol=5e-3)}

GRID = [  # T, in, out, S, r
    (0, 8, 8, 2, 4), (1, 37, 53, 1, 1), (7, 37, 53, 3, 8), (64, 64, 48, 17, 16), (300, 33, 71, 128, 5),
    (4096, 32, 24, 8, 128),
]


@pytest.mark.parametrize("T,i,o,S,r", GRID)
@pytest.mark.parametrize("layout", ["random", "runs"])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_reference(T, i, o, S, r, layout, bias):
    x, base, A, B, b, scale, slots = _operands(T, i, o, S, r, torch.float32, bias, layout)
    out = ops.multi_lora_linear(x, base, A, B, b, scale, slots)
    torch.testing.assert_close(out, ref.multi_lora_linear(x, base, A, B, b, scale, slots), **TOL[torch.float32])
    inplace = base.clone()
    returned = ops.multi_lora_linear_(inplace, x, A, B, b, scale, slots)
    assert returned.data_ptr() == inplace.data_ptr()
    torch.testing.assert_close(inplace, out, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_linear_dtypes(dtype, index_dtype):
    x, base, A, B, b, scale, slots = _operands(200, 40, 24, 5, 8, dtype, True, "runs", index_dtype)
    out = ops.multi_lora_linear(x, base, A, B, b, scale, slots)
    assert out.dtype == dtype
    expected = ref.multi_lora_linear(x, base, A, B, b, scale, slots)
    torch.testing.assert_close(out, expected, **TOL[dtype])
    if dtype in (torch.bfloat16, torch.float16):
        # no worse than about twice plain PyTorch in the same dtype
        s = slots.long().clamp(min=0)
        used = (slots >= 0).to(dtype)[:, None]
        plain = base + used * scale[s].to(dtype)[:, None] * (torch.einsum("tor,tr->to", B[s], torch.einsum(
            "tri,ti->tr", A[s], x)) + b[s])
        exact = ref.multi_lora_linear(x.double(), base.double(), A.double(), B.double(), b.double(), scale, slots)
        ours_err = (out.double() - exact).abs().max()
        plain_err = (plain.double() - exact).abs().max()
        assert ours_err <= 2 * plain_err + 1e-6


def test_float32_base_with_bfloat16_adapters():
    x, base, A, B, b, scale, slots = _operands(50, 16, 12, 3, 4, torch.bfloat16)
    base = base.float()
    out = ops.multi_lora_linear(x, base, A, B, b, scale, slots)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref.multi_lora_linear(x, base, A, B, b, scale, slots), atol=5e-2, rtol=2e-2)


def test_non_contiguous_and_3d_inputs():
    x, base, A, B, b, scale, slots = _operands(60, 20, 30, 4, 6, torch.float32)
    x_nc = torch.randn(20, 60).t()  # [60, 20] with column stride != 1
    x_nc.copy_(x)
    base_nc = torch.randn(30, 60).t()
    base_nc.copy_(base)
    out = ops.multi_lora_linear(x_nc, base_nc, A[:, :, :], B, b, scale, slots)
    torch.testing.assert_close(out, ref.multi_lora_linear(x, base, A, B, b, scale, slots))
    ops.multi_lora_linear_(base_nc, x_nc, A, B, b, scale, slots)
    torch.testing.assert_close(base_nc, out)
    x3, base3 = x.view(6, 10, 20), base.view(6, 10, 30)
    out3 = ops.multi_lora_linear(x3, base3, A, B, b, scale, slots)
    assert out3.shape == (6, 10, 30)
    torch.testing.assert_close(out3.reshape(60, 30), out)


def test_linear_with_multi_lora_is_base_plus_adapters():
    x, _, A, B, b, scale, slots = _operands(90, 24, 16, 6, 4, torch.float32)
    W, wb = torch.randn(16, 24), torch.randn(16)
    out = ops.linear_with_multi_lora(x, W, wb, A, B, b, scale, slots)
    expected = ref.multi_lora_linear(x, torch.nn.functional.linear(x, W, wb), A, B, b, scale, slots)
    torch.testing.assert_close(out, expected)


def test_zero_padded_ranks_add_nothing():
    """Adapters of different ranks share one stack; the padding changes no value."""
    x = torch.randn(40, 12)
    base = torch.randn(40, 10)
    factors = [(torch.randn(r, 12), torch.randn(10, r)) for r in (2, 5, 3)]
    A = torch.zeros(3, 5, 12)
    B = torch.zeros(3, 10, 5)
    for s, (a, b) in enumerate(factors):
        A[s, : a.shape[0]] = a
        B[s, :, : b.shape[1]] = b
    slots = torch.randint(0, 3, (40,))
    scale = torch.tensor([0.5, 2.0, 1.5])
    out = ops.multi_lora_linear(x, base, A, B, None, scale, slots)
    for t in range(40):
        a, b = factors[int(slots[t])]
        torch.testing.assert_close(out[t], base[t] + scale[slots[t]] * (b @ (a @ x[t])))


def _reference_grads(x, base, A, B, b, scale, slots, g):
    leaves = [t.detach().double().requires_grad_() for t in (x, base, A, B, b, scale)]
    out = ref.multi_lora_linear(*leaves, slots)
    return torch.autograd.grad(out, leaves, g.double())


@pytest.mark.parametrize("layout", ["random", "runs"])
def test_linear_gradients_match_reference(layout):
    x, base, A, B, b, scale, slots = _operands(500, 33, 21, 9, 7, torch.float32, True, layout)
    leaves = [t.clone().requires_grad_() for t in (x, base, A, B, b, scale)]
    out = ops.multi_lora_linear(*leaves, slots)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, g)
    for name, ours, theirs in zip(("x", "base_out", "lora_A", "lora_B", "lora_bias", "scale"), got,
                                  _reference_grads(x, base, A, B, b, scale, slots, g)):
        torch.testing.assert_close(ours.double(), theirs, atol=1e-3, rtol=1e-4, msg=name)


def test_unused_slots_get_zero_gradients():
    x, base, A, B, b, scale, _ = _operands(20, 8, 6, 4, 3, torch.float32)
    slots = torch.tensor([0] * 10 + [2] * 10)
    A.requires_grad_()
    B.requires_grad_()
    ops.multi_lora_linear(x, base, A, B, b, scale, slots).sum().backward()
    assert A.grad[1].abs().sum() == 0 and A.grad[3].abs().sum() == 0
    assert A.grad[0].abs().sum() > 0 and B.grad[2].abs().sum() > 0


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("layout", ["random", "runs"])
def test_gradcheck_linear(bias, layout):
    x, base, A, B, b, scale, slots = _operands(24, 5, 4, 3, 2, torch.float64, bias, layout)
    slots[::5] = -1
    leaves = [t.clone().requires_grad_() for t in (x, base, A, B, scale)]
    bias_leaf = b.clone().requires_grad_() if bias else None
    if bias:
        fn = lambda x, base, A, B, scale, lb: ops.multi_lora_linear(x, base, A, B, lb, scale, slots)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (*leaves, bias_leaf))
    else:
        fn = lambda x, base, A, B, scale: ops.multi_lora_linear(x, base, A, B, None, scale, slots)  # noqa: E731
        assert torch.autograd.gradcheck(fn, tuple(leaves))


def test_gradcheck_primitives_and_inplace():
    x, base, A, B, b, scale, slots = _operands(12, 4, 3, 2, 2, torch.float64)
    xs, As = x.requires_grad_(), A.requires_grad_()
    assert torch.autograd.gradcheck(lambda x, A: ops.multi_lora_shrink(x, A, slots), (xs, As))
    h = ops.multi_lora_shrink(x, A, slots).detach().requires_grad_()
    Bs, bs, ss, base_s = B.requires_grad_(), b.requires_grad_(), scale.double().requires_grad_(), base.requires_grad_()
    assert torch.autograd.gradcheck(lambda o, h, B, b, s: ops.multi_lora_expand(o, h, B, b, s, slots),
                                    (base_s, h, Bs, bs, ss))
    assert torch.autograd.gradcheck(lambda o, h, B, b, s: ops.multi_lora_expand_(o * 1, h, B, b, s, slots),
                                    (base_s, h, Bs, bs, ss))


def test_embedding_matches_reference_and_gradcheck():
    S, r, V, D = 5, 4, 13, 9
    ids = torch.randint(0, V, (3, 7))
    slots = torch.randint(-1, S, (21,))
    A, B = torch.randn(S, r, V, dtype=torch.float64), torch.randn(S, D, r, dtype=torch.float64)
    scale, base = torch.rand(S, dtype=torch.float64), torch.randn(3, 7, D, dtype=torch.float64)
    out = ops.multi_lora_embedding(ids, base, A, B, scale, slots)
    torch.testing.assert_close(out, ref.multi_lora_embedding(ids, base, A, B, scale, slots))
    leaves = [t.clone().requires_grad_() for t in (base, A, B, scale)]
    assert torch.autograd.gradcheck(lambda o, A, B, s: ops.multi_lora_embedding(ids, o, A, B, s, slots), leaves)
    # padding_idx: that id's column of lora_A gets no gradient, its value still counts
    pad = int(ids[0, 0])
    A_leaf = A.clone().requires_grad_()
    out_pad = ops.multi_lora_embedding(ids, base, A_leaf, B, scale, slots, pad)
    torch.testing.assert_close(out_pad, out)
    out_pad.sum().backward()
    assert A_leaf.grad[:, :, pad].abs().sum() == 0


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("bias", [False, True])
def test_conv2d_matches_reference_and_gradcheck(groups, bias):
    S, N, C, O, r = 3, 4, 2, 4, 4
    x = torch.randn(N, C, 5, 4, dtype=torch.float64)
    A, B = torch.randn(S, r, C, 3, 3, dtype=torch.float64), torch.randn(S, O, r // groups, 1, 1, dtype=torch.float64)
    b = torch.randn(S, O, dtype=torch.float64) if bias else None
    scale, slots = torch.rand(S, dtype=torch.float64), torch.tensor([2, -1, 0, 2])
    geometry = ([2, 1], [1, 1], [1, 2], groups)
    h = torch.nn.functional.conv2d(x, A[0], None, *geometry[:3])
    base = torch.randn(N, O, *h.shape[2:], dtype=torch.float64)
    out = ops.multi_lora_conv2d(x, base, A, B, b, scale, slots, *geometry)
    torch.testing.assert_close(out, ref.multi_lora_conv2d(x, base, A, B, b, scale, slots, *geometry))
    leaves = [t.clone().requires_grad_() for t in (x, base, A, B, scale)]
    fn = lambda x, o, A, B, s: ops.multi_lora_conv2d(x, o, A, B, b, s, slots, *geometry)  # noqa: E731
    assert torch.autograd.gradcheck(fn, leaves, fast_mode=True)


def test_opcheck_every_op():
    x, base, A, B, b, scale, slots = _operands(30, 9, 7, 4, 3, torch.float32)
    A.requires_grad_()
    B.requires_grad_()
    h = ops.multi_lora_shrink(x, A, slots).detach()
    tl = torch.ops.torchlora
    torch.library.opcheck(tl.multi_lora_shrink.default, (x, A, slots))
    torch.library.opcheck(tl.multi_lora_expand.default, (base, h, B, b, scale, slots))
    torch.library.opcheck(tl.multi_lora_expand_.default, (base.clone(), h, B, None, scale, slots))
    torch.library.opcheck(tl._multi_lora_shrink_backward.default, (h, x, A.detach(), slots, [True, True]))
    torch.library.opcheck(tl._multi_lora_expand_backward.default,
                          (base, h, B.detach(), b, scale, slots, [True, True, True, True]))
    torch.library.opcheck(tl.multi_lora_linear.default, (x, base, A, B, b, scale, slots))
    torch.library.opcheck(tl.multi_lora_linear_.default, (base.clone(), x, A, B, b, scale, slots))
    torch.library.opcheck(tl.linear_with_multi_lora.default, (x, torch.randn(7, 9), None, A, B, b, scale, slots))
    ids = torch.randint(0, 9, (30,))
    torch.library.opcheck(tl.multi_lora_embedding.default, (ids, base, A.detach().clone().requires_grad_(),
                                                             B.detach().transpose(1, 2).contiguous()[:, :3, :].
                                                             transpose(1, 2).contiguous(), scale, slots, -1))
    xc = torch.randn(3, 9, 5, 5)
    Ac = torch.randn(4, 3, 9, 3, 3, requires_grad=True)
    Bc = torch.randn(4, 7, 3, 1, 1, requires_grad=True)
    torch.library.opcheck(tl.multi_lora_conv2d.default, (xc, torch.randn(3, 7, 3, 3), Ac, Bc, None, scale,
                                                          torch.tensor([1, -1, 3]), [1, 1], [0, 0], [1, 1], 1))


def test_meta_shapes():
    x, base, A, B, b, scale, slots = (t.to("meta") if t is not None else None for t in _operands(10, 8, 6, 3, 2, torch.float32))
    h = ops.multi_lora_shrink(x, A, slots)
    assert h.shape == (10, 2) and h.dtype == torch.float32 and h.device.type == "meta"
    assert ops.multi_lora_expand(base, h, B, b, scale, slots).shape == (10, 6)


@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph_without_recompiles(dynamic):
    torch._dynamo.reset()
    x, base, A, B, b, scale, slots = _operands(40, 16, 12, 5, 4, torch.float32)

    def fn(x, base, A, B, b, scale, slots):
        return ops.multi_lora_linear(x, base, A, B, b, scale, slots)

    compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic)
    torch.testing.assert_close(compiled(x, base, A, B, b, scale, slots), fn(x, base, A, B, b, scale, slots))
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(2):  # new index values, new weights and scales: the same graph
            slots = torch.randint(-1, 5, (40,))
            A, scale = torch.randn_like(A), torch.rand(5)
            torch.testing.assert_close(compiled(x, base, A, B, b, scale, slots), fn(x, base, A, B, b, scale, slots))


def test_compile_embedding_and_conv2d():
    torch._dynamo.reset()
    ids, slots = torch.randint(0, 11, (2, 5)), torch.randint(-1, 3, (10,))
    A, B, scale, base = torch.randn(3, 4, 11), torch.randn(3, 6, 4), torch.rand(3), torch.randn(2, 5, 6)
    emb = torch.compile(ops.multi_lora_embedding, fullgraph=True)
    torch.testing.assert_close(emb(ids, base, A, B, scale, slots), ref.multi_lora_embedding(ids, base, A, B, scale, slots))
    x, Ac, Bc = torch.randn(2, 3, 6, 6), torch.randn(3, 4, 3, 3, 3), torch.randn(3, 5, 4, 1, 1)
    conv = torch.compile(lambda *a: ops.multi_lora_conv2d(*a, [1, 1], [1, 1], [1, 1], 1), fullgraph=True)
    base_c, s = torch.randn(2, 5, 6, 6), torch.tensor([2, 0])
    torch.testing.assert_close(conv(x, base_c, Ac, Bc, None, scale, s),
                               ref.multi_lora_conv2d(x, base_c, Ac, Bc, None, scale, s, [1, 1], [1, 1], [1, 1], 1))


@pytest.mark.parametrize("groups", [1, 2])
def test_compile_conv2d_with_a_dynamic_batch(groups):
    """A symbolic batch takes the im2col shrink (a batch-sized group count would be fixed in the
    compiled code): every batch size runs the one graph and matches the reference."""
    torch._dynamo.reset()
    S, C, O, r = 3, 4, 6, 4
    A, B = torch.randn(S, r, C, 3, 2), torch.randn(S, O, r // groups, 1, 1)
    b, scale = torch.randn(S, O), torch.rand(S)
    geometry = ([2, 1], [1, 0], [1, 2], groups)
    conv = torch.compile(lambda *a: ops.multi_lora_conv2d(*a, *geometry), fullgraph=True, dynamic=True)
    for step, N in enumerate((2, 5, 3)):
        x = torch.randn(N, C, 7, 6)
        h = torch.nn.functional.conv2d(x, A[0], None, *geometry[:3])
        base = torch.randn(N, O, *h.shape[2:])
        slots = torch.randint(-1, S, (N,))
        with torch._dynamo.config.patch(error_on_recompile=step > 1):
            out = conv(x, base, A, B, b, scale, slots)
        torch.testing.assert_close(out, ref.multi_lora_conv2d(x, base, A, B, b, scale, slots, *geometry),
                                   rtol=1e-5, atol=1e-5)


def test_bad_input_is_named():
    x, base, A, B, b, scale, slots = _operands(10, 8, 6, 3, 2, torch.float32)
    bad = slots.clone()
    bad[4] = 3
    with pytest.raises(ValueError, match=r"slot_index\[4\] = 3 is out of range.*3 slots"):
        ops.multi_lora_linear(x, base, A, B, b, scale, bad)
    bad[4] = -2
    with pytest.raises(ValueError, match="out of range"):
        ops.multi_lora_shrink(x, A, bad)
    with pytest.raises(RuntimeError, match="slot_index must be int32 or int64"):
        ops.multi_lora_shrink(x, A, slots.float())
    with pytest.raises(RuntimeError, match="slot_index has 9 entries but there are 10 rows"):
        ops.multi_lora_shrink(x, A, slots[:9])
    with pytest.raises(RuntimeError, match="lora_A must be 3-D"):
        ops.multi_lora_shrink(x, A[0], slots)
    with pytest.raises(RuntimeError, match="lora_A has dtype"):
        ops.multi_lora_shrink(x, A.double(), slots)
    with pytest.raises(RuntimeError, match="input features"):
        ops.multi_lora_shrink(x[:, :5], A, slots)
    h = ops.multi_lora_shrink(x, A, slots)
    with pytest.raises(RuntimeError, match=r"scale must be \[3\]"):
        ops.multi_lora_expand(base, h, B, b, scale[:2], slots)
    with pytest.raises(RuntimeError, match="lora_bias must be"):
        ops.multi_lora_expand(base, h, B, b[:, :3], scale, slots)
    with pytest.raises(RuntimeError, match="h must be Float"):
        ops.multi_lora_expand(base, h.double(), B, b, scale, slots)
    with pytest.raises(RuntimeError, match="lora_B is"):
        ops.multi_lora_expand(base[:, :4], h, B, b, scale, slots)
    with pytest.raises(RuntimeError, match="base_out"):
        ops.multi_lora_linear(x, base[:9], A, B, b, scale, slots)
    with pytest.raises(ValueError, match=r"slot_index has values out of \[-1, 3\)"):
        ops.multi_lora_conv2d(torch.randn(2, 8, 4, 4), torch.randn(2, 6, 4, 4), torch.randn(3, 2, 8, 1, 1),
                              torch.randn(3, 6, 2, 1, 1), None, scale, torch.tensor([0, 5]), [1, 1], [0, 0], [1, 1], 1)
    with pytest.raises(RuntimeError, match="ids must be an int64 or int32"):
        ops.multi_lora_embedding(torch.zeros(10), base, torch.randn(3, 2, 5), torch.randn(3, 6, 2), scale, slots)
