"""Kernel entry points of the LAWA history, each defined once and dispatched to a backend.

Every entry point takes a :class:`lawa_optim.history.Bucket` and runs the backend
chosen for it when it was built (``bucket.backend``): ``"torch"`` (the pure-torch
reference, :mod:`lawa_optim.backends.reference`), ``"triton"`` or ``"cuda"``. Callers
never branch on the backend. A backend module provides:

``unavailable(bucket) -> str | None``
    why it cannot run the bucket (``None`` when it can). Only ``device``,
    ``param_device``, ``dtype`` and ``history_dtype`` of the bucket are read; what every
    fused backend needs (one device, :data:`FUSED_DTYPES`; the history may also be the
    8-bit one below) is checked here, once.
``push(bucket)``
    uniform snapshot with ``n = pushes``: ``s = n % k``; ``old = ring[s]``;
    ``ring[s] = cast(param)``. ``total`` is the running *mean* of the filled slots. When
    ``(n + 1) % refresh_every == 0`` (a *refresh*; ``bucket.refresh_every``, by default
    k) it becomes exactly what ``recompute`` leaves with ``min(n + 1, k)`` filled slots;
    otherwise, while the ring fills (``n < k``), ``total += (float(ring[s]) - total) /
    (n + 1)``, and on a full ring ``total += (float(ring[s]) - float(old)) / k``, each
    operation rounded in the accumulation dtype. The decision reads ``pushes`` where it
    lives, so a push captured in a CUDA graph or a compiled region refreshes at the
    right replay.
``ema_update(bucket, decay)``
    ``total = cast(param)`` when ``n == 0``, else
    ``total = decay * total + (1 - decay) * param`` in the accumulation dtype.
``phema_update(bucket, alphas)``
    the power-function EMAs of ``mode="phema"`` (EDM2), ``emas``: ``(E, D)`` in the
    accumulation dtype, one row per width; ``alphas``: ``E`` coefficients
    ``1 - beta_e(t)`` in that dtype on the bucket's device. For each ``e``:
    ``emas[e] = float(param)`` when ``alphas[e] == 1`` (step ``t = 1``), else
    ``emas[e] = emas[e] + alphas[e] * (float(param) - emas[e])``, the difference, the
    product and the sum each rounded once (no fused multiply-add). The lerp form, not
    ``beta * ema + (1 - beta) * param`` as ``ema_update``: ``1 - beta`` is about
    ``(gamma + 1) / t``, which a float32 ``beta`` next to 1 holds to a few digits only
    (at ``t = 10**6`` and ``sigma_rel = 0.10`` its rounding moves the newest step's
    weight by up to 0.4 %), while
    ``alphas`` holds it to float32's relative precision and the weights still sum to 1.
    The parameters are read once for all ``E`` rows; ``pushes`` is not read.
``swap_in(bucket, last)`` with a ``backup`` buffer
    ``backup = param`` (exact), then ``param = round(avg)``. In EMA mode ``avg = total``
    (in phema mode ``total`` is ``emas[0]``, the live EMA of the first width).
    For the full window ``avg = total`` (the mean of ``c = min(n, k)`` slots) where it
    is finite; for ``last = j``, ``avg = S / j`` (IEEE division) with ``S = csum`` of the
    ``j`` newest slots ``(n - 1 - i) % k``, ``i = 0 .. j-1``, in that order. Where the
    mean or ``S`` is not finite (it overflowed, or it holds a NaN or an infinity),
    ``avg`` is instead ``wide`` of the same ``c`` slots (slot order ``0 .. c-1`` for the
    mean, newest first for ``last``).
    ``backup`` may be the newest ring slot where it holds ``param`` bit for bit (the
    history checks): writing it then changes no bit of the ring.
``swap_in(bucket, None)`` with ``backup is None`` (the in-place swap)
    the full average without a copy; only for float32, bfloat16 and float64 parameters
    over a floating-point history whose ``total`` is finite (the caller checks, with
    :func:`exchanges`), so ``avg = total`` exactly as above. An 8-bit history's
    ``total`` is its anchor, not a mean: it always swaps with a backup.
    Parameters of the accumulation dtype exchange their bits with ``total``. A bfloat16
    parameter ``w`` with mean ``m`` (bits as unsigned integers): ``param = round(m) =
    (m + 0x8000) >> 16`` and ``total = (w << 16) | (m & 0xFFFF)``: the training weights
    and the whole mean stay in the two buffers.
``swap_in(bucket, None, weights)``
    ``backup = param`` (exact), then ``param = cast(s + c)``, the weighted sum of the
    ``m = len(weights)`` newest slots: ``weights`` is a 1-D tensor of ``m <= min(n, k)``
    coefficients in the accumulation dtype on the bucket's device, newest first; with
    ``s = c = 0`` and for ``j = 0 .. m-1``: ``y = weights[j] * float(slot (n - 1 - j) % k)``
    (the product rounded), ``t = s + y``, ``c += (s - t) + y`` when ``|s| >= |y|`` else
    ``c += (y - t) + s`` (Neumaier's compensated sum, each operation rounded once, no
    fused multiply-add), ``s = t``. The error is at most about three roundings of
    ``sum_j |weights[j] * slot|`` whatever ``m`` (for ``last = j``'s uniform weights:
    of the largest magnitude, the bound of ``last = j``); a NaN or an infinity in a
    weighted slot makes the result NaN. The coefficients are read on the device: a new
    vector needs no recompilation and no host sync.
``swap_back(bucket)``
    ``param = backup`` (exact); without a backup, the inverse of the in-place swap:
    the exchange again, or for bfloat16 with ``t = total``, ``l = t & 0xFFFF``:
    ``param = t >> 16`` and ``total = (((param - (l >> 15)) & 0xFFFF) << 16) | l``,
    both bit for bit what they held before the swap-in.
``recompute(bucket)``
    ``total = csum(ring[0], ..., ring[c - 1]) / c`` in slot order with ``c = min(n, k)``
    (IEEE division), ``wide`` of the same slots where the sum is not finite; 0 for
    ``c = 0``.

The arithmetic, per element, every operation rounded to nearest even, no contraction
into fused multiply-adds (``acc`` is the accumulation dtype, float32 but for float64
parameters):

``csum(x_0, ..., x_{m-1})``
    Neumaier's compensated sum, whose error does not grow with ``m``:
    ``s = c = +0``; for each ``x`` (widened exactly to ``acc``), in order:
    ``t = s + x``; ``c += (s - t) + x`` if ``|s| >= |x|`` else ``c += (x - t) + s``;
    ``s = t``. The result is ``s + c`` where ``s`` is finite, else ``s``.
``wide(x_0, ..., x_{c-1})``
    ``w = +0.0`` in float64; ``w += float64(x)`` for each ``x`` in order; the result
    is ``w / c`` in float64, rounded to ``acc``. A window of finite values thus never
    averages to an infinity; a NaN or an infinity in it stays one.
``cast``
    ``Tensor.to``: round to nearest even into the destination dtype.
``round``
    how every swap writes an average into the parameters: ``cast``, but for bfloat16
    parameters, round to nearest with ties away from zero on the bit pattern,
    ``(bits + 0x8000) >> 16`` (a NaN as ``cast`` makes it), which the in-place swap
    can undo from the low half it keeps.

The 8-bit history (``history_dtype=torch.int8``, ``bucket.int8``) stores differences,
not weights: rounding each snapshot to 8 bits would err by about 0.7 % of the weights'
RMS, while the average differs from the newest snapshot by far less, and consecutive
snapshots round alike, so the error would not average out. Instead ``total`` is the
*anchor* ``A``, the newest stored snapshot (float32), and ring slot ``s`` of ``k - 1``
holds the int8 codes of one delta, with ``scales[s, b]`` (float32) per block ``b`` of
256 elements counted from each parameter's first element (``bucket.block_bases``).
Backends provide ``push_int8(bucket)`` and ``swap_in_int8(bucket, coefficients)``:

``push_int8(bucket)``
    when ``n == 0`` or ``k == 1``: ``A = float(param)``. Otherwise, with slot
    ``s = (n - 1) % (k - 1)``, per block: ``d = float(param) - A``. Where every ``d`` of
    the block is finite, ``m = max |d|``; when ``m < 2**-120`` the block stores
    ``scale = 0``, codes 0 and ``A`` stays; else ``scale = m / 127``, ``code =
    rint(d * (127 / m))`` (round half to even; ``|code| <= 127`` follows) and ``A = A +
    float(code) * scale``. Where a ``d`` of the block is not finite (a NaN or an
    infinity in the weights or the anchor, or a difference beyond float32's range):
    ``scale = NaN``, codes 0, ``A = float(param)``: the block restarts from the
    weights, and the snapshots before it read as NaN until that delta leaves the ring.
    The loop is closed: each delta is taken against the stored snapshot, so quantisation
    errors never accumulate, and nothing else is rounded.
``swap_in_int8(bucket, coefficients)``
    ``backup = param`` (exact), then ``param = cast(s + c)``, the compensated sum
    defined for ``weights`` above, of ``coefficients[0] * A`` and, for ``i = 1 .. m-1``,
    ``coefficients[i] * dq_i``, where ``dq_i = float(code) * scale`` (rounded) of the
    ``i``-th newest delta, slot ``(n - 1 - i) % (k - 1)``. The stored snapshot ``j``
    newest is ``A - dq_1 - ... - dq_j``, so weights ``w_0 .. w_{m-1}`` of the ``m``
    newest snapshots give the coefficients ``W_0, -W_1, ..., -W_{m-1}`` with the suffix
    sums ``W_i = w_i + ... + w_{m-1}`` (:func:`int8_coefficients`): the mean,
    ``last = j`` and ``weights=`` are one pass over the anchor and the ``m - 1`` deltas.
    A NaN scale in those deltas makes the result NaN in its block.

The dispatcher advances ``pushes`` after ``push`` and ``ema_update``; backends only
read it.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING

import torch
from torch.autograd.graph import increment_version

if TYPE_CHECKING:
    from lawa_optim.history import Bucket

#: Elements per quantisation block of an 8-bit history; blocks start at each
#: parameter's first element, so no block straddles two parameters (or two shards).
QBLOCK = 256

#: Backend names accepted by ``LAWA(backend=...)``.
BACKENDS = ("auto", "torch", "triton", "cuda")

#: Parameter and history dtypes of the fused backends (float64 runs on "torch").
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_MODULES = {
    "torch": "lawa_optim.backends.reference",
    "triton": "lawa_optim.backends.triton",
    "cuda": "lawa_optim.backends.cuda",
}
_loaded: dict[str, ModuleType] = {}


def _module(name: str) -> ModuleType:
    mod = _loaded.get(name)
    if mod is None:
        mod = _loaded[name] = importlib.import_module(_MODULES[name])
    return mod


def unavailable(name: str, bucket: "Bucket") -> str | None:
    """Why backend ``name`` cannot run ``bucket``, or ``None`` when it can."""
    if name != "torch":
        if bucket.device != bucket.param_device:
            return (
                f"the history is on {bucket.device} but the parameters are on "
                f"{bucket.param_device}; the fused kernels need both on one device (storage='device')"
            )
        for what, dtype in (("parameter", bucket.dtype), ("history", bucket.history_dtype)):
            if dtype not in FUSED_DTYPES and not (what == "history" and dtype == torch.int8):
                return (
                    f"the {what} dtype is {dtype}; the fused kernels accept "
                    f"{', '.join(map(str, FUSED_DTYPES))} (float64 runs on the torch backend)"
                )
    try:
        mod = _module(name)
    except ImportError as exc:
        return f"the {name} backend cannot be imported ({exc})"
    return mod.unavailable(bucket)


def resolve(requested: str, bucket: "Bucket") -> str:
    """The backend that runs ``bucket``: ``auto`` prefers cuda, then triton, on a GPU."""
    if requested == "auto":
        if bucket.device.type == "cuda":
            for name in ("cuda", "triton"):
                if unavailable(name, bucket) is None:
                    return name
        return "torch"
    reason = unavailable(requested, bucket)
    if reason is not None:
        raise RuntimeError(
            f"backend={requested!r} cannot run parameters of dtype {bucket.dtype} on "
            f"{bucket.param_device} with history on {bucket.device}: {reason}. "
            "Use backend='auto' to pick one that can."
        )
    return requested


def push(bucket: "Bucket") -> None:
    """Write the current weights into the next ring slot and update the running mean (an
    8-bit history: the next delta and the anchor)."""
    if bucket.int8:
        _module(bucket.backend).push_int8(bucket)
    else:
        _module(bucket.backend).push(bucket)
    bucket.pushes.add_(1)


def ema_update(bucket: "Bucket", decay: float) -> None:
    """Fold the current weights into the exponential average kept in ``total``."""
    _module(bucket.backend).ema_update(bucket, decay)
    bucket.pushes.add_(1)


def phema_update(bucket: "Bucket", alphas: torch.Tensor) -> None:
    """Fold the weights into every power-function EMA of ``bucket.emas`` in one pass."""
    _module(bucket.backend).phema_update(bucket, alphas)


def swap_in(bucket: "Bucket", last: int | None, weights: torch.Tensor | None = None) -> None:
    """Write the average into the weights (the weighted sum of the newest slots when
    ``weights`` is given), copying them into ``bucket.backup`` first; without a backup,
    exchange the full average with the running mean in place (never for an 8-bit
    history: it swaps with a backup)."""
    if bucket.int8:
        _swapper(bucket).swap_in_int8(bucket, int8_coefficients(bucket, last, weights))
    elif weights is None:
        _swapper(bucket).swap_in(bucket, last)
    else:
        _swapper(bucket).swap_in(bucket, None, weights)
    _mark_written(bucket)


def int8_coefficients(bucket: "Bucket", last: int | None, weights: torch.Tensor | None) -> torch.Tensor:
    """The coefficients of an 8-bit history's swap-in (see the module docstring) for the
    mean of the ``last`` (default ``min(n, k)``) newest snapshots, or for ``weights``."""
    if weights is None:
        return suffix_coefficients(None, last if last is not None else min(int(bucket.pushes.item()), bucket.k), bucket.device)
    return suffix_coefficients(weights, weights.numel(), bucket.device)


def suffix_coefficients(weights: torch.Tensor | None, count: int, device: torch.device) -> torch.Tensor:
    """``W_0, -W_1, ..., -W_{c-1}`` in float32 on ``device``: the suffix sums ``W_i`` of
    ``weights`` (float32 coefficients of the newest snapshots, newest first) summed in
    float64 and rounded once; for ``weights=None`` those of ``1/c`` each, ``(c - i)/c``."""
    if weights is None:
        suffix = torch.arange(count, 0, -1, dtype=torch.float64, device=device) / count
    else:
        suffix = weights.to(device=device, dtype=torch.float64).flip(0).cumsum(0).flip(0)
    suffix[1:] = suffix[1:].neg()
    return suffix.to(torch.float32)


def swap_back(bucket: "Bucket") -> None:
    """Restore the weights from ``bucket.backup``, or undo the in-place swap."""
    _swapper(bucket).swap_back(bucket)
    _mark_written(bucket)


def exchanges(bucket: "Bucket") -> bool:
    """Whether the bucket's backend swaps its full average in place (no backup)."""
    return _module(bucket.backend).exchanges(bucket)


def _swapper(bucket: "Bucket") -> ModuleType:
    # A fused kernel reads parameters, history and backup on one device; a backup kept
    # elsewhere (backup="cpu" for GPU parameters) is the reference's.
    backup = bucket.backup
    if backup is not None and backup.device != bucket.param_device:
        return _module("torch")
    return _module(bucket.backend)


def _mark_written(bucket: "Bucket") -> None:
    # Fused kernels write through raw pointers, which autograd cannot see: bump the
    # version counters so a backward through a graph built before the swap fails loudly.
    for p in bucket.params:
        increment_version(p)


def recompute(bucket: "Bucket") -> None:
    """Recompute ``total`` exactly from the filled ring slots (nothing for an 8-bit
    history: its anchor is a snapshot, not a sum)."""
    if not bucket.int8:
        _module(bucket.backend).recompute(bucket)
