"""torchlora.linear_with_lora (a frozen nn.Linear and one LoRA adapter as one op) against the
pure-PyTorch reference: forward and every gradient over shapes, ranks, dropout and biases;
dtypes; non-contiguous operands; the private forward/backward ops (shrink, dropout bits);
the no-grad fused path; gradcheck, opcheck, torch.compile, input errors and thread counts."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from torchlora import ops

from reference import dropout_mask

FORWARD = torch.ops.torchlora._linear_with_lora_forward
BACKWARD = torch.ops.torchlora._linear_with_lora_backward
PUBLIC = torch.ops.torchlora.linear_with_lora.default

NAMES = ("x", "weight", "bias", "lora_A", "lora_B", "lora_bias")

# Against a float64 reference; atol is relative to the largest magnitude of the reference.
VS_FLOAT64 = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-4, atol=1e-4),
}


# ----------------------------------------------------------------------------- helpers


def reference(x, weight, bias, A, B, lora_bias, scaling, p=0.0, seed=None):
    """F.linear(x, W, b) + scaling * (dropout(x) @ A^T) @ B^T + scaling * lora_bias."""
    xd = x * dropout_mask(x.shape, p, seed, x.dtype, x.device) if p > 0 else x
    delta = (xd @ A.T) @ B.T
    if lora_bias is not None:
        delta = delta + lora_bias
    return F.linear(x, weight, bias) + scaling * delta


def make(lead, d_in, d_out, r, dtype=torch.float32, bias=True, lora_bias=True, requires_grad=False):
    """x, weight, bias, lora_A, lora_B, lora_bias with O(1) outputs."""
    x = torch.randn(*lead, d_in, dtype=dtype)
    weight = torch.randn(d_out, d_in, dtype=dtype) / d_in**0.5
    b = torch.randn(d_out, dtype=dtype) if bias else None
    A = torch.randn(r, d_in, dtype=dtype) / d_in**0.5
    B = torch.randn(d_out, r, dtype=dtype) / r**0.5
    lb = torch.randn(d_out, dtype=dtype) if lora_bias else None
    tensors = [x, weight, b, A, B, lb]
    for t in tensors:
        if t is not None:
            t.requires_grad_(requires_grad)
    return tensors


def as_double_leaves(tensors):
    return [None if t is None else t.detach().double().requires_grad_() for t in tensors]


def assert_close(got, want, rtol, atol, what=""):
    """|got - want| <= atol * max(1, max|want|) + rtol * |want|, elementwise."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if want.numel() == 0:
        return
    got, want = got.double(), want.double()
    scale = max(1.0, want.abs().max().item())
    err = (got - want).abs()
    bound = atol * scale + rtol * want.abs()
    bad = err > bound
    assert not bad.any() and not got.isnan().any(), (
        f"{what}: {int(bad.sum())} of {want.numel()} elements off, max error {err.max().item():.3g} "
        f"(max |want| {want.abs().max().item():.3g})"
    )


def run_and_check(lead, d_in, d_out, r, p, with_bias, with_lora_bias, dtype, scaling=0.7, grad=None):
    """Forward and all six gradients of the op against a float64 reference."""
    tensors = make(lead, d_in, d_out, r, dtype, with_bias, with_lora_bias, requires_grad=True)
    seed = ops.make_seed() if p else None
    out = ops.linear_with_lora(*tensors, scaling, p, seed)
    assert out.shape == (*lead, d_out) and out.dtype == dtype
    g = torch.randn_like(out) if grad is None else grad
    given = [t for t in tensors if t is not None]
    got = torch.autograd.grad(out, given, g, allow_unused=True)

    leaves = as_double_leaves(tensors)
    want_out = reference(*leaves, scaling, p, seed)
    given_leaves = [t for t in leaves if t is not None]
    want = torch.autograd.grad(want_out, given_leaves, g.double())

    tol = VS_FLOAT64[dtype]
    assert_close(out, want_out, what="out", **tol)
    names = [n for n, t in zip(NAMES, tensors) if t is not None]
    for name, ours, theirs in zip(names, got, want):
        assert ours is not None, f"no gradient for {name}"
        assert ours.dtype == dtype, name
        assert_close(ours, theirs, what=f"grad {name}", **tol)


# ----------------------------------------------------------------------------- 1. the grid

LEADS = [(1,), (7,), (3, 5), (2, 3, 4)]
IN_OUT = [(1, 1), (13, 7), (17, 33), (100, 40), (40, 100)]
RANKS = [1, 3, 16, 20, 64]
DROPOUT = [0.0, 0.05, 0.5]
BIASES = [(False, False), (True, False), (False, True), (True, True)]


def _grid(leads):
    """lead x (in, out) x rank x dropout; the four bias combinations taken in turn, so every
    combination meets every shape, rank and dropout without multiplying the grid by four."""
    cases = []
    for i, (lead, (d_in, d_out), r, p) in enumerate(itertools.product(leads, IN_OUT, RANKS, DROPOUT)):
        with_bias, with_lora_bias = BIASES[(i + i // len(DROPOUT)) % 4]
        cases.append(pytest.param(lead, d_in, d_out, r, p, with_bias, with_lora_bias,
                                  id=f"{'x'.join(map(str, lead))}-{d_in}to{d_out}-r{r}-p{p}-b{int(with_bias)}"
                                     f"lb{int(with_lora_bias)}"))
    return cases


@pytest.mark.parametrize("lead,d_in,d_out,r,p,with_bias,with_lora_bias", _grid(LEADS))
def test_float32_forward_and_gradients_match_reference(lead, d_in, d_out, r, p, with_bias, with_lora_bias):
    run_and_check(lead, d_in, d_out, r, p, with_bias, with_lora_bias, torch.float32)


@pytest.mark.parametrize("lead,d_in,d_out,r,p,with_bias,with_lora_bias", _grid([(3, 5)]))
def test_float64_forward_and_gradients_match_reference(lead, d_in, d_out, r, p, with_bias, with_lora_bias):
    run_and_check(lead, d_in, d_out, r, p, with_bias, with_lora_bias, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tokens", [0, 1, 2, 3, 9, 130])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_token_counts(dtype, tokens, p):
    """Few rows (and 0), and more rows than output features (the folded grad_x paths)."""
    run_and_check((tokens,), 33, 17, 20, p, True, True, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d_in,d_out", [(53, 71), (71, 53), (48, 97)])
@pytest.mark.parametrize("r", [1, 5, 20])
def test_folded_weight_paths_with_odd_sizes(dtype, d_in, d_out, r):
    """More rows than features: the adapter is folded into the weight in training forward,
    inference and grad_x, over sizes that are not whole vector tiles."""
    run_and_check((300,), d_in, d_out, r, 0.0, True, True, dtype, scaling=1.7)
    tensors = make((300,), d_in, d_out, r, dtype)
    with torch.no_grad():
        got = ops.linear_with_lora(*tensors, 1.7, 0.0, None)
    assert_close(got, reference(*[t.double() for t in tensors], 1.7, 0.0, None), what="no_grad", **VS_FLOAT64[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_wide_rows_and_odd_rank(dtype, p):
    run_and_check((2, 11), 1000, 37, 35, p, True, False, dtype, scaling=2.0)


# ----------------------------------------------------------------------------- 2. layouts


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("p", [0.0, 0.5])
def test_non_contiguous_x_and_grad_out(dtype, p):
    d_in, d_out, r = 17, 13, 5
    base = torch.randn(2, d_in, 6, dtype=dtype)
    x = base.transpose(1, 2).requires_grad_()  # [2, 6, 17], a transposed view
    assert not x.is_contiguous()
    _, weight, bias, A, B, lb = make((1,), d_in, d_out, r, dtype, requires_grad=True)
    tensors = [x, weight, bias, A, B, lb]
    seed = ops.make_seed() if p else None
    leaves = as_double_leaves(tensors)
    want_out = reference(*leaves, 0.5, p, seed)

    # out.sum().backward(): grad_out is a scalar expanded to [2, 6, 13] (stride 0)
    out = ops.linear_with_lora(*tensors, 0.5, p, seed)
    assert_close(out, want_out, what="out", **VS_FLOAT64[dtype])
    out.sum().backward()
    want = torch.autograd.grad(want_out.sum(), leaves)
    for name, t, w in zip(NAMES, tensors, want):
        assert_close(t.grad, w, what=f"grad {name} (expanded grad_out)", **VS_FLOAT64[dtype])

    # a transposed grad_out
    g = torch.randn(d_out, 6, 2, dtype=dtype).permute(2, 1, 0)
    assert not g.is_contiguous()
    got = torch.autograd.grad(ops.linear_with_lora(*tensors, 0.5, p, seed), tensors, g)
    want = torch.autograd.grad(reference(*leaves, 0.5, p, seed), leaves, g.double())
    for name, ours, theirs in zip(NAMES, got, want):
        assert_close(ours, theirs, what=f"grad {name} (transposed grad_out)", **VS_FLOAT64[dtype])


def test_non_contiguous_weight_and_factors():
    d_in, d_out, r = 21, 11, 6
    x = torch.randn(5, d_in, requires_grad=True)
    weight = (torch.randn(d_in, d_out) / d_in**0.5).T.requires_grad_()
    A = torch.randn(d_in, r).T.requires_grad_()
    B = torch.randn(r, d_out).T.requires_grad_()
    assert not (weight.is_contiguous() or A.is_contiguous() or B.is_contiguous())
    seed = ops.make_seed()
    for p in (0.0, 0.4):
        tensors = [x, weight, None, A, B, None]
        out = ops.linear_with_lora(*tensors, 1.5, p, seed)
        g = torch.randn_like(out)
        got = torch.autograd.grad(out, [x, weight, A, B], g)
        leaves = as_double_leaves(tensors)
        want_out = reference(*leaves, 1.5, p, seed)
        want = torch.autograd.grad(want_out, [leaves[i] for i in (0, 1, 3, 4)], g.double())
        assert_close(out, want_out, what="out", **VS_FLOAT64[torch.float32])
        for name, ours, theirs in zip(("x", "weight", "lora_A", "lora_B"), got, want):
            assert_close(ours, theirs, what=f"grad {name}", **VS_FLOAT64[torch.float32])


# ----------------------------------------------------------------------------- 3. dtypes


def max_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got.double() - want).abs().max().item() if want.numel() else 0.0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_forward_backward_dtypes(dtype, p):
    """Against a float64 reference, the op's error is at most about twice that of the plain
    PyTorch computation in the same dtype (and within tolerance for float32/64)."""
    inputs = make((4, 9), 24, 17, 8, dtype=dtype, requires_grad=True)
    seed = ops.make_seed() if p else None
    out = ops.linear_with_lora(*inputs, 2.0, p, seed)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, inputs, grad)
    plain = reference(*inputs, 2.0, p, seed)
    plain_grads = torch.autograd.grad(plain, inputs, grad)
    leaves = as_double_leaves(inputs)
    ref = reference(*leaves, 2.0, p, seed)
    want = torch.autograd.grad(ref, leaves, grad.double())
    for name, ours, theirs, exact in zip(("out", *NAMES), (out, *got), (plain, *plain_grads), (ref, *want)):
        assert ours.dtype == dtype, name
        assert ours.shape == exact.shape, name
        if dtype in (torch.float32, torch.float64):
            assert_close(ours, exact, what=name, **VS_FLOAT64[dtype])
        else:
            assert max_error(ours, exact) <= 2 * max_error(theirs, exact) + 1e-3, name


def check_16bit_against_plain(lead, d_in, d_out, r, p, dtype, with_bias=True, with_lora_bias=True):
    """Forward and every gradient of the op in a 16-bit dtype: against a float64 reference, its
    error is at most about twice that of the plain PyTorch computation in that dtype."""
    inputs = make(lead, d_in, d_out, r, dtype=dtype, bias=with_bias, lora_bias=with_lora_bias, requires_grad=True)
    given = [t for t in inputs if t is not None]
    seed = ops.make_seed() if p else None
    out = ops.linear_with_lora(*inputs, 1.3, p, seed)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, given, grad)
    plain = reference(*inputs, 1.3, p, seed)
    plain_grads = torch.autograd.grad(plain, given, grad)
    leaves = as_double_leaves(inputs)
    ref = reference(*leaves, 1.3, p, seed)
    want = torch.autograd.grad(ref, [t for t in leaves if t is not None], grad.double())
    names = ["out"] + [n for n, t in zip(NAMES, inputs) if t is not None]
    for name, ours, theirs, exact in zip(names, (out, *got), (plain, *plain_grads), (ref, *want)):
        assert ours.dtype == dtype and ours.shape == exact.shape, name
        scale = exact.abs().max().item() if exact.numel() else 0.0
        assert max_error(ours, exact) <= 2 * max_error(theirs, exact) + 4e-3 * max(scale, 1.0), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lead,d_in,d_out,r,p,with_bias,with_lora_bias", _grid([(7,), (2, 3, 4)]))
def test_16bit_forward_and_gradients_match_reference(dtype, lead, d_in, d_out, r, p, with_bias, with_lora_bias):
    check_16bit_against_plain(lead, d_in, d_out, r, p, dtype, with_bias, with_lora_bias)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("tokens,d_in,d_out,r", [(300, 1000, 37, 35), (129, 48, 1030, 16), (70, 96, 40, 16), (0, 16, 8, 4)])
def test_16bit_wide_rows_block_edges_and_no_tokens(dtype, p, tokens, d_in, d_out, r):
    check_16bit_against_plain((tokens,), d_in, d_out, r, p, dtype)


# ----------------------------------------------------------------------------- 4. private forward


def expected_bits(tokens, d_in, p, seed):
    """The packed mask as int64 words: bit e of word e // 64 set when element e is dropped."""
    count = tokens * d_in
    dropped = (ops.dropout_apply(torch.ones(count), p, seed) == 0).tolist()
    words = []
    for w in range((count + 63) // 64):
        v = sum(1 << i for i in range(64) if w * 64 + i < count and dropped[w * 64 + i])
        words.append(v - (1 << 64) if v >= 1 << 63 else v)
    return torch.tensor(words, dtype=torch.int64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("lead,d_in", [((3,), 7), ((5, 3), 13), ((1,), 1), ((4,), 16), ((9,), 100), ((2,), 33)])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_forward_op_dropped_bits_and_shrunk(dtype, lead, d_in, p):
    d_out, r = 6, 5
    x, weight, bias, A, B, lb = make(lead, d_in, d_out, r, dtype)
    tokens = x.numel() // d_in
    seed = ops.make_seed()
    out, shrunk, bits = FORWARD(x, weight, bias, A, B, lb, 0.5, p, seed, True)

    want_bits = expected_bits(tokens, d_in, p, seed)
    assert bits.dtype == torch.int64 and bits.shape == ((tokens * d_in + 63) // 64,)
    assert torch.equal(bits, want_bits), f"bits {bits.tolist()} != {want_bits.tolist()}"
    count = tokens * d_in
    if count % 64:  # the last word is partial: its unused bits are clear
        assert int(bits[-1]) & ~((1 << (count % 64)) - 1) == 0

    inter = torch.float64 if dtype == torch.float64 else torch.float32
    assert shrunk.dtype == inter and shrunk.shape == (tokens, r)
    xd = ops.dropout_apply(x.double(), p, seed).reshape(tokens, d_in)
    want_shrunk = xd @ A.double().T
    tol = VS_FLOAT64[torch.float64] if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    if dtype == torch.bfloat16:  # shrunk of the rounded bfloat16 dropout(x), in float32
        want_shrunk = ops.dropout_apply(x, p, seed).reshape(tokens, d_in).double() @ A.double().T
        tol = dict(rtol=1e-2, atol=1e-2)
    assert_close(shrunk, want_shrunk, what="shrunk", **tol)
    assert out.dtype == dtype and out.shape == (*lead, d_out)

    # the public op returns the same output; keep_shrunk=False keeps nothing else
    out2, shrunk2, bits2 = FORWARD(x, weight, bias, A, B, lb, 0.5, p, seed, False)
    assert shrunk2.shape == (0,) and bits2.shape == (0,)
    assert shrunk2.dtype == inter and bits2.dtype == torch.int64
    torch.testing.assert_close(out2, out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ops.linear_with_lora(x, weight, bias, A, B, lb, 0.5, p, seed), out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_forward_op_without_dropout_keeps_no_bits(dtype):
    x, weight, bias, A, B, lb = make((4, 3), 10, 6, 3, dtype)
    out, shrunk, bits = FORWARD(x, weight, bias, A, B, lb, 0.5, 0.0, None, True)
    inter = torch.float64 if dtype == torch.float64 else torch.float32
    assert bits.shape == (0,) and bits.dtype == torch.int64
    assert shrunk.shape == (12, 3) and shrunk.dtype == inter
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.float16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shrunk.double(), x.double().reshape(12, 10) @ A.double().T, **tol)
    _, shrunk2, bits2 = FORWARD(x, weight, bias, A, B, lb, 0.5, 0.0, None, False)
    assert shrunk2.shape == (0,) and bits2.shape == (0,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_backward_op_matches_reference_and_honours_output_mask(dtype, p):
    x, weight, bias, A, B, lb = make((3, 7), 19, 11, 6, dtype)
    seed = ops.make_seed() if p else None
    out, shrunk, bits = FORWARD(x, weight, bias, A, B, lb, 0.8, p, seed, True)
    g = torch.randn_like(out)
    leaves = as_double_leaves([x, weight, bias, A, B, lb])
    want = torch.autograd.grad(reference(*leaves, 0.8, p, seed), leaves, g.double())
    for mask in itertools.product([False, True], repeat=4):
        for needs_bias_grad, needs_lora_bias_grad in BIASES:
            grads = BACKWARD(g, x, weight, shrunk, bits, A, B, needs_bias_grad, needs_lora_bias_grad, 0.8, p, seed,
                             list(mask))
            wanted = (*mask[:2], needs_bias_grad, *mask[2:], needs_lora_bias_grad)
            for name, ours, theirs, asked in zip(NAMES, (grads[0], grads[1], grads[4], grads[2], grads[3], grads[5]),
                                                 want, wanted):
                if asked:
                    assert_close(ours, theirs, what=f"grad {name} mask={mask}", **VS_FLOAT64[dtype])
                else:
                    assert ours.shape == (0,), f"grad {name} not asked for but has shape {tuple(ours.shape)}"


# ----------------------------------------------------------------------------- 5. no-grad paths


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tokens", [3, 600])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_no_grad_and_frozen_inputs_give_the_same_numbers(dtype, tokens, p):
    """Without anything to differentiate the op takes its inference path (for many rows
    without dropout: the adapter folded into the weight)."""
    tensors = make((tokens,), 32, 32, 8, dtype)
    seed = ops.make_seed() if p else None
    want = reference(*[t.double() for t in tensors], 1.3, p, seed)
    tol = VS_FLOAT64[dtype]

    frozen = ops.linear_with_lora(*tensors, 1.3, p, seed)
    with torch.no_grad():
        grad_free = ops.linear_with_lora(*[t.requires_grad_() for t in tensors], 1.3, p, seed)
    assert not grad_free.requires_grad
    with torch.inference_mode():
        inference = ops.linear_with_lora(*tensors, 1.3, p, seed)
    with_grad = ops.linear_with_lora(*tensors, 1.3, p, seed)
    assert with_grad.requires_grad
    for name, got in (("frozen", frozen), ("no_grad", grad_free), ("inference_mode", inference),
                      ("with grad", with_grad)):
        assert_close(got, want, what=name, **tol)
    torch.testing.assert_close(frozen, with_grad.detach(), **({"rtol": 1e-5, "atol": 1e-5}
                                                               if dtype == torch.float32 else {}))


def test_only_the_inputs_that_require_grad_get_one():
    """needs_input_grad counts only the tensors given: absent or frozen biases must not shift
    which gradient lands where."""
    for with_bias, with_lora_bias in BIASES:
        for wanted in itertools.product([False, True], repeat=6):
            tensors = make((5,), 9, 4, 3, torch.float64, with_bias, with_lora_bias)
            for t, w in zip(tensors, wanted):
                if t is not None and w:
                    t.requires_grad_()
            given = [t for t in tensors if t is not None and t.requires_grad]
            if not given:
                continue
            out = ops.linear_with_lora(*tensors, 0.6)
            out.backward(torch.ones_like(out))
            leaves = as_double_leaves(tensors)
            want = torch.autograd.grad(reference(*leaves, 0.6), [t for t in leaves if t is not None],
                                       torch.ones_like(out))
            want = iter(want)
            for name, t in zip(NAMES, tensors):
                if t is None:
                    continue
                w = next(want)
                if t.requires_grad:
                    assert t.grad is not None, f"{name} got no gradient (bias={with_bias}, lora_bias={with_lora_bias})"
                    assert_close(t.grad, w, what=f"grad {name} requires={wanted}", **VS_FLOAT64[torch.float64])
                else:
                    assert t.grad is None, name


# ----------------------------------------------------------------------------- 6. gradcheck


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("with_bias,with_lora_bias", BIASES)
def test_gradcheck_float64(p, with_bias, with_lora_bias):
    tensors = make((3, 2), 6, 5, 3, torch.float64, with_bias, with_lora_bias, requires_grad=True)
    seed = ops.make_seed() if p else None

    def fn(x, weight, bias, A, B, lb):
        return ops.linear_with_lora(x, weight, bias, A, B, lb, 0.7, p, seed)

    assert torch.autograd.gradcheck(fn, tuple(tensors))


# A float32 frozen weight with 16-bit x (what autocast passes on the CPU): the op computes with
# the weight rounded to x's dtype; where it folds the adapter into the weight it rounds
# W + scaling * B @ A once. Few tokens: no fold; many: the fold (forward and grad_x); dropout:
# the masked kernels with the rounded weight.
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens,p", [(3, 0.0), (130, 0.0), (130, 0.2)])
def test_float32_weight_with_16bit_x(dtype, tokens, p):
    x, weight, bias, A, B, lb = make((tokens,), 40, 24, 6, dtype=dtype, requires_grad=True)
    weight32 = (torch.randn(24, 40) / 40**0.5).requires_grad_()
    seed = ops.make_seed() if p else None
    out = ops.linear_with_lora(x, weight32, bias, A, B, lb, 1.3, p, seed)
    rounded = weight32.detach().to(dtype).requires_grad_()
    plain = ops.linear_with_lora(x, rounded, bias, A, B, lb, 1.3, p, seed)
    assert out.dtype == dtype and out.shape == plain.shape
    grad = torch.randn_like(out)
    inputs = (x, bias, A, B, lb)
    got = torch.autograd.grad(out, (*inputs, weight32), grad)
    want = torch.autograd.grad(plain, (*inputs, rounded), grad)
    leaves = as_double_leaves([x, weight32, bias, A, B, lb])
    exact = reference(*leaves, 1.3, p, seed)
    # no worse than the op on the rounded weight, against the float64 result on the float32 one
    assert max_error(out, exact) <= max_error(plain, exact) + 4e-3 * max(exact.abs().max().item(), 1.0)
    for name, ours, theirs in zip(("x", "bias", "lora_A", "lora_B", "lora_bias", "weight"), got, want):
        assert ours.shape == theirs.shape, name
        assert ours.dtype == (torch.float32 if name == "weight" else dtype), name
        assert_close(ours.double(), theirs.double(), rtol=2e-2, atol=2e-2, what=name)


def test_float32_weight_needs_16bit_x():
    x, _, bias, A, B, lb = make((3,), 8, 5, 2, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="weight has dtype Float but x has dtype Double"):
        ops.linear_with_lora(x, torch.randn(5, 8), bias, A, B, lb, 1.0)
    x, _, bias, A, B, lb = make((3,), 8, 5, 2, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="weight has dtype Half but x has dtype BFloat16"):
        ops.linear_with_lora(x, torch.randn(5, 8, dtype=torch.half), bias, A, B, lb, 1.0)


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_opcheck_float32_weight_with_bfloat16_x(p):
    x, _, bias, A, B, lb = make((20,), 10, 6, 4, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(6, 10)
    seed = ops.make_seed() if p else None
    torch.library.opcheck(PUBLIC, (x, weight, bias, A, B, lb, 0.5, p, seed))
    x, bias, A, B, lb = (t.detach() for t in (x, bias, A, B, lb))  # the private ops have no autograd
    out, shrunk, bits = FORWARD(x, weight, bias, A, B, lb, 0.5, p, seed, True)
    torch.library.opcheck(
        BACKWARD.default,
        (torch.randn_like(out), x, weight, shrunk, bits, A, B, True, True, 0.5, p, seed, [True, True, True, True]),
    )


# ----------------------------------------------------------------------------- 7. opcheck


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_opcheck(p):
    x, weight, bias, A, B, lb = make((3, 4), 10, 6, 4, requires_grad=True)
    seed = ops.make_seed() if p else None
    torch.library.opcheck(PUBLIC, (x, weight, bias, A, B, lb, 0.5, p, seed))
    torch.library.opcheck(PUBLIC, (x, weight, None, A, B, None, 0.5, p, seed))
    torch.library.opcheck(PUBLIC, (x, weight, None, A, B, lb, 0.5, p, seed))


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_opcheck_private_ops(p):
    x, weight, bias, A, B, lb = make((5,), 10, 6, 4)
    seed = ops.make_seed() if p else None
    for keep in (True, False):
        torch.library.opcheck(FORWARD.default, (x, weight, bias, A, B, lb, 0.5, p, seed, keep))
    out, shrunk, bits = FORWARD(x, weight, bias, A, B, lb, 0.5, p, seed, True)
    grad = torch.randn_like(out)
    torch.library.opcheck(
        BACKWARD.default, (grad, x, weight, shrunk, bits, A, B, True, True, 0.5, p, seed, [True, True, True, True])
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize(
    "with_bias,with_lora_bias,output_mask",
    [(False, True, [False, True, True, False]), (False, False, [True, True, True, True])],
    ids=["partial-mask", "no-biases"],
)
def test_opcheck_backward_op_with_outputs_not_asked_for(dtype, p, with_bias, with_lora_bias, output_mask):
    """The [0] placeholders of the gradients not asked for are outputs too: the schema declares
    no aliasing, so they must be distinct tensors (opcheck's test_schema). The no-biases case is
    the call autograd makes for a layer without biases."""
    x, weight, bias, A, B, lb = make((5,), 10, 6, 4, dtype, with_bias, with_lora_bias)
    seed = ops.make_seed() if p else None
    out, shrunk, bits = FORWARD(x, weight, bias, A, B, lb, 0.5, p, seed, True)
    grad = torch.randn_like(out)
    torch.library.opcheck(
        BACKWARD.default, (grad, x, weight, shrunk, bits, A, B, with_bias, with_lora_bias, 0.5, p, seed, output_mask)
    )


# ----------------------------------------------------------------------------- 8. torch.compile


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_torch_compile_fullgraph(dynamic, p):
    def fn(x, weight, bias, A, B, lb, seed):
        return ops.linear_with_lora(x, weight, bias, A, B, lb, 0.5, p, seed).relu()

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic)
    for tokens in (5, 9):
        tensors = make((2, tokens), 12, 7, 4, requires_grad=True)
        seed = ops.make_seed() if p else None
        out = compiled(*tensors, seed)
        g = torch.randn_like(out)
        got = torch.autograd.grad(out, tensors, g)
        eager = fn(*tensors, seed)
        want = torch.autograd.grad(eager, tensors, g)
        torch.testing.assert_close(out, eager)
        for name, ours, theirs in zip(NAMES, got, want):
            torch.testing.assert_close(ours, theirs, msg=lambda m, name=name: f"grad {name}: {m}")


# ----------------------------------------------------------------------------- 9. bad inputs


def _good():
    return [torch.randn(4, 6), torch.randn(5, 6), torch.randn(5), torch.randn(2, 6), torch.randn(5, 2), torch.randn(5)]


BAD_INPUTS = [
    (lambda t: (t[0], torch.randn(5, 7), *t[2:]), 0.0, False, r"weight is \[5, 7\]"),
    (lambda t: (t[0], torch.randn(5, 6, 1), *t[2:]), 0.0, False, "weight must be 2-D"),
    (lambda t: (t[0], t[1].double(), *t[2:]), 0.0, False, "weight has dtype"),
    (lambda t: (*t[:2], torch.randn(4), *t[3:]), 0.0, False, r"bias must be \[5\]"),
    (lambda t: (*t[:3], torch.randn(2, 7), *t[4:]), 0.0, False, r"lora_A is \[2, 7\]"),
    (lambda t: (*t[:4], torch.randn(4, 2), t[5]), 0.0, False, "lora_B has 4 rows"),
    (lambda t: (*t[:4], torch.randn(5, 3), t[5]), 0.0, False, "lora_B is"),
    (lambda t: (*t[:3], t[3][:0], t[4][:, :0], t[5]), 0.0, False, "rank"),
    (lambda t: (*t[:5], torch.randn(3)), 0.0, False, r"lora_bias must be \[5\]"),
    (lambda t: t, 1.0, True, r"dropout_p must be in \[0, 1\)"),
    (lambda t: t, -0.1, True, r"dropout_p must be in \[0, 1\)"),
    (lambda t: t, 0.5, False, "needs a seed"),
]


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("mutate,p,with_seed,message", BAD_INPUTS)
def test_bad_inputs_raise_clear_errors(mutate, p, with_seed, message, requires_grad):
    tensors = mutate(_good())
    if requires_grad:
        tensors = [t.requires_grad_() if t.is_floating_point() and t.is_leaf else t for t in tensors]
    seed = ops.make_seed() if with_seed else None
    with pytest.raises(RuntimeError, match=message):
        ops.linear_with_lora(*tensors, 1.0, p, seed)


def test_bad_seed_and_scaling():
    t = _good()
    with pytest.raises(RuntimeError, match="seed must be an int64"):
        ops.linear_with_lora(*t, 1.0, 0.5, torch.zeros(2, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="scaling must be finite"):
        ops.linear_with_lora(*t, float("inf"))


def test_backward_op_rejects_wrong_dropped_bits():
    x, weight, bias, A, B, lb = make((3,), 30, 5, 2)  # 90 elements: 2 words
    seed = ops.make_seed()
    out, shrunk, bits = FORWARD(x, weight, bias, A, B, lb, 0.5, 0.3, seed, True)
    assert bits.shape == (2,)
    g = torch.randn_like(out)
    for wrong in (bits[:1].clone(), torch.zeros(3, dtype=torch.int64), torch.empty(0, dtype=torch.int64),
                  bits.int(), bits.view(2, 1)):
        with pytest.raises(RuntimeError, match="dropped_bits"):
            BACKWARD(g, x, weight, shrunk, wrong, A, B, True, True, 0.5, 0.3, seed, [True, True, True, True])
    with pytest.raises(RuntimeError, match="weight must be"):
        BACKWARD(g, x, weight[:, :29], shrunk, bits, A, B, True, True, 0.5, 0.3, seed, [True, True, True, True])


# ----------------------------------------------------------------------------- 10. threads


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_thread_counts_agree(p):
    before = torch.get_num_threads()
    tensors = make((300,), 1000, 40, 20, requires_grad=True)
    seed = ops.make_seed() if p else None
    g = torch.randn(300, 40)
    results = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out = ops.linear_with_lora(*tensors, 0.9, p, seed)
            results[threads] = (out, *torch.autograd.grad(out, tensors, g))
            with torch.no_grad():
                results[threads] += (ops.linear_with_lora(*tensors, 0.9, p, seed),)
    finally:
        torch.set_num_threads(before)
    assert torch.get_num_threads() == before
    leaves = as_double_leaves(tensors)
    ref = reference(*leaves, 0.9, p, seed)
    exact = (ref, *torch.autograd.grad(ref, leaves, g.double()), ref)
    for name, one, two, want in zip(("out", *NAMES, "no-grad out"), results[1], results[2], exact):
        assert_close(one, two.double(), what=f"{name}: 1 vs 2 threads", rtol=1e-4, atol=1e-4)
        assert_close(one, want, what=f"{name} (1 thread)", **VS_FLOAT64[torch.float32])
        assert_close(two, want, what=f"{name} (2 threads)", **VS_FLOAT64[torch.float32])
