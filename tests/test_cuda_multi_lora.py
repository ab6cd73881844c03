"""The CUDA kernels of the multi-adapter primitives (multi_lora_shrink, multi_lora_expand, the
in-place expand and both backward ops) against a pure-PyTorch reference written here: the
decode-shaped (few rows) and prefill-shaped (many rows) kernels, rows without an adapter
(slot -1), int32 and int64 slot indices, float32/float16/bfloat16/float64, lora_bias on and
off, non-contiguous inputs, output masks, autograd and gradcheck, torch.library.opcheck,
CUDA-graph capture with slot indices changed in place, and the device-side slot check.
Skipped without a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from cuda_graph_capture import capture

import torchlora  # noqa: F401  (loads the operators)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEV = "cuda"
OPS = torch.ops.torchlora
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
TOKENS = [1, 7, 64, 300, 4096]
# (slots, rank, in_features, out_features): odd sizes, ranks off the kernels' chunk sizes,
# feature counts long enough for the split contraction and several column tiles.
SHAPES = [(1, 1, 37, 53), (5, 16, 1000, 300), (128, 128, 37, 53), (3, 40, 130, 1031)]


# ---- the reference ---------------------------------------------------------------------------


def slot_groups(slot_index: torch.Tensor):
    """(slot, row indices) for every slot used by some row; rows with -1 belong to none."""
    idx = slot_index.long().cpu()
    for s in torch.unique(idx).tolist():
        if s >= 0:
            yield s, (idx == s).nonzero().squeeze(1).to(slot_index.device)


def ref_shrink(x, A, slot_index):
    """h[t] = A[slot[t]] @ x[t], in x's dtype; zero rows for slot -1."""
    h = x.new_zeros(x.shape[0], A.shape[1])
    for s, rows in slot_groups(slot_index):
        h[rows] = x[rows] @ A[s].T
    return h


def ref_expand(base, h, B, bias, scale, slot_index):
    """out[t] = base[t] + scale[s] (B[s] @ h[t] + bias[s]), in base's dtype; base for slot -1."""
    out = base.clone()
    for s, rows in slot_groups(slot_index):
        delta = h[rows].to(B.dtype) @ B[s].T
        if bias is not None:
            delta = delta + bias[s]
        out[rows] = out[rows] + (scale[s].to(delta.dtype) * delta).to(base.dtype)
    return out


def ref_shrink_backward(grad_h, x, A, slot_index):
    grad_x, grad_A = torch.zeros_like(x), torch.zeros_like(A)
    g = grad_h.to(x.dtype)
    for s, rows in slot_groups(slot_index):
        grad_x[rows] = g[rows] @ A[s]
        grad_A[s] = g[rows].T @ x[rows]
    return grad_x, grad_A


def ref_expand_backward(grad_out, h, B, bias, scale, slot_index):
    grad_h, grad_B = torch.zeros_like(h), torch.zeros_like(B)
    grad_bias = torch.zeros(B.shape[0], B.shape[1], dtype=B.dtype, device=B.device)
    grad_scale = torch.zeros_like(scale)
    g, hh = grad_out.to(B.dtype), h.to(B.dtype)
    for s, rows in slot_groups(slot_index):
        sc = scale[s].to(B.dtype)
        u = g[rows] @ B[s]
        grad_h[rows] = (sc * u).to(h.dtype)
        grad_B[s] = sc * (g[rows].T @ hh[rows])
        column_sum = g[rows].sum(0)
        grad_bias[s] = sc * column_sum
        d_scale = (u * hh[rows]).sum()
        if bias is not None:
            d_scale = d_scale + (column_sum * bias[s]).sum()
        grad_scale[s] = d_scale.to(scale.dtype)
    return grad_h, grad_B, grad_bias, grad_scale


def check_error(actual, reference, plain, name):
    """The contract: the error against float64 is at most ~2x that of plain PyTorch in the same
    dtype, with a floor near the dtype's rounding of the result."""
    ref = reference.double()
    assert actual.shape == ref.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(ref.shape)}"
    ours = (actual.double() - ref).abs().max().item() if ref.numel() else 0.0
    theirs = (plain.double() - ref).abs().max().item() if ref.numel() else 0.0
    magnitude = (ref.abs().max().item() if ref.numel() else 0.0) + 1.0
    floors = {torch.float32: 2e-5, torch.float64: 1e-10}
    floor = floors.get(actual.dtype, 2 * torch.finfo(actual.dtype).eps) * magnitude
    assert ours <= max(2.0 * theirs, floor), f"{name}: error {ours:.3g} vs plain {theirs:.3g} (floor {floor:.3g})"


# ---- inputs ----------------------------------------------------------------------------------


def make_slots(T, S, layout, index_dtype, gen):
    """Slot indices [T]: 'runs' (prefill: runs of one slot, some of -1), 'random' (decode: any
    slot per row, at least one -1 when T > 1), 'one' (every row slot S - 1), 'none' (all -1)."""
    if layout == "runs":
        values = []
        while len(values) < T:
            length = int(torch.randint(1, max(2, T // 3) + 1, (1,), generator=gen))
            values += [int(torch.randint(-1, S, (1,), generator=gen))] * length
        slots = torch.tensor(values[:T])
    elif layout == "random":
        slots = torch.randint(-1, S, (T,), generator=gen)
        if T > 1:
            slots[T // 2] = -1
    elif layout == "one":
        slots = torch.full((T,), S - 1)
    else:
        slots = torch.full((T,), -1)
    return slots.to(DEV, index_dtype)


def randn(gen, *shape, scale=1.0):
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale


class Case:
    """float64 originals of every operand and their rounding to `dtype`, on the GPU."""

    def __init__(self, T, shape, dtype, layout, index_dtype, with_bias, seed=0):
        S, r, K, N = shape
        gen = torch.Generator().manual_seed(seed + 7919 * T + 31 * S + r)
        self.T, self.S, self.r, self.K, self.N, self.dtype = T, S, r, K, N, dtype
        self.acc = torch.float64 if dtype == torch.float64 else torch.float32
        self.slot = make_slots(T, S, layout, index_dtype, gen)

        def dev(t, dt=dtype):  # the operand as the op sees it, and its exact float64 value
            t = t.to(DEV, dt)
            return t, t.double()

        self.x, self.x64 = dev(randn(gen, T, K))
        self.A, self.A64 = dev(randn(gen, S, r, K, scale=K**-0.5))
        self.B, self.B64 = dev(randn(gen, S, N, r, scale=r**-0.5))
        self.bias, self.bias64 = dev(randn(gen, S, N)) if with_bias else (None, None)
        self.scale, self.scale64 = dev(torch.rand(S, generator=gen, dtype=torch.float64) + 0.5, torch.float32)
        self.base, self.base64 = dev(randn(gen, T, N))
        self.h, self.h64 = dev(randn(gen, T, r), self.acc)
        self.grad_h, self.grad_h64 = dev(randn(gen, T, r), self.acc)
        self.grad_out, self.grad_out64 = dev(randn(gen, T, N))


# ---- forward ---------------------------------------------------------------------------------


def layouts_for(shape_id):
    return [("runs", torch.int32), ("random", torch.int64)][shape_id % 2]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("shape_id", range(len(SHAPES)))
def test_shrink_matches_reference(T, shape_id, dtype):
    layout, index_dtype = layouts_for(shape_id + T)
    c = Case(T, SHAPES[shape_id], dtype, layout, index_dtype, with_bias=False)
    h = OPS.multi_lora_shrink(c.x, c.A, c.slot)
    assert h.dtype == c.acc and h.shape == (T, c.r) and h.is_contiguous()
    check_error(h, ref_shrink(c.x64, c.A64, c.slot), ref_shrink(c.x, c.A, c.slot), "h")
    assert (h[c.slot.long() < 0] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("shape_id", range(len(SHAPES)))
def test_expand_matches_reference(T, shape_id, dtype):
    layout, index_dtype = layouts_for(shape_id + T + 1)
    c = Case(T, SHAPES[shape_id], dtype, layout, index_dtype, with_bias=(T + shape_id) % 2 == 0)
    out = OPS.multi_lora_expand(c.base, c.h, c.B, c.bias, c.scale, c.slot)
    assert out.dtype == dtype and out.shape == (T, c.N)
    ref = ref_expand(c.base64, c.h64, c.B64, c.bias64, c.scale64, c.slot)
    plain = ref_expand(c.base, c.h, c.B, c.bias, c.scale, c.slot)
    check_error(out, ref, plain, "out")
    none = c.slot.long() < 0
    assert torch.equal(out[none], c.base[none]), "rows with slot -1 must equal base_out"


@pytest.mark.parametrize("T", [7, 300])
@pytest.mark.parametrize("layout", ["one", "none"])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
def test_single_slot_and_no_adapter_batches(T, layout, index_dtype):
    c = Case(T, (4, 8, 70, 90), torch.float32, layout, index_dtype, with_bias=True)
    h = OPS.multi_lora_shrink(c.x, c.A, c.slot)
    torch.testing.assert_close(h.double(), ref_shrink(c.x64, c.A64, c.slot), rtol=1e-5, atol=1e-5)
    out = OPS.multi_lora_expand(c.base, h, c.B, c.bias, c.scale, c.slot)
    ref = ref_expand(c.base64, h.double(), c.B64, c.bias64, c.scale64, c.slot)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    if layout == "none":
        assert (h == 0).all() and torch.equal(out, c.base)


@pytest.mark.parametrize("T", [5, 300])
@pytest.mark.parametrize(
    "base_dtype,adapter_dtype,scale_dtype",
    [
        (torch.bfloat16, torch.float32, torch.float32),  # adapters kept in float32 on a bf16 model
        (torch.float32, torch.float16, torch.bfloat16),
        (torch.float16, torch.float64, torch.float16),
        (torch.float64, torch.float32, torch.float64),
    ],
    ids=str,
)
def test_expand_base_out_and_scale_of_other_dtypes(T, base_dtype, adapter_dtype, scale_dtype):
    c = Case(T, (6, 24, 40, 333), adapter_dtype, "random", torch.int64, with_bias=True)
    base = c.base64.to(base_dtype)
    scale = c.scale64.to(scale_dtype)
    out = OPS.multi_lora_expand(base, c.h, c.B, c.bias, scale, c.slot)
    assert out.dtype == base_dtype
    ref = ref_expand(base.double(), c.h64, c.B64, c.bias64, scale.double(), c.slot)
    # accumulated in float32 (float64), added to base_out and rounded once: half an ulp of a
    # float16/bfloat16 result; float32 accumulation noise for a float32/float64 one
    rel = torch.finfo(base_dtype).eps if base_dtype in (torch.float16, torch.bfloat16) else 1e-5
    err = (out.double() - ref).abs()
    assert (err <= rel * (ref.abs() + 1)).all(), f"max error {err.max().item():.3g}"
    # the backward takes grad_out of base_out's dtype
    g = c.grad_out64.to(base_dtype)
    grads = OPS._multi_lora_expand_backward(g, c.h, c.B, c.bias, scale, c.slot, [True, True, True, True])
    refs = ref_expand_backward(g.double(), c.h64, c.B64, c.bias64, scale.double(), c.slot)
    dtypes = [c.acc, adapter_dtype, adapter_dtype, scale_dtype]
    for name, ours, r, dtype in zip(["grad_h", "grad_B", "grad_lora_bias", "grad_scale"], grads, refs, dtypes):
        assert ours.dtype == dtype and ours.shape == r.shape, name
        tol = 8 * max(torch.finfo(dtype).eps, 1e-5)
        torch.testing.assert_close(
            ours.double(), r, rtol=tol, atol=tol * (r.abs().max().item() + 1), msg=lambda m, n=name: f"{n}: {m}"
        )


def test_empty_batch():
    c = Case(0, (3, 8, 20, 30), torch.float32, "random", torch.int64, with_bias=True)
    h = OPS.multi_lora_shrink(c.x, c.A, c.slot)
    assert h.shape == (0, 8) and h.dtype == torch.float32
    out = OPS.multi_lora_expand(c.base, h, c.B, c.bias, c.scale, c.slot)
    assert out.shape == (0, 30)
    assert OPS.multi_lora_expand_(c.base, h, c.B, c.bias, c.scale, c.slot) is c.base
    gx, gA = OPS._multi_lora_shrink_backward(c.grad_h, c.x, c.A, c.slot, [True, True])
    assert gx.shape == (0, 20) and gA.shape == (3, 8, 20) and (gA == 0).all()
    gh, gB, gb, gs = OPS._multi_lora_expand_backward(c.grad_out, h, c.B, c.bias, c.scale, c.slot, [True] * 4)
    assert gh.shape == (0, 8) and gB.shape == (3, 30, 8) and gb.shape == (3, 30) and gs.shape == (3,)
    assert not gB.any() and not gb.any() and not gs.any()


@pytest.mark.parametrize("T", [6, 200])
def test_non_contiguous_operands(T):
    c = Case(T, (4, 12, 45, 70), torch.float16, "runs", torch.int64, with_bias=True)
    x_strided = torch.stack([c.x, torch.zeros_like(c.x)], dim=-1)[..., 0]  # column stride 2
    x_transposed = c.x.T.contiguous().T
    A_transposed = c.A.transpose(1, 2).contiguous().transpose(1, 2)
    slot_strided = torch.stack([c.slot, torch.zeros_like(c.slot)], dim=-1)[:, 0]
    assert not x_strided.is_contiguous() and not x_transposed.is_contiguous() and not slot_strided.is_contiguous()
    expected = OPS.multi_lora_shrink(c.x, c.A, c.slot)
    for x, A, slot in [(x_strided, c.A, c.slot), (x_transposed, A_transposed, slot_strided)]:
        torch.testing.assert_close(OPS.multi_lora_shrink(x, A, slot), expected, rtol=0, atol=0)

    base_transposed = c.base.T.contiguous().T
    base_rows = torch.cat([c.base, torch.ones_like(c.base)], dim=1)[:, : c.N]  # row stride 2N
    h_strided = torch.stack([c.h, c.h], dim=-1)[..., 1]
    B_transposed = c.B.transpose(1, 2).contiguous().transpose(1, 2)
    expected = OPS.multi_lora_expand(c.base, c.h, c.B, c.bias, c.scale, c.slot)
    for base, h, B in [(base_transposed, h_strided, B_transposed), (base_rows, c.h, c.B)]:
        assert not base.is_contiguous()
        torch.testing.assert_close(OPS.multi_lora_expand(base, h, B, c.bias, c.scale, c.slot), expected, rtol=0, atol=0)

    grad_strided = c.grad_out.T.contiguous().T
    ours = OPS._multi_lora_expand_backward(grad_strided, c.h, B_transposed, c.bias, c.scale, c.slot, [True] * 4)
    dense = OPS._multi_lora_expand_backward(c.grad_out, c.h, c.B, c.bias, c.scale, c.slot, [True] * 4)
    for a, b in zip(ours, dense):  # atomics: the last bits may differ between runs
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("T", [3, 300])
@pytest.mark.parametrize("layout", ["contiguous", "row_strided", "transposed"])
def test_expand_in_place(T, dtype, layout):
    c = Case(T, (5, 16, 30, 75), dtype, "random", torch.int32, with_bias=True)
    expected = OPS.multi_lora_expand(c.base, c.h, c.B, c.bias, c.scale, c.slot)
    if layout == "contiguous":
        storage = c.base.clone()
        target = storage
    elif layout == "row_strided":
        storage = torch.cat([c.base, torch.full_like(c.base, 7.0)], dim=1)
        target = storage[:, : c.N]
    else:
        storage = c.base.T.contiguous()
        target = storage.T
    result = OPS.multi_lora_expand_(target, c.h, c.B, c.bias, c.scale, c.slot)
    assert result is target
    torch.testing.assert_close(target, expected, rtol=0, atol=0)
    if layout == "row_strided":
        assert (storage[:, c.N :] == 7.0).all(), "the in-place expand wrote outside base_out"


# ---- backward --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("shape_id", range(len(SHAPES)))
def test_shrink_backward_matches_reference(T, shape_id, dtype):
    layout, index_dtype = layouts_for(shape_id + T)
    c = Case(T, SHAPES[shape_id], dtype, layout, index_dtype, with_bias=False, seed=1)
    grad_x, grad_A = OPS._multi_lora_shrink_backward(c.grad_h, c.x, c.A, c.slot, [True, True])
    assert grad_x.dtype == dtype and grad_A.dtype == dtype
    ref = ref_shrink_backward(c.grad_h64, c.x64, c.A64, c.slot)
    plain = ref_shrink_backward(c.grad_h, c.x, c.A, c.slot)
    check_error(grad_x, ref[0], plain[0], "grad_x")
    check_error(grad_A, ref[1], plain[1], "grad_A")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("shape_id", range(len(SHAPES)))
def test_expand_backward_matches_reference(T, shape_id, dtype):
    layout, index_dtype = layouts_for(shape_id + T + 1)
    with_bias = (T + shape_id) % 2 == 1
    c = Case(T, SHAPES[shape_id], dtype, layout, index_dtype, with_bias=with_bias, seed=2)
    grads = OPS._multi_lora_expand_backward(c.grad_out, c.h, c.B, c.bias, c.scale, c.slot, [True] * 4)
    ref = ref_expand_backward(c.grad_out64, c.h64, c.B64, c.bias64, c.scale64, c.slot)
    plain = ref_expand_backward(c.grad_out, c.h, c.B, c.bias, c.scale, c.slot)
    names = ["grad_h", "grad_B", "grad_lora_bias", "grad_scale"]
    dtypes = [c.acc, dtype, dtype, torch.float32]
    for i, (name, ours) in enumerate(zip(names, grads)):
        if name == "grad_lora_bias" and not with_bias:
            assert ours.numel() == 0, "no lora_bias: its gradient is an empty [0] tensor"
            continue
        assert ours.dtype == dtypes[i], name
        check_error(ours, ref[i], plain[i], name)


@pytest.mark.parametrize("T", [7, 300])
def test_backward_output_masks(T):
    c = Case(T, (4, 8, 50, 60), torch.float32, "runs", torch.int64, with_bias=True, seed=3)
    full_x, full_A = OPS._multi_lora_shrink_backward(c.grad_h, c.x, c.A, c.slot, [True, True])
    for mask in ([True, False], [False, True], [False, False]):
        got = OPS._multi_lora_shrink_backward(c.grad_h, c.x, c.A, c.slot, mask)
        for want, full, g, like in zip(mask, (full_x, full_A), got, (c.x, c.A)):
            if want:
                torch.testing.assert_close(g, full)
            else:
                assert g.shape == (0,) and g.dtype == like.dtype and g.device == like.device
    full = OPS._multi_lora_expand_backward(c.grad_out, c.h, c.B, c.bias, c.scale, c.slot, [True] * 4)
    likes = (c.h, c.B, c.B, c.scale)
    for bits in range(16):
        mask = [bool(bits >> i & 1) for i in range(4)]
        got = OPS._multi_lora_expand_backward(c.grad_out, c.h, c.B, c.bias, c.scale, c.slot, mask)
        for want, f, g, like in zip(mask, full, got, likes):
            if want:
                torch.testing.assert_close(g, f)
            else:
                assert g.shape == (0,) and g.dtype == like.dtype and g.device == like.device
    # without lora_bias, its gradient is empty even when asked for
    got = OPS._multi_lora_expand_backward(c.grad_out, c.h, c.B, None, c.scale, c.slot, [True] * 4)
    assert got[2].shape == (0,)


@pytest.mark.parametrize("T", [5, 70])
def test_autograd_through_the_ops(T):
    c = Case(T, (4, 8, 33, 41), torch.float32, "random", torch.int64, with_bias=True, seed=4)
    leaves = [t.clone().requires_grad_() for t in (c.x, c.A, c.base, c.B, c.bias, c.scale)]
    x, A, base, B, bias, scale = leaves
    out = OPS.multi_lora_expand(base, OPS.multi_lora_shrink(x, A, c.slot), B, bias, scale, c.slot)
    grads = torch.autograd.grad(out, leaves, c.grad_out)

    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    x, A, base, B, bias, scale = ref_leaves
    ref = ref_expand(base, ref_shrink(x, A, c.slot), B, bias, scale, c.slot)
    ref_grads = torch.autograd.grad(ref, ref_leaves, c.grad_out64)
    for name, g, r in zip(["x", "lora_A", "base_out", "lora_B", "lora_bias", "scale"], grads, ref_grads):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("T", [7, 40])
def test_gradcheck_float64(T):
    gen = torch.Generator().manual_seed(T)
    S, r, K, N = 3, 4, 5, 6
    slot = torch.randint(-1, S, (T,), generator=gen)
    slot[0] = -1
    slot = slot.to(DEV)

    def leaf(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(DEV).requires_grad_()

    x, A = leaf(T, K), leaf(S, r, K)
    base, B, bias, scale = leaf(T, N), leaf(S, N, r), leaf(S, N), leaf(S)
    # the weight gradients are summed with atomics: the last bits may differ between backward calls
    nondet_tol = 1e-12
    assert torch.autograd.gradcheck(lambda x, A: OPS.multi_lora_shrink(x, A, slot), (x, A), nondet_tol=nondet_tol)
    h = leaf(T, r)
    assert torch.autograd.gradcheck(
        lambda base, h, B, bias, scale: OPS.multi_lora_expand(base, h, B, bias, scale, slot),
        (base, h, B, bias, scale),
        nondet_tol=nondet_tol,
    )
    assert torch.autograd.gradcheck(
        lambda base, h, B, scale: OPS.multi_lora_expand(base, h, B, None, scale, slot),
        (base, h, B, scale),
        nondet_tol=nondet_tol,
    )


# ---- operator contract -----------------------------------------------------------------------


def test_cuda_kernels_are_registered():
    for name in [
        "multi_lora_shrink",
        "_multi_lora_shrink_backward",
        "multi_lora_expand",
        "multi_lora_expand_",
        "_multi_lora_expand_backward",
    ]:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"torchlora::{name}", "CUDA"), name


@pytest.mark.parametrize("T", [5, 70])
def test_opcheck(T):
    c = Case(T, (3, 8, 19, 23), torch.float32, "random", torch.int64, with_bias=True, seed=5)

    def grad(t):
        return t.clone().requires_grad_()

    torch.library.opcheck(OPS.multi_lora_shrink.default, (grad(c.x), grad(c.A), c.slot))
    torch.library.opcheck(OPS.multi_lora_shrink.default, (c.x, c.A, c.slot.int()))
    torch.library.opcheck(OPS._multi_lora_shrink_backward.default, (c.grad_h, c.x, c.A, c.slot, [True, True]))
    torch.library.opcheck(OPS._multi_lora_shrink_backward.default, (c.grad_h, c.x, c.A, c.slot, [False, True]))
    torch.library.opcheck(
        OPS.multi_lora_expand.default, (grad(c.base), grad(c.h), grad(c.B), grad(c.bias), grad(c.scale), c.slot)
    )
    torch.library.opcheck(OPS.multi_lora_expand.default, (c.base, c.h, c.B, None, c.scale, c.slot))
    torch.library.opcheck(OPS.multi_lora_expand_.default, (c.base.clone(), c.h, c.B, c.bias, c.scale, c.slot))
    for mask in ([True] * 4, [False, True, False, True]):
        torch.library.opcheck(
            OPS._multi_lora_expand_backward.default, (c.grad_out, c.h, c.B, c.bias, c.scale, c.slot, mask)
        )


@pytest.mark.parametrize("T", [6, 96])
def test_cuda_graph_capture_with_slots_changed_in_place(T):
    c = Case(T, (6, 16, 72, 40), torch.float16, "random", torch.int32, with_bias=True, seed=6)
    x, A, B, bias, base, scale, slot = c.x, c.A, c.B, c.bias, c.base, c.scale, c.slot
    grad_out = c.grad_out

    def step():
        h = OPS.multi_lora_shrink(x, A, slot)
        out = OPS.multi_lora_expand(base, h, B, bias, scale, slot)
        grad_h, grad_B, grad_bias, grad_scale = OPS._multi_lora_expand_backward(
            grad_out, h, B, bias, scale, slot, [True, True, True, True]
        )
        grad_x, grad_A = OPS._multi_lora_shrink_backward(grad_h, x, A, slot, [True, True])
        return out, grad_x, grad_A, grad_B, grad_bias, grad_scale

    graph, static = capture(step)

    gen = torch.Generator().manual_seed(99)
    for layout in ["random", "runs", "none", "one"]:
        slot.copy_(make_slots(T, c.S, layout, torch.int32, gen))  # read on the device by the replay
        graph.replay()
        torch.cuda.synchronize()
        eager = step()
        ref_out = ref_expand(base.double(), ref_shrink(x.double(), A.double(), slot), B.double(),
                             bias.double(), scale.double(), slot)
        torch.testing.assert_close(static[0].double(), ref_out, rtol=2e-3, atol=2e-3)
        for name, s, e in zip(["out", "grad_x", "grad_A", "grad_B", "grad_lora_bias", "grad_scale"], static, eager):
            torch.testing.assert_close(s, e, msg=lambda m, n=name: f"{layout} {n}: {m}")


@pytest.mark.parametrize("bad", ["too_large", "below_minus_one"])
def test_out_of_range_slot_trips_a_device_assert(bad):
    # A device-side assert leaves the CUDA context unusable: run it in a process of its own.
    value = 4 if bad == "too_large" else -2
    code = textwrap.dedent(
        f"""
        import torch, torchlora
        x = torch.randn(3, 8, device="cuda")
        A = torch.randn(4, 2, 8, device="cuda")
        slot = torch.tensor([0, {value}, 1], device="cuda")
        try:
            torch.ops.torchlora.multi_lora_shrink(x, A, slot)
            torch.cuda.synchronize()
        except RuntimeError as e:
            print("RAISED", "device-side assert" in str(e))
        else:
            print("NOT RAISED")
        """
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert "RAISED True" in proc.stdout, proc.stdout + proc.stderr
