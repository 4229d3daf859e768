"""Pure-torch implementation of the entry points in :mod:`lawa_optim.ops`.

The fallback on any device and the oracle the fused backends are tested against:
written for clarity, with no Python loop over elements and bounded temporaries (the
flat buffer is walked in chunks of whole parameters, so a snapshot of a full ring
needs one float32 chunk of scratch, not a second copy of the model). It reads the
snapshot counter with ``.item()``, a host sync on a GPU: the fused backends don't.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from lawa_optim.history import Bucket

#: Elements per chunk of scratch (16 MiB of float32); a larger parameter is its own chunk.
CHUNK = 1 << 22


def unavailable(bucket: "Bucket") -> str | None:
    """The reference runs every bucket."""
    return None


def _cache(b: "Bucket") -> dict:
    c = b.cache.get("torch")
    if c is None:
        P = len(b.params)
        chunks, i0 = [], 0
        while i0 < P:
            i1 = i0 + 1
            while i1 < P and b.offsets[i1] + b.numels[i1] - b.offsets[i0] <= CHUNK:
                i1 += 1
            hi = b.offsets[i1] if i1 < P else b.D
            chunks.append((b.offsets[i0], hi, i0, i1))
            i0 = i1
        c = b.cache["torch"] = {
            "chunks": chunks,
            "slots": None if b.ring is None else [[b.view(b.ring[s], i) for i in range(P)] for s in range(b.k)],
            "total": [b.view(b.total, i) for i in range(P)],
        }
    return c


def _params(b: "Bucket") -> list[Tensor]:
    # History kept off the parameters' device (storage="cpu"/"pinned"): bring them over first.
    if b.device == b.param_device:
        return b.params
    return [p.to(b.device) for p in b.params]


def push(b: "Bucket") -> None:
    c = _cache(b)
    n = int(b.pushes.item())
    s = n % b.k
    slot, views, params = b.ring[s], c["slots"][s], _params(b)
    if n < b.k:
        torch._foreach_copy_(views, params)
        b.total.add_(slot)
        return
    for lo, hi, i0, i1 in c["chunks"]:
        delta = slot[lo:hi].to(b.total.dtype, copy=True)
        torch._foreach_copy_(views[i0:i1], params[i0:i1])
        delta.neg_().add_(slot[lo:hi])  # (-old) + new rounds exactly as new - old
        b.total[lo:hi].add_(delta)


def ema_update(b: "Bucket", decay: float) -> None:
    views, params = _cache(b)["total"], _params(b)
    if int(b.pushes.item()) == 0:
        torch._foreach_copy_(views, params)
        return
    torch._foreach_mul_(views, decay)
    torch._foreach_add_(views, params, alpha=1.0 - decay)


def swap_in(b: "Bucket", last: int | None) -> None:
    c = _cache(b)
    torch._foreach_copy_([b.view(b.backup, i) for i in range(len(b.params))], b.params)
    n = int(b.pushes.item())
    for lo, hi, i0, i1 in c["chunks"]:
        if b.mode == "ema":
            avg = b.total[lo:hi]
        elif last is None:
            avg = b.total[lo:hi] / min(n, b.k)
        else:
            avg = torch.zeros(hi - lo, dtype=b.total.dtype, device=b.device)
            for i in range(last):
                avg.add_(b.ring[(n - 1 - i) % b.k, lo:hi])
            avg.div_(last)
        torch._foreach_copy_(b.params[i0:i1], [b.view(avg, i, base=lo) for i in range(i0, i1)])


def swap_back(b: "Bucket") -> None:
    torch._foreach_copy_(b.params, [b.view(b.backup, i) for i in range(len(b.params))])


def recompute(b: "Bucket") -> None:
    filled = min(int(b.pushes.item()), b.k)
    b.total.zero_()
    for s in range(filled):
        b.total.add_(b.ring[s])
