"""The numerical guarantee of the running sum, for any sequence of snapshots.

With default settings, at most k snapshots after a value has left the window (NaN and
inf included) it no longer affects the average, which is then the mean of the stored
window to within 1e-5 of the largest magnitude in the window. Checked through the
public API on every backend that runs here (``conftest.runner``: the plain torch code,
the fused CPU kernel, the Triton interpreter; CUDA and Triton on a GPU), for float32
and bfloat16 history, against float64 means of copies of the stored snapshots.
"""

import math

import pytest
import torch

from lawa_optim import LAWA

from conftest import DEVICE


def make(backend, k, hdtype, sizes=(5, 70, 131)):
    params = [torch.nn.Parameter(torch.zeros(n, device=DEVICE)) for n in sizes]
    opt = LAWA(torch.optim.SGD(params, lr=0.1), k=k, history_dtype=hdtype, backend=backend)
    return params, opt


def push(params, opt, values, stored):
    """Write ``values`` (one float64 tensor per parameter) into the weights, snapshot, and
    keep the stored (history-dtype) values in float64 for the oracle."""
    hdtype = opt._history.history_dtype or torch.float32
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v.to(p.dtype))
    opt.snapshot()
    stored.append([p.detach().to(hdtype).double().cpu() for p in params])


def averages(params, opt):
    with opt.averaged():
        return [p.detach().double().cpu() for p in params]


def check_bound(params, opt, stored, k):
    """After each push: every element whose last 2k snapshots (the window and the values
    that left it at most k pushes ago) are finite is within 1e-5 of the largest magnitude
    among them; every element whose window is finite and whose non-finite values left the
    window more than k pushes ago is finite."""
    avg = averages(params, opt)
    for i, a in enumerate(avg):
        window = torch.stack([s[i] for s in stored[-k:]])
        recent = torch.stack([s[i] for s in stored[-2 * k:]])
        finite = recent.isfinite().all(0)
        bound = 1e-5 * recent.abs().amax(0)
        err = (a - window.mean(0)).abs()
        assert (err[finite] <= bound[finite]).all(), (
            f"push {len(stored)}, param {i}: error {err[finite].max().item():.3g} "
            f"above the bound {bound[finite][err[finite].argmax()].item():.3g}"
        )
        assert a[finite].isfinite().all()


@pytest.mark.parametrize("hdtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_values_leave_no_trace_after_k_snapshots(runner, hdtype):
    """k=2: two snapshots at 1e8 then two at 1.0 gave an average of 0.0 before the
    refresh; now it is 1.0 exactly."""
    params, opt = make(runner, 2, hdtype)
    stored = []
    for value in (1e8, 1e8, 1.0, 1.0):
        push(params, opt, [torch.full((p.numel(),), value, dtype=torch.float64) for p in params], stored)
    assert all(torch.equal(a, torch.ones_like(a)) for a in averages(params, opt))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("hdtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_non_finite_snapshot_leaves_the_average(runner, hdtype, bad):
    k = 3
    params, opt = make(runner, k, hdtype)
    stored = []
    g = torch.Generator().manual_seed(0)
    values = lambda: [torch.randn(p.numel(), generator=g, dtype=torch.float64) for p in params]  # noqa: E731
    push(params, opt, values(), stored)
    poisoned = values()
    poisoned[1][3] = bad
    push(params, opt, poisoned, stored)
    for _ in range(2 * k):  # the value leaves after k - 1 more pushes, the refresh follows
        push(params, opt, values(), stored)
        check_bound(params, opt, stored, k)
    avg = averages(params, opt)
    assert all(a.isfinite().all() for a in avg)
    window = [torch.stack([s[i] for s in stored[-k:]]).mean(0) for i in range(len(params))]
    for a, m in zip(avg, window):
        torch.testing.assert_close(a, m, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("k", [1, 2, 6])
@pytest.mark.parametrize("hdtype", [torch.float32, torch.bfloat16], ids=str)
def test_bound_holds_for_any_sequence(runner, hdtype, k):
    """Per-element magnitudes jumping between 1e-3 and 1e6 (and 1e8 now and then), signs
    changing, an occasional NaN or inf: the bound holds after every push."""
    params, opt = make(runner, k, hdtype)
    stored = []
    g = torch.Generator().manual_seed(k)
    for t in range(8 * k + 5):
        values = []
        for p in params:
            scale = 10 ** (torch.rand(p.numel(), generator=g, dtype=torch.float64) * 9 - 3)
            v = torch.randn(p.numel(), generator=g, dtype=torch.float64) * scale
            if t % 7 == 3:
                v[t % p.numel()] = (math.nan, math.inf, -math.inf)[t % 3]
            values.append(v)
        push(params, opt, values, stored)
        check_bound(params, opt, stored, k)


def test_recompute_every_sets_the_refresh_period(runner):
    """k=2 with a refresh every 5 pushes: after 1e8, 1e8, 1, 1 the cancelling sum is still
    0.0 (the failure the default refresh prevents); the fifth push refreshes it."""
    params = [torch.nn.Parameter(torch.zeros(3, device=DEVICE))]
    opt = LAWA(torch.optim.SGD(params, lr=0.1), k=2, backend=runner, recompute_every=5)
    stored = []
    for value in (1e8, 1e8, 1.0, 1.0):
        push(params, opt, [torch.full((3,), value, dtype=torch.float64)], stored)
    assert torch.equal(averages(params, opt)[0], torch.zeros(3, dtype=torch.float64))
    push(params, opt, [torch.full((3,), 1.0, dtype=torch.float64)], stored)
    assert torch.equal(averages(params, opt)[0], torch.ones(3, dtype=torch.float64))


def test_ema_keeps_a_non_finite_snapshot(runner):
    """EMA mode keeps no window: a NaN snapshot stays in the average for good (as in
    torch.optim.swa_utils and timm's EMA); the documented behaviour."""
    params = [torch.nn.Parameter(torch.zeros(4, device=DEVICE))]
    opt = LAWA(torch.optim.SGD(params, lr=0.1), mode="ema", decay=0.5, backend=runner)
    for value in (1.0, math.nan, *[2.0] * 20):
        with torch.no_grad():
            params[0].fill_(value)
        opt.snapshot()
    (avg,) = averages(params, opt)
    assert avg.isnan().all()
