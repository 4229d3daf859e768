"""Kernel entry points of the LAWA history, each defined once and dispatched to a backend.

Every entry point takes a :class:`lawa_optim.history.Bucket` and runs the backend
chosen for it when it was built (``bucket.backend``): ``"torch"`` (the pure-torch
reference, :mod:`lawa_optim.backends.reference`), ``"triton"`` or ``"cuda"``. Callers
never branch on the backend. A backend module provides:

``unavailable(bucket) -> str | None``
    why it cannot run the bucket (``None`` when it can). Only ``device``,
    ``param_device``, ``dtype`` and ``history_dtype`` of the bucket are read; what every
    fused backend needs (one device, :data:`FUSED_DTYPES`) is checked here, once.
``push(bucket)``
    uniform snapshot with ``n = pushes``: ``s = n % k``; ``old = ring[s]`` (0 while
    ``n < k``); ``ring[s] = cast(param)``. Then, when ``(n + 1) % refresh_every == 0``
    (a *refresh*; ``bucket.refresh_every``, by default k), ``total`` becomes exactly
    what ``recompute`` leaves with ``min(n + 1, k)`` filled slots; otherwise
    ``total += float(ring[s]) - float(old)``, the difference rounded in the
    accumulation dtype and then added. The decision reads ``pushes`` where it lives, so
    a push captured in a CUDA graph or a compiled region refreshes at the right replay.
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
``swap_in(bucket, last)``
    ``backup = param`` (exact), then ``param = cast(avg)``. In EMA mode ``avg = total`` (in phema mode
    ``total`` is ``emas[0]``, the live EMA of the first width).
    Otherwise ``avg = S / c`` (IEEE division) with ``c = min(n, k)`` and ``S = total``,
    or for ``last = j`` with ``c = j`` and ``S = csum`` of the ``j`` newest slots
    ``(n - 1 - i) % k``, ``i = 0 .. j-1``, in that order. Where ``S`` is not finite
    (the float32 sum overflowed, or it holds a NaN or an infinity), ``avg`` is instead
    ``wide`` of the same ``c`` slots (slot order ``0 .. c-1`` for the mean, newest first
    for ``last``).
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
    ``param = backup`` (exact).
``recompute(bucket)``
    ``total = csum(ring[0], ..., ring[min(n, k) - 1])``, in slot order.

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
            if dtype not in FUSED_DTYPES:
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
    """Write the current weights into the next ring slot and update the running sum."""
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
    """Copy the weights into ``bucket.backup`` and write the average into them (the
    weighted sum of the newest slots when ``weights`` is given)."""
    if weights is None:
        _module(bucket.backend).swap_in(bucket, last)
    else:
        _module(bucket.backend).swap_in(bucket, None, weights)
    _mark_written(bucket)


def swap_back(bucket: "Bucket") -> None:
    """Copy ``bucket.backup`` back into the weights."""
    _module(bucket.backend).swap_back(bucket)
    _mark_written(bucket)


def _mark_written(bucket: "Bucket") -> None:
    # Fused kernels write through raw pointers, which autograd cannot see: bump the
    # version counters so a backward through a graph built before the swap fails loudly.
    for p in bucket.params:
        increment_version(p)


def recompute(bucket: "Bucket") -> None:
    """Recompute ``total`` exactly from the filled ring slots."""
    _module(bucket.backend).recompute(bucket)
