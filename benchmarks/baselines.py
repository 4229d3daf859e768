"""What people do today to average weights, on the same tensors as the LAWA history.

LAWA (Kaddour 2022, arXiv:2209.14981) keeps the k latest snapshots in a ring plus a
running mean. The baselines work on per-parameter views of that same ring and mean:

* ``foreach``: ``torch._foreach_*`` calls over the parameter list, as
  ``torch.optim.swa_utils.AveragedModel`` updates its average (a ring push is
  sub, copy, add: about 32 bytes per float32 element);
* ``loop``: the same arithmetic one parameter at a time in Python;
* ``authors``: keep k copies and recompute the mean from all of them for every
  average, as the paper's code does (O(k) per average).

The ``foreach`` push adds ``(new - old) / k`` as two scaled additions (``total - old/k
+ new/k``), so its mean can differ from the fused one in the last bits; the ring it
writes is identical. The recompute baselines sum the slots plainly, where the history's
refresh compensates its sum (:mod:`lawa_optim.ops`): equal to float32 rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lawa_optim.history import Bucket, accumulation_dtype


@dataclass
class Lists:
    """Per-parameter views of a bucket's buffers, the shape a baseline works on."""

    params: list[Tensor]
    slots: list[list[Tensor]]
    total: list[Tensor]
    backup: list[Tensor]
    avg: list[Tensor]

    @classmethod
    def of(cls, b: Bucket, avg: Tensor) -> "Lists":
        """Views into ``b``'s ring, sum and backup, and into ``avg`` (a flat ``(D,)``
        buffer of the parameters' dtype, where the authors' mean goes)."""
        slots = [] if b.ring is None else [b.views(b.ring[s]) for s in range(b.k)]  # EMA keeps no ring
        backup = [] if b.backup is None else b.views(b.backup)
        return cls(b.params, slots, b.views(b.total), backup, b.views(avg))


def roofline(dst: Tensor, src: Tensor) -> None:
    """A plain device copy: what moving the same bytes costs at best."""
    dst.copy_(src)


def foreach_push(x: Lists, n: int) -> None:
    """Ring push number ``n`` into the running mean with three ``torch._foreach_*``
    passes: sub, copy, add (scaled by 1/k; a lerp towards the new slot while filling)."""
    k = len(x.slots)
    slot = x.slots[n % k]
    if n >= k:
        torch._foreach_add_(x.total, slot, alpha=-1.0 / k)
    torch._foreach_copy_(slot, x.params)
    if n >= k:
        torch._foreach_add_(x.total, slot, alpha=1.0 / k)
    else:
        torch._foreach_lerp_(x.total, [t.to(x.total[0].dtype) for t in slot], 1.0 / (n + 1))


def loop_push(x: Lists, n: int) -> None:
    """Ring push number ``n`` into the running mean, one parameter at a time."""
    k = len(x.slots)
    s = n % k
    for i, p in enumerate(x.params):
        if n >= k:
            x.total[i].add_(x.slots[s][i], alpha=-1.0 / k)
        x.slots[s][i].copy_(p)
        if n >= k:
            x.total[i].add_(x.slots[s][i], alpha=1.0 / k)
        else:
            x.total[i].lerp_(x.slots[s][i].to(x.total[i].dtype), 1.0 / (n + 1))


def authors_push(x: Lists, n: int) -> None:
    """Store snapshot ``n`` as one of k copies and recompute their mean (O(k))."""
    torch._foreach_copy_(x.slots[n % len(x.slots)], x.params)
    authors_mean(x, min(n + 1, len(x.slots)))


def authors_mean(x: Lists, filled: int) -> None:
    """The mean of the ``filled`` stored copies, summed from scratch into ``x.avg``."""
    # A copy, always: ``Tensor.float()`` of a float32 slot is the slot itself, and the sum
    # would then be accumulated into the ring.
    acc = [t.to(accumulation_dtype(t.dtype), copy=True) for t in x.slots[0]]
    for s in range(1, filled):
        torch._foreach_add_(acc, x.slots[s])
    torch._foreach_div_(acc, filled)
    torch._foreach_copy_(x.avg, acc)


def foreach_ema(x: Lists, decay: float) -> None:
    """``AveragedModel``'s EMA update: one ``torch._foreach_lerp_`` over the list."""
    torch._foreach_lerp_(x.total, [p.to(t.dtype) for p, t in zip(x.params, x.total)], 1.0 - decay)


def loop_ema(x: Lists, decay: float) -> None:
    """The EMA update one parameter at a time."""
    for t, p in zip(x.total, x.params):
        t.lerp_(p.to(t.dtype), 1.0 - decay)


def foreach_swap_in(x: Lists, filled: int) -> None:
    """Back up the weights, then write the running mean into them."""
    torch._foreach_copy_(x.backup, x.params)
    torch._foreach_copy_(x.params, x.total)


def loop_swap_in(x: Lists, filled: int) -> None:
    """The swap-in one parameter at a time."""
    for p, b, t in zip(x.params, x.backup, x.total):
        b.copy_(p)
        p.copy_(t)


def authors_swap_in(x: Lists, filled: int) -> None:
    """Back up the weights and write the mean recomputed from all stored copies."""
    torch._foreach_copy_(x.backup, x.params)
    authors_mean(x, filled)
    torch._foreach_copy_(x.params, x.avg)


def foreach_swap_back(x: Lists, _: int = 0) -> None:
    """Restore the weights from the backup."""
    torch._foreach_copy_(x.params, x.backup)


def loop_swap_back(x: Lists, _: int = 0) -> None:
    """Restore the weights one parameter at a time."""
    for p, b in zip(x.params, x.backup):
        p.copy_(b)


def foreach_recompute(x: Lists, filled: int) -> None:
    """Sum the filled slots from scratch and divide: the running mean."""
    torch._foreach_zero_(x.total)
    for s in range(filled):
        torch._foreach_add_(x.total, x.slots[s])
    torch._foreach_div_(x.total, float(filled))


def loop_recompute(x: Lists, filled: int) -> None:
    """The recompute one parameter at a time."""
    for i, t in enumerate(x.total):
        t.zero_()
        for s in range(filled):
            t.add_(x.slots[s][i])
        t.div_(float(filled))


#: Baselines per operation: name -> callable(lists, arg); the arg is the push number,
#: the decay or the number of filled slots, as the operation needs (unused by swap_back).
BASELINES: dict[str, dict[str, Callable]] = {
    "snapshot": {"foreach": foreach_push, "loop": loop_push, "authors": authors_push},
    "ema": {"foreach": foreach_ema, "loop": loop_ema},
    "swap_in": {"foreach": foreach_swap_in, "loop": loop_swap_in, "authors": authors_swap_in},
    "swap_back": {"foreach": foreach_swap_back, "loop": loop_swap_back},
    "recompute": {"foreach": foreach_recompute, "loop": loop_recompute},
}
