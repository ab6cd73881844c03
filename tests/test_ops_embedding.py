"""torchlora.lora_embedding against F.embedding: index shapes, vocabularies, padding_idx,
scale_grad_by_freq, dtypes, gradients, opcheck, torch.compile and errors."""

import pytest
import torch
import torch.nn.functional as F

from torchlora import ops

from reference import lora_embedding as ref_embedding


def make(vocab, dim, r, dtype=torch.float32, requires_grad=False):
    A = torch.randn(r, vocab, dtype=dtype, requires_grad=requires_grad)
    B = torch.randn(dim, r, dtype=dtype, requires_grad=requires_grad)
    W = torch.randn(vocab, dim, dtype=dtype)
    return W, A, B


@pytest.mark.parametrize("ids_shape", [(1,), (7,), (3, 5), (2, 3, 4)])
@pytest.mark.parametrize("vocab,dim", [(1, 3), (11, 6), (257, 31)])
@pytest.mark.parametrize("r", [1, 4, 16])
@pytest.mark.parametrize("padding_idx", [None, 0])
def test_forward_backward_match_reference(ids_shape, vocab, dim, r, padding_idx):
    W, A, B = make(vocab, dim, r, requires_grad=True)
    ids = torch.randint(0, vocab, ids_shape)
    base = F.embedding(ids, W)
    out = ops.lora_embedding(ids, base, A, B, 0.5, padding_idx)
    grad = torch.randn_like(out)
    gA, gB = torch.autograd.grad(out, (A, B), grad)
    Ar, Br = A.detach().requires_grad_(), B.detach().requires_grad_()
    ref = ref_embedding(ids, base, Ar, Br, 0.5, padding_idx)
    rA, rB = torch.autograd.grad(ref, (Ar, Br), grad)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gA, rA)
    torch.testing.assert_close(gB, rB)
    if padding_idx is not None:
        assert torch.all(gA[:, padding_idx] == 0)


def test_scale_grad_by_freq_and_int32_ids():
    W, A, B = make(9, 4, 3, requires_grad=True)
    ids = torch.tensor([[1, 1, 1, 2], [3, 2, 1, 0]], dtype=torch.int32)
    base = F.embedding(ids, W)
    out = ops.lora_embedding(ids, base, A, B, 1.5, None, True)
    gA = torch.autograd.grad(out.sum(), A)[0]
    Ar = A.detach().requires_grad_()
    ref = base + 1.5 * F.embedding(ids.long(), Ar.T, scale_grad_by_freq=True) @ B.detach().T
    torch.testing.assert_close(gA, torch.autograd.grad(ref.sum(), Ar)[0])


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_dtypes(dtype):
    W, A, B = make(20, 8, 4, dtype=dtype)
    ids = torch.randint(0, 20, (3, 6))
    base = F.embedding(ids, W)
    out = ops.lora_embedding(ids, base, A, B, 2.0)
    assert out.dtype == dtype
    exact = ref_embedding(ids, base.double(), A.double(), B.double(), 2.0)
    plain = ref_embedding(ids, base, A, B, 2.0)
    assert (out.double() - exact).abs().max() <= 2 * (plain.double() - exact).abs().max() + 1e-3


def test_gradcheck_float64():
    W, A, B = make(7, 5, 3, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[0, 3, 3], [6, 1, 2]])
    base = F.embedding(ids, W.detach()).requires_grad_()
    # padding_idx and scale_grad_by_freq alter the gradient on purpose; numerical differentiation cannot see that
    fn = lambda base, A, B: ops.lora_embedding(ids, base, A, B, 0.8)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (base, A, B))


def test_opcheck():
    W, A, B = make(13, 6, 4, requires_grad=True)
    ids = torch.randint(0, 13, (2, 5))
    base = F.embedding(ids, W)
    torch.library.opcheck(torch.ops.torchlora.lora_embedding.default, (ids, base, A, B, 0.5, 2, False))
    torch.library.opcheck(torch.ops.torchlora.lora_embedding.default, (ids, base, A, B, 0.5, -1, True))


def test_torch_compile_fullgraph():
    W, A, B = make(13, 6, 4, requires_grad=True)
    fn = torch.compile(lambda ids, base: ops.lora_embedding(ids, base, A, B, 0.5), fullgraph=True)
    ids = torch.randint(0, 13, (2, 5))
    base = F.embedding(ids, W)
    out = fn(ids, base)
    out.sum().backward()
    torch.testing.assert_close(out, ref_embedding(ids, base, A, B, 0.5))


def test_bad_inputs():
    W, A, B = make(10, 4, 2)
    ids = torch.randint(0, 10, (3,))
    base = F.embedding(ids, W)
    with pytest.raises(RuntimeError, match="ids must be int64 or int32"):
        ops.lora_embedding(ids.float(), base, A, B, 1.0)
    with pytest.raises(RuntimeError, match="lora_B"):
        ops.lora_embedding(ids, base, A, torch.randn(4, 3), 1.0)
    with pytest.raises(RuntimeError, match="base_out"):
        ops.lora_embedding(ids, base[:2], A, B, 1.0)
    with pytest.raises(IndexError):
        ops.lora_embedding(torch.tensor([10, 0, 1]), base, A, B, 1.0)


def test_backward_op_rejects_bad_operands():
    """The backward op validates through the shared checks (detail/checks.h) on every backend."""
    W, A, B = make(10, 4, 2)
    ids = torch.randint(0, 10, (3,))
    base = F.embedding(ids, W)
    _, gathered = torch.ops.torchlora._lora_embedding_forward(ids, base, A, B, 0.5)
    g = torch.randn_like(base)
    backward = torch.ops.torchlora._lora_embedding_backward
    with pytest.raises(RuntimeError, match=r"gathered must be \[3, 2\]"):
        backward(g, ids, gathered[:2], A, B, 0.5, -1, False, [True, True])
    with pytest.raises(RuntimeError, match="grad_out has 8 elements"):
        backward(g[:2], ids, gathered, A, B, 0.5, -1, False, [True, True])
    with pytest.raises(RuntimeError, match=r"padding_idx 10 is outside \[-1, 10\)"):
        backward(g, ids, gathered, A, B, 0.5, 10, False, [True, True])
    with pytest.raises(RuntimeError, match="lora_B has dtype"):
        backward(g, ids, gathered, A, B.double(), 0.5, -1, False, [True, True])
    with pytest.raises(RuntimeError, match="ids must be int64 or int32"):
        backward(g, ids.float(), gathered, A, B, 0.5, -1, False, [True, True])
