"""The CUDA kernels of the low-rank path against a float64 CPU reference, the CPU dropout mask
and PEFT's layers: all three dtypes, T from 1, odd sizes, strided inputs, ranks 1..80,
CUDA-graph capture and torch.compile(mode="reduce-overhead"). Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cuda_graph_capture import capture

import torchlora
from torchlora import ops

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DEV = "cuda"


def peft_layer(kind: str, base: nn.Module, r: int, lora_alpha: int, **options) -> nn.Module:
    """PEFT's own LoRA layer (`Linear` or `Embedding`) around `base`, B initialised non-zero."""
    peft_lora = pytest.importorskip("peft.tuners.lora.layer")
    from peft import LoraConfig

    options = {"init_lora_weights": False, **options}
    config = LoraConfig(r=r, lora_alpha=lora_alpha, **options)
    return getattr(peft_lora, kind)(base, "default", config=config, r=r, lora_alpha=lora_alpha, **options)


def keep_mask(shape: tuple[int, ...], p: float, seed: int) -> torch.Tensor:
    """The CPU kernel's dropout mask for a row-major tensor of `shape` (bool, CPU)."""
    ones = torch.ones(shape, dtype=torch.float64)
    return ops.dropout_apply(ones, p, torch.tensor([seed], dtype=torch.int64)) != 0


def check_error(actual: torch.Tensor, reference: torch.Tensor, plain: torch.Tensor, name: str) -> None:
    """The contract: error against float64 at most ~2x that of plain PyTorch in the same dtype
    (with a floor for float32, where both are near rounding noise)."""
    ref = reference.double().cpu()
    ours = (actual.double().cpu() - ref).abs().max().item()
    theirs = (plain.double().cpu() - ref).abs().max().item()
    scale = ref.abs().max().item() + 1.0
    floors = {torch.float32: 2e-5, torch.float64: 1e-6}  # float64: the [T, r] shrink is float32
    floor = floors.get(actual.dtype, 2 * torch.finfo(actual.dtype).eps) * scale
    assert ours <= max(2.0 * theirs, floor), f"{name}: error {ours:.3g} vs plain {theirs:.3g} (floor {floor:.3g})"


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """Equal up to the dtype's noise relative to the tensor's magnitude (PEFT rounds its
    intermediates to the dtype, torchlora keeps them in float32)."""
    rel = 1e-4 if actual.dtype == torch.float32 else 3e-2
    err = (actual.double() - expected.double()).abs().max().item()
    bound = rel * (expected.double().abs().max().item() + 1.0)
    assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g}"


def linear_formula(x, base, A, B, bias, scaling, mask, p):
    """PEFT's unfused computation in the inputs' dtype and device."""
    xd = x if mask is None else x * mask.to(x.device, x.dtype) / (1 - p)
    delta = (xd @ A.T) @ B.T
    if bias is not None:
        delta = delta + bias
    return base + scaling * delta


def run_linear_case(T, K, N, R, dtype, p, with_bias, *, strided=False, batch_dims=()):
    torch.manual_seed(T * 1000 + K + N + R)
    seed = 1234567 + T
    shape_x = (*batch_dims, T, K) if batch_dims else (T, K)
    tokens = T * (torch.Size(batch_dims).numel() if batch_dims else 1)
    x64 = torch.randn(shape_x, dtype=torch.float64)
    base64 = torch.randn((*shape_x[:-1], N), dtype=torch.float64)
    A64 = torch.randn(R, K, dtype=torch.float64) / K**0.5
    B64 = torch.randn(N, R, dtype=torch.float64) / R**0.5
    bias64 = torch.randn(N, dtype=torch.float64) if with_bias else None
    g64 = torch.randn((*shape_x[:-1], N), dtype=torch.float64)
    scaling = 1.7
    mask = keep_mask((tokens, K), p, seed).reshape(shape_x) if p > 0 else None

    def leaves(device, dt):
        ts = [t.to(device, dt).requires_grad_() for t in (x64, A64, B64)]
        b = bias64.to(device, dt).requires_grad_() if with_bias else None
        return ts, b

    # float64 CPU reference and plain same-dtype GPU computation
    (xr, Ar, Br), br = leaves("cpu", torch.float64)
    ref = linear_formula(xr, base64, Ar, Br, br, scaling, mask, p)
    ref_grads = torch.autograd.grad(ref, [xr, Ar, Br] + ([br] if with_bias else []), g64)
    (xp, Ap, Bp), bp = leaves(DEV, dtype)
    plain = linear_formula(xp, base64.to(DEV, dtype), Ap, Bp, bp, scaling, mask, p)
    plain_grads = torch.autograd.grad(plain, [xp, Ap, Bp] + ([bp] if with_bias else []), g64.to(DEV, dtype))

    # the op, optionally on strided views
    (xo, Ao, Bo), bo = leaves(DEV, dtype)
    base = base64.to(DEV, dtype)
    x_in = xo
    if strided:
        x_in = torch.stack([xo, torch.zeros_like(xo)], dim=-1)[..., 0]  # stride 2 in the feature dim
        base = base.transpose(-1, -2).contiguous().transpose(-1, -2)
        assert not x_in.is_contiguous() and not base.is_contiguous()
    seed_t = torch.tensor([seed], dtype=torch.int64, device=DEV) if p > 0 else None
    out = ops.lora_linear(x_in, base, Ao, Bo, bo, scaling, p, seed_t)
    grads = torch.autograd.grad(out, [xo, Ao, Bo] + ([bo] if with_bias else []), g64.to(DEV, dtype))

    assert out.shape == ref.shape and out.dtype == dtype
    check_error(out, ref.detach(), plain.detach(), "out")
    for name, ours, r, pl in zip(["grad_x", "grad_A", "grad_B", "grad_lora_bias"], grads, ref_grads, plain_grads):
        assert ours.shape == r.shape, name
        check_error(ours, r, pl, name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("R", [1, 8, 16, 64, 80])
@pytest.mark.parametrize("T,K,N", [(1, 64, 48), (37, 67, 45), (300, 256, 130), (1, 4096, 512)])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_linear_matches_reference(T, K, N, R, dtype, p):
    run_linear_case(T, K, N, R, dtype, p, with_bias=(R % 2 == 0))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_linear_strided_and_batched_inputs(dtype, p):
    run_linear_case(19, 33, 21, 8, dtype, p, with_bias=True, strided=True, batch_dims=(3,))


def test_linear_many_tokens_split_over_tokens():
    run_linear_case(5000, 96, 70, 16, torch.bfloat16, 0.1, with_bias=True)


def test_linear_dropout_mask_matches_cpu_in_forward_and_backward():
    """With A = B = I, x = 1 and g = 1 the op exposes the mask: out = keep / (1-p),
    grad_x = keep / (1-p), grad_A = column sums of keep / (1-p); all must equal the CPU kernel's
    mask for the same seed (rank 67: beyond one rank tile)."""
    T, K, p, seed = 29, 67, 0.3, 987654321
    mask = keep_mask((T, K), p, seed).to(DEV, torch.float32)
    x = torch.ones(T, K, device=DEV, requires_grad=True)
    A = torch.eye(K, device=DEV, requires_grad=True)
    B = torch.eye(K, device=DEV, requires_grad=True)
    for seed_device in ("cpu", DEV):
        seed_t = torch.tensor([seed], dtype=torch.int64, device=seed_device)
        out = ops.lora_linear(x, torch.zeros(T, K, device=DEV), A, B, None, 1.0, p, seed_t)
        torch.testing.assert_close(out, mask / (1 - p), rtol=1e-6, atol=1e-6)
        gx, gA = torch.autograd.grad(out, [x, A], torch.ones(T, K, device=DEV))
        torch.testing.assert_close(gx, mask / (1 - p), rtol=1e-6, atol=1e-6)
        column_sums = torch.ones(K, T, device=DEV) @ mask / (1 - p)
        torch.testing.assert_close(gA, column_sums, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out, ops.dropout_apply(torch.ones(T, K, device=DEV), p, seed_t))


def test_linear_dropout_zero_saves_no_activation_copy():
    """Backward keeps x (alive anyway) and the [T, r] float32 shrink, never a [T, in] mask."""
    T, K, N, R = 64, 128, 96, 8
    x = torch.randn(T, K, device=DEV, requires_grad=True)
    A = torch.randn(R, K, device=DEV, requires_grad=True)
    B = torch.randn(N, R, device=DEV, requires_grad=True)
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    for p in (0.0, 0.5):
        saved.clear()
        seed = ops.make_seed(DEV) if p else None
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = ops.lora_linear(x, torch.zeros(T, N, device=DEV), A, B, None, 1.0, p, seed)
        big = [t for t in saved if t.numel() >= T * K and t.data_ptr() != x.data_ptr()]
        assert not big, f"p={p}: saved activation-sized tensors {[tuple(t.shape) for t in big]}"
        out.sum().backward()


def test_linear_float64_falls_back_to_aten():
    run_linear_case(7, 13, 11, 4, torch.float64, 0.2, with_bias=True)


def test_built_with_cuda_kernels():
    assert torchlora.build_info()["cuda"], "torchlora was built without its CUDA kernels (TORCHLORA_CUDA=1)"


def test_linear_cuda_graph_capture_and_replay():
    T, K, N, R, p = 24, 80, 40, 16, 0.2
    x = torch.randn(T, K, device=DEV, requires_grad=True)
    base = torch.randn(T, N, device=DEV)
    A = torch.randn(R, K, device=DEV, requires_grad=True)
    B = torch.randn(N, R, device=DEV, requires_grad=True)
    g = torch.randn(T, N, device=DEV)
    seed = torch.tensor([11], dtype=torch.int64, device=DEV)

    def step():
        out = ops.lora_linear(x, base, A, B, None, 0.5, p, seed)
        return (out, *torch.autograd.grad(out, [x, A, B], g))

    graph, static = capture(step)
    for new_seed in (11, 12, 99):
        seed.fill_(new_seed)  # read on the device by the replayed kernels
        with torch.no_grad():
            x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        eager = step()
        for s, e in zip(static, eager):
            torch.testing.assert_close(s, e, rtol=0, atol=0)


def test_linear_torch_compile_reduce_overhead():
    T, K, N, R = 16, 64, 32, 8
    A = torch.randn(R, K, device=DEV, requires_grad=True)
    B = torch.randn(N, R, device=DEV, requires_grad=True)

    def f(x, base, seed):
        return ops.lora_linear(x, base, A, B, None, 2.0, 0.1, seed)

    compiled = torch.compile(f, mode="reduce-overhead", fullgraph=True)
    for step in range(4):
        x = torch.randn(T, K, device=DEV)
        base = torch.randn(T, N, device=DEV)
        seed = torch.tensor([step], dtype=torch.int64, device=DEV)
        out = compiled(x, base, seed).clone()
        gA, gB = torch.autograd.grad(out.sum(), [A, B])
        ref = f(x, base, seed)
        rA, rB = torch.autograd.grad(ref.sum(), [A, B])
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(gA, rA)
        torch.testing.assert_close(gB, rB)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("R", [1, 16, 64])
def test_linear_layer_matches_peft(dtype, R):
    torch.manual_seed(R)
    base = nn.Linear(96, 72).to(DEV, dtype).requires_grad_(False)
    ref = peft_layer("Linear", base, R, 2 * R, lora_bias=True)
    ours = torchlora.LoraLinear(nn.Linear(96, 72).to(DEV, dtype).requires_grad_(False), "default", r=R,
                                lora_alpha=2 * R, init_lora_weights=False, lora_bias=True)
    ours.load_state_dict(ref.state_dict())
    x_ref = torch.randn(5, 7, 96, device=DEV, dtype=dtype, requires_grad=True)
    x_ours = x_ref.detach().clone().requires_grad_()
    y_ref, y_ours = ref(x_ref), ours(x_ours)
    g = torch.randn_like(y_ref)
    y_ref.backward(g)
    y_ours.backward(g)
    assert_close_scaled(y_ours, y_ref, "out")
    assert_close_scaled(x_ours.grad, x_ref.grad, "grad_x")
    ref_params = dict(ref.named_parameters())
    for name, param in ours.named_parameters():
        if param.requires_grad:
            assert_close_scaled(param.grad, ref_params[name].grad, name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ids_dtype", [torch.int64, torch.int32], ids=str)
@pytest.mark.parametrize("R", [1, 16, 80])
def test_embedding_forward_fused_gather_expand(dtype, ids_dtype, R):
    torch.manual_seed(R)
    V, D = 101, 75
    ids = torch.randint(0, V, (3, 17), device=DEV, dtype=ids_dtype)
    base = torch.randn(3, 17, D, device=DEV, dtype=dtype)
    A = torch.randn(R, V, device=DEV, dtype=dtype, requires_grad=True)
    B = torch.randn(D, R, device=DEV, dtype=dtype, requires_grad=True)
    out = ops.lora_embedding(ids, base, A, B, 0.75)
    A64, B64 = A.detach().double().cpu().requires_grad_(), B.detach().double().cpu().requires_grad_()
    ref = base.double().cpu() + 0.75 * A64.T[ids.long().cpu()] @ B64.T
    plain = base + 0.75 * (A.detach().T[ids.long()] @ B.detach().T)
    check_error(out, ref.detach(), plain, "out")
    g = torch.randn_like(out)
    gA, gB = torch.autograd.grad(out, [A, B], g)
    rA, rB = torch.autograd.grad(ref, [A64, B64], g.double().cpu())
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 3e-2, "atol": 3e-2}
    torch.testing.assert_close(gA.double().cpu(), rA, **tol)
    torch.testing.assert_close(gB.double().cpu(), rB, **tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_embedding_layer_matches_peft(dtype):
    torch.manual_seed(0)
    base = nn.Embedding(50, 24).to(DEV, dtype).requires_grad_(False)
    ref = peft_layer("Embedding", base, 8, 16)
    ours = torchlora.LoraEmbedding(nn.Embedding(50, 24).to(DEV, dtype).requires_grad_(False), "default", r=8,
                                   lora_alpha=16, init_lora_weights=False)
    ours.load_state_dict(ref.state_dict())
    ids = torch.randint(0, 50, (4, 9), device=DEV)
    assert_close_scaled(ours(ids), ref(ids), "out")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("groups,R,with_bias", [(1, 8, False), (2, 8, True), (1, 64, True)])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_conv2d_fused_expand(dtype, groups, R, with_bias, p):
    torch.manual_seed(R + groups)
    x = torch.randn(2, 6, 11, 9, device=DEV, dtype=dtype, requires_grad=True)
    A = torch.randn(R, 6, 3, 3, device=DEV, dtype=dtype, requires_grad=True)
    B = torch.randn(10, R // groups, 1, 1, device=DEV, dtype=dtype, requires_grad=True)
    bias = torch.randn(10, device=DEV, dtype=dtype) if with_bias else None
    base = torch.randn(2, 10, 6, 5, device=DEV, dtype=dtype)
    seed = 4242
    seed_t = torch.tensor([seed], dtype=torch.int64, device=DEV) if p else None
    out = ops.lora_conv2d(x, base, A, B, bias, (2, 2), (1, 1), (1, 1), groups, 0.5, p, seed_t)

    def formula(x, A, B, bias, base):
        xd = x if not p else x * keep_mask(tuple(x.shape), p, seed).to(x.device, x.dtype) / (1 - p)
        h = torch.nn.functional.conv2d(xd, A, None, 2, 1, 1)
        return base + 0.5 * torch.nn.functional.conv2d(h, B, bias, 1, 0, 1, groups)

    leaves64 = [t.detach().double().cpu().requires_grad_() for t in (x, A, B)]
    ref = formula(*leaves64, None if bias is None else bias.double().cpu(), base.double().cpu())
    plain = formula(x.detach(), A.detach(), B.detach(), bias, base)
    check_error(out, ref.detach(), plain, "out")
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, A, B], g)
    refs = torch.autograd.grad(ref, leaves64, g.double().cpu())
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 5e-2, "atol": 5e-2}
    for ours, r in zip(grads, refs):
        torch.testing.assert_close(ours.double().cpu(), r, **tol)


def test_conv2d_channels_last_base_keeps_its_layout():
    x = torch.randn(2, 4, 8, 8, device=DEV).to(memory_format=torch.channels_last)
    A = torch.randn(4, 4, 1, 1, device=DEV)
    B = torch.randn(6, 4, 1, 1, device=DEV)
    base = torch.randn(2, 6, 8, 8, device=DEV).to(memory_format=torch.channels_last)
    out = ops.lora_conv2d(x, base, A, B, None, (1, 1), (0, 0), (1, 1), 1, 1.0)
    ref = base + torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, A), B)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_linear_with_lora_matches_cpu_and_its_mask_bits(p):
    """The layer op on CUDA (base GEMM + the lora_linear kernels) equals the CPU op in float64
    terms, and its dropped bits equal the CPU kernel's."""
    torch.manual_seed(0)
    x = torch.randn(3, 37, 45, dtype=torch.float64)
    W, b = torch.randn(21, 45, dtype=torch.float64), torch.randn(21, dtype=torch.float64)
    A, B = torch.randn(6, 45, dtype=torch.float64), torch.randn(21, 6, dtype=torch.float64)
    seed = torch.tensor([1234], dtype=torch.int64) if p else None
    cpu = [t.clone().requires_grad_(True) for t in (x, W, b, A, B)]
    gpu = [t.to(DEV, torch.float32).requires_grad_(True) for t in (x, W, b, A, B)]
    out_cpu = ops.linear_with_lora(cpu[0], cpu[1], cpu[2], cpu[3], cpu[4], None, 0.5, p, seed)
    out_gpu = ops.linear_with_lora(gpu[0], gpu[1], gpu[2], gpu[3], gpu[4], None, 0.5, p,
                                   None if seed is None else seed.to(DEV))
    grad = torch.randn_like(out_cpu)
    out_cpu.backward(grad)
    out_gpu.backward(grad.to(DEV, torch.float32))
    torch.testing.assert_close(out_gpu.double().cpu(), out_cpu, rtol=1e-3, atol=1e-3)
    for c, g in zip(cpu, gpu):
        torch.testing.assert_close(g.grad.double().cpu(), c.grad, rtol=1e-3, atol=1e-3)
    if p:
        forward = torch.ops.torchlora._linear_with_lora_forward
        bits_cpu = forward(*(t.detach() for t in cpu[:3]), cpu[3].detach(), cpu[4].detach(), None, 0.5, p, seed, True)[2]
        bits_gpu = forward(*(t.detach() for t in gpu[:3]), gpu[3].detach(), gpu[4].detach(), None, 0.5, p,
                           seed.to(DEV), True)[2]
        assert torch.equal(bits_gpu.cpu(), bits_cpu)
