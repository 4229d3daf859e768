"""A LAWA history in pinned host memory whose snapshots overlap with training.

LAWA (Kaddour 2022, arXiv:2209.14981) keeps k snapshots of the weights: 6 copies of a
1B-parameter float32 model are 24 GB, which often does not fit beside the model on
its GPU. With ``storage="pinned"`` the ring and the running mean live in page-locked
host memory, and a snapshot of weights on a GPU runs in two halves:

1. on a side stream that first waits for the work already queued (the weights are
   final once the queued optimizer step has run), the weights are copied into a
   pinned staging buffer with asynchronous device-to-host copies, overlapping with
   the forward and backward passes that follow; only the next optimizer step makes the
   current stream wait for that copy (on the GPU, :meth:`Offload.before_step`), so it
   cannot overwrite weights still being read. The Python thread does not block;
2. one worker thread waits for the copy's event and runs the torch backend's push
   (the fused C loop) from the staging buffer into the ring and the mean.

Anything that reads the history (the count, a swap, a recompute, ``state_dict``)
calls :meth:`Offload.wait` first, which also re-raises an error from the worker. The
staging buffer holds one copy of the weights (``D`` elements of the parameters' dtype).
"""

from __future__ import annotations

import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor

from lawa_optim.backends import reference

if TYPE_CHECKING:
    from lawa_optim.history import Bucket


class Done(Protocol):
    """What a transfer returns: something to wait on until the copy has landed."""

    def synchronize(self) -> None: ...


class Transfer(Protocol):
    """Starts copying ``src`` into ``dst`` and returns without waiting for it; ``order``
    makes work queued later on the current stream wait for a copy, without blocking."""

    def copy(self, dst: list[Tensor], src: list[Tensor]) -> Done: ...

    def order(self, done: Done) -> None: ...


class CudaTransfer:
    """Device-to-host copies on a side stream, ordered with the current stream by events."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def copy(self, dst: list[Tensor], src: list[Tensor]) -> torch.cuda.Event:
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            torch._foreach_copy_(dst, src, non_blocking=True)
            # Blocking: the worker thread sleeps in synchronize() for the whole copy (4 GiB
            # take 0.1-0.2 s over PCIe) instead of spinning a core the data loader could use.
            done = torch.cuda.Event(blocking=True)
            done.record(self.stream)
        return done

    def order(self, done: torch.cuda.Event) -> None:
        torch.cuda.current_stream(self.device).wait_event(done)


class Offload:
    """The asynchronous snapshot of one bucket whose history is in host memory.

    ``transfer`` (default: :class:`CudaTransfer` on the parameters' device) moves the
    weights into the staging buffer; ``pin_memory`` page-locks that buffer, which the
    asynchronous copy needs.

    The bucket is held weakly: it holds this offload, and a reference back would make a
    cycle that keeps gigabytes of page-locked ring alive after the optimizer is gone,
    until the next cycle collection. A snapshot still on its way when the bucket goes
    is dropped.
    """

    def __init__(self, bucket: "Bucket", transfer: Transfer | None = None, pin_memory: bool = True) -> None:
        self._bucket = weakref.ref(bucket)
        self.transfer = transfer if transfer is not None else CudaTransfer(bucket.param_device)
        self.staging = torch.empty(bucket.D, dtype=bucket.dtype, pin_memory=pin_memory)
        self._views = bucket.views(self.staging)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lawa-offload")
        self._pending: Future | None = None
        self._unordered: Done | None = None

    def push(self) -> None:
        """Start a snapshot of the current weights and return; it lands in order."""
        bucket = self._bucket()
        if bucket is None:
            raise RuntimeError("the bucket of this offload no longer exists")
        self.wait()  # the staging buffer is reused: the previous update must have read it
        done = self.transfer.copy(self._views, bucket.params)
        self._unordered = done
        self._pending = self._worker.submit(self._update, done)

    def before_step(self) -> None:
        """Order the coming optimizer step after the last copy (on the device, no block)."""
        done, self._unordered = self._unordered, None
        if done is not None:
            self.transfer.order(done)

    def _update(self, done: Done) -> None:
        done.synchronize()
        bucket = self._bucket()
        if bucket is None:  # the optimizer went away: nobody can read this snapshot
            return
        (reference.push_int8 if bucket.int8 else reference.push)(bucket, self._views)
        bucket.pushes.add_(1)

    def pending(self) -> bool:
        """Whether a snapshot is still on its way into the ring."""
        return self._pending is not None and not self._pending.done()

    def wait(self) -> None:
        """Block until the last snapshot is in the ring; re-raise its error, if any."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()  # the copy is complete: nothing left to order
            self._unordered = None

    def nbytes(self) -> int:
        """Bytes of the staging buffer."""
        return self.staging.numel() * self.staging.element_size()
