"""The flat history: layout, memory, drift of the running sum, parameter changes."""

import pytest
import torch

from lawa_optim import LAWA, ops
from lawa_optim.history import ALIGN, Bucket, History, is_dense


def relative_error(b: Bucket, filled: int) -> float:
    """max over elements of |total/count - mean64(slots)| / mean64(|slots|)."""
    held = b.ring[:filled].double()
    return ((b.total.double() / filled - held.mean(0)).abs() / held.abs().mean(0)).max().item()


def drift_run(recompute_every, n=100_000, width=64):
    """Push n snapshots whose elements have scales spread over six orders of magnitude
    (1e-3 .. 1e3) and signs that change; return the worst error seen and the last one."""
    g = torch.Generator().manual_seed(0)
    scale = 10 ** (torch.rand(width, generator=g) * 6 - 3)
    data = torch.randn(n, width, generator=g) * scale
    p = torch.zeros(width)
    hist = History(6, "uniform", None, "device", "torch", recompute_every)
    hist.extend([{"params": [p]}])
    (b,) = hist.buckets
    worst = 0.0
    for i in range(n):
        p.copy_(data[i])
        hist.push()
        if i % 499 == 0 or i == n - 1:
            err = relative_error(b, min(i + 1, 6))
            worst = max(worst, err)
    return worst, err


def test_drift_is_bounded_by_the_refresh():
    worst, _ = drift_run(recompute_every=None)  # the default: an exact refresh every k pushes
    assert worst <= 1e-5
    worst_off, last_off = drift_run(recompute_every=10**9)
    # Without the refresh the rounding error of the running sum random-walks upward.
    assert worst_off > 1e-5 and worst_off > 3 * worst
    early_off, _ = drift_run(recompute_every=10**9, n=5_000)
    assert last_off > early_off


@pytest.mark.parametrize("hdtype", [None, torch.bfloat16])
def test_memory_is_k_slots_plus_one_fp32_sum(hdtype):
    model = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.Linear(20, 3))
    opt = LAWA(torch.optim.SGD(model.parameters(), lr=0.1), k=6, history_dtype=hdtype)
    assert opt._history.nbytes() == 0  # nothing before the first step or snapshot
    opt.snapshot()
    D = sum(-(-p.numel() // ALIGN) * ALIGN for p in model.parameters())
    slot_bytes = (hdtype or torch.float32).itemsize
    counter = 8
    assert opt._history.nbytes() == 6 * D * slot_bytes + 4 * D + counter
    for _ in range(20):
        opt.snapshot()  # no allocation per snapshot
    assert opt._history.nbytes() == 6 * D * slot_bytes + 4 * D + counter
    opt.swap_to_average()
    assert opt._history.nbytes() == 6 * D * slot_bytes + 4 * D + counter + 4 * D  # the backup
    opt.swap_back()
    assert opt._history.nbytes() == 6 * D * slot_bytes + 4 * D + counter


def test_ema_keeps_no_ring():
    p = torch.nn.Parameter(torch.randn(100))
    opt = LAWA(torch.optim.SGD([p], lr=0.1), mode="ema")
    opt.snapshot()
    D = 2 * ALIGN
    assert opt._history.nbytes() == 4 * D + 8


def test_layout_aligns_every_parameter():
    params = [torch.randn(n) for n in (1, 63, 64, 65, 200)]
    b = Bucket(params, 2, "uniform", None, "device", "torch")
    assert all(o % ALIGN == 0 for o in b.offsets)
    assert b.offsets == [0, 64, 128, 192, 320]
    assert b.D == 320 + 256


def test_channels_last_is_stored_in_memory_order():
    w = torch.randn(4, 3, 2, 2).contiguous(memory_format=torch.channels_last)
    b = Bucket([w], 2, "uniform", None, "device", "torch")
    ops.push(b)
    # The slot holds the raw memory of the weight, so a linear copy kernel is correct.
    raw = w.as_strided((w.numel(),), (1,))
    assert torch.equal(b.ring[0, : w.numel()], raw)
    assert torch.equal(b.view(b.ring[0], 0), w)
    assert torch.equal(b.history_view(0)[0], w)


def test_is_dense():
    x = torch.randn(4, 6)
    assert is_dense(x) and is_dense(x.t()) and is_dense(torch.randn(1))
    assert not is_dense(x[:, :3]) and not is_dense(x[::2])
    assert is_dense(torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last))


def test_non_dense_parameter_is_refused():
    base = torch.randn(4, 6)
    p = torch.nn.Parameter(base[:, :3])
    with pytest.raises(ValueError, match="dense"):
        LAWA(torch.optim.SGD([p], lr=0.1))


def test_moved_parameter_storage_is_followed():
    p = torch.nn.Parameter(torch.zeros(5))
    opt = LAWA(torch.optim.SGD([p], lr=0.1), k=2)
    opt.snapshot()
    p.data = torch.full((5,), 2.0)  # new storage, same layout
    opt.snapshot()
    with opt.averaged():
        assert torch.equal(p.detach(), torch.ones(5))
    p.data = torch.zeros(6)
    with pytest.raises(RuntimeError, match="changed shape"):
        opt.snapshot()


def test_buckets_split_by_dtype():
    a = torch.nn.Parameter(torch.randn(3))
    h = torch.nn.Parameter(torch.randn(5, dtype=torch.bfloat16))
    d = torch.nn.Parameter(torch.randn(2, dtype=torch.float64))
    opt = LAWA(torch.optim.SGD([a, h, d], lr=0.1), k=2)
    opt.snapshot()
    buckets = opt._history.buckets
    assert [b.dtype for b in buckets] == [torch.float32, torch.bfloat16, torch.float64]
    assert buckets[2].total.dtype == torch.float64
    assert buckets[1].total.dtype == torch.float32
