"""The CPU kernels' lower vector paths (AVX-512 without the bfloat16 dot product; AVX2 and scalar
Philox; BLAS with corrections instead of the AVX-512 low-rank kernels), forced with
TORCHLORA_CPU_ISA in a subprocess, against this CPU's best path: identical dropout masks and
bits, the same numbers. A forced path that is
this CPU's best path already is skipped (it would compare a path with itself)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import torchlora
from torchlora import ops

PYTHON_DIR = os.path.dirname(os.path.dirname(os.path.abspath(torchlora.__file__)))

# Writes the results of one fixed computation to argv[1].
SCRIPT = r"""
import sys, torch, torchlora
from torchlora import ops
torch.manual_seed(0)
x = torch.randn(3, 41, 77, requires_grad=True)
W = torch.randn(29, 77, requires_grad=True)
b = torch.randn(29, requires_grad=True)
A = torch.randn(5, 77, requires_grad=True)
B = torch.randn(29, 5, requires_grad=True)
seed = torch.tensor([987654321], dtype=torch.int64)
results = {"isa": torchlora._C.cpu_kernel_isa(), "mask": ops.dropout_apply(torch.ones(1000, 37), 0.3, seed)}
for p in (0.0, 0.1):
    out = ops.linear_with_lora(x, W, b, A, B, None, 0.7, p, seed if p else None)
    grads = torch.autograd.grad(out, (x, W, b, A, B), torch.ones_like(out))
    results[f"out{p}"] = out.detach()
    results[f"grads{p}"] = [g.detach() for g in grads]
for p in (0.0, 0.1):
    leaves = [t.detach().bfloat16().requires_grad_() for t in (x, W, b, A, B)]
    out = ops.linear_with_lora(*leaves[:3], leaves[3], leaves[4], None, 0.7, p, seed if p else None)
    results[f"bf16_out{p}"] = out.detach()
    results[f"bf16_grads{p}"] = [g.detach() for g in torch.autograd.grad(out, leaves, torch.ones_like(out))]
forward = torch.ops.torchlora._linear_with_lora_forward
results["bits"] = forward(x.detach(), W.detach(), b.detach(), A.detach(), B.detach(), None, 0.7, 0.1, seed, True)[2]
torch.save(results, sys.argv[1])
"""


def run(tmp_path, isa: str | None) -> dict:
    path = tmp_path / f"{isa or 'default'}.pt"
    env = {**os.environ, "PYTHONPATH": PYTHON_DIR}
    env.pop("TORCHLORA_CPU_ISA", None)
    if isa is not None:
        env["TORCHLORA_CPU_ISA"] = isa
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(path)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(path)


ISA_ORDER = ["scalar", "avx2", "avx512", "avx512_bf16"]


def best_isa() -> str:
    """This CPU's best path (what a process without TORCHLORA_CPU_ISA takes)."""
    env = {**os.environ, "PYTHONPATH": PYTHON_DIR}
    env.pop("TORCHLORA_CPU_ISA", None)
    done = subprocess.run([sys.executable, "-c", "import torchlora; print(torchlora._C.cpu_kernel_isa())"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize("isa", ["avx512", "avx2", "scalar"])
def test_lower_isa_paths_give_the_same_masks_and_numbers(tmp_path, isa):
    best = best_isa()
    if ISA_ORDER.index(best) <= ISA_ORDER.index(isa):
        pytest.skip(f"this CPU's best path is {best}: forcing {isa} would compare {best} with itself")
    want, got = run(tmp_path, None), run(tmp_path, isa)
    assert (want["isa"], got["isa"]) == (best, isa)  # the two runs took different paths
    assert torch.equal(got["mask"], want["mask"])
    assert torch.equal(got["bits"], want["bits"])
    for p in (0.0, 0.1):
        torch.testing.assert_close(got[f"out{p}"], want[f"out{p}"], rtol=1e-4, atol=1e-4)
        for g, w in zip(got[f"grads{p}"], want[f"grads{p}"]):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-3)
        # bfloat16: the paths round at different points (the fused kernels once per result).
        assert relative_error(got[f"bf16_out{p}"], want[f"bf16_out{p}"]) < 1e-2
        for g, w in zip(got[f"bf16_grads{p}"], want[f"bf16_grads{p}"]):
            assert g.dtype == w.dtype == torch.bfloat16 and relative_error(g, w) < 2e-2


def test_the_mask_is_philox_of_the_element_index():
    """The scalar Philox-4x32-10 written out in Python: element 4q + lane is kept when word
    `lane` of philox(counter=q, key=seed) is at least p * 2^32.

    An independent oracle: its constants are the published Philox-4x32 ones (Salmon et al.,
    Random123), written here on purpose instead of read from detail/philox_dropout.h, so that
    a wrong constant there fails this test."""
    def philox(counter: int, key: int) -> list[int]:
        m = 0xFFFFFFFF
        c = [counter & m, counter >> 32, 0, 0]
        k0, k1 = key & m, key >> 32
        for _ in range(10):
            p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
            c = [((p1 >> 32) ^ c[1] ^ k0) & m, p1 & m, ((p0 >> 32) ^ c[3] ^ k1) & m, p0 & m]
            k0, k1 = (k0 + 0x9E3779B9) & m, (k1 + 0xBB67AE85) & m
        return c

    p, key, n = 0.3, 987654321, 203
    threshold = int(p * 2**32)
    want = torch.tensor([philox(e // 4, key)[e % 4] >= threshold for e in range(n)])
    got = ops.dropout_apply(torch.ones(n, dtype=torch.float64), p, torch.tensor([key])) != 0
    assert torch.equal(got, want)


def test_a_bad_isa_setting_is_an_error(tmp_path):
    env = {**os.environ, "PYTHONPATH": PYTHON_DIR, "TORCHLORA_CPU_ISA": "sse9"}
    code = "import torch, torchlora; torchlora.ops.dropout_apply(torch.ones(8), 0.5, torch.tensor([1]))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode != 0 and "TORCHLORA_CPU_ISA must be avx512_bf16, avx512, avx2 or scalar" in done.stderr


@pytest.mark.parametrize("isa", ["avx2", "scalar"])
def test_autocast_tests_pass_on_the_lower_paths(isa):
    # test_autocast.py compares calls that must round and sum alike (the reused cast buffer of x
    # against autocast's own cast); without the AVX-512 kernels the generic path's GEMMs run, whose
    # order of summation follows x's strides
    best = best_isa()
    if ISA_ORDER.index(best) <= ISA_ORDER.index(isa):
        pytest.skip(f"this CPU's best path is {best}: the plain run of test_autocast.py covers {isa}")
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([PYTHON_DIR, tests_dir]), "TORCHLORA_CPU_ISA": isa}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.join(tests_dir, "test_autocast.py")],
        capture_output=True, text=True, env=env, timeout=600, cwd=tests_dir,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
