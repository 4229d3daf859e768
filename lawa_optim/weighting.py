"""Coefficients over the stored snapshots, newest first: their checks, and the rule for
parameters that hold fewer snapshots than there are coefficients.

A weighted average of the k latest snapshots (LAWA, Kaddour 2022, arXiv:2209.14981,
averages them uniformly) is exact for any coefficients that sum to 1; the caller chooses
them after training (``lawa_optim.profiles`` builds the usual ones).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

#: How far from 1 the coefficients may sum, and how far from 0 a renormalised prefix must.
TOLERANCE = 1e-6


def parse(weights: Sequence[float] | Tensor) -> tuple[float, ...]:
    """``weights`` as Python floats, checked: a 1-D tensor or a sequence of real numbers,
    at least one, all finite, summing to 1 within :data:`TOLERANCE` (``math.fsum``).
    ``TypeError`` or ``ValueError`` naming what is wrong otherwise."""
    if isinstance(weights, Tensor):
        if weights.dim() != 1 or weights.is_complex() or weights.dtype == torch.bool:
            raise TypeError(
                f"weights must be a 1-D real tensor or a sequence of floats, got a {weights.dim()}-D "
                f"tensor of {weights.dtype}"
            )
        values = weights.detach().cpu().double().tolist()
    elif isinstance(weights, Sequence) and not isinstance(weights, (str, bytes)):
        values = list(weights)
        for i, w in enumerate(values):
            if isinstance(w, bool) or not isinstance(w, numbers.Real):
                raise TypeError(f"weights[{i}] must be a real number, got {type(w).__name__} {w!r}")
        values = [float(w) for w in values]
    else:
        raise TypeError(
            f"weights must be a sequence of floats or a 1-D tensor (newest snapshot first), "
            f"got {type(weights).__name__}"
        )
    if not values:
        raise ValueError("weights is empty; give one coefficient per snapshot, newest first")
    for i, w in enumerate(values):
        if not math.isfinite(w):
            raise ValueError(f"weights[{i}] is {w!r}; every coefficient must be finite")
    total = math.fsum(values)
    if abs(total - 1.0) > TOLERANCE:
        raise ValueError(
            f"weights sum to {total!r}, not 1 within {TOLERANCE:g}; they are used as given, so "
            "normalise them first (w / sum(w)); negative coefficients are allowed"
        )
    return tuple(values)


def check_length(weights: tuple[float, ...], held: int) -> None:
    """``ValueError`` unless there are at most ``held`` coefficients (the snapshots held)."""
    if len(weights) > held:
        raise ValueError(
            f"weights has {len(weights)} coefficients but {held} snapshots are held; accepted: "
            f"1 to {held} coefficients, newest snapshot first"
        )


def fit(weights: tuple[float, ...], count: int, where: str) -> tuple[float, ...]:
    """The coefficients for parameters holding ``count`` snapshots (``where`` names them):
    ``weights`` itself when ``count`` covers it, else its ``count`` newest coefficients
    divided by their sum, refused with ``ValueError`` when that sum is within
    :data:`TOLERANCE` of 0."""
    if count >= len(weights):
        return weights
    head = weights[:count]
    total = math.fsum(head)
    if abs(total) <= TOLERANCE:
        raise ValueError(
            f"{where} holds {count} snapshots (added after the others), so it takes the "
            f"{count} newest coefficients renormalised, but those sum to {total!r}: too close to 0 "
            "to renormalise; give weights whose newest coefficients do not cancel"
        )
    return tuple(w / total for w in head)
