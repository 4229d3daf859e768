"""The fused CPU push (csrc/cpu_push.c) against an element-wise torch oracle, bit for bit."""

import warnings

import pytest
import torch

from lawa_optim import ops
from lawa_optim.backends import cpu_kernels
from lawa_optim.history import Bucket

DTYPES = (torch.float32, torch.bfloat16, torch.float16)

pytestmark = pytest.mark.skipif(cpu_kernels.library() is None, reason="no C compiler for the fused CPU push")


def special_values(n: int, seed: int) -> torch.Tensor:
    """Random values over many scales plus the edge cases of the casts: signed zeros,
    infinities, NaN, float32 subnormals, bfloat16 rounding ties, float16 overflow."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 10 ** torch.randint(-8, 8, (n,), generator=g).float()
    edge = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40, -3e-39,
                         1.0 + 2**-8, 1.0 + 3 * 2**-8, 65520.0, 7e4, 2**-25])
    x[: len(edge)] = edge
    return x


def oracle_push(ring, total, params, n, k):
    """One snapshot by the contract in lawa_optim.ops, element-wise torch ops only."""
    s = n % k
    new = torch.cat([p.reshape(-1) for p in params]).to(ring.dtype)
    old = ring[s].clone()
    ring[s] = new
    if (n + 1) % k == 0:  # the refresh: the filled slots summed in slot order
        total.zero_()
        for slot in ring[: min(n + 1, k)]:
            total += slot.float()
    else:
        total += new.float() - old.float() if n >= k else new.float()


@pytest.mark.parametrize("pdtype", DTYPES, ids=str)
@pytest.mark.parametrize("hdtype", DTYPES, ids=str)
def test_fused_push_is_bit_identical_to_the_contract(pdtype, hdtype):
    # Sizes multiple of ALIGN so the oracle's flat buffers line up with the ring; one
    # parameter spans three work rows (ROW = 65536).
    shapes = [(64,), (3 * cpu_kernels.ROW + 64,), (128, 3)]
    params = [torch.zeros(s, dtype=pdtype) for s in shapes]
    k = 3
    b = Bucket(params, k, "uniform", hdtype, "device", "torch")
    D = sum(p.numel() for p in params)
    ring, total = torch.zeros(k, D, dtype=hdtype), torch.zeros(D)
    for n in range(2 * k + 1):
        for i, p in enumerate(params):
            p.copy_(special_values(p.numel(), seed=10 * n + i).view(p.shape))
        ops.push(b)
        oracle_push(ring, total, params, n, k)
    assert torch.equal(b.ring.view(torch.int16 if hdtype != torch.float32 else torch.int32),
                       ring.view(torch.int16 if hdtype != torch.float32 else torch.int32))
    assert torch.equal(b.total.view(torch.int32), total.view(torch.int32))


def test_fused_and_plain_push_agree_bit_for_bit(monkeypatch):
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=g) for s in [(1,), (7,), (70_001,), (33, 65)]]
    runs = {}
    for fused in (True, False):
        monkeypatch.setattr(cpu_kernels, "enabled", fused)
        ps = [p.clone() for p in params]
        b = Bucket(ps, 4, "uniform", torch.bfloat16, "device", "torch")
        for step in range(9):
            for p in ps:
                p.mul_(0.9).add_(1e-3 * step)
            ops.push(b)
        runs[fused] = (b.ring.clone(), b.total.clone())
    assert torch.equal(runs[True][0].view(torch.int16), runs[False][0].view(torch.int16))
    assert torch.equal(runs[True][1].view(torch.int32), runs[False][1].view(torch.int32))


def test_float64_and_disabled_use_the_plain_code(monkeypatch):
    p64 = [torch.ones(5, dtype=torch.float64)]
    assert not cpu_kernels.runs(Bucket(p64, 2, "uniform", None, "device", "torch"))
    b = Bucket([torch.ones(5)], 2, "uniform", None, "device", "torch")
    assert cpu_kernels.runs(b)
    monkeypatch.setattr(cpu_kernels, "enabled", False)
    assert not cpu_kernels.runs(b)


def test_missing_compiler_warns_once_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(cpu_kernels, "_lib", None)
    monkeypatch.setattr(cpu_kernels, "_error", None)
    with pytest.warns(UserWarning, match="could not be built.*no-such-cc"):
        assert cpu_kernels.library() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu_kernels.library() is None
    b = Bucket([torch.ones(5)], 2, "uniform", None, "device", "torch")
    assert not cpu_kernels.runs(b)
    ops.push(b)
    assert torch.equal(b.total[:5], torch.ones(5)) and not b.total[5:].any()
