"""torchlora's counter-based dropout: statistics, reproducibility, mask regeneration in
backward, and no dropout work at p=0."""

import pytest
import torch

from torchlora import ops


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_keep_rate_and_scale(p):
    x = torch.ones(200_000)
    y = ops.dropout_apply(x, p, ops.make_seed())
    kept = y != 0
    n = x.numel()
    # binomial standard deviation, 6 sigma
    assert abs(kept.float().mean().item() - (1 - p)) < 6 * (p * (1 - p) / n) ** 0.5
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / (1 - p)))
    assert abs(y.mean().item() - 1.0) < 0.05  # inverted dropout keeps the expectation


def test_mask_has_no_visible_structure():
    y = ops.dropout_apply(torch.ones(64, 1024), 0.5, ops.make_seed()) != 0
    rows, cols = y.float().mean(1), y.float().mean(0)
    assert rows.min() > 0.35 and rows.max() < 0.65
    assert cols.min() > 0.2 and cols.max() < 0.8
    # neighbouring elements (also across Philox lanes) are uncorrelated
    a, b = y.flatten()[:-1].float(), y.flatten()[1:].float()
    corr = torch.corrcoef(torch.stack([a, b]))[0, 1]
    assert abs(corr) < 0.02


def test_same_seed_same_mask_and_other_seed_other_mask():
    x = torch.randn(33, 17)
    s1 = torch.tensor([12345])
    torch.testing.assert_close(ops.dropout_apply(x, 0.3, s1), ops.dropout_apply(x, 0.3, s1.clone()))
    assert not torch.equal(ops.dropout_apply(x, 0.3, s1), ops.dropout_apply(x, 0.3, torch.tensor([12346])))


def test_mask_depends_on_logical_index_not_layout():
    x = torch.randn(20, 30)
    seed = ops.make_seed()
    torch.testing.assert_close(ops.dropout_apply(x.T.contiguous().T, 0.4, seed), ops.dropout_apply(x, 0.4, seed))


def test_manual_seed_reproduces_seeds():
    torch.manual_seed(3)
    a = ops.make_seed()
    torch.manual_seed(3)
    assert torch.equal(a, ops.make_seed())


def test_layer_mask_regenerated_in_backward():
    """The gradient of x under dropout equals the gradient of the explicit masked formula
    with the mask materialised from the same seed: backward regenerated it."""
    x = torch.randn(50, 40, dtype=torch.float64, requires_grad=True)
    A = torch.randn(6, 40, dtype=torch.float64, requires_grad=True)
    B = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    base = torch.zeros(50, 9, dtype=torch.float64)
    seed = ops.make_seed()
    out = ops.lora_linear(x, base, A, B, None, 1.0, 0.5, seed)
    out.sum().backward()
    mask = ops.dropout_apply(torch.ones_like(x), 0.5, seed)
    x2, A2, B2 = (t.detach().requires_grad_() for t in (x, A, B))
    ((x2 * mask) @ A2.T @ B2.T).sum().backward()
    for got, want in ((x.grad, x2.grad), (A.grad, A2.grad), (B.grad, B2.grad)):
        torch.testing.assert_close(got, want)
    assert torch.all(x.grad[mask == 0] == 0)


def test_dropout_saves_no_input_sized_mask():
    """Saved for backward beyond the inputs: the [T, r] intermediate and the seed only."""
    x = torch.randn(128, 64, requires_grad=True)
    A = torch.randn(4, 64, requires_grad=True)
    B = torch.randn(32, 4, requires_grad=True)
    base = torch.randn(128, 32)
    inputs = {id(t) for t in (x, A, B, base)}
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ops.lora_linear(x, base, A, B, None, 1.0, 0.1, ops.make_seed())
    new = [t for t in saved if id(t) not in inputs and t.numel() > 1]
    assert [tuple(t.shape) for t in new] == [(128, 4)]


def test_errors():
    with pytest.raises(RuntimeError, match=r"p must be in \[0, 1\)"):
        ops.dropout_apply(torch.ones(3), 1.0, ops.make_seed())
    with pytest.raises(RuntimeError, match="seed must be an int64"):
        ops.dropout_apply(torch.ones(3), 0.5, torch.tensor([1.0]))
    with pytest.raises(RuntimeError, match="floating-point"):
        ops.dropout_apply(torch.ones(3, dtype=torch.int64), 0.5, ops.make_seed())


def test_opcheck():
    x = torch.randn(5, 7, requires_grad=True)
    torch.library.opcheck(torch.ops.torchlora.dropout_apply.default, (x, 0.25, ops.make_seed()))
