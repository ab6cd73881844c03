"""The fused CPU kernels of lora_linear and the in-place lora_linear_: against the reference
formula (the ATen path written with torch ops and torchlora's own dropout mask), dropout
consistency between forward and backward, odd sizes, 3-D and non-contiguous inputs, dtypes,
ranks, thread counts, in-place semantics and autograd errors, opcheck and torch.compile."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import torchlora.ops as ops
from torchlora.nn import LoraLinear


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


def reference(x, base_out, A, B, bias, scaling, p, seed):
    """base_out + scaling * (dropout(x) @ A^T @ B^T + bias), dropout from ops.dropout_apply."""
    xd = ops.dropout_apply(x, p, seed) if p > 0 else x
    delta = xd @ A.t() @ B.t()
    if bias is not None:
        delta = delta + bias
    return base_out + scaling * delta


def leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) if t is not None else None for t in tensors]


def tolerances(dtype):
    return {torch.float64: (1e-5, 1e-5),  # the saved [T, r] intermediate is float32
             torch.float32: (2e-5, 2e-5),
            torch.bfloat16: (3e-2, 3e-2), torch.float16: (5e-3, 5e-3)}[dtype]


def make(tokens_shape, d_in, d_out, r, dtype, bias=False):
    x = torch.randn(*tokens_shape, d_in, dtype=dtype)
    base = torch.randn(*tokens_shape, d_out, dtype=dtype)
    A = torch.randn(r, d_in, dtype=dtype) / d_in**0.5
    B = torch.randn(d_out, r, dtype=dtype) / r**0.5
    b = torch.randn(d_out, dtype=dtype) if bias else None
    return x, base, A, B, b


def check_against_reference(x, base, A, B, bias, scaling, p, in_place):
    seed = ops.make_seed() if p > 0 else None
    rtol, atol = tolerances(x.dtype)
    # reference in float64 from the same inputs
    xr, baser, Ar, Br, br = leaves(*(t.double() if t is not None else None for t in (x, base, A, B, bias)))
    ref = reference(xr, baser, Ar, Br, br, scaling, p, seed)
    xl, basel, Al, Bl, bl = leaves(x, base, A, B, bias)
    if in_place:
        out = ops.lora_linear_(basel.clone(), xl, Al, Bl, bl, scaling, p, seed)
    else:
        out = ops.lora_linear(xl, basel, Al, Bl, bl, scaling, p, seed)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad.double())
    torch.testing.assert_close(out.double(), ref.detach(), rtol=rtol, atol=atol)
    for got, want in ((xl, xr), (basel, baser), (Al, Ar), (Bl, Br), (bl, br)):
        if got is not None:
            torch.testing.assert_close(got.grad.double(), want.grad, rtol=rtol, atol=atol)


@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize(
    "tokens_shape,d_in,d_out,r",
    [((1,), 1, 1, 1), ((3,), 5, 7, 2), ((65,), 33, 17, 7), ((2, 70), 40, 24, 16), ((130,), 9, 300, 3)],
)
def test_fused_matches_reference_fp32_fp64(tokens_shape, d_in, d_out, r, p, in_place):
    for dtype in (torch.float32, torch.float64):
        x, base, A, B, b = make(tokens_shape, d_in, d_out, r, dtype, bias=r == 7)
        check_against_reference(x, base, A, B, b, 0.75, p, in_place)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("in_place", [False, True])
def test_fused_low_precision(dtype, p, in_place):
    x, base, A, B, b = make((2, 67), 48, 40, 8, dtype, bias=True)
    check_against_reference(x, base, A, B, b, 0.5, p, in_place)


def test_dropout_mask_is_the_dropout_apply_mask_in_forward_and_backward():
    """grad_A = (scaling g B)^T dropout(x) and grad_x = dropout'((scaling g B) A) with the SAME
    mask as dropout_apply over the row-major [T, in] index (here with T crossing row blocks)."""
    x, base, A, B, _ = make((3, 50), 37, 29, 5, torch.float64)
    p, scaling, seed = 0.4, 1.5, ops.make_seed()
    x.requires_grad_(True)
    A.requires_grad_(True)
    out = ops.lora_linear(x, base, A, B, None, scaling, p, seed)
    keep = ops.dropout_apply(torch.ones(150, 37, dtype=torch.float64), p, seed).view(3, 50, 37) * (1 - p)
    torch.testing.assert_close(out, base + scaling * ((x * keep / (1 - p)) @ A.t() @ B.t()))
    g = torch.randn_like(out)
    out.backward(g)
    gs = scaling * g @ B
    torch.testing.assert_close(A.grad, gs.reshape(-1, 5).t() @ (x * keep / (1 - p)).reshape(-1, 37))
    torch.testing.assert_close(x.grad, (gs @ A) * keep / (1 - p))
    assert 0.3 < 1 - keep.mean().item() < 0.5


def test_non_contiguous_inputs_and_outputs():
    x_t = torch.randn(24, 40).t()  # [40, 24] non-contiguous
    base_t = torch.randn(16, 40).t()  # [40, 16] non-contiguous
    A, B = torch.randn(4, 24), torch.randn(16, 4)
    for p in (0.0, 0.25):
        check_against_reference(x_t, base_t, A, B, None, 2.0, p, in_place=False)
        check_against_reference(x_t, base_t, A, B, None, 2.0, p, in_place=True)
    # in place into a non-contiguous base_out updates that very tensor
    base = base_t.clone().t().contiguous().t()
    before = base.clone()
    out = ops.lora_linear_(base, x_t, A, B, None, 2.0)
    assert out is base
    torch.testing.assert_close(base, before + 2.0 * x_t @ A.t() @ B.t())


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_thread_counts_agree(p):
    x, base, A, B, _ = make((300,), 64, 32, 8, torch.float32)
    seed = ops.make_seed()
    results = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            xl, Al = leaves(x, A)
            out = ops.lora_linear(xl, base, Al, B, None, 0.5, p, seed)
            out.backward(torch.ones_like(out))
            results.append((out.detach(), xl.grad, Al.grad))
    finally:
        torch.set_num_threads(old)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_zero_tokens():
    x, base, A, B, _ = make((0,), 8, 4, 2, torch.float32)
    for p in (0.0, 0.5):
        seed = ops.make_seed()
        xl, Al, Bl = leaves(x, A, B)
        out = ops.lora_linear(xl, base, Al, Bl, None, 1.0, p, seed)
        out.sum().backward()
        assert out.shape == (0, 4) and xl.grad.shape == (0, 8)
        assert torch.count_nonzero(Al.grad) == 0 and torch.count_nonzero(Bl.grad) == 0


# ---------------------------------------------------------------- the in-place op
def test_in_place_returns_and_mutates_base_out():
    x, base, A, B, b = make((5,), 6, 4, 2, torch.float32, bias=True)
    expected = ops.lora_linear(x, base, A, B, b, 0.5)
    target = base.clone()
    version = target._version
    out = ops.lora_linear_(target, x, A, B, b, 0.5)
    assert out is target and target._version > version
    torch.testing.assert_close(target, expected)


def test_in_place_on_leaf_requiring_grad_raises():
    x, base, A, B, _ = make((5,), 6, 4, 2, torch.float32)
    leaf = base.clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        ops.lora_linear_(leaf, x, A, B, None, 1.0)


def test_in_place_on_a_tensor_saved_for_backward_raises_at_backward():
    x, base, A, B, _ = make((5,), 6, 4, 2, torch.float32)
    z = base.clone().requires_grad_(True)
    saved_output = torch.exp(z)  # exp saves its output for backward
    ops.lora_linear_(saved_output, x, A, B, None, 1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved_output.sum().backward()


def test_in_place_on_a_view_gives_correct_gradients():
    x, _, A, B, _ = make((6,), 5, 4, 3, torch.float64)
    base = torch.randn(6, 8, dtype=torch.float64)
    zl, xl, Al, Bl = leaves(base, x, A, B)
    y = zl * 2.0
    ops.lora_linear_(y[:, 2:6], xl, Al, Bl, None, 0.7)
    (y * torch.arange(8.0, dtype=torch.float64)).sum().backward()
    # reference: the same update written out of place
    zr, xr, Ar, Br = leaves(base, x, A, B)
    y2 = zr * 2.0
    y2 = torch.cat([y2[:, :2], y2[:, 2:6] + 0.7 * (xr @ Ar.t() @ Br.t()), y2[:, 6:]], dim=1)
    (y2 * torch.arange(8.0, dtype=torch.float64)).sum().backward()
    for got, want in ((zl, zr), (xl, xr), (Al, Ar), (Bl, Br)):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-5)  # float32 [T, r] intermediate


def test_in_place_errors_name_the_input():
    x, base, A, B, _ = make((5,), 6, 4, 2, torch.float32)
    with pytest.raises(RuntimeError, match="base_out"):
        ops.lora_linear_(torch.zeros(5, 3), x, A, B, None, 1.0)
    with pytest.raises(RuntimeError, match="seed"):
        ops.lora_linear_(base, x, A, B, None, 1.0, 0.1, None)


def _opcheck_samples():
    x, base, A, B, b = make((2, 9), 6, 5, 3, torch.float32, bias=True)
    seed = ops.make_seed()
    samples = []
    for requires_grad in (False, True):
        xs, As, Bs, bs = (t.clone().requires_grad_(requires_grad) for t in (x, A, B, b))
        samples.append((base.clone(), xs, As, Bs, bs, 0.5, 0.0, None))
        samples.append((base.clone(), xs, As, Bs, None, 2.0, 0.2, seed))
    return samples


@pytest.mark.parametrize("sample", range(4))
def test_opcheck_in_place(sample):
    args = _opcheck_samples()[sample]
    torch.library.opcheck(torch.ops.torchlora.lora_linear_.default, args)


def test_opcheck_functional_fused():
    x, base, A, B, b = make((2, 70), 6, 5, 3, torch.float32, bias=True)
    seed = ops.make_seed()
    xs, As, Bs = (t.clone().requires_grad_(True) for t in (x, A, B))
    torch.library.opcheck(torch.ops.torchlora.lora_linear.default, (xs, base, As, Bs, b, 0.5, 0.2, seed))


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_in_place_under_torch_compile_fullgraph(p):
    x, _, A, B, _ = make((2, 7), 6, 5, 3, torch.float32)
    W = torch.randn(5, 6)
    seed = ops.make_seed()

    def fn(x, A, B, seed):
        out = torch.nn.functional.linear(x.reshape(-1, 6), W)
        out = ops.lora_linear_(out, x.reshape(-1, 6), A, B, None, 0.5, p, seed if p > 0 else None)
        return out.view(2, 7, 5)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    xe, Ae, Be = leaves(x, A, B)
    xc, Ac, Bc = leaves(x, A, B)
    eager = fn(xe, Ae, Be, seed)
    comp = compiled(xc, Ac, Bc, seed)
    torch.testing.assert_close(comp, eager)
    eager.sum().backward()
    comp.sum().backward()
    for got, want in ((xc, xe), (Ac, Ae), (Bc, Be)):
        torch.testing.assert_close(got.grad, want.grad)


# ---------------------------------------------------------------- the layer
def _count_calls(monkeypatch):
    calls = {"linear_with_lora": 0, "lora_linear_": 0, "lora_linear": 0}
    for name in calls:
        original = getattr(ops, name)

        def counting(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(ops, name, counting)
    return calls


@pytest.mark.parametrize("training", [False, True])
def test_layer_runs_base_and_adapter_as_one_op_and_matches_peft(monkeypatch, training):
    peft = pytest.importorskip("peft")
    torch.manual_seed(1)
    base = nn.Linear(12, 10).requires_grad_(False)
    ours = LoraLinear(copy.deepcopy(base), r=4, lora_alpha=8)
    holder = nn.Module()
    holder.layer = copy.deepcopy(base)
    theirs = peft.get_peft_model(holder, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["layer"]))
    theirs = theirs.base_model.model.layer
    with torch.no_grad():
        nn.init.normal_(ours.lora_B["default"].weight)
        theirs.lora_A["default"].weight.copy_(ours.lora_A["default"].weight)
        theirs.lora_B["default"].weight.copy_(ours.lora_B["default"].weight)
    ours.train(training)
    theirs.train(training)
    calls = _count_calls(monkeypatch)
    x = torch.randn(3, 5, 12, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    out = ours(x)
    ref = theirs(x2)
    assert calls == {"linear_with_lora": 1, "lora_linear_": 0, "lora_linear": 0}
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, x2.grad)
    for key in ("lora_A", "lora_B"):
        torch.testing.assert_close(getattr(ours, key)["default"].weight.grad, getattr(theirs, key)["default"].weight.grad)


def test_layer_with_a_hook_on_the_base_takes_the_functional_path(monkeypatch):
    layer = LoraLinear(nn.Linear(6, 4), r=2)
    seen = []
    layer.base_layer.register_forward_hook(lambda _m, _i, out: seen.append(out))
    calls = _count_calls(monkeypatch)
    out = layer(torch.randn(3, 6))
    assert calls == {"linear_with_lora": 0, "lora_linear_": 0, "lora_linear": 1}
    assert seen and seen[0] is not out


def test_layer_saves_only_rank_floats_beyond_the_base():
    """Saved activations per LoRA linear beyond the base layer: T x r float32 and the dropout
    mask as T x in bits (+ the seed); the layer input itself, which grad_A needs in any LoRA
    implementation, is not counted."""
    tokens, d, r = 64, 32, 4
    layer = LoraLinear(nn.Linear(d, d).requires_grad_(False), r=r, lora_dropout=0.1).train()
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}

    def saved_bytes(module, x):
        seen = {}

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params and ptr != x.untyped_storage().data_ptr():
                seen[ptr] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            module(x)
        return sum(seen.values())

    x = torch.randn(tokens, d, requires_grad=True)
    extra = saved_bytes(layer, x) - saved_bytes(layer.base_layer, x)
    assert extra <= tokens * r * 4 + tokens * d // 8 + 64, extra
