"""Kernel entry points (lawa_optim.ops) on every backend against hand-kept oracles.

The oracle keeps each snapshot as its own tensor (cast with ``Tensor.to``) and replays
the running sum per parameter, independently of the flat layout; averages are also
checked against float64 means.
"""

import pytest
import torch

from lawa_optim import ops
from lawa_optim.history import ALIGN, Bucket, accumulation_dtype

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
COMBOS = [(p, h) for p in DTYPES for h in DTYPES] + [(torch.float64, torch.float64)]
# One ulp of the parameter dtype (relative): the cast of the average may round either way
# of a float64 mean.
RTOL = {torch.float32: 1e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10, torch.float64: 1e-12}


def make_params(device, dtype, seed=0):
    """Edge shapes: 1 element, odd and prime sizes, a channels_last conv weight, > ALIGN."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(1,), (7,), (3, 5), (ALIGN + 1,), (2 * ALIGN,)]
    ps = [torch.randn(s, generator=g, dtype=torch.float64).to(device, dtype) for s in shapes]
    conv = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64).to(device, dtype)
    ps.append(conv.contiguous(memory_format=torch.channels_last))
    return ps


def randomize(params, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 3)


def skip_unless(backend, pdtype, hdtype, device):
    probe = Bucket.__new__(Bucket)
    probe.device = probe.param_device = device
    probe.dtype, probe.history_dtype = pdtype, hdtype
    reason = ops.unavailable(backend, probe)
    if reason is not None:
        pytest.skip(reason)


class Oracle:
    """Snapshots kept one tensor each, the running sum replayed per parameter."""

    def __init__(self, params, k, hdtype):
        self.k, self.hdtype = k, hdtype
        self.snaps: list[list[torch.Tensor]] = []
        acc = accumulation_dtype(params[0].dtype)
        self.total = [torch.zeros(p.shape, dtype=acc) for p in params]

    def push(self, params):
        new = [p.detach().to("cpu", self.hdtype, copy=True) for p in params]
        old = self.snaps[-self.k] if len(self.snaps) >= self.k else None
        self.snaps.append(new)
        if len(self.snaps) % self.k == 0:  # the refresh: the sum of the slots, in slot order
            slots = self.snaps[-self.k:]  # the push that completes a pass: slot s = snaps[-k + s]
            for i, t in enumerate(self.total):
                t.zero_()
                for snap in slots:
                    t.add_(snap[i].to(t.dtype))
            return
        for i, t in enumerate(self.total):
            diff = new[i].to(t.dtype) - (old[i].to(t.dtype) if old is not None else 0)
            t.add_(diff)

    def mean64(self, last=None):
        held = self.snaps[-min(len(self.snaps), self.k):]
        if last is not None:
            held = held[-last:]
        return [torch.stack([s[i].double() for s in held]).mean(0) for i in range(len(self.total))]


@pytest.mark.parametrize("pdtype,hdtype", COMBOS, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("k", [1, 3])
def test_push_and_swap_match_oracle(backend, device, pdtype, hdtype, k):
    skip_unless(backend, pdtype, hdtype, device)
    params = make_params(device, pdtype)
    b = Bucket(params, k, "uniform", hdtype, "device", backend)
    oracle = Oracle(params, k, hdtype)
    for step in range(k + 3):  # fills the ring, then wraps it
        randomize(params, seed=step)
        ops.push(b)
        oracle.push(params)
        assert int(b.pushes) == step + 1
        slot = b.ring[step % k]
        for i, p in enumerate(params):
            assert torch.equal(b.view(slot, i).cpu(), oracle.snaps[-1][i]), f"slot of param {i}"
            assert torch.equal(b.view(b.total, i).cpu(), oracle.total[i]), f"sum of param {i}, step {step}"

    randomize(params, seed=99)
    live = [p.detach().clone() for p in params]
    ptrs = [p.data_ptr() for p in params]
    b.backup = torch.empty(b.D, dtype=b.dtype, device=b.device)
    ops.swap_in(b, None)
    count = min(k + 3, k)
    for i, (p, m) in enumerate(zip(params, oracle.mean64())):
        exact = (oracle.total[i] / count).to(pdtype)  # the contract: total / count, cast
        assert torch.equal(p.cpu(), exact), f"average of param {i}"
        torch.testing.assert_close(p.cpu().double(), m, rtol=RTOL[pdtype], atol=1e-6)
        assert torch.equal(b.view(b.backup, i), live[i])
    assert [p.data_ptr() for p in params] == ptrs
    ops.swap_back(b)
    for p, x in zip(params, live):
        assert torch.equal(p, x)


@pytest.mark.parametrize("pdtype,hdtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)], ids=str)
def test_swap_in_last_j(backend, device, pdtype, hdtype):
    skip_unless(backend, pdtype, hdtype, device)
    params = make_params(device, pdtype)
    k = 4
    b = Bucket(params, k, "uniform", hdtype, "device", backend)
    oracle = Oracle(params, k, hdtype)
    for step in range(6):
        randomize(params, seed=step)
        ops.push(b)
        oracle.push(params)
    for j in range(1, k + 1):
        b.backup = torch.empty(b.D, dtype=b.dtype, device=b.device)
        ops.swap_in(b, j)
        for i, (p, m) in enumerate(zip(params, oracle.mean64(last=j))):
            acc = torch.zeros(p.shape, dtype=torch.float32)
            for snap in reversed(oracle.snaps[-j:]):  # newest first, as the contract says
                acc += snap[i].float()
            assert torch.equal(p.cpu(), (acc / j).to(pdtype)), f"last={j}, param {i}"
            torch.testing.assert_close(p.cpu().double(), m, rtol=RTOL[pdtype], atol=1e-6)
        ops.swap_back(b)


@pytest.mark.parametrize("pdtype", DTYPES, ids=str)
def test_ema_matches_float64(backend, device, pdtype):
    skip_unless(backend, pdtype, pdtype, device)
    params = make_params(device, pdtype)
    decay = 0.75
    b = Bucket(params, 3, "ema", None, "device", backend)
    assert b.ring is None
    ema = None
    for step in range(5):
        randomize(params, seed=step)
        ops.ema_update(b, decay)
        theta = [p.detach().cpu().double() for p in params]
        ema = theta if ema is None else [decay * e + (1 - decay) * t for e, t in zip(ema, theta)]
        for i, e in enumerate(ema):
            torch.testing.assert_close(b.view(b.total, i).cpu().double(), e, rtol=1e-6, atol=1e-6)
    b.backup = torch.empty(b.D, dtype=b.dtype, device=b.device)
    ops.swap_in(b, None)
    for i, p in enumerate(params):
        assert torch.equal(p.cpu(), b.view(b.total, i).cpu().to(pdtype))


@pytest.mark.parametrize("hdtype", DTYPES, ids=str)
def test_recompute_is_the_sum_of_filled_slots(backend, device, hdtype):
    skip_unless(backend, torch.float32, hdtype, device)
    params = make_params(device, torch.float32)
    k = 3
    for pushes in (2, 7):  # ring partly filled, ring full
        b = Bucket(params, k, "uniform", hdtype, "device", backend)
        for step in range(pushes):
            randomize(params, seed=step)
            ops.push(b)
        b.total.fill_(123.0)  # garbage the recompute must wipe
        ops.recompute(b)
        expect = torch.zeros(b.D, dtype=torch.float32, device=device)
        for s in range(min(pushes, k)):
            expect += b.ring[s].float()
        assert torch.equal(b.total, expect)


def test_backends_agree_bit_for_bit(backend, device):
    """Every backend leaves exactly the reference's ring, sum and averages."""
    if backend == "torch":
        pytest.skip("the torch backend is the reference")
    for pdtype, hdtype in [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16), (torch.float16, torch.float16)]:
        runs = {}
        for name in ("torch", backend):
            params = make_params(device, pdtype)
            b = Bucket(params, 3, "uniform", hdtype, "device", name)
            for step in range(5):
                randomize(params, seed=step)
                ops.push(b)
            b.backup = torch.empty(b.D, dtype=b.dtype, device=b.device)
            ops.swap_in(b, 2)
            runs[name] = (b.ring.clone(), b.total.clone(), [p.clone() for p in params])
        (r0, t0, p0), (r1, t1, p1) = runs["torch"], runs[backend]
        assert torch.equal(r0, r1) and torch.equal(t0, t1), f"{pdtype}/{hdtype}"
        assert all(torch.equal(a, c) for a, c in zip(p0, p1)), f"{pdtype}/{hdtype}"


def test_many_small_parameters(backend, device):
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(1 + i % 5, generator=g).to(device) for i in range(1000)]
    b = Bucket(params, 2, "uniform", None, "device", backend)
    oracle = Oracle(params, 2, torch.float32)
    for step in range(3):
        for p in params:
            p.add_(1.0)
        ops.push(b)
        oracle.push(params)
    b.backup = torch.empty(b.D, dtype=b.dtype, device=b.device)
    ops.swap_in(b, None)
    for p, m in zip(params, oracle.mean64()):
        torch.testing.assert_close(p.cpu().double(), m, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-c", "plain"])
def test_cpu_parameters_spanning_several_work_rows(monkeypatch, fused):
    """On the CPU the torch backend's C kernels split parameters into rows of
    ``cpu_kernels.ROW`` elements shared among threads: a parameter of two rows and a
    tail, between small ones, through pushes with refreshes, swaps and EMA updates."""
    from lawa_optim.backends import cpu_kernels

    monkeypatch.setattr(cpu_kernels, "enabled", fused)
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=g) for s in [(3,), (2 * cpu_kernels.ROW + 5,), (7,)]]
    k = 2
    b = Bucket(params, k, "uniform", torch.bfloat16, "device", "torch")
    ema = Bucket(params, k, "ema", None, "device", "torch")
    assert cpu_kernels.runs(b) == fused
    oracle = Oracle(params, k, torch.bfloat16)
    avg = None
    for step in range(5):
        randomize(params, seed=step)
        ops.push(b)
        oracle.push(params)
        ops.ema_update(ema, 0.75)
        theta = [p.double() for p in params]
        avg = theta if avg is None else [0.75 * a + 0.25 * t for a, t in zip(avg, theta)]
    for i, p in enumerate(params):
        assert torch.equal(b.view(b.total, i), oracle.total[i]), f"sum of param {i}"
        torch.testing.assert_close(ema.view(ema.total, i).double(), avg[i], rtol=1e-6, atol=1e-6)
    live = [p.clone() for p in params]
    for last in (None, 1):
        b.backup = torch.empty(b.D)
        ops.swap_in(b, last)
        for p, m in zip(params, oracle.mean64(last=last)):
            torch.testing.assert_close(p.double(), m, rtol=RTOL[torch.float32], atol=1e-6)
        ops.swap_back(b)
        assert all(torch.equal(p, x) for p, x in zip(params, live))
