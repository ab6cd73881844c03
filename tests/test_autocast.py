"""torch.autocast on the CPU: the operators cast as aten::linear / aten::embedding do
(csrc/torchlora/autocast.cpp), and a model trained under autocast matches PEFT's under the same
autocast."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchlora
from torchlora import ops

from peft_parity import build_pair, grads, logits
from tiny_models import VOCAB, input_ids, llama

LOW = [torch.bfloat16, torch.float16]


def _all_torchlora_ops() -> list[str]:
    return sorted(name for name in torch._C._dispatch_get_all_op_names() if name.startswith("torchlora::"))


def test_every_op_with_kernels_of_its_own_has_an_autocast_kernel() -> None:
    names = _all_torchlora_ops()
    assert "torchlora::linear_with_lora" in names
    missing = [
        name for name in names
        if not torch._C._dispatch_has_kernel_for_dispatch_key(name, "CompositeImplicitAutograd")
        and not (torch._C._dispatch_has_kernel_for_dispatch_key(name, "AutocastCPU")
                 and torch._C._dispatch_has_kernel_for_dispatch_key(name, "AutocastCUDA"))
    ]
    assert not missing, f"ops without an autocast kernel: {missing}"


def _linear_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, 24, generator=g)
    weight, bias = torch.randn(17, 24, generator=g) / 5, torch.randn(17, generator=g)
    lora_A, lora_B = torch.randn(4, 24, generator=g) / 5, torch.randn(17, 4, generator=g)
    return x, weight, bias, lora_A, lora_B


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_linear_with_lora_runs_in_the_autocast_dtype(dtype: torch.dtype, dropout_p: float) -> None:
    x, weight, bias, lora_A, lora_B = _linear_inputs()
    seed = torch.tensor([7])
    with torch.autocast("cpu", dtype=dtype):
        got = ops.linear_with_lora(x, weight, bias, lora_A, lora_B, None, 1.5, dropout_p, seed)
    # every operand cast but the frozen float32 weight, which the op rounds itself (with the
    # adapter where it folds it into the weight)
    x16, bias16, A16, B16 = (t.to(dtype) for t in (x, bias, lora_A, lora_B))
    want = ops.linear_with_lora(x16, weight, bias16, A16, B16, None, 1.5, dropout_p, seed)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    all_cast = ops.linear_with_lora(x16, weight.to(dtype), bias16, A16, B16, None, 1.5, dropout_p, seed)
    torch.testing.assert_close(got, all_cast, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("shape", [(17, 24), (64, 96), (33, 1000)])
def test_float32_weight_is_rounded_as_aten_rounds_it(dtype: torch.dtype, shape: tuple[int, int]) -> None:
    # with dropout the op rounds the float32 weight itself (into its per-thread buffer): the result is
    # the one of a weight that ATen rounded, to the bit; sizes with and without a vector tail,
    # and values at rounding ties and beyond float16's range
    g = torch.Generator().manual_seed(3)
    out_features, in_features = shape
    weight = torch.randn(out_features, in_features, generator=g) / 5
    flat = weight.view(-1)
    flat[:8] = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 2**-20, 70000.0, -1e-6, 0.0, 1 + 2**-11])
    x = torch.randn(9, in_features, generator=g).to(dtype)
    lora_A = (torch.randn(4, in_features, generator=g) / 5).to(dtype)
    lora_B = torch.randn(out_features, 4, generator=g).to(dtype)
    seed = torch.tensor([11])
    got = ops.linear_with_lora(x, weight, None, lora_A, lora_B, None, 1.5, 0.25, seed)
    want = ops.linear_with_lora(x, weight.to(dtype), None, lora_A, lora_B, None, 1.5, 0.25, seed)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("context", ["no_grad", "inference_mode", "frozen"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_input_cast_without_autograd_is_private_to_each_call(context: str, dropout_p: float) -> None:
    # without autograd the op casts x into a buffer it reuses (autocast.cpp): calls one after
    # another, on inputs of other shapes and strides, each get their own exact result
    x, weight, bias, lora_A, lora_B = _linear_inputs()
    lora_A.requires_grad_(context != "frozen")
    enter = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode, "frozen": torch.enable_grad}[context]
    inputs = [x, x.flip(0) * 3, x[:, :2], x.transpose(0, 1), x.reshape(-1, 24)[::2], x]
    seed = torch.tensor([7])
    results = []
    for xi in inputs:
        with enter(), torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(ops.linear_with_lora(xi, weight, bias, lora_A, lora_B, None, 1.5, dropout_p, seed))
    casts = (bias, lora_A.detach(), lora_B)
    for xi, got in zip(inputs, results):
        want = ops.linear_with_lora(xi.bfloat16(), weight, *(t.bfloat16() for t in casts), None, 1.5, dropout_p, seed)
        assert not got.requires_grad
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_training_under_autocast_keeps_no_rounded_copy_of_the_weight(dropout_p: float) -> None:
    # aten::linear under autocast saves a bfloat16 copy of every frozen weight for backward;
    # linear_with_lora saves the float32 weight itself
    x, weight, bias, lora_A, lora_B = _linear_inputs()
    lora_A.requires_grad_()
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = ops.linear_with_lora(x, weight, bias, lora_A, lora_B, None, 1.5, dropout_p, torch.tensor([7]))
    assert any(t is weight for t in saved)
    assert not any(t.shape == weight.shape and t.dtype == torch.bfloat16 for t in saved)
    out.float().sum().backward()
    assert lora_A.grad is not None and lora_A.grad.dtype == torch.float32


@pytest.mark.parametrize("dtype", LOW)
def test_lora_linear_and_conv2d_cast_and_embedding_keeps_float32(dtype: torch.dtype) -> None:
    x, weight, bias, lora_A, lora_B = _linear_inputs()
    base = torch.nn.functional.linear(x, weight, bias)
    with torch.autocast("cpu", dtype=dtype):
        assert ops.lora_linear(x, base, lora_A, lora_B, None, 2.0).dtype == dtype
        image = torch.randn(2, 3, 6, 6)
        conv_base = torch.nn.functional.conv2d(image, torch.randn(5, 3, 3, 3), padding=1)
        conv = ops.lora_conv2d(image, conv_base, torch.randn(4, 3, 3, 3), torch.randn(5, 4, 1, 1), None,
                               (1, 1), (1, 1), (1, 1), 1, 2.0)
        assert conv.dtype == dtype
        ids = torch.tensor([[1, 2, 3]])
        emb_base = torch.nn.functional.embedding(ids, torch.randn(10, 6))
        emb = ops.lora_embedding(ids, emb_base, torch.randn(4, 10), torch.randn(6, 4), 2.0)
    # aten::embedding is not autocast: neither is the adapter's lookup (PEFT's result is float32 too).
    assert emb.dtype == torch.float32


@pytest.mark.parametrize("dtype", LOW)
def test_in_place_update_keeps_the_callers_tensor(dtype: torch.dtype) -> None:
    x, weight, bias, lora_A, lora_B = _linear_inputs()
    for out_dtype in (torch.float32, dtype):
        base = torch.nn.functional.linear(x, weight, bias).to(out_dtype)
        expected = ops.lora_linear_(base.clone(), x.to(out_dtype), lora_A.to(out_dtype), lora_B.to(out_dtype),
                                    None, 2.0)
        with torch.autocast("cpu", dtype=dtype):
            returned = ops.lora_linear_(base, x, lora_A, lora_B, None, 2.0)
        assert returned.data_ptr() == base.data_ptr() and base.dtype == out_dtype
        torch.testing.assert_close(base, expected, rtol=0, atol=0)


class _Layers(nn.Module):
    """An embedding, linears and a conv2d on one input: every layer kind with its own op."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(VOCAB, 16)
        self.lin = nn.Linear(16, 24)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(4 * 24, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.lin(self.emb(ids)))  # [B, L, 24]
        return self.head(self.conv(h[:, None, :4]).mean(2).flatten(1))


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.detach().float() - want.detach().float()).norm() / want.float().norm().clamp_min(1e-12))


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("case", ["layers", "llama", "llama_dora", "two_adapters"])
def test_training_step_under_autocast_matches_peft(dtype: torch.dtype, case: str) -> None:
    builder, targets = (_Layers, ["emb", "lin", "conv"]) if case == "layers" else (
        llama, ["q_proj", "v_proj", "down_proj", "embed_tokens"])
    extra = {"use_dora": True} if case == "llama_dora" else {}

    def config(lib):
        return lib.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, **extra)

    ref, ours = build_pair(builder, config)
    if case == "two_adapters":
        for model, lib in ((ref, __import__("peft")), (ours, torchlora)):
            torch.manual_seed(5)
            model.add_adapter("other", config(lib))
        torchlora.set_peft_model_state_dict(
            ours, __import__("peft").get_peft_model_state_dict(ref, adapter_name="other"), adapter_name="other")
        for model in (ref, ours):
            model.base_model.set_adapter(["default", "other"])
    ids = input_ids(batch=2, length=6)
    # float32 without autocast is the truth; under autocast torchlora must be as close to it as
    # PEFT is (float16 gradients of a tiny model are coarse for both). The loss is scaled as a
    # GradScaler would, so that float16 gradients do not underflow.
    exact = logits(ref(ids)).detach()
    exact_grads = {n: g.clone() for n, g in grads_after(ref, ids).items()}
    outs, errors = [], []
    for model in (ref, ours):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=dtype):
            outs.append(logits(model(ids)))
        (outs[-1].float().square().mean() * 1024).backward()
        got = grads(model)
        assert set(got) == set(exact_grads)
        errors.append({n: _relative_error(g / 1024, exact_grads[n]) for n, g in got.items()})
        for n, g in got.items():
            assert g.dtype == torch.float32, n
    assert outs[1].dtype == outs[0].dtype
    assert _relative_error(outs[1], exact) <= max(2 * _relative_error(outs[0], exact), 1e-2)
    for name, peft_error in errors[0].items():
        assert errors[1][name] <= max(2 * peft_error, 2e-2), (name, errors[1][name], peft_error)


def grads_after(model, ids) -> dict[str, torch.Tensor]:
    """The adapter gradients of one float32 step (no autocast)."""
    model.zero_grad(set_to_none=True)
    logits(model(ids)).float().square().mean().backward()
    return grads(model)


@pytest.mark.parametrize("dtype", LOW)
def test_training_with_dropout_under_autocast(dtype: torch.dtype) -> None:
    model = torchlora.get_peft_model(_Layers(), torchlora.LoraConfig(
        r=4, target_modules=["emb", "lin", "conv"], lora_dropout=0.1, init_lora_weights=False))
    with torch.autocast("cpu", dtype=dtype):
        out = model(input_ids(batch=2, length=6))
    out.float().sum().backward()
    for name, grad in grads(model).items():
        assert grad.dtype == torch.float32 and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_compiled_forward_under_autocast_has_no_graph_break() -> None:
    torch._dynamo.reset()
    x, weight, bias, lora_A, lora_B = _linear_inputs()

    def step(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return ops.linear_with_lora(x, weight, bias, lora_A, lora_B, None, 2.0)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), step(x), rtol=0, atol=0)
