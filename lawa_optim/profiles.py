"""Coefficients over the stored snapshots, newest first, for ``weights=``.

LAWA (Kaddour 2022, arXiv:2209.14981) averages the k latest snapshots uniformly, and
which k is best is not known in advance. The ring holds the k latest snapshots, so any
weighting of them can be chosen after training, exactly and in one pass:
``opt.averaged(weights=...)``, ``opt.swap_to_average(weights=...)`` and
``export_average(model, source, weights=...)`` take what these functions build. Each
returns a float64 tensor of coefficients that sum to 1, the newest snapshot first::

    profiles.window(3)        # tensor([1/3, 1/3, 1/3]): the same as last=3
    profiles.linear(3)        # tensor([3/6, 2/6, 1/6]): a ramp, the newest heaviest
    w, lost = profiles.ema(0.5, 4)   # an EMA truncated to 4 snapshots, renormalised
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from lawa_optim.history import is_int

__all__ = ["ema", "linear", "window"]

#: ``ema`` warns when the ring cannot hold more than this fraction of the EMA's weight.
WARN_ABOVE = 1e-6


def _check_count(name: str, j: object) -> int:
    if not is_int(j) or j < 1:
        raise ValueError(f"{name} must be an int >= 1 (a number of snapshots), got {j!r}")
    return j


def window(j: int) -> Tensor:
    """The uniform average of the ``j`` newest snapshots (what ``last=j`` gives, with the
    arithmetic of ``weights=``)."""
    _check_count("j", j)
    return torch.full((j,), 1.0 / j, dtype=torch.float64)


def linear(j: int) -> Tensor:
    """A ramp over the ``j`` newest snapshots: the ``i``-th newest (from 0) weighs
    ``(j - i) / (j (j + 1) / 2)``, so the newest weighs ``j`` times the oldest."""
    _check_count("j", j)
    ramp = torch.arange(j, 0, -1, dtype=torch.float64)
    return ramp / ramp.sum()


def ema(decay: float, k: int) -> tuple[Tensor, float]:
    """An exponential moving average over snapshots truncated to the ``k`` newest.

    The library's EMA convention (``LAWA(mode="ema")``): ``avg = decay * avg + (1 -
    decay) * theta``, so the ``i``-th newest snapshot (from 0) weighs ``(1 - decay) *
    decay**i`` and the snapshots older than the ``k`` newest together ``decay**k``.
    That mass does not fit in a ring of ``k``: it is dropped and the ``k`` coefficients
    renormalised to sum to 1 (each divided by ``1 - decay**k``, up to rounding).

    Args:
        decay: in ``[0, 1)``; the paper's Appendix C weight alpha on the newest snapshot
            is ``1 - decay``.
        k: the snapshots the ring holds (``opt.num_snapshots``), ``>= 1``.

    Returns:
        ``(weights, truncated)``: the ``k`` coefficients, newest first, and the fraction
        ``decay**k`` of the untruncated EMA that they leave out. A ``UserWarning`` says
        that fraction when it exceeds :data:`WARN_ABOVE`.
    """
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
        raise ValueError(f"decay must be a float in [0, 1), got {decay!r}")
    _check_count("k", k)
    powers = torch.full((k,), float(decay), dtype=torch.float64).pow(torch.arange(k, dtype=torch.float64))
    truncated = float(decay) ** k
    if truncated > WARN_ABOVE:
        # The horizon in snapshots that would hold all but 1e-6 of the EMA.
        needed = math.ceil(math.log(WARN_ABOVE) / math.log(decay))
        warnings.warn(
            f"ema(decay={decay!r}, k={k}): a ring of {k} snapshots holds {1 - truncated:.2%} of the "
            f"EMA's weight; the {truncated:.2%} on older snapshots is left out and the rest "
            f"renormalised (all but 1e-6 of it needs k >= {needed})",
            UserWarning,
            stacklevel=2,
        )
    weights = powers * (1.0 - decay)
    return weights / weights.sum(), truncated
