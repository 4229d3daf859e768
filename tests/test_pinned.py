"""The pinned-memory history (lawa_optim.offload): queueing and ordering of snapshots.

Without a GPU the device-to-host copy is replaced by a fake transfer that copies at
once and returns an event the test opens when it likes, so the worker thread, the
reuse of the staging buffer and the waits before every read are exercised for real;
the side stream and the CUDA events themselves need a GPU (tested there).
"""

import threading
import warnings

import pytest
import torch

import lawa_optim.history as history
from lawa_optim import LAWA, ops
from lawa_optim.history import Bucket, History
from lawa_optim.offload import Offload


class Gate:
    """A fake CUDA event: ``synchronize`` blocks until the test opens the gate."""

    def __init__(self, error: Exception | None = None) -> None:
        self.opened = threading.Event()
        self.error = error

    def synchronize(self) -> None:
        self.opened.wait()
        if self.error is not None:
            raise self.error


class FakeTransfer:
    """Copies at once (the weights are read when the copy is issued, as the side stream
    does after waiting for the queued step) and hands out the current gate."""

    def __init__(self) -> None:
        self.gate = Gate()
        self.ordered: list[Gate] = []

    def copy(self, dst, src):
        torch._foreach_copy_(dst, src)
        return self.gate

    def order(self, done):
        self.ordered.append(done)


def params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in [(3,), (70,), (4, 5)]]


def offloaded(history_or_bucket):
    """Give each bucket a fake-transfer offload (a GPU would give a CudaTransfer)."""
    buckets = history_or_bucket.buckets if isinstance(history_or_bucket, History) else [history_or_bucket]
    transfer = FakeTransfer()
    for b in buckets:
        b.offload = Offload(b, transfer, pin_memory=False)
    return transfer


def test_pinned_without_cuda_warns_and_keeps_the_cpu_path(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available: storage='pinned' is real here")
    monkeypatch.setattr(history, "_pinned_warned", False)
    ps = params()
    with pytest.warns(UserWarning, match="storage='pinned' needs CUDA"):
        opt = LAWA(torch.optim.SGD(ps, lr=0.1), k=2, storage="pinned")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        LAWA(torch.optim.SGD(ps, lr=0.1), k=2, storage="pinned")
    opt.snapshot()
    assert all(b.offload is None for b in opt._history.buckets)
    assert torch.equal(opt._history.buckets[0].ring[0, :3], ps[0])


def test_snapshot_returns_before_the_ring_is_written_and_lands_on_read():
    ps = params()
    b = Bucket(ps, 3, "uniform", None, "cpu", "torch")
    transfer = offloaded(b)
    b.offload.push()
    assert b.offload.pending()
    assert not b.ring.any() and int(b.pushes) == 0  # the worker waits on the event
    transfer.gate.opened.set()
    assert b.count() == 1  # count() waits for the pending snapshot
    assert torch.equal(b.view(b.ring[0], 1), ps[1]) and torch.equal(b.view(b.total, 2), ps[2])


def test_next_snapshot_does_not_overwrite_staging_still_being_read():
    ps = params()
    b = Bucket(ps, 3, "uniform", None, "cpu", "torch")
    transfer = offloaded(b)
    first = [p.clone() for p in ps]
    b.offload.push()  # snapshot 0 is copied to staging; its ring update is held at the gate
    for p in ps:
        p.add_(1.0)
    second = threading.Thread(target=b.offload.push)
    second.start()  # must wait for snapshot 0 to leave staging before copying snapshot 1
    transfer.gate.opened.set()
    second.join()
    b.wait()
    assert b.count() == 2
    for i in range(len(ps)):
        assert torch.equal(b.view(b.ring[0], i), first[i])
        assert torch.equal(b.view(b.ring[1], i), ps[i])


def test_offloaded_history_matches_the_synchronous_one_and_swaps_see_the_last_snapshot():
    k, steps = 3, 7
    ps, ref_ps = params(), params()
    hist = History(k, "uniform", torch.bfloat16, "cpu", "torch", recompute_every=4)
    ref = History(k, "uniform", torch.bfloat16, "cpu", "torch", recompute_every=4)
    hist.extend([{"params": ps}])
    ref.extend([{"params": ref_ps}])
    offloaded(hist).gate.opened.set()
    for step in range(steps):
        for p, q in zip(ps, ref_ps):
            p.mul_(0.5).add_(step)
            q.copy_(p)
        hist.push()
        ref.push()
        hist.swap_in(None)  # waits for the snapshot just taken
        ref.swap_in(None)
        for p, q in zip(ps, ref_ps):
            assert torch.equal(p, q)
        hist.swap_back()
        ref.swap_back()
    (b,), (r,) = hist.buckets, ref.buckets
    assert torch.equal(b.ring.view(torch.int16), r.ring.view(torch.int16))
    assert torch.equal(b.total, r.total)


def test_state_dict_waits_for_a_pending_snapshot():
    ps = params()
    opt = LAWA(torch.optim.SGD(ps, lr=0.1), k=2, storage="cpu")
    opt.snapshot()
    transfer = offloaded(opt._history)
    for p in ps:
        p.add_(2.0)
    opt.snapshot()
    threading.Timer(0.05, transfer.gate.opened.set).start()
    sd = opt.state_dict()
    hist = sd["state"][1]["lawa_history"]
    assert torch.equal(hist[1], ps[1])
    assert opt.num_snapshots == 2


def test_an_error_on_the_worker_is_raised_by_the_next_read():
    b = Bucket(params(), 2, "uniform", None, "cpu", "torch")
    transfer = offloaded(b)
    transfer.gate = Gate(RuntimeError("copy failed"))
    b.offload.push()
    transfer.gate.opened.set()
    with pytest.raises(RuntimeError, match="copy failed"):
        b.count()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert b.count() == 0  # the error is reported once; nothing was recorded
    ops.push(b)
    assert b.count() == 1


def test_the_next_step_is_ordered_after_the_copy_without_blocking():
    ps = [torch.nn.Parameter(p) for p in params()]
    opt = LAWA(torch.optim.SGD(ps, lr=0.1), k=2)
    opt.snapshot()
    transfer = offloaded(opt._history)
    opt.snapshot()  # returns with the copy still "in flight" (the gate is closed)
    assert transfer.ordered == []
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()  # must not block on the gate, only order the device work after it
    assert transfer.ordered == [transfer.gate]
    opt.step()
    assert transfer.ordered == [transfer.gate]  # once per copy
    transfer.gate.opened.set()
    assert opt.num_snapshots == 2
