"""The kernel contract of :mod:`lawa_optim.ops`, one matrix over every backend.

Runners (``conftest.runner``: the torch backend's plain code and its fused CPU kernels,
Triton, CUDA) x dtype pairs (the 9 fused pairs; float64 on the plain torch code) x ring
fill (empty, partly filled, full, wrapped several times, across refreshes) x layouts
(``conftest.make_params`` puts aligned parameters, misaligned views, a channels_last
weight, empty parameters and one spanning several chunks, rows and table rows into one
bucket, so every case runs every layout; ``conftest.many_params`` is the many-tiny-tensors
case). Two oracles, both computed from kept copies of the snapshots, one tensor per
parameter, never from the bucket's ring or sum:

* :class:`conftest.Contract`, the arithmetic of the ``ops`` docstring replayed in torch,
  element by element and independent of the flat layout: slots, running sum, refreshes
  and swaps must match it bit for bit;
* float64 means of the stored values, which the running sum must meet within the
  guarantee of :mod:`lawa_optim.history` (1e-5 of the largest magnitude in the window)
  and a swapped-in average within that plus one rounding to the parameter dtype (swapped
  in with a backup and, for the full average, in place: exchanged with the running
  mean, both buffers checked bit for bit while swapped and after); for a
  weighted swap-in (``weights=``) the float64 weighted sum, within the same bound scaled
  by the sum of the terms' magnitudes (the largest magnitude for uniform weights).

The Triton interpreter pays per launch and per block, not per element, so each case is
one bucket and a few dozen launches.
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    COMBOS, DEVICE, DTYPES, Contract, assert_same_bits, bits, dtype_id, make_params, many_params, rounded, swap_in,
)

from lawa_optim import ops
from lawa_optim.backends import cpu_kernels
from lawa_optim.history import Bucket, accumulation_dtype

PAIRS = [*COMBOS, (torch.float64, torch.float64)]
#: The guarantee of lawa_optim.history: the running sum's mean is within this fraction of
#: the largest magnitude in the window of the float64 mean of the stored values.
GUARANTEE = 1e-5


def assert_near(got: torch.Tensor, want: torch.Tensor, magnitude: torch.Tensor, what: str,
                dtype: torch.dtype | None = None) -> None:
    """``got`` (any dtype) is the float64 ``want`` within the guarantee relative to
    ``magnitude`` (the largest magnitude of the values averaged, per element), plus one
    rounding to ``dtype`` when given."""
    bound = GUARANTEE * magnitude
    if dtype is not None:
        bound = bound + torch.finfo(dtype).eps * want.abs()
    err = (got.double() - want).abs()
    if not bool((err <= bound).all()):
        i = (err - bound).argmax()
        raise AssertionError(f"{what}: {got.flatten()[i].item()!r} is not the float64 value "
                             f"{want.flatten()[i].item()!r} within {bound.flatten()[i].item():.3g}")


def assert_near_mean(got: torch.Tensor, window: torch.Tensor, what: str, dtype: torch.dtype | None = None) -> None:
    """``got`` is the float64 mean of ``window`` (``(count, *shape)``) within the guarantee."""
    assert_near(got, window.mean(0), window.abs().amax(0), what, dtype)


def randomize(params: list[torch.Tensor], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 3)


def padding(b: Bucket) -> torch.Tensor:
    """True for the elements of the flat buffers that belong to no parameter."""
    pad = torch.ones(b.D, dtype=torch.bool, device=b.device)
    for off, n in zip(b.offsets, b.numels):
        pad[off:off + n] = False
    return pad


def check_history(b: Bucket, c: Contract, what: str) -> None:
    """Every slot and the mean of every parameter bit for bit as the contract has them,
    empty slots and the padding still zero, and the mean near the float64 mean."""
    for i in range(len(b.params)):
        for s in range(b.k):
            got, want = b.view(b.ring[s], i), c.slot(s)
            if want is None:
                assert not bits(got).any(), f"{what}: empty slot {s} of parameter {i} was written"
            else:
                assert_same_bits(got, want[i], f"{what}: slot {s} of parameter {i}")
        assert_same_bits(b.view(b.total, i), c.total[i], f"{what}: mean of parameter {i}")
    pad = padding(b)
    assert not bits(b.ring[:, pad]).any() and not bits(b.total[pad]).any(), f"{what}: padding written"
    count = min(c.n, c.k)
    if count:
        for i, w in enumerate(c.window()):
            assert_near_mean(b.view(b.total, i), w, f"{what}: mean of parameter {i}")


def check_swaps(b: Bucket, c: Contract, lasts: tuple, what: str) -> None:
    """Each swap-in writes the contract's average into the parameters in place, backs up
    the weights exactly and leaves the history alone; each swap-back restores them."""
    originals = [p.clone() for p in b.params]
    ptrs = [p.data_ptr() for p in b.params]
    history = [t.clone() for t in (b.ring, b.total) if t is not None]
    for last in lasts:
        at = f"{what}, swap_in(last={last})"
        swap_in(b, last)
        for i, (p, want, w) in enumerate(zip(b.params, c.average(last), c.window(last))):
            assert_same_bits(p, want, f"{at}: parameter {i}")
            assert_near_mean(p, w, f"{at}: parameter {i}", p.dtype)
            assert_same_bits(b.view(b.backup, i), originals[i], f"{at}: backup of parameter {i}")
        assert [p.data_ptr() for p in b.params] == ptrs, f"{at}: a parameter moved"
        for t, kept in zip((x for x in (b.ring, b.total) if x is not None), history):
            assert_same_bits(t, kept, f"{at}: the history changed")
        ops.swap_back(b)
        for i, (p, o) in enumerate(zip(b.params, originals)):
            assert_same_bits(p, o, f"{at}, swap_back: parameter {i}")
    if None in lasts and ops.exchanges(b) and bool(b.total.isfinite().all()):
        check_exchange(b, c, originals, c.average(), what)


def check_exchange(b: Bucket, c: Contract, originals: list[torch.Tensor], averages: list[torch.Tensor],
                   what: str) -> None:
    """The in-place swap (no backup): the parameters get ``averages``, the running mean
    holds what the contract says it keeps, and the swap-back restores both bit for bit."""
    at = f"{what}, in-place swap_in"
    means = b.total.clone()
    ptrs = [p.data_ptr() for p in b.params]
    b.backup = None
    ops.swap_in(b, None)
    for i, (p, want, kept) in enumerate(zip(b.params, averages, c.exchanged(originals))):
        assert_same_bits(p, want, f"{at}: parameter {i}")
        assert_same_bits(b.view(b.total, i), kept, f"{at}: the word kept for parameter {i}")
    assert [p.data_ptr() for p in b.params] == ptrs, f"{at}: a parameter moved"
    ops.swap_back(b)
    for i, (p, o) in enumerate(zip(b.params, originals)):
        assert_same_bits(p, o, f"{at}, swap_back: parameter {i}")
    assert_same_bits(b.total, means, f"{at}, swap_back: the running mean")


def skip_float64(runner: str, pdtype: torch.dtype) -> None:
    if pdtype == torch.float64 and (runner != "torch" or cpu_kernels.enabled):
        pytest.skip("float64 runs on the torch backend's plain code only")


def run_uniform(b: Bucket, c: Contract, pushes: int, swaps: dict[int, tuple], recompute_at: tuple = ()) -> None:
    """``pushes`` snapshots of fresh values, the history checked after each; the swaps
    ``swaps[n]`` after push ``n``, then a recompute over garbage after push ``n`` in
    ``recompute_at`` (0: the empty ring)."""
    for n in range(pushes + 1):
        if n:
            randomize(b.params, seed=n)
            ops.push(b)
            c.push(b.params)
            assert int(b.pushes) == n
            check_history(b, c, f"push {n}")
        if n in swaps:
            check_swaps(b, c, swaps[n], f"after {n} pushes")
        if n in recompute_at:
            b.total.fill_(123.0)  # garbage the recompute must wipe
            ops.recompute(b)
            c.recompute()
            check_history(b, c, f"recompute after {n} pushes")


@pytest.mark.parametrize("pdtype,hdtype", PAIRS, ids=dtype_id)
def test_uniform_contract(runner, pdtype, hdtype):
    """k = 3 over 8 pushes: the ring fills (swaps with every ``last`` at 2 pushes), is full
    and refreshed at 3, refreshed again at 6, then updated incrementally; swaps with every
    ``last`` at the end. Recomputes on the empty, the partly filled and the wrapped ring."""
    skip_float64(runner, pdtype)
    params = make_params(DEVICE, pdtype)
    b = Bucket(params, 3, "uniform", hdtype, "device", runner)
    assert b.backend == runner
    run_uniform(b, Contract(params, 3, hdtype), pushes=8,
                swaps={2: (None, 1, 2), 3: (None,), 8: (None, 1, 2, 3)}, recompute_at=(0, 2, 8))


@pytest.mark.parametrize("pdtype,hdtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)],
                         ids=dtype_id)
def test_sums_beyond_the_float32_range(runner, pdtype, hdtype):
    """Snapshots of up to 3.3e38 in magnitude overflow many float32 sums (the refreshed,
    the updated and those of ``last``); where a sum is not finite the swap takes the
    contract's float64 ``wide`` mean of the slots instead, bit for bit on every backend."""
    params = make_params(DEVICE, pdtype, seed=7)
    b = Bucket(params, 3, "uniform", hdtype, "device", runner)
    c = Contract(params, 3, hdtype)
    overflowed = 0
    for n in range(1, 5):  # filling, the refresh, an update
        g = torch.Generator().manual_seed(n)
        for p in params:
            p.copy_((torch.rand(p.shape, generator=g, dtype=torch.float64) * 2 - 1) * 3.3e38)
        ops.push(b)
        c.push(b.params)
        for i in range(len(params)):
            assert_same_bits(b.view(b.total, i), c.total[i], f"push {n}: mean of parameter {i}")
            overflowed += int((~c.total[i].isfinite()).sum())
        check_swaps(b, c, (None, *range(1, min(n, 3) + 1)), f"after {n} pushes")
    assert overflowed > 100, "too few sums overflow to test the fallback"


@pytest.mark.parametrize("k,refresh_every", [(1, None), (2, 5), (3, 2), (4, 1)])
def test_refresh_period(runner, k, refresh_every):
    """Refreshes at every push, while the ring fills, rarer than every k and out of step
    with k; every swap on the wrapped ring."""
    params = make_params(DEVICE, torch.float32, seed=5)
    b = Bucket(params, k, "uniform", torch.bfloat16, "device", runner, refresh_every)
    pushes = 2 * max(k, refresh_every or 0) + 1
    run_uniform(b, Contract(params, k, torch.bfloat16, refresh_every), pushes=pushes,
                swaps={pushes: (None, *range(1, k + 1))})


def test_many_small_parameters(runner):
    """64 parameters of 1 to 7 elements: one table row each, one launch per operation."""
    params = many_params(DEVICE, torch.float32)
    b = Bucket(params, 2, "uniform", torch.bfloat16, "device", runner)
    run_uniform(b, Contract(params, 2, torch.bfloat16), pushes=3, swaps={3: (None, 1)})


def fma_rounds_once() -> bool:
    """Whether ``tl.fma`` rounds once where the Triton kernels run. Compiled, it is
    ``fma.rn.f32`` (test_triton.py checks the PTX); the interpreters of Triton 3.6 and
    3.8 multiply and add in two roundings, so the EMA cannot match torch there."""
    from lawa_optim.backends import triton as tb

    if not tb._k.INTERPRET:
        return True
    import triton
    import triton.language as tl

    @triton.jit
    def probe(x):
        v = tl.load(x)
        tl.store(x, tl.fma(v, 2.0 - v, -1.0))  # exactly -2**-46 when fused, 0.0 when not

    x = torch.tensor([1.0 + 2.0**-23])
    probe[(1,)](x)
    return x.item() != 0.0


@pytest.mark.parametrize("pdtype", [*DTYPES, torch.float64], ids=dtype_id)
def test_ema_contract(runner, pdtype):
    """The first update copies, the next fold in ``decay * total + (1 - decay) * param``
    as torch computes it (the product rounded, then one fused multiply-add); the swap
    writes the sum itself."""
    skip_float64(runner, pdtype)
    if runner == "triton" and not fma_rounds_once():
        pytest.skip("this Triton's interpreter rounds tl.fma twice (Triton < 3.9)")
    decay = 0.9
    params = make_params(DEVICE, pdtype, seed=1)
    b = Bucket(params, 3, "ema", None, "device", runner)
    assert b.ring is None
    acc = accumulation_dtype(pdtype)
    # Laid out as the parameters, as the sum's views are: torch picks its foreach path by layout.
    total = [torch.zeros_like(p, dtype=acc) for p in params]
    ema64, magnitude = None, None
    for n in range(4):
        randomize(params, seed=10 + n)
        ops.ema_update(b, decay)
        if n == 0:
            for t, p in zip(total, params):
                t.copy_(p)
        else:  # the contract's arithmetic, per parameter
            torch._foreach_mul_(total, decay)
            torch._foreach_add_(total, params, alpha=1.0 - decay)
        theta = [p.detach().to(torch.float64, copy=True) for p in params]
        if ema64 is None:
            ema64, magnitude = theta, [t.abs() for t in theta]
        else:
            ema64 = [decay * e + (1 - decay) * t for e, t in zip(ema64, theta)]
            magnitude = [torch.maximum(m, t.abs()) for m, t in zip(magnitude, theta)]
        for i, (t, e, m) in enumerate(zip(total, ema64, magnitude)):
            assert_same_bits(b.view(b.total, i), t, f"update {n + 1}: EMA of parameter {i}")
            assert_near(b.view(b.total, i), e, m, f"update {n + 1}: EMA of parameter {i}")
    originals = [p.clone() for p in params]
    swap_in(b, None)
    for i, (p, t, e, m) in enumerate(zip(params, total, ema64, magnitude)):
        assert_same_bits(p, rounded(t, pdtype), f"EMA swap_in: parameter {i}")
        assert_near(p, e, m, f"EMA swap_in: parameter {i}", pdtype)
        assert_same_bits(b.view(b.backup, i), originals[i], f"EMA backup of parameter {i}")
    ops.swap_back(b)
    for i, (p, o) in enumerate(zip(params, originals)):
        assert_same_bits(p, o, f"EMA swap_back: parameter {i}")
    if ops.exchanges(b):
        c = Contract(params, 3, pdtype)
        c.total = total
        check_exchange(b, c, originals, [rounded(t, pdtype) for t in total], "EMA")


#: Coefficient vectors of the weighted swap-in, newest first: uniform, a ramp, one
#: snapshot, extrapolation (negative coefficients, BEMA-like), uneven float32 roundings.
WEIGHTS = {
    1: ([1.0],),
    2: ([0.5, 0.5], [1.5, -0.5]),
    4: ([0.4, 0.3, 0.2, 0.1], [0.7, 0.6, -0.2, -0.1], [0.25, 0.25, 0.25, 0.25], [1 / 3, 1 / 7, 0.0, 11 / 21]),
}


def check_weighted(b: Bucket, c: Contract, what: str) -> None:
    """Every coefficient vector that fits the snapshots held: the contract's bits, the
    float64 weighted sum within the bound, the backup exact, the history untouched, and
    swap_back restoring the weights bit for bit."""
    originals = [p.clone() for p in b.params]
    history = [b.ring.clone(), b.total.clone()]
    count = min(c.n, c.k)
    for length, vectors in WEIGHTS.items():
        if length > count:
            continue
        for weights in vectors:
            at = f"{what}, swap_in(weights={weights})"
            swap_in(b, None, weights)
            w = torch.tensor(weights, dtype=c.acc).double()  # the coefficients the kernels get
            for i, (p, want, win) in enumerate(zip(b.params, c.weighted(weights), c.window(length))):
                assert_same_bits(p, want, f"{at}: parameter {i}")
                terms = w.view(-1, *[1] * (win.dim() - 1)) * win.flip(0)  # newest first
                assert_near(p, terms.sum(0), terms.abs().sum(0), f"{at}: parameter {i}", p.dtype)
                assert_same_bits(b.view(b.backup, i), originals[i], f"{at}: backup of parameter {i}")
            assert_same_bits(b.ring, history[0], f"{at}: the ring changed")
            assert_same_bits(b.total, history[1], f"{at}: the sum changed")
            ops.swap_back(b)
            for i, (p, o) in enumerate(zip(b.params, originals)):
                assert_same_bits(p, o, f"{at}, swap_back: parameter {i}")


@pytest.mark.parametrize("pdtype,hdtype", PAIRS, ids=dtype_id)
def test_weighted_contract(runner, pdtype, hdtype):
    """k = 4: weighted swaps on a ring holding 1 and 2 snapshots, then on a ring that has
    wrapped (7 pushes: the newest slot is in the middle of the ring), every coefficient
    vector of :data:`WEIGHTS` that fits."""
    skip_float64(runner, pdtype)
    params = make_params(DEVICE, pdtype, seed=3)
    b = Bucket(params, 4, "uniform", hdtype, "device", runner)
    c = Contract(params, 4, hdtype)
    for n in range(1, 8):
        randomize(b.params, seed=100 + n)
        ops.push(b)
        c.push(b.params)
        if n in (1, 2, 7):
            check_weighted(b, c, f"after {n} pushes")


# -- the 8-bit history ----------------------------------------------------------------

def memory_order(p: torch.Tensor) -> torch.Tensor:
    """A dense parameter's elements in memory order, flat (its slice of the flat buffers)."""
    return p.as_strided((p.numel(),), (1,), p.storage_offset())


class Int8Contract:
    """The 8-bit history of the ``ops`` docstring replayed per parameter, flat in memory
    order, block by block: ``anchor``, ``codes`` and ``scales`` per slot, and the exact
    snapshots (float64) with the half-step bound each stored snapshot is within."""

    def __init__(self, params: list[torch.Tensor], k: int):
        self.k, self.pdtype = k, params[0].dtype
        self.anchor = [torch.zeros(p.numel()) for p in params]
        self.codes = [[torch.zeros(p.numel(), dtype=torch.int8) for p in params] for _ in range(k - 1)]
        self.scales = [[torch.zeros(-(-max(p.numel(), 1) // 256)) for p in params] for _ in range(k - 1)]
        self.exact: list[list[torch.Tensor]] = []  # float64, per snapshot
        self.error: list[list[torch.Tensor]] = []  # bound on |stored - exact|, per snapshot

    @property
    def n(self) -> int:
        return len(self.exact)

    def push(self, params: list[torch.Tensor]) -> None:
        n, s = self.n, (self.n - 1) % max(self.k - 1, 1)
        ws = [memory_order(p.detach()).float() for p in params]
        errors = []
        for i, w in enumerate(ws):
            if n == 0 or self.k == 1:
                self.anchor[i] = w.clone()
                errors.append(torch.zeros(w.numel(), dtype=torch.float64))
                continue
            codes, scales = self.codes[s][i], self.scales[s][i]
            err = torch.zeros(w.numel(), dtype=torch.float64)
            for blk in range(0, w.numel(), 256):
                d = w[blk:blk + 256] - self.anchor[i][blk:blk + 256]
                if not bool(d.isfinite().all()):
                    scales[blk // 256] = float("nan")
                    codes[blk:blk + 256] = 0
                    self.anchor[i][blk:blk + 256] = w[blk:blk + 256]
                    continue
                m = d.abs().max()
                if m < 2.0**-120:
                    scales[blk // 256], codes[blk:blk + 256] = 0.0, 0
                    err[blk:blk + 256] = m.double()
                    continue
                scale = m / torch.tensor(127.0)
                q = torch.round(d * (torch.tensor(127.0) / m))
                scales[blk // 256], codes[blk:blk + 256] = scale, q.to(torch.int8)
                self.anchor[i][blk:blk + 256] += q * scale
                # The stated error: (1/254 + 5u) of the largest change, one rounding of the value.
                err[blk:blk + 256] = m.double() * (1 / 254 + 5 * 2.0**-24) + 2.0**-24 * self.anchor[i][blk:blk + 256].abs()
            errors.append(err)
        self.exact.append([w.double() for w in ws])
        self.error.append(errors)

    def dequantised(self, slot: int, i: int) -> torch.Tensor:
        return self.codes[slot][i].float() * self.scales[slot][i].repeat_interleave(256)[: self.anchor[i].numel()]

    def weighted(self, weights: list[float]) -> list[torch.Tensor]:
        """What ``swap_in`` writes for ``weights`` of the newest snapshots (flat)."""
        w = torch.tensor(weights, dtype=torch.float64)
        coef = torch.cat([w.flip(0).cumsum(0).flip(0)[:1], -w.flip(0).cumsum(0).flip(0)[1:]]).float()
        out = []
        for i, a in enumerate(self.anchor):
            terms = [a] + [self.dequantised((self.n - 1 - j) % (self.k - 1), i) for j in range(1, len(weights))]
            s, c = torch.zeros_like(a), torch.zeros_like(a)
            for x, cj in zip(terms, coef):
                y = x * cj
                t = s + y
                c = c + torch.where(s.abs() >= y.abs(), (s - t) + y, (y - t) + s)
                s = t
            out.append((s + c).to(self.pdtype))
        return out

    def bound(self, weights: list[float], i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The float64 weighted sum of the exact snapshots and the guarantee's bound on
        an 8-bit average's distance from it: each stored snapshot within its stated error,
        and float32 arithmetic within ``(m + 4) 2**-24`` of the largest magnitude."""
        snaps = list(reversed(self.exact[-len(weights):]))
        errs = list(reversed(self.error[-len(weights):]))
        exact = sum(wj * s[i] for wj, s in zip(weights, snaps))
        mag = torch.stack([s[i].abs() for s in snaps]).amax(0)
        total = sum(abs(wj) for wj in weights)
        bound = sum(abs(wj) * e[i] for wj, e in zip(weights, errs)) + (len(weights) + 4) * 2.0**-24 * total * mag
        return exact, bound


def check_int8(b: Bucket, c: Int8Contract, what: str) -> None:
    """Anchor, codes and scales bit for bit as the contract has them; padding untouched."""
    for i in range(len(b.params)):
        lo, n = b.offsets[i], b.numels[i]
        assert_same_bits(b.total[lo:lo + n], c.anchor[i], f"{what}: anchor of parameter {i}")
        for s in range(b.k - 1):
            assert_same_bits(b.ring[s, lo:lo + n], c.codes[s][i], f"{what}: codes of slot {s}, parameter {i}")
            got = b.scales[s, b.block_bases[i]:b.block_bases[i] + c.scales[s][i].numel()]
            assert_same_bits(got, c.scales[s][i], f"{what}: scales of slot {s}, parameter {i}")
    pad = padding(b)
    assert not bits(b.ring[:, pad]).any() and not bits(b.total[pad]).any(), f"{what}: padding written"


def check_int8_swaps(b: Bucket, c: Int8Contract, what: str) -> None:
    """The mean, every ``last`` and a weighting, each bit for bit as the contract has it
    and within the guarantee of the exact snapshots' average; swap-back restores."""
    originals = [p.clone() for p in b.params]
    held = min(c.n, b.k)
    cases = [(None, [1.0 / held] * held)] + [(j, [1.0 / j] * j) for j in range(1, held + 1)]
    cases.append(("w", [1.5, -0.75, 0.25][:held]))
    for last, weights in cases:
        at = f"{what}, swap_in({'weights' if last == 'w' else f'last={last}'})"
        if last == "w":
            swap_in(b, None, weights)
        else:
            swap_in(b, last)
        for i, (p, want) in enumerate(zip(b.params, c.weighted(weights))):
            got = memory_order(p)
            # A NaN's payload after the cast to the parameter dtype is the backend's (ops: cast).
            assert_same_bits(got, want, f"{at}: parameter {i}", any_nan=True)
            exact, bound = c.bound(weights, i)
            bound = bound + torch.finfo(p.dtype).eps * exact.abs()
            err = (got.double() - exact).abs()
            # Where the contract reads NaN (a restarted block in reach): the same bits, checked above.
            held = exact.isfinite() & want.isfinite()
            assert bool((err <= bound)[held].all()), f"{at}: parameter {i} beyond the guarantee"
            assert_same_bits(b.view(b.backup, i), originals[i], f"{at}: backup of parameter {i}")
        ops.swap_back(b)
        for i, (p, o) in enumerate(zip(b.params, originals)):
            assert_same_bits(p, o, f"{at}, swap_back: parameter {i}")


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("pdtype", DTYPES, ids=dtype_id)
def test_int8_contract(runner, pdtype, k):
    """The 8-bit history on every backend: anchor, codes and scales bit for bit as
    :class:`Int8Contract` replays the ``ops`` docstring after every push (filling,
    wrapping, a NaN and an infinity entering and leaving, a block that does not move),
    and every swap-in bit for bit and within the guarantee of the float64 average of the
    exact snapshots."""
    params = make_params(DEVICE, pdtype, seed=5)
    b = Bucket(params, k, "uniform", torch.int8, "device", runner)
    c = Int8Contract(b.params, k)
    g = torch.Generator().manual_seed(7)
    for n in range(1, 2 * k + 4):
        for p in b.params:  # a random walk, each parameter at its own scale and drift
            p.add_((torch.randn(p.shape, generator=g, dtype=torch.float64) * 10.0 ** -(n % 3)).to(pdtype))
        big = max(b.params, key=torch.numel).view(-1)
        if n in (1, 2):  # -0.0, then +0.0: a block that stores no delta keeps its anchor's bits
            big[:300] = -0.0 if n == 1 else 0.0
        if n == 3:
            big[0] = float("nan")
        if n == 4:
            big[-1] = float("inf")
        if n == 5:
            big[0], big[-1] = 1.0, -2.0
        ops.push(b)
        c.push(b.params)
        check_int8(b, c, f"k={k}, push {n}")
        check_int8_swaps(b, c, f"k={k}, after {n} pushes")


#: Coefficients 1 - beta of three widths over four steps: the first step copies (1.0), the
#: next fold in; one width copies again at step 3 (a coefficient of exactly 1 at any step).
PHEMA_ALPHAS = ([1.0, 1.0, 1.0], [0.75, 0.5, 0.996], [1.0, 0.3, 0.1], [2.0**-20, 1 / 3, 0.0])


@pytest.mark.parametrize("pdtype", [*DTYPES, torch.float64], ids=dtype_id)
def test_phema_contract(runner, pdtype):
    """Every row of ``emas`` follows ``ema + a * (param - ema)`` (copy where ``a == 1``)
    bit for bit, replayed per parameter in torch, and stays within the bound of the float64
    EMA; the padding stays zero; a plain swap-in writes the first row."""
    skip_float64(runner, pdtype)
    params = make_params(DEVICE, pdtype, seed=4)
    b = Bucket(params, 3, "phema", None, "device", runner, widths=3)
    assert b.emas.shape == (3, b.D) and b.total.data_ptr() == b.emas.data_ptr()
    acc = accumulation_dtype(pdtype)
    rows = [[torch.zeros_like(p, dtype=acc) for p in params] for _ in range(3)]
    ema64 = [[None] * len(params) for _ in range(3)]
    magnitude = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    for step, alphas in enumerate(PHEMA_ALPHAS):
        randomize(params, seed=20 + step)
        a = torch.tensor(alphas, dtype=acc, device=DEVICE)
        ops.phema_update(b, a)
        magnitude = [torch.maximum(m, p.double().abs()) for m, p in zip(magnitude, params)]
        for e in range(3):
            for i, p in enumerate(params):
                theta = p.detach().to(acc)
                if alphas[e] == 1.0:
                    rows[e][i] = theta.clone()
                else:
                    rows[e][i] = rows[e][i] + a[e] * (theta - rows[e][i])
                w, x = a[e].double(), p.to(torch.float64, copy=True)  # a copy: p changes in place
                ema64[e][i] = x if alphas[e] == 1.0 else ema64[e][i] + w * (x - ema64[e][i])
                at = f"step {step + 1}, width {e}, parameter {i}"
                assert_same_bits(b.view(b.emas[e], i), rows[e][i], at)
                assert_near(b.view(b.emas[e], i), ema64[e][i], magnitude[i], at)
    assert not bits(b.emas[:, padding(b)]).any(), "padding written"
    assert int(b.pushes) == 0, "the update must not count as a snapshot"
    originals = [p.clone() for p in params]
    swap_in(b, None)
    for i, (p, want) in enumerate(zip(params, rows[0])):
        assert_same_bits(p, want.to(pdtype), f"phema swap_in: parameter {i}")
        assert_same_bits(b.view(b.backup, i), originals[i], f"phema backup of parameter {i}")
    ops.swap_back(b)
    for i, (p, o) in enumerate(zip(params, originals)):
        assert_same_bits(p, o, f"phema swap_back: parameter {i}")
