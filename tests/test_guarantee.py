"""The numerical guarantee of the running mean, for any sequence of snapshots.

With default settings, at most k snapshots after a value has left the window (NaN and
inf included) it no longer affects the average, which is then the mean of the stored
window to within 1e-5 of the largest magnitude in the window (README, "The numerical
guarantee": for k up to 151; right after a refresh within 2**-22 for any k, each later
snapshot adding at most one float32 rounding and two of its difference). A window of
finite values never averages to an infinity, however close to the float32 range they
are; bfloat16 and float16 parameters get the float32 average rounded once (to nearest,
ties away from zero for bfloat16); float16 history warns at the snapshot that stores an
infinity for a finite weight. Checked on every backend that runs here
(``conftest.runner``: the plain torch code, the fused CPU kernel, the Triton interpreter;
CUDA and Triton on a GPU), against float64 means of copies of the stored snapshots:
through the public API, and for large k on a bucket whose ring is filled directly (the
Triton interpreter pays per launch).
"""

import contextlib
import math
import warnings

import pytest
import torch

from lawa_optim import LAWA, export_average, ops
from lawa_optim.history import FLOAT16_MAX, Bucket

from conftest import DEVICE, rounded, swap_in

#: The unit roundoff of float32.
U = 2.0**-24


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


# -- large k -------------------------------------------------------------------------


def err_over_m(got: torch.Tensor, window: torch.Tensor) -> float:
    """The largest error of ``got`` against the float64 mean of ``window`` ``(count, n)``,
    relative to the largest magnitude in the window, element by element."""
    w = window.double()
    return ((got.double().cpu() - w.mean(0)) / w.abs().amax(0)).abs().max().item()


def filled_bucket(runner: str, k: int, values: torch.Tensor) -> tuple[Bucket, torch.Tensor]:
    """A float32 bucket of one 64-element parameter whose ring holds ``values[:k - 1]``
    (as if pushed), then ``values[k - 1]`` pushed: the push that completes the ring, a
    refresh."""
    p = torch.zeros(values.shape[1], device=DEVICE)
    b = Bucket([p], k, "uniform", None, "device", runner)
    b.ring[: k - 1, : values.shape[1]] = values[: k - 1].to(DEVICE)
    b.pushes.fill_(k - 1)
    p.copy_(values[k - 1])
    ops.push(b)
    return b, p


@pytest.mark.parametrize("k", [512, 2048])
def test_the_refresh_bound_does_not_grow_with_k(runner, k):
    """A sequential float32 sum of these values (near 0.1) is off by 16 u at k = 512 and
    22 u at 2048 (u = 2**-24, relative to the largest magnitude), growing with k. The
    mean the refresh and the recompute make of the compensated sum stays within 2 u, and
    the averages (``last=j`` too) within 4 u, at any k."""
    if runner == "triton" and k > 512:
        pytest.skip("the Triton interpreter pays per slot; k = 512 covers its kernels")
    g = torch.Generator().manual_seed(k)
    values = (0.1 + 1e-3 * torch.randn(k, 64, generator=g, dtype=torch.float64)).float()
    b, p = filled_bucket(runner, k, values)
    assert err_over_m(b.total[:64], values) <= 2 * U, "the refresh"
    for last in (None, k, k // 2 + 1):
        swap_in(b, last)
        assert err_over_m(p, values[-(last or k):]) <= 4 * U, f"swap_in(last={last})"
        ops.swap_back(b)
    b.total.fill_(3.0)
    ops.recompute(b)
    assert err_over_m(b.total[:64], values) <= 2 * U, "recompute"


@pytest.mark.parametrize("k", [2, 64])
def test_between_refreshes_each_snapshot_adds_at_most_one_rounding(runner, k):
    """The O(1) update rounds the mean once per snapshot: snapshots that each exceed the
    one they replace by just under k half-ulps of the mean (k = 2: exactly, a tie that
    rounds to the even 1.0) lose all of it. The error then grows to about r 2**-24 of the
    largest magnitude after r snapshots since the refresh, within the README's bound
    (4 + r (1 + 4/k)) 2**-24; the next refresh removes it."""
    values = torch.ones(k, 64)
    b, p = filled_bucket(runner, k, values)
    # (new - old) / k just under half an ulp of the mean (1.0), exactly half for k = 2.
    step = torch.tensor(1.0 + k * 2.0**-24 - (2.0**-23 if k > 2 else 0.0), dtype=torch.float32)
    window = list(values)
    for r in range(1, k):
        p.copy_(step)
        ops.push(b)
        window = window[1:] + [step.expand(64)]
        swap_in(b, None)
        err = err_over_m(p, torch.stack(window))
        ops.swap_back(b)
        assert err <= (4 + r * (1 + 4 / k)) * U, f"{r} snapshots after the refresh: {err:.3g}"
    assert k == 2 or err > (r - 2) * U, "the sequence no longer makes every rounding lose"
    p.copy_(step)
    ops.push(b)  # the refresh
    swap_in(b, None)
    assert err_over_m(p, torch.stack(window[1:] + [step.expand(64)])) <= 4 * U


# -- the float32 range ---------------------------------------------------------------


def overflow_model(runner, hdtype, k=6):
    model = torch.nn.Module()
    model.a = torch.nn.Parameter(torch.zeros(5, device=DEVICE))
    model.b = torch.nn.Parameter(torch.zeros(21, device=DEVICE))
    opt = LAWA(torch.optim.SGD(model.parameters(), lr=0.1), k=k, history_dtype=hdtype, backend=runner)
    return model, list(model.parameters()), opt


def check_finite_windows(params, opt, stored, k):
    """With ``last`` None, 1, k/2 and k: every element whose window is finite averages to a finite
    value, within the bound where the values that left it lately are finite too (as in
    :func:`check_bound`); a window holding a NaN or an infinity averages to what float64
    makes of it."""
    for last in sorted({None, 1, min(k // 2, len(stored)), min(k, len(stored))}, key=str):
        with opt.averaged(last):
            avg = [p.detach().double().cpu() for p in params]
        for i, a in enumerate(avg):
            window = torch.stack([s[i] for s in stored[-(last or k):]])
            recent = torch.stack([s[i] for s in stored[-2 * k:]])
            mean, finite = window.mean(0), window.isfinite().all(0)
            assert a[finite].isfinite().all(), f"last={last}: a finite window averages to {a[finite]}"
            settled = recent.isfinite().all(0)
            err = (a - mean).abs()[settled]
            assert (err <= 1e-5 * recent.abs().amax(0)[settled]).all(), f"last={last}: error {err.max().item():.3g}"
            assert torch.equal(a[~finite].isnan(), mean[~finite].isnan()), f"last={last}"
            assert torch.equal(a[~finite].nan_to_num(), mean[~finite].nan_to_num()), f"last={last}"


@pytest.mark.parametrize("hdtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_window_of_finite_values_near_the_float32_range_averages_to_a_finite_mean(runner, hdtype):
    """Six snapshots of 1e38 overflow a float32 sum (and did overflow the running sum of
    version 0.2.0); the difference of two snapshots overflows the running mean's O(1)
    update, and any ``last=j``'s sum. Where the mean or the sum is not finite the swap
    and the export take the float64 mean of the stored slots."""
    k = 6
    model, params, opt = overflow_model(runner, hdtype, k)
    stored = []
    g = torch.Generator().manual_seed(1)
    big = [3.3e38, -3.3e38, 1e38, 2e38, 5.0, -1e38]  # finite in bfloat16 too
    for t in range(2 * k + 3):
        values = []
        for p in params:
            v = torch.tensor([big[(t + j) % len(big)] for j in range(p.numel())], dtype=torch.float64)
            if t >= k + 2:  # magnitudes fall while the overflowed sum still holds them
                v = torch.randn(p.numel(), generator=g, dtype=torch.float64)
            values.append(v)
        if t == k + 4:
            values[0][1], values[1][2] = math.inf, math.nan
        push(params, opt, values, stored)
        check_finite_windows(params, opt, stored, k)
        if t in (k - 1, k + 3):
            with opt.averaged():
                swapped = {n: p.detach().clone() for n, p in model.named_parameters()}
            for source in (opt, opt.state_dict()):
                exported = export_average(model, source)
                for n, want in swapped.items():
                    torch.testing.assert_close(exported[n], want, rtol=0, atol=0, equal_nan=True, msg=n)


# -- bfloat16 and float16 parameters -------------------------------------------------


@pytest.mark.parametrize("hdtype", [None, torch.float32], ids=["history=param", "history=float32"])
@pytest.mark.parametrize("pdtype", [torch.bfloat16, torch.float16], ids=str)
def test_a_low_precision_parameter_gets_the_float32_average_rounded_once(runner, pdtype, hdtype):
    """The average of bfloat16 or float16 parameters is the float32 average (what float32
    parameters holding the same values get) rounded once to nearest (ties away from zero
    for bfloat16, to even for float16): within the float32 bound plus half an ulp of the
    parameter dtype, at most 2**-8 (bfloat16) or 2**-11 (float16) of the average."""
    k = 3
    low = [torch.nn.Parameter(torch.zeros(n, device=DEVICE, dtype=pdtype)) for n in (5, 70)]
    wide = [torch.nn.Parameter(torch.zeros(n, device=DEVICE)) for n in (5, 70)]
    opt = LAWA(torch.optim.SGD(low, lr=0.1), k=k, history_dtype=hdtype, backend=runner)
    twin = LAWA(torch.optim.SGD(wide, lr=0.1), k=k, history_dtype=hdtype or pdtype, backend=runner)
    half_ulp = torch.finfo(pdtype).eps / 2
    g = torch.Generator().manual_seed(3)
    stored = []
    for _ in range(2 * k + 1):
        with torch.no_grad():
            for p, w in zip(low, wide):
                scale = 10 ** (torch.rand(p.numel(), generator=g) * 5 - 2)
                p.copy_(torch.randn(p.numel(), generator=g) * scale)
                w.copy_(p)  # exact
        opt.snapshot()
        twin.snapshot()
        stored.append([p.detach().double().cpu() for p in low])
        for last in (None, min(2, len(stored))):
            with opt.averaged(last), twin.averaged(last):
                for i, (p, w) in enumerate(zip(low, wide)):
                    assert torch.equal(p, rounded(w, pdtype)), f"parameter {i}, last={last}"
                    window = torch.stack([s[i] for s in stored[-(last or k):]])
                    bound = 1e-5 * window.abs().amax(0) + half_ulp * p.double().abs().cpu()
                    assert ((p.double().cpu() - window.mean(0)).abs() <= bound).all()


# -- float16 history -----------------------------------------------------------------


@pytest.mark.parametrize("pdtype", [torch.float32, torch.bfloat16], ids=str)
def test_float16_history_warns_at_the_snapshot_that_stores_an_infinity(runner, pdtype):
    """65519 rounds to the largest finite float16, 65504; from 65520 on a finite weight is
    stored as inf. The first snapshot that does so warns (once), naming itself, the
    largest finite float16 and bfloat16; weights that are themselves inf do not warn."""
    p = torch.nn.Parameter(torch.zeros(10, device=DEVICE, dtype=pdtype))
    opt = LAWA(torch.optim.SGD([p], lr=0.1), k=2, history_dtype=torch.float16, backend=runner)
    with no_range_warning():
        with torch.no_grad():
            p.fill_(-65519.0 if pdtype == torch.float32 else -65280.0)
            p[0] = math.inf
        opt.snapshot()
        with opt.averaged():
            assert p[1:].eq(-FLOAT16_MAX if pdtype == torch.float32 else -65280.0).all()
    with torch.no_grad():
        p[3] = 70000.0
    with pytest.warns(RuntimeWarning, match=r"snapshot 2 stores 1 finite weight.*65504.*bfloat16"):
        opt.snapshot()
    with no_range_warning():
        with torch.no_grad():
            p[4] = -1e5
        opt.snapshot()


@contextlib.contextmanager
def no_range_warning():
    """Fails when the body warns about float16 history (the Triton interpreter's numpy
    warns about its own overflows)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    assert not [w for w in caught if "float16" in str(w.message)], [str(w.message) for w in caught]


# -- the 8-bit history ---------------------------------------------------------------
# README, "The numerical guarantee": each snapshot an 8-bit history stores differs from
# the weights it stored by at most (1/254 + 5u) of the largest change of its 256-element
# block since the previous stored snapshot, plus one rounding of its magnitude (the first
# snapshot is stored exactly); the average of c snapshots is within the mean of those
# errors plus (c + 4) u of the largest magnitude in the window. A non-finite weight, or a
# change beyond float32's range, restarts its block: averages over windows reaching
# across the restart are NaN there, and k snapshots after the value has left, the bound
# holds again.

def int8_step_errors(weights: list[torch.Tensor], stored: list[torch.Tensor]) -> torch.Tensor:
    """The stated bound on ``|stored - weights|`` of the newest snapshot (flat float64,
    one contiguous parameter), from the previous stored snapshot: per block of 256,
    (1/254 + 5u) of the largest change, plus one rounding."""
    w, a = weights[-1], stored[-1]
    if len(weights) == 1:
        return torch.zeros_like(w)
    change = (w - stored[-2]).abs()
    pad = -w.numel() % 256
    m = torch.nn.functional.pad(change, (0, pad)).view(-1, 256).amax(1).repeat_interleave(256)[: w.numel()]
    return m * (1 / 254 + 5 * U) + U * a.abs()


@pytest.mark.parametrize("pdtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("k", [2, 6])
def test_int8_average_within_the_stated_error(runner, pdtype, k):
    """Weights at magnitudes from 1e-3 to 1e4 moving by steps from 1e-7 to 1 of their
    size: every average (the mean, each last=j) within the stated bound of the float64
    mean of the weights snapshotted."""
    sizes = (5, 300, 600)
    params = [torch.nn.Parameter(torch.zeros(n, device=DEVICE, dtype=pdtype)) for n in sizes]
    opt = LAWA(torch.optim.SGD(params, lr=0.1), k=k, history_dtype=torch.int8, backend=runner)
    g = torch.Generator().manual_seed(k)
    scale = [10.0 ** torch.empty(n).uniform_(-3, 4, generator=g).double() for n in sizes]
    weights, stored, errors = [[] for _ in sizes], [[] for _ in sizes], [[] for _ in sizes]
    value = [torch.randn(n, generator=g, dtype=torch.float64) * s for n, s in zip(sizes, scale)]
    for n in range(3 * k + 2):
        step = 10.0 ** -(n % 8)
        with torch.no_grad():
            for i, p in enumerate(params):
                value[i] = value[i] + torch.randn(sizes[i], generator=g, dtype=torch.float64) * scale[i] * step
                p.copy_(value[i])
        opt.snapshot()
        (b,) = opt._history.buckets  # the stored snapshot exactly (float32), also for bfloat16 weights
        newest = [b.view(b.total, i).double().cpu() for i in range(len(params))]
        for i, p in enumerate(params):
            weights[i].append(p.detach().double().cpu())
            stored[i].append(newest[i])
            errors[i].append(int8_step_errors(weights[i], stored[i]))
        held = min(n + 1, k)
        for last in (None, *range(1, held + 1)):
            c = held if last is None else last
            with opt.averaged(last=last):
                for i, p in enumerate(params):
                    exact = torch.stack(weights[i][-c:]).mean(0)
                    window = torch.stack(stored[i][-c:] + weights[i][-c:]).abs().amax(0)
                    bound = torch.stack(errors[i][-c:]).mean(0) + (c + 4) * U * window
                    if pdtype != torch.float32:
                        bound = bound + exact.abs() * 2.0**-8
                    err = (p.detach().double().cpu() - exact).abs()
                    assert (err <= bound).all(), (
                        f"push {n + 1}, last={last}, param {i}: error {(err - bound).max().item():.3g} over the bound"
                    )


def test_int8_a_non_finite_weight_leaves_after_k_snapshots(runner):
    """A NaN and an infinity restart their blocks: the averages reaching across are NaN
    there (and only in those blocks), then k snapshots after they left, within the bound
    again; the other blocks never notice."""
    k = 3
    params = [torch.nn.Parameter(torch.zeros(600, device=DEVICE))]
    opt = LAWA(torch.optim.SGD(params, lr=0.1), k=k, history_dtype=torch.int8, backend=runner)
    g = torch.Generator().manual_seed(0)
    walk = [torch.randn(600, generator=g, dtype=torch.float64)]
    for n in range(4 * k):
        walk.append(walk[-1] + 1e-3 * torch.randn(600, generator=g, dtype=torch.float64))
    tol = 5e-3 / 254 + 1e-6  # half a step of a change up to 5 sigma, and float32 rounding
    for n, w in enumerate(walk):
        w = w.clone()
        if n == 2:
            w[3], w[300] = math.nan, math.inf
        with torch.no_grad():
            params[0].copy_(w)
        opt.snapshot()
        with opt.averaged():
            avg = params[0].detach().double().cpu()
        window = range(max(0, n - k + 1), n + 1)
        exact = torch.stack([walk[j] for j in window]).mean(0)
        reaches = 2 in window or (n - k + 1 <= 2 and n >= 3)  # holds snapshot 2, or the restart after it
        for block in (slice(0, 256), slice(256, 512)):
            if reaches and n >= 2:
                assert avg[block].isnan().all() or n == 2, f"push {n + 1}: block {block} should read NaN"
            else:
                assert (avg[block] - exact[block]).abs().max() <= tol, f"push {n + 1}: block {block}"
        assert (avg[512:] - exact[512:]).abs().max() <= tol, f"push {n + 1}: an untouched block moved"
