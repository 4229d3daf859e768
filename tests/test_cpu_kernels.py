"""The fused CPU kernels (csrc/cpu_kernels.c) where the contract matrix (test_ops.py, which
runs them on finite values) does not reach: signed zeros, infinities, NaNs, subnormals and
rounding ties through every operation and every pair of float32/bfloat16/float16
parameters and history, against the plain torch code and an element-wise oracle, on one
and two threads; every float16 conversion; the EMA's single rounding, checked in exact
arithmetic; the C entry points' own refusals. The build's failure modes are in
test_native.py."""

import os
import subprocess
import sys
import textwrap
import warnings
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import COMBOS, DTYPES, SMALL_ROW, Contract, assert_same_bits, bits, dtype_id, make_params

from lawa_optim import ops
from lawa_optim.backends import cpu_kernels
from lawa_optim.history import Bucket

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")

pytestmark = pytest.mark.skipif(cpu_kernels.library() is None, reason="no C compiler for the fused CPU kernels")


@pytest.fixture(autouse=True)
def fused_short_rows(monkeypatch):
    """The fused kernels on, whatever LAWA_OPTIM_CPU_KERNELS says, with short work rows."""
    monkeypatch.setattr(cpu_kernels, "enabled", True)
    monkeypatch.setattr(cpu_kernels, "ROW", SMALL_ROW)


def special_values(n: int, seed: int) -> torch.Tensor:
    """Random values over many scales plus the edge cases of the casts: signed zeros,
    infinities, NaNs, float32 subnormals, bfloat16 and float16 rounding ties, float16
    overflow, its largest value and its subnormals."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 10 ** torch.randint(-8, 8, (n,), generator=g).float()
    edge = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), -float("nan"), 1e-40,
                         -3e-39, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 65520.0, 7e4, 2**-25, 65504.0,
                         65519.0, -(2**-14), 2**-24, -3 * 2**-25, 1.0 + 2**-11, 1.0 + 3 * 2**-11,
                         2**-15 + 2**-25, 3e38, -2**-126])
    m = min(n, len(edge))
    x[:m] = edge[:m]
    return x


def fill(params, seed, special=True):
    """Special values, or (``special=False``) finite normal ones."""
    g = torch.Generator().manual_seed(seed)
    for i, p in enumerate(params):
        values = special_values(p.numel(), seed=100 * seed + i) if special else torch.randn(p.numel(), generator=g)
        p.copy_(values.view(p.shape))


def state(b: Bucket, params):
    return [t.clone() for t in (b.ring, b.total, b.backup, *params) if t is not None]


def after_push(b: Bucket):
    """What a push writes: the slot it filled and the sum."""
    n = int(b.pushes.item()) - 1
    return [b.ring[n % b.k].clone(), b.total.clone()]


def both_ways(monkeypatch, run):
    """``run()`` with the fused kernels and with the plain torch code; each returns the
    tensors to compare, which must agree bit for bit (NaN payloads aside)."""
    monkeypatch.setattr(cpu_kernels, "enabled", False)
    plain = run()
    monkeypatch.setattr(cpu_kernels, "enabled", True)
    fused = run()
    assert len(plain) == len(fused)
    for i, (f, p) in enumerate(zip(fused, plain)):
        assert_same_bits(f, p, f"tensor {i}", any_nan=True)


@pytest.mark.parametrize("pdtype,hdtype", COMBOS, ids=dtype_id)
@pytest.mark.parametrize("k,refresh_every", [(1, None), (3, None), (3, 2), (3, 5), (4, 1)])
def test_push_follows_the_contract(pdtype, hdtype, k, refresh_every):
    """Every slot and the sum of every parameter after each push, bit for bit as the
    contract (conftest.Contract) has them, empty slots still zero (NaN payloads aside)."""
    params = make_params(CPU, pdtype)
    b = Bucket(params, k, "uniform", hdtype, "device", "torch", refresh_every)
    assert cpu_kernels.runs(b)
    c = Contract(params, k, hdtype, refresh_every)
    for n in range(2 * k + 3):
        fill(params, seed=n)
        ops.push(b)
        c.push(params)
        for i in range(len(params)):
            for s in range(k):
                got, want = b.view(b.ring[s], i), c.slot(s)
                if want is None:
                    assert not bits(got).any(), f"push {n}: empty slot {s} of param {i} was written"
                else:
                    assert_same_bits(got, want[i], f"push {n}, slot {s} of param {i}", any_nan=True)
            assert_same_bits(b.view(b.total, i), c.total[i], f"push {n}, sum of param {i}", any_nan=True)


def every_float16() -> torch.Tensor:
    return torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16)


def float32_around_float16() -> torch.Tensor:
    """Every finite float16 value, the float32 ties halfway to its neighbour and one
    float32 ulp either side of them, and values beyond the float16 range."""
    h = every_float16().float()
    h = h[h.isfinite()].unique()
    mid = (h[1:].double() + h[:-1].double()) / 2
    mid = mid.float()
    up, down = (torch.nextafter(mid, torch.tensor(d)) for d in (float("inf"), -float("inf")))
    return torch.cat([h, mid, up, down, torch.tensor([65520.0, -65520.0, 1e5, 3e38])])


@pytest.mark.parametrize("pdtype,hdtype,values", [
    (torch.float16, torch.float32, every_float16),
    (torch.float16, torch.bfloat16, every_float16),
    (torch.float32, torch.float16, float32_around_float16),
    (torch.bfloat16, torch.float16, lambda: torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)),
], ids=["f16-to-f32", "f16-to-bf16", "f32-to-f16", "bf16-to-f16"])
def test_float16_conversions_match_torch_for_every_value(pdtype, hdtype, values):
    """The kernels convert float16 in vectorised integer arithmetic: each float16 value,
    and each float32 or bfloat16 value that rounds to one (ties included), converts as
    torch converts it, and the sum widens the stored value exactly."""
    x = values().to(pdtype)
    b = Bucket([x.clone()], 2, "uniform", hdtype, "device", "torch")
    assert cpu_kernels.runs(b)
    ops.push(b)
    want = x.to(hdtype)
    assert_same_bits(b.ring[0, : x.numel()], want, "the stored snapshot", any_nan=True)
    assert_same_bits(b.total[: x.numel()], torch.zeros(x.numel()) + want.float(), "the sum, 0 + new", any_nan=True)


@pytest.mark.parametrize("pdtype,hdtype", COMBOS, ids=dtype_id)
def test_every_operation_matches_the_plain_code(monkeypatch, pdtype, hdtype):
    """Pushes with refreshes, the swap-in in every mode, the swap-back: the same bits as
    the plain torch code, on one and on two threads (a parameter spans several rows)."""
    k = 3

    def run():
        params = make_params(CPU, pdtype)
        b = Bucket(params, k, "uniform", hdtype, "device", "torch")
        out = []
        for n in range(2 * k + 2):
            torch.set_num_threads(1 + n % 2)
            fill(params, seed=n)
            if n in (1, 2 * k + 1):  # part of the ring filled, then wrapped
                live = [p.clone() for p in params]
                for last in (None, *range(1, min(n, k) + 1)):
                    b.backup = torch.zeros(b.D, dtype=pdtype)  # padding included: compared below
                    ops.swap_in(b, last)
                    out += [b.backup.clone(), *(p.clone() for p in params)]
                    ops.swap_back(b)
                    assert all(torch.equal(bits(p), bits(x)) for p, x in zip(params, live))
            ops.push(b)
            out += after_push(b)
        return out + state(b, params)

    threads = torch.get_num_threads()
    try:
        both_ways(monkeypatch, run)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("pdtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("decay", [0.9, 0.999, 1 / 3, 0.5])
def test_ema_matches_the_plain_code(monkeypatch, pdtype, decay):
    def run():
        params = make_params(CPU, pdtype)
        b = Bucket(params, 3, "ema", None, "device", "torch")
        out = []
        for n in range(4):
            fill(params, seed=n, special=n != 2)  # a NaN poisons the EMA for good
            ops.ema_update(b, decay)
            out.append(b.total.clone())
        b.backup = torch.zeros(b.D, dtype=pdtype)  # padding included: compared below
        ops.swap_in(b, 2)  # last is ignored in EMA mode
        out += state(b, params)
        ops.swap_back(b)
        return out + [p.clone() for p in params]

    both_ways(monkeypatch, run)


def round_to_float32(x: Fraction) -> float:
    """``x`` rounded once to float32, to nearest, ties to even."""
    f = torch.tensor(float(x), dtype=torch.float32)
    candidates = [torch.nextafter(f, torch.tensor(d)).item() for d in (-float("inf"), float("inf"))]
    best = min([f.item(), *candidates], key=lambda c: (abs(Fraction(c) - x), torch.tensor(c).view(torch.int32).item() & 1))
    return best


def test_ema_rounds_the_product_then_one_fused_multiply_add():
    """An oracle in exact rational arithmetic: total = fma(param, 1 - decay, decay * total),
    the product rounded to float32 first, on 67 elements (vectors and a scalar tail)."""
    assert cpu_kernels.ema_rounding() is True, "this torch build fuses add-with-alpha on x86-64 with AVX2"
    g = torch.Generator().manual_seed(0)
    decay = 0.9
    d32, a32 = torch.tensor(decay).float().item(), torch.tensor(1.0 - decay).float().item()
    p = torch.randn(67, generator=g)
    b = Bucket([p], 2, "ema", None, "device", "torch")
    ops.ema_update(b, decay)
    before = b.total[:67].clone()
    p.copy_(torch.randn(67, generator=g) * 3)
    ops.ema_update(b, decay)
    fused = 0
    for i in range(67):
        prod = round_to_float32(Fraction(before[i].item()) * Fraction(d32))
        want = round_to_float32(Fraction(p[i].item()) * Fraction(a32) + Fraction(prod))
        twice = round_to_float32(Fraction(round_to_float32(Fraction(p[i].item()) * Fraction(a32))) + Fraction(prod))
        assert b.total[i].item() == want, f"element {i}"
        fused += want != twice
    assert fused == 11  # elements of this data where one rounding and two differ: it tells them apart


def test_ema_follows_torch_where_it_rounds_twice(monkeypatch):
    """With the rounding probe answering "twice" (torch built without FMA, or
    ATEN_CPU_CAPABILITY=default), the kernel rounds the second product too; with no
    consistent answer the EMA runs the plain code."""
    g = torch.Generator().manual_seed(1)
    p = torch.randn(67, generator=g)
    b = Bucket([p], 2, "ema", None, "device", "torch")
    monkeypatch.setattr(cpu_kernels, "_ema_rounding", False)
    ops.ema_update(b, 0.9)
    start = b.total.clone()
    p.copy_(torch.randn(67, generator=g))
    ops.ema_update(b, 0.9)
    want = start[:67] * torch.tensor(0.9).float() + p * torch.tensor(1.0 - 0.9).float()
    assert torch.equal(b.total[:67], want)
    monkeypatch.setattr(cpu_kernels, "_ema_rounding", None)
    assert cpu_kernels.runs(b) and not cpu_kernels.runs(b, "ema")


def test_ema_matches_a_torch_that_rounds_twice():
    """Under ATEN_CPU_CAPABILITY=default torch's add-with-alpha is not fused: the probe
    sees it and the fused EMA still leaves the plain code's bits (in a fresh process)."""
    script = textwrap.dedent("""
        import torch
        from lawa_optim import ops
        from lawa_optim.backends import cpu_kernels
        from lawa_optim.history import Bucket
        g = torch.Generator().manual_seed(0)
        values = [torch.randn(1000, generator=g) for _ in range(3)]
        totals = []
        for fused in (True, False):
            cpu_kernels.enabled = fused
            p = torch.zeros(1000)
            b = Bucket([p], 2, "ema", None, "device", "torch")
            for v in values:
                p.copy_(v)
                ops.ema_update(b, 0.9)
            totals.append(b.total)
        print(torch.backends.cpu.get_cpu_capability(), cpu_kernels.ema_rounding(), torch.equal(*totals))
    """)
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    *capability, rounding, same = out.stdout.split()
    assert " ".join(capability) in ("DEFAULT", "NO AVX")  # torch 2.6 names it "NO AVX"
    assert [rounding, same] == ["False", "True"]


def test_refusals_of_the_c_entry_points_write_nothing():
    """Counts that would index outside the ring and unknown dtype codes are refused by the
    kernels themselves before anything is written."""
    params = make_params(CPU, torch.float32)
    b = Bucket(params, 3, "uniform", None, "device", "torch")
    for n in range(2):
        fill(params, seed=n, special=False)
        ops.push(b)
    b.backup = torch.full((b.D,), 7.0)
    table = cpu_kernels.rows(b, params)
    before = state(b, params)
    lib = cpu_kernels.library()
    common = (table.data_ptr(), table.shape[0])
    w = torch.full((4,), 0.25)
    calls = {
        "push with k=0": lib.lawa_cpu_push(*common, 0, 0, b.ring.data_ptr(), b.D, 0, 2, 3, b.total.data_ptr(), 1),
        "push with refresh_every=0": lib.lawa_cpu_push(*common, 0, 0, b.ring.data_ptr(), b.D, 3, 2, 0, b.total.data_ptr(), 1),
        "push of dtype code 3": lib.lawa_cpu_push(*common, 3, 0, b.ring.data_ptr(), b.D, 3, 2, 3, b.total.data_ptr(), 1),
        "last=3 after 2 pushes": lib.lawa_cpu_swap_in(*common, 0, 0, b.backup.data_ptr(), b.total.data_ptr(), b.ring.data_ptr(), b.D, 3, 2, 2, 3, 1),
        "last=0": lib.lawa_cpu_swap_in(*common, 0, 0, b.backup.data_ptr(), b.total.data_ptr(), b.ring.data_ptr(), b.D, 3, 2, 2, 0, 1),
        "last without a ring": lib.lawa_cpu_swap_in(*common, 0, 0, b.backup.data_ptr(), b.total.data_ptr(), None, b.D, 3, 2, 2, 1, 1),
        "swap-in mode 3": lib.lawa_cpu_swap_in(*common, 0, 0, b.backup.data_ptr(), b.total.data_ptr(), b.ring.data_ptr(), b.D, 3, 2, 3, 1, 1),
        "3 weights after 2 pushes": lib.lawa_cpu_swap_weighted(*common, 0, 0, b.backup.data_ptr(), b.ring.data_ptr(), b.D, 3, 2, w.data_ptr(), 3, 1),
        "4 weights with k=3": lib.lawa_cpu_swap_weighted(*common, 0, 0, b.backup.data_ptr(), b.ring.data_ptr(), b.D, 3, 5, w.data_ptr(), 4, 1),
        "no weights": lib.lawa_cpu_swap_weighted(*common, 0, 0, b.backup.data_ptr(), b.ring.data_ptr(), b.D, 3, 2, w.data_ptr(), 0, 1),
        "weights without a ring": lib.lawa_cpu_swap_weighted(*common, 0, 0, b.backup.data_ptr(), None, b.D, 3, 2, w.data_ptr(), 1, 1),
        "weighted of dtype code 3": lib.lawa_cpu_swap_weighted(*common, 0, 3, b.backup.data_ptr(), b.ring.data_ptr(), b.D, 3, 2, w.data_ptr(), 1, 1),
        "EMA of dtype code -1": lib.lawa_cpu_ema(*common, -1, b.total.data_ptr(), 0, 0.9, 1, 1),
        "swap-back of dtype code 5": lib.lawa_cpu_swap_back(*common, 5, b.backup.data_ptr(), 1),
    }
    for what, rc in calls.items():
        assert rc in (-1, -2), what
    for i, (x, y) in enumerate(zip(state(b, params), before)):
        assert torch.equal(x, y), f"tensor {i} changed"


def test_which_operations_run_fused(monkeypatch):
    probe = SimpleNamespace(device=torch.device("cpu"), param_device=torch.device("cpu"),
                            dtype=torch.float32, history_dtype=torch.bfloat16)
    assert all(cpu_kernels.runs(probe, op) for op in ("push", "ema", "swap"))
    # History in host memory, weights on a GPU: pushes and EMA updates read copies on the
    # host, swaps write the GPU weights, which the C kernels cannot reach.
    probe.param_device = torch.device("cuda")
    assert cpu_kernels.runs(probe, "push") and cpu_kernels.runs(probe, "ema")
    assert not cpu_kernels.runs(probe, "swap")
    probe.param_device = torch.device("cpu")
    for dtypes in ((torch.float64, torch.float64), (torch.float32, torch.float64)):
        probe.dtype, probe.history_dtype = dtypes
        assert not any(cpu_kernels.runs(probe, op) for op in ("push", "ema", "swap"))
    probe.dtype = probe.history_dtype = torch.float16
    monkeypatch.setattr(cpu_kernels, "enabled", False)
    assert not any(cpu_kernels.runs(probe, op) for op in ("push", "ema", "swap"))


def test_missing_compiler_warns_once_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("LAWA_OPTIM_BUILD_DIR", str(tmp_path))
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
