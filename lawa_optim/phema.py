"""Power-function EMA profiles and their post-hoc least-squares fit (Karras et al. 2024,
"Analyzing and Improving the Training Dynamics of Diffusion Models", EDM2, Sec. 3 and
Appendix C; NVlabs/edm2 ``training/phema.py``).

A power-function EMA of the weights with exponent ``gamma``, updated at steps
``t = 1, 2, ...`` with ``beta(t) = (1 - 1/t) ** (gamma + 1)`` (so step 1 copies the
weights), holds at step ``t`` the average of the weights under the profile
``p(t, tau) = (gamma + 1) tau**gamma / t**(gamma + 1)`` on ``0 < tau <= t``; step
``tau`` gets exactly the profile's mass on ``(tau - 1, tau]``. Its relative width is
``sigma_rel = sqrt((gamma + 1) / ((gamma + 2)**2 (gamma + 3)))``. Given snapshots of
such EMAs (profiles ``p_i``), the EMA of another width at a time ``t_r`` is
approximated by the combination ``sum_i x_i theta_i`` whose profile is nearest to
``p_r`` in L2: ``A x = b`` with ``A_ij = <p_i, p_j>``, ``b_i = <p_i, p_r>``, the inner
products in closed form. All arithmetic here is float64 on the host: the coefficients
are few, and the weighted sum of the snapshots is then one fused pass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

#: Widest profile accepted: ``gamma = 0`` (a uniform average over all steps so far).
MAX_SIGMA_REL = 12 ** -0.5


def _real(x: object, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise ValueError(f"{name} must be a finite number, got {x!r}")
    return float(x)


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent of the power-function EMA of relative width ``sigma_rel``, in
    ``(0, MAX_SIGMA_REL]`` (about 0.289): the real root of
    ``gamma**3 + 7 gamma**2 + (16 - s**-2) gamma + (12 - s**-2) = 0``."""
    s = _real(sigma_rel, "sigma_rel")
    if not 0.0 < s <= MAX_SIGMA_REL:
        raise ValueError(f"sigma_rel must be in (0, {MAX_SIGMA_REL:.4f}] (gamma >= 0), got {sigma_rel!r}")
    # sigma_rel falls monotonically in gamma >= 0: bisect on the closed form, to float64 precision.
    lo, hi = 0.0, 1.0
    while gamma_to_sigma_rel(hi) > s:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if gamma_to_sigma_rel(mid) > s else (lo, mid)
    return (lo + hi) / 2


def gamma_to_sigma_rel(gamma: float) -> float:
    """Relative width of the power-function profile of exponent ``gamma >= 0``."""
    g = _real(gamma, "gamma")
    if g < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma!r}")
    return math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3)))


def beta(t: int, gamma: float) -> float:
    """Decay of the power-function EMA at step ``t >= 1``: ``(1 - 1/t) ** (gamma + 1)``."""
    return (1.0 - 1.0 / t) ** (gamma + 1.0)


def alpha(t: int, gamma: float) -> float:
    """``1 - beta(t, gamma)``, the weight of the newest weights at step ``t >= 1``: 1 at
    ``t = 1``, about ``(gamma + 1) / t`` later, computed with ``expm1``/``log1p`` so that it
    keeps float64's relative precision where ``beta`` is within 1e-9 of 1."""
    if t == 1:
        return 1.0
    return -math.expm1((gamma + 1.0) * math.log1p(-1.0 / t))


def inner(t_a: torch.Tensor, gamma_a: torch.Tensor, t_b: torch.Tensor, gamma_b: torch.Tensor) -> torch.Tensor:
    """``<p(t_a, .), p(t_b, .)>``, elementwise with broadcasting, in float64."""
    t_a, gamma_a, t_b, gamma_b = (torch.as_tensor(x, dtype=torch.float64) for x in (t_a, gamma_a, t_b, gamma_b))
    exponent = torch.where(t_a < t_b, gamma_b, -gamma_a)
    num = (gamma_a + 1) * (gamma_b + 1) * (t_a / t_b) ** exponent
    return num / ((gamma_a + gamma_b + 1) * torch.maximum(t_a, t_b))


@dataclass(frozen=True)
class Fit:
    """Coefficients over the stored profiles and how far their profile is from the target.

    Attributes:
        weights: one coefficient per stored profile, in the order given; they sum to 1.
        error: the relative L2 distance ``||sum_i x_i p_i - p_r|| / ||p_r||``.
    """

    weights: list[float]
    error: float


def fit(times: Sequence[float], gammas: Sequence[float], t_r: float, gamma_r: float) -> Fit:
    """Least-squares coefficients that combine the profiles ``(times[i], gammas[i])``
    into the profile ``(t_r, gamma_r)``, normalised to sum 1, and the fit's error.

    Duplicate or nearly dependent profiles are fine: the system is solved in the
    least-squares sense with a minimum-norm solution (SVD).
    """
    if len(times) != len(gammas) or not times:
        raise ValueError(f"times and gammas must be non-empty and of one length, got {len(times)} and {len(gammas)}")
    t = torch.tensor([_real(x, "times") for x in times], dtype=torch.float64)
    g = torch.tensor([_real(x, "gammas") for x in gammas], dtype=torch.float64)
    if (t < 1).any() or (g < 0).any():
        raise ValueError(f"times must be >= 1 and gammas >= 0, got times {list(times)}, gammas {list(gammas)}")
    t_r, gamma_r = _real(t_r, "t_r"), _real(gamma_r, "gamma_r")
    A = inner(t[:, None], g[:, None], t[None, :], g[None, :])
    b = inner(t, g, torch.tensor(t_r, dtype=torch.float64), torch.tensor(gamma_r, dtype=torch.float64))
    # Scale rows and columns to unit diagonal: profiles of very different times differ
    # in norm by orders of magnitude, which the SVD's cut-off would otherwise mistake for
    # dependence.
    d = A.diagonal().rsqrt()
    x = d * torch.linalg.lstsq((d[:, None] * A * d[None, :]), d * b, driver="gelsd").solution
    x = x / x.sum()
    c = (gamma_r + 1) ** 2 / ((2 * gamma_r + 1) * t_r)  # <p_r, p_r>
    err2 = float(x @ A @ x - 2 * x @ b + c)
    return Fit([float(v) for v in x], math.sqrt(max(err2, 0.0) / c))
