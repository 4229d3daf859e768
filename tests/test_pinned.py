"""The pinned-memory history (lawa_optim.offload): queueing and ordering of snapshots.

Without a GPU the device-to-host copy is replaced by a fake transfer that copies at
once and returns an event the test opens when it likes, so the worker thread, the
reuse of the staging buffer and the waits before every read are exercised for real.
The real path (CudaTransfer, its side stream and events, the worker thread) is tested
at the end of this file on a GPU, against the history kept on the device.

Every wait here has a timeout and every gate is opened on the way out of its test,
so a broken ordering fails the test instead of hanging the suite.
"""

import contextlib
import gc
import threading
import warnings
import weakref

import pytest
import torch
from conftest import TIMEOUT, Gate, bits, offloaded

import lawa_optim.history as history
from lawa_optim import LAWA, ops
from lawa_optim.history import Bucket, History
from lawa_optim.offload import CudaTransfer

@contextlib.contextmanager
def closed(gate: Gate):
    """Keep ``gate`` closed inside the block and open it on the way out, whatever happens."""
    try:
        yield gate
    finally:
        gate.opened.set()


def join(thread: threading.Thread) -> None:
    thread.join(TIMEOUT)
    assert not thread.is_alive(), f"{thread.name} still running after {TIMEOUT} s"


def offload_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("lawa-offload")}


def params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in [(3,), (70,), (4, 5)]]


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
    with closed(transfer.gate):
        b.offload.push()
        assert b.offload.pending()
        assert not b.ring.any() and int(b.pushes) == 0  # the worker waits on the event
    assert b.count() == 1  # count() waits for the pending snapshot
    assert torch.equal(b.view(b.ring[0], 1), ps[1]) and torch.equal(b.view(b.total, 2), ps[2])


def test_next_snapshot_does_not_overwrite_staging_still_being_read():
    ps = params()
    b = Bucket(ps, 3, "uniform", None, "cpu", "torch")
    transfer = offloaded(b)
    first = [p.clone() for p in ps]
    with closed(transfer.gate):
        b.offload.push()  # snapshot 0 is copied to staging; its ring update is held at the gate
        for p in ps:
            p.add_(1.0)
        second = threading.Thread(target=b.offload.push)
        second.start()  # must wait for snapshot 0 to leave staging before copying snapshot 1
    join(second)
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
    with closed(transfer.gate):
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
    with closed(transfer.gate):
        b.offload.push()
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
    with closed(transfer.gate):
        opt.snapshot()  # returns with the copy still "in flight" (the gate is closed)
        assert transfer.ordered == []
        for p in ps:
            p.grad = torch.ones_like(p)
        opt.step()  # must not block on the gate, only order the device work after it
        assert transfer.ordered == [transfer.gate]
        opt.step()
        assert transfer.ordered == [transfer.gate]  # once per copy
    assert opt.num_snapshots == 2


@contextlib.contextmanager
def no_cycle_collection():
    """Objects die here when their last reference goes, or not at all."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def test_the_history_is_freed_with_the_optimizer_not_at_the_next_collection():
    ps = params()
    with no_cycle_collection():
        opt = LAWA(torch.optim.SGD(ps, lr=0.1), k=2, storage="cpu")
        opt.snapshot()
        offloaded(opt._history).gate.opened.set()
        opt.snapshot()
        assert opt.num_snapshots == 2
        (b,) = opt._history.buckets
        bucket, ring, staging = weakref.ref(b), weakref.ref(b.ring), weakref.ref(b.offload.staging)
        del b, opt
        assert bucket() is None and ring() is None and staging() is None


def test_a_pending_snapshot_keeps_neither_the_history_nor_its_worker_alive():
    with no_cycle_collection():
        b = Bucket(params(), 2, "uniform", None, "cpu", "torch")
        transfer = offloaded(b)
        before = offload_threads()
        with closed(transfer.gate):
            b.offload.push()
            (worker,) = offload_threads() - before
            bucket, ring = weakref.ref(b), weakref.ref(b.ring)
            del b
            assert bucket() is None and ring() is None  # while the worker waits for the copy
        join(worker)  # the snapshot is dropped, the offload freed, and its thread ends


# -- the real path: CudaTransfer, a side stream, the worker thread (GPU only) ----------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU for the real pinned path")


def sgd_pair(hdtype, seed=0):
    """Two LAWA-wrapped SGDs over equal weights on the GPU: history pinned, and on the device."""
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(s, generator=g) for s in [(3,), (70_001,), (64, 33)]]
    opts = []
    for storage in ("pinned", "device"):
        ps = [torch.nn.Parameter(w.cuda()) for w in weights]
        opts.append(LAWA(torch.optim.SGD(ps, lr=0.1, momentum=0.9), k=3, storage=storage,
                         history_dtype=hdtype, backend="torch"))
    return opts


@needs_cuda
@pytest.mark.parametrize("hdtype", [torch.float32, torch.bfloat16, torch.int8], ids=str)
def test_pinned_snapshots_equal_the_device_history_bit_for_bit(hdtype):
    pinned, device = sgd_pair(hdtype)
    g = torch.Generator().manual_seed(1)
    for _ in range(2 * pinned.k + 1):  # more than two passes over the ring
        grads = [torch.randn(p.shape, generator=g) for p in pinned.param_groups[0]["params"]]
        for opt in (pinned, device):
            for p, grad in zip(opt.param_groups[0]["params"], grads):
                p.grad = grad.cuda()
            opt.step()
            opt.snapshot()
    (b,), (r,) = pinned._history.buckets, device._history.buckets
    assert isinstance(b.offload.transfer, CudaTransfer) and b.ring.is_pinned()
    b.wait()
    assert torch.equal(bits(b.ring), bits(r.ring.cpu())) and torch.equal(bits(b.total), bits(r.total.cpu()))
    if hdtype == torch.int8:
        assert torch.equal(bits(b.scales), bits(r.scales.cpu()))
    for opt in (pinned, device):
        opt.swap_to_average()
    for p, q in zip(pinned.param_groups[0]["params"], device.param_groups[0]["params"]):
        assert torch.equal(bits(p.detach()), bits(q.detach()))


@needs_cuda
def test_a_snapshot_sees_the_work_queued_before_it_and_not_the_step_after_it():
    # 128 MB: the copy to the host takes milliseconds, the step after it microseconds, so
    # a step that did not wait for the copy would overwrite weights being copied.
    p = torch.nn.Parameter(torch.zeros(1 << 25, device="cuda"))
    opt = LAWA(torch.optim.SGD([p], lr=1.0), k=2, storage="pinned")
    p.grad = torch.ones_like(p)
    opt.step()  # builds the history; p = -1
    torch.cuda._sleep(50_000_000)  # tens of ms of GPU time queued before the next write
    with torch.no_grad():
        p.fill_(3.0)
    opt.snapshot()  # must copy 3.0: the side stream waits for the queued fill
    opt.step()  # p = 2.0, only once the copy has read the weights
    assert opt.num_snapshots == 1
    (b,) = opt._history.buckets
    assert torch.equal(b.ring[0, : p.numel()], torch.full((p.numel(),), 3.0))
    assert torch.equal(p.detach(), torch.full_like(p, 2.0))


@needs_cuda
def test_pinned_memory_is_freed_with_the_optimizer():
    with no_cycle_collection():
        p = torch.nn.Parameter(torch.randn(1 << 20, device="cuda"))
        opt = LAWA(torch.optim.SGD([p], lr=0.1), k=2, storage="pinned")
        opt.snapshot()
        assert opt.num_snapshots == 1
        (b,) = opt._history.buckets
        bucket, ring = weakref.ref(b), weakref.ref(b.ring)
        del b, opt
        assert bucket() is None and ring() is None
