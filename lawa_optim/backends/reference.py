"""Pure-torch implementation of the entry points in :mod:`lawa_optim.ops`.

The fallback on any device and the oracle the fused backends are tested against:
written for clarity, with no Python loop over elements and bounded temporaries (the
flat buffer is walked in chunks of whole parameters, so a snapshot of a full ring
needs one float32 chunk of scratch, not a second copy of the model). It reads the
snapshot counter with ``.item()``, a host sync on a GPU: the fused backends don't.
On the CPU every operation runs the one-pass C kernels of
:mod:`lawa_optim.backends.cpu_kernels` when they can be built: the same bits (a NaN's
payload aside), with the refresh of the mean fused into the push; the code below stays
the readable fallback and the definition they are tested against.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lawa_optim.backends import cpu_kernels
from lawa_optim.ops import QBLOCK

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
            "slots": None if b.ring is None else [b.views(slot) for slot in b.ring],
            "total": b.views(b.total),
        }
    return c


def _params(b: "Bucket") -> list[Tensor]:
    # History kept off the parameters' device (storage="cpu"/"pinned"): bring them over first.
    if b.device == b.param_device:
        return b.params
    return [p.to(b.device) for p in b.params]


def push(b: "Bucket", sources: Sequence[Tensor] | None = None) -> None:
    """Uniform snapshot of ``sources`` (default: the parameters), one tensor per parameter."""
    n = int(b.pushes.item())
    params = _params(b) if sources is None else list(sources)
    if cpu_kernels.runs(b):
        cpu_kernels.push(b, n, params)  # one fused pass, the refresh included
        return
    refresh = (n + 1) % b.refresh_every == 0
    c = _cache(b)
    s = n % b.k
    slot, views = b.ring[s], c["slots"][s]
    if refresh:
        torch._foreach_copy_(views, params)
        _mean_slots(b, min(n + 1, b.k))
        return
    if n < b.k:
        torch._foreach_copy_(views, params)
        count = _scalar(n + 1, b)
        for lo, hi, _, _ in c["chunks"]:
            delta = slot[lo:hi].to(b.total.dtype, copy=True).sub_(b.total[lo:hi])
            b.total[lo:hi].add_(delta.div_(count))
        return
    k = _scalar(b.k, b)
    for lo, hi, i0, i1 in c["chunks"]:
        delta = slot[lo:hi].to(b.total.dtype, copy=True)
        torch._foreach_copy_(views[i0:i1], params[i0:i1])
        delta.neg_().add_(slot[lo:hi])  # (-old) + new rounds exactly as new - old
        b.total[lo:hi].add_(delta.div_(k))


def ema_update(b: "Bucket", decay: float) -> None:
    n, params = int(b.pushes.item()), _params(b)
    if cpu_kernels.runs(b, "ema"):
        cpu_kernels.ema_update(b, n, decay, params)
        return
    views = _cache(b)["total"]
    if n == 0:
        torch._foreach_copy_(views, params)
        return
    torch._foreach_mul_(views, decay)
    torch._foreach_add_(views, params, alpha=1.0 - decay)


def phema_update(b: "Bucket", alphas: Tensor) -> None:
    """Every power-function EMA of ``b.emas``, as :mod:`lawa_optim.ops` defines it."""
    params = _params(b)
    if cpu_kernels.runs(b, "phema"):
        cpu_kernels.phema_update(b, alphas, params)
        return
    for lo, hi, i0, i1 in _cache(b)["chunks"]:
        # One widened copy of the chunk's weights serves every width.
        theta = torch.zeros(hi - lo, dtype=b.emas.dtype, device=b.device)
        torch._foreach_copy_([b.view(theta, i, base=lo) for i in range(i0, i1)], params[i0:i1])
        for e, a in enumerate(alphas.tolist()):
            row = b.emas[e, lo:hi]
            if a == 1.0:
                row.copy_(theta)
            else:
                row.add_((theta - row).mul_(alphas[e]))


def _scalar(x: int, b: "Bucket") -> Tensor:
    # Dividing by a Python number multiplies by its reciprocal on CUDA (1 ulp off IEEE
    # division); a 0-dim tensor on the same device divides exactly, as the contract says.
    return torch.tensor(float(x), dtype=b.total.dtype, device=b.device)


def swap_in(b: "Bucket", last: int | None, weights: Tensor | None = None) -> None:
    if b.backup is None:  # the full average, exchanged with the running mean in place
        exchange(b, back=False)
        return
    n = int(b.pushes.item())
    if cpu_kernels.runs(b, "swap") and b.backup.device.type == "cpu":
        if weights is None:
            cpu_kernels.swap_in(b, n, last)
        else:
            cpu_kernels.swap_weighted(b, n, weights)
        return
    c = _cache(b)
    torch._foreach_copy_(b.views(b.backup), b.params)
    for lo, hi, i0, i1 in c["chunks"]:
        if weights is not None:
            avg = weighted_sum([b.ring[(n - 1 - j) % b.k, lo:hi] for j in range(len(weights))], weights)
        elif b.mode != "uniform":  # the EMA; in phema mode total is emas[0]
            avg = b.total[lo:hi]
        elif last is None:
            slots = [b.ring[s, lo:hi] for s in range(min(n, b.k))]
            avg = wide_where_overflowed(b.total[lo:hi], b.total[lo:hi], slots)
        else:
            slots = [b.ring[(n - 1 - i) % b.k, lo:hi] for i in range(last)]
            total = compensated_sum(slots, b.total[lo:hi])
            avg = wide_where_overflowed(total / _scalar(last, b), total, slots)
        avg = rounded(avg, b.dtype)
        torch._foreach_copy_(b.params[i0:i1], [b.view(avg, i, base=lo) for i in range(i0, i1)])


def rounded(avg: Tensor, dtype: torch.dtype) -> Tensor:
    """An average in the accumulation dtype as a swap writes it into parameters of
    ``dtype`` (:mod:`lawa_optim.ops`, ``round``): bfloat16 rounds to nearest with ties
    away from zero, ``(bits + 0x8000) >> 16``, a NaN as ``Tensor.to`` makes it; every
    other dtype as ``Tensor.to`` rounds (to nearest even)."""
    if dtype != torch.bfloat16 or avg.dtype != torch.float32:
        return avg.to(dtype)
    high = ((avg.view(torch.int32).to(torch.int64) + 0x8000) >> 16).to(torch.int16)
    return torch.where(avg.isnan(), avg.to(dtype), high.view(torch.bfloat16))


#: Elements per piece of an exchange: its temporaries stay under a few MiB.
PIECE = 1 << 18


def exchanges(b: "Bucket") -> bool:
    """Whether the full average of ``b`` can be exchanged with its parameters in place:
    float32, bfloat16 or float64 parameters (the running mean's width, or its high half)
    over a history of floating-point snapshots, whose ``total`` is their running mean."""
    return b.dtype in (torch.float32, torch.bfloat16, torch.float64) and b.history_dtype.is_floating_point


def exchange(b: "Bucket", back: bool) -> None:
    """The in-place swap of :mod:`lawa_optim.ops` (``back=False``: swap-in, else
    swap-back) in pieces of at most ``PIECE`` elements, whatever the devices."""
    if cpu_kernels.runs(b, "swap"):
        cpu_kernels.exchange(b, back)
        return
    for p, off, n in zip(b.params, b.offsets, b.numels):
        flat = p.as_strided((n,), (1,), p.storage_offset())  # dense: its memory order
        for lo in range(0, n, PIECE):
            hi = min(n, lo + PIECE)
            _exchange(flat[lo:hi], b.total[off + lo:off + hi], back)


def unexchanged(param: Tensor, word: Tensor) -> tuple[Tensor, Tensor]:
    """The running mean and the training weights that the in-place swap keeps in a
    parameter ``param`` and its slice ``word`` of ``total``, as new tensors."""
    mean, weights = word.detach().clone(), param.detach().clone()
    _exchange(weights, mean, back=True)
    return mean, weights


def _exchange(param: Tensor, mean: Tensor, back: bool) -> None:
    if param.dtype == mean.dtype:  # a plain exchange of the bits, both ways
        held = param.to(mean.device, copy=True)
        param.copy_(mean)
        mean.copy_(held)
        return
    word = mean.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    low = word & 0xFFFF
    if not back:  # param = round(mean); the word keeps (weights << 16) | low 16 bits of the mean
        weights = param.view(torch.int16).to(mean.device, torch.int64) & 0xFFFF
        shown = (word + 0x8000) >> 16
        kept = (weights << 16) | low
    else:  # the mean's high half is what round() added back out of the parameter
        shown = word >> 16
        high = ((param.view(torch.int16).to(mean.device, torch.int64) & 0xFFFF) - (low >> 15)) & 0xFFFF
        kept = (high << 16) | low
    kept = torch.where(kept >= 1 << 31, kept - (1 << 32), kept).to(torch.int32)
    shown = torch.where(shown >= 1 << 15, shown - (1 << 16), shown).to(torch.int16)
    param.copy_(shown.view(torch.bfloat16))
    mean.copy_(kept.view(torch.float32))


def weighted_sum(slots: Sequence[Tensor], weights: Tensor) -> Tensor:
    """``sum_j weights[j] * slots[j]`` as :mod:`lawa_optim.ops` defines it: each product
    rounded in ``weights.dtype`` (the accumulation dtype), then added in order with
    Neumaier's compensation, ``s + c`` at the end. Also what ``export_average`` computes
    from a checkpoint, so a file gives the bits a live swap gives."""
    s = torch.zeros(slots[0].shape, dtype=weights.dtype, device=slots[0].device)
    c = torch.zeros_like(s)
    for w, x in zip(weights, slots):
        y = x.to(weights.dtype) * w
        t = s + y
        c += torch.where(s.abs() >= y.abs(), (s - t) + y, (y - t) + s)
        s = t
    return s + c


def swap_back(b: "Bucket") -> None:
    if b.backup is None:
        exchange(b, back=True)
        return
    if cpu_kernels.runs(b, "swap") and b.backup.device.type == "cpu":
        cpu_kernels.swap_back(b)
        return
    torch._foreach_copy_(b.params, b.views(b.backup))


def recompute(b: "Bucket") -> None:
    _mean_slots(b, min(int(b.pushes.item()), b.k))


def _mean_slots(b: "Bucket", filled: int) -> None:
    """``total`` = the mean of the ``filled`` first slots: their compensated sum divided by
    ``filled``, ``wide`` of them where that sum is not finite (0 for an empty ring)."""
    if filled == 0:
        b.total.zero_()
        return
    count = _scalar(filled, b)
    for lo, hi, _, _ in _cache(b)["chunks"]:
        slots = [b.ring[s, lo:hi] for s in range(filled)]
        total = compensated_sum(slots, b.total[lo:hi])
        b.total[lo:hi] = wide_where_overflowed(total / count, total, slots)


def compensated_sum(terms: Iterable[Tensor], like: Tensor) -> Tensor:
    """The sum of ``terms`` (each shaped like ``like``) in ``like``'s dtype, in order,
    compensated as :mod:`lawa_optim.ops` defines it (Neumaier's summation), so its error
    does not grow with the number of terms; where the plain running sum ends up not
    finite, the result is that sum."""
    s, c = torch.zeros_like(like), torch.zeros_like(like)
    for x in terms:
        x = x.to(like.dtype)
        t = s + x
        c += torch.where(s.abs() >= x.abs(), (s - t) + x, (x - t) + s)
        s = t
    return torch.where(s.isfinite(), s + c, s)


def wide_where_overflowed(avg: Tensor, total: Tensor, slots: Sequence[Tensor]) -> Tensor:
    """``avg``, except where ``total`` (the sum it was divided from) is not finite: there
    the ``len(slots)`` slots summed in that order from 0 in float64, divided by their
    count in float64 and rounded to ``avg``'s dtype, so a sum that overflowed float32
    still gives the (finite) mean. A NaN or an infinity among the slots stays one."""
    bad = ~total.isfinite()
    if not bool(bad.any()):
        return avg
    wide = torch.zeros_like(total, dtype=torch.float64)
    for x in slots:
        wide += x.to(torch.float64)
    wide /= torch.tensor(float(len(slots)), dtype=torch.float64, device=wide.device)
    return torch.where(bad, wide.to(avg.dtype), avg)


# -- the 8-bit history (lawa_optim.ops: push_int8, swap_in_int8) ----------------------

#: Below this largest |delta| a block stores no delta (127 / m would overflow float32).
TINY = 2.0**-120


def _blocked(x: Tensor) -> Tensor:
    """A flat parameter slice as ``(blocks, QBLOCK)``, zero-padded at its end."""
    return torch.nn.functional.pad(x, (0, -x.numel() % QBLOCK)).view(-1, QBLOCK)


def quantise(d: Tensor) -> tuple[Tensor, Tensor]:
    """int8 codes and float32 scales of deltas ``d`` shaped ``(blocks, QBLOCK)``, as
    :mod:`lawa_optim.ops` defines them (a block with a non-finite delta gets scale NaN
    and codes 0; one whose largest |delta| is below ``TINY``, scale 0 and codes 0)."""
    ok = d.isfinite().all(1, keepdim=True)
    m = torch.where(ok, d.abs().amax(1, keepdim=True), 1.0)
    live = ok & (m >= TINY)
    inv = torch.div(torch.full_like(m, 127.0), torch.where(live, m, 1.0))
    codes = torch.where(live, torch.round(torch.where(ok, d, 0.0) * inv), 0.0).to(torch.int8)
    scale = torch.where(live, torch.div(m, torch.full_like(m, 127.0)), torch.where(ok, 0.0, float("nan")))
    return codes, scale.squeeze(1)


def push_int8(b: "Bucket", sources: Sequence[Tensor] | None = None) -> None:
    """Push of an 8-bit history: the next delta, quantised against the anchor, and the
    anchor moved by what was stored."""
    n = int(b.pushes.item())
    params = _params(b) if sources is None else list(sources)
    if cpu_kernels.runs(b):
        cpu_kernels.push_int8(b, n, params)
        return
    anchors = _cache(b)["total"]
    if n == 0 or b.k == 1:
        torch._foreach_copy_(anchors, params)
        return
    s = (n - 1) % (b.k - 1)
    for i, (p, a) in enumerate(zip(params, anchors)):
        lo, numel = b.offsets[i], b.numels[i]
        w = torch.empty(numel, dtype=torch.float32, device=b.device)
        b.view(w, i, base=lo).copy_(p)
        anchor = b.total[lo:lo + numel]
        codes, scale = quantise(_blocked(w - anchor))
        nb = codes.shape[0]
        b.scales[s, b.block_bases[i]:b.block_bases[i] + nb] = scale
        b.ring[s, lo:lo + numel] = codes.view(-1)[:numel]
        dq = (codes.to(torch.float32) * scale[:, None]).view(-1)[:numel]
        # A block that restarts takes the weights; one that stored no delta stays as it was.
        restart = scale.isnan().repeat_interleave(QBLOCK)[:numel]
        moved = (scale > 0).repeat_interleave(QBLOCK)[:numel]
        anchor.copy_(torch.where(restart, w, torch.where(moved, anchor + dq, anchor)))


def dequantise(codes: Tensor, scales: Tensor) -> Tensor:
    """``float(code) * scale`` of one parameter's delta: ``codes`` flat in memory order,
    ``scales`` one per block of ``QBLOCK`` of them (float32)."""
    blocked = _blocked(codes).to(torch.float32)
    return (blocked * scales[: blocked.shape[0], None]).view(-1)[: codes.numel()]


def dequantised(b: "Bucket", slot: int, i: int) -> Tensor:
    """Parameter ``i``'s delta in ring slot ``slot`` of an 8-bit history, float32, flat
    in memory order."""
    lo, numel = b.offsets[i], b.numels[i]
    return dequantise(b.ring[slot, lo:lo + numel], b.scales[slot, b.block_bases[i]:])


def stored_snapshots(b: "Bucket", index: Sequence[int], count: int, device: torch.device) -> Tensor:
    """The ``count`` newest stored snapshots of parameters ``index`` of a uniform-mode
    bucket, newest first: a ``(count, sum of their numels)`` float64 matrix on
    ``device``, each row the parameters back to back, each flat in memory order.

    A floating-point ring's slots are widened exactly. For an 8-bit history they are the
    snapshots its swaps average (:mod:`lawa_optim.ops`, ``swap_in_int8``): the ``j``-th
    newest is the anchor minus the ``j`` newest dequantised deltas, subtracted one at a
    time in float64 (within ``j 2**-53`` of the magnitudes of the exact difference); a
    block restarted by a non-finite delta (scale NaN) reads as NaN in every snapshot
    before the restart. Temporaries: one parameter's delta, no copy of the ring."""
    n = int(b.pushes.item())
    out = torch.empty(count, sum(b.numels[i] for i in index), dtype=torch.float64, device=device)
    col = 0
    for i in index:
        lo, numel = b.offsets[i], b.numels[i]
        rows = out[:, col:col + numel]
        col += numel
        if not b.int8:
            for j in range(count):
                rows[j].copy_(b.ring[(n - 1 - j) % b.k, lo:lo + numel])
            continue
        rows[0].copy_(b.total[lo:lo + numel])
        for j in range(1, count):
            delta = dequantised(b, (n - 1 - j) % (b.k - 1), i).to(device=device, dtype=torch.float64)
            torch.sub(rows[j - 1], delta, out=rows[j])
    return out


def swap_in_int8(b: "Bucket", coefficients: Tensor) -> None:
    """Swap-in of an 8-bit history: the compensated sum of ``coefficients[0] * anchor``
    and ``coefficients[i] *`` the ``i``-th newest delta."""
    n = int(b.pushes.item())
    if cpu_kernels.runs(b, "swap"):
        cpu_kernels.swap_in_int8(b, n, coefficients)
        return
    slots = [(n - 1 - i) % (b.k - 1) for i in range(1, coefficients.numel())]
    for i, p in enumerate(b.params):
        lo, numel = b.offsets[i], b.numels[i]
        terms = [b.total[lo:lo + numel]] + [dequantised(b, s, i) for s in slots]
        b.view(b.backup, i).copy_(p)
        p.copy_(b.view(weighted_sum(terms, coefficients), i, base=lo))
