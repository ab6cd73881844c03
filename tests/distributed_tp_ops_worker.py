"""Run under torchrun (2 CPU processes, gloo; by tests/distributed_tp_worker.py): every torchlora
operator with a sharding rule, called on DTensors in the colwise, rowwise and replicated
layouts, gives the outputs and gradients of the same operator on the whole tensors."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

import torchlora.distributed  # noqa: F401  (registers the sharding rules)
from torchlora import ops
from torchlora.utils.distributed import end_process_group

TOL = {"rtol": 1e-10, "atol": 1e-10}  # float64: only the order of the sums differs


def close(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    got = got.full_tensor() if isinstance(got, DTensor) else got
    torch.testing.assert_close(got, want, **TOL, msg=lambda m: f"{name}: {m}")


def leaf(t: torch.Tensor, mesh, placement) -> DTensor:
    return distribute_tensor(t.detach(), mesh, [placement]).requires_grad_(t.requires_grad)


def full_grad(t: torch.Tensor) -> torch.Tensor:
    return t.grad.full_tensor() if isinstance(t.grad, DTensor) else t.grad


def compare(name, op, full_args, dtensor_args, expected_placement=None):
    """op on whole tensors vs op on DTensors: outputs, and the gradients of every input that
    requires grad (through the same random weighting of the output)."""
    want = op(*full_args)
    weights = torch.randn(want.shape, dtype=want.dtype)
    (want * weights).sum().backward()
    got = op(*dtensor_args)
    if expected_placement is not None:
        assert got.placements == (expected_placement,), f"{name}: output placed {got.placements}"
    close(name, got, want.detach())
    (got.full_tensor() * weights).sum().backward()
    for index, (f, d) in enumerate(zip(full_args, dtensor_args)):
        if isinstance(f, torch.Tensor) and f.requires_grad:
            close(f"{name} grad {index}", full_grad(d), f.grad)
    print(f"OK {name}", flush=True)


def check_operators() -> None:
    """Every check, on the process group already started."""
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)  # the same whole tensors on every rank
    R_, P_ = Replicate(), Partial()
    dtype = torch.float64
    IN, OUT, RANK = 8, 10, 3

    def tensors(bias: bool):
        x = torch.randn(2, 3, IN, dtype=dtype, requires_grad=True)
        t = {"x": x, "W": torch.randn(OUT, IN, dtype=dtype, requires_grad=True),
             "b": torch.randn(OUT, dtype=dtype, requires_grad=True) if bias else None,
             "A": torch.randn(RANK, IN, dtype=dtype, requires_grad=True),
             "B": torch.randn(OUT, RANK, dtype=dtype, requires_grad=True),
             "lb": torch.randn(OUT, dtype=dtype, requires_grad=True) if bias else None,
             "base": torch.randn(2, 3, OUT, dtype=dtype, requires_grad=True)}
        return t

    seed = torch.tensor([1234], dtype=torch.int64)
    seed_d = distribute_tensor(seed, mesh, [R_])
    layouts = {
        # name: (x, base_out, A, B, lora_bias / base bias, W)
        "colwise": (R_, Shard(2), R_, Shard(0), Shard(0), Shard(0)),
        "rowwise": (Shard(2), R_, Shard(1), R_, R_, Shard(1)),
        "replicate": (R_, R_, R_, R_, R_, R_),
    }
    for layout, (px, pbase, pA, pB, pbias, pW) in layouts.items():
        for p in (0.0, 0.3):
            for bias in (False, True):
                t = tensors(bias)
                d = {k: None if v is None else leaf(v, mesh, pl) for (k, v), pl in zip(
                    t.items(), (px, pW, pbias, pA, pB, pbias, pbase))}
                s = seed if p else None
                sd = seed_d if p else None
                # a rowwise output stays a partial sum (reduced once, by the caller) unless dropout gathers x;
                # (with dropout, or from replicated inputs, several layouts cost the same: not checked)
                placement = {"colwise": Shard(2), "rowwise": P_ if p == 0 else None, "replicate": None}[layout]
                compare(f"lora_linear {layout} p={p} bias={bias}", ops.lora_linear,
                        (t["x"], t["base"], t["A"], t["B"], t["lb"], 0.7, p, s),
                        (d["x"], d["base"], d["A"], d["B"], d["lb"], 0.7, p, sd), placement)
                t = tensors(bias)
                d = {k: None if v is None else leaf(v, mesh, pl) for (k, v), pl in zip(
                    t.items(), (px, pW, pbias, pA, pB, pbias, pbase))}
                compare(f"linear_with_lora {layout} p={p} bias={bias}", ops.linear_with_lora,
                        (t["x"], t["W"], t["b"], t["A"], t["B"], t["lb"], 0.7, p, s),
                        (d["x"], d["W"], d["b"], d["A"], d["B"], d["lb"], 0.7, p, sd))

    # inference mode reaches the public operator itself (no autograd kernel in between)
    t = tensors(True)
    with torch.inference_mode():
        want = ops.lora_linear(t["x"], t["base"], t["A"], t["B"], t["lb"], 0.5)
        got = ops.lora_linear(*(distribute_tensor(t[k].detach(), mesh, [pl]) for k, pl in
                                (("x", R_), ("base", Shard(2)), ("A", R_), ("B", Shard(0)), ("lb", Shard(0)))), 0.5)
    close("lora_linear inference_mode colwise", got, want)
    print("OK lora_linear inference_mode", flush=True)

    # local input and base output of a tensor-parallel base layer, factors as DTensors or plain
    rank, world = dist.get_rank(), dist.get_world_size()
    t = tensors(True)
    rows = slice(rank * OUT // world, (rank + 1) * OUT // world)
    x_local = t["x"].detach().clone().requires_grad_()
    A_plain = t["A"].detach().clone().requires_grad_()
    B_d = leaf(t["B"], mesh, Shard(0))
    lb_d = leaf(t["lb"], mesh, Shard(0))
    base_local = t["base"].detach()[..., rows].clone().requires_grad_()
    want = ops.lora_linear(t["x"], t["base"], t["A"], t["B"], t["lb"], 0.5, 0.3, seed)
    got = ops.lora_linear(x_local, base_local, A_plain, B_d, lb_d, 0.5, 0.3, seed)
    assert type(got) is torch.Tensor, type(got)
    close("mixed colwise output", got, want.detach()[..., rows])
    weights = torch.randn(want.shape, dtype=dtype)
    (want * weights).sum().backward()
    (got * weights[..., rows]).sum().backward()
    close("mixed colwise grad x (reduced)", x_local.grad, t["x"].grad)
    close("mixed colwise grad A (reduced)", A_plain.grad, t["A"].grad)
    close("mixed colwise grad B", B_d.grad, t["B"].grad)
    close("mixed colwise grad base_out", base_local.grad, t["base"].grad[..., rows])
    print("OK mixed colwise", flush=True)

    t = tensors(True)
    cols = slice(rank * IN // world, (rank + 1) * IN // world)
    x_local = t["x"].detach()[..., cols].clone().requires_grad_()
    A_d = leaf(t["A"], mesh, Shard(1))
    B_plain = t["B"].detach().clone().requires_grad_()
    lb_plain = t["lb"].detach().clone().requires_grad_()
    base_full = t["base"].detach().clone().requires_grad_()
    want = ops.lora_linear(t["x"], t["base"], t["A"], t["B"], t["lb"], 0.5)
    got = ops.lora_linear(x_local, base_full, A_d, B_plain, lb_plain, 0.5)
    close("mixed rowwise output (lora_bias added once)", got, want.detach())
    weights = torch.randn(want.shape, dtype=dtype)
    (want * weights).sum().backward()
    (got * weights).sum().backward()
    close("mixed rowwise grad x", x_local.grad, t["x"].grad[..., cols])
    close("mixed rowwise grad A", A_d.grad, t["A"].grad)
    close("mixed rowwise grad B", B_plain.grad, t["B"].grad)
    close("mixed rowwise grad base_out", base_full.grad, t["base"].grad)
    close("mixed rowwise grad lora_bias", lb_plain.grad, t["lb"].grad)
    print("OK mixed rowwise", flush=True)

    # factors sharded along their rank: no layout of the input or output fits, a clear error
    try:
        ops.lora_linear(x_local, base_full, leaf(t["A"], mesh, Shard(0)), B_plain, None, 0.5)
    except ValueError as error:
        assert "lora_A [r, in] must be replicated or sharded on dim 1" in str(error), error
    else:
        raise AssertionError("lora_A sharded on its rank was accepted")
    print("OK rank-sharded factors rejected", flush=True)

    # dropout: a sharded x is gathered (the mask follows the whole tensor's element index)
    x = torch.randn(4, IN, dtype=dtype, requires_grad=True)
    for placement in (Shard(1), Shard(0), R_):
        x.grad = None
        compare(f"dropout_apply {placement}", ops.dropout_apply, (x, 0.4, seed),
                (leaf(x, mesh, placement), 0.4, seed_d))
    partial = DTensor.from_local(x.detach() / world, mesh, [P_], run_check=False)
    close("dropout_apply partial", ops.dropout_apply(partial, 0.4, seed_d), ops.dropout_apply(x.detach(), 0.4, seed))
    print("OK dropout_apply partial", flush=True)

    # embedding: embedding_dim sharded
    V, D = 12, 10
    ids = torch.randint(0, V, (2, 5))
    A = torch.randn(RANK, V, dtype=dtype, requires_grad=True)
    B = torch.randn(D, RANK, dtype=dtype, requires_grad=True)
    base = torch.randn(2, 5, D, dtype=dtype, requires_grad=True)
    compare("lora_embedding colwise", ops.lora_embedding, (ids, base, A, B, 0.5, 3),
            (distribute_tensor(ids, mesh, [R_]), leaf(base, mesh, Shard(2)), leaf(A, mesh, R_), leaf(B, mesh, Shard(0)),
             0.5, 3), Shard(2))

    # the local ids and (reduced) output of a vocabulary-parallel embedding, lora_embedding_A
    # sharded on the vocabulary
    A.grad = B.grad = base.grad = None
    want = ops.lora_embedding(ids, base, A, B, 0.5, 3)
    A_d = leaf(A, mesh, Shard(1))
    B_plain = B.detach().clone().requires_grad_()
    got = ops.lora_embedding(ids, base.detach(), A_d, B_plain, 0.5, 3)
    assert type(got) is torch.Tensor, type(got)
    close("mixed embedding output", got, want.detach())
    weights = torch.randn(want.shape, dtype=dtype)
    (want * weights).sum().backward()
    (got * weights).sum().backward()
    close("mixed embedding grad A", A_d.grad, A.grad)
    close("mixed embedding grad B (reduced)", B_plain.grad, B.grad)
    print("OK mixed embedding", flush=True)

    # in-place operators refuse DTensors with a clear error
    t = tensors(False)
    try:
        with torch.no_grad():
            ops.lora_linear_(leaf(t["base"], mesh, Shard(2)), leaf(t["x"], mesh, R_), leaf(t["A"], mesh, R_),
                             leaf(t["B"], mesh, Shard(0)), None, 0.5)
    except Exception as error:  # DTensor may wrap the rule's NotImplementedError
        assert "does not take DTensor arguments" in str(error), error
    else:
        raise AssertionError("lora_linear_ took DTensors")
    print("OK lora_linear_ rejects DTensors", flush=True)

    dist.barrier()
    if rank == 0:
        print("ALL OK", flush=True)


if __name__ == "__main__":
    dist.init_process_group("gloo")
    try:
        check_operators()
    finally:
        end_process_group(completed=sys.exc_info()[0] is None)
