"""Power-function EMA math (EDM2) against independent references: the cubic for gamma,
numerical quadrature of the profiles, a step-by-step EMA, and ema_pytorch's solver."""

import math

import pytest
import torch

from lawa_optim import phema

SIGMAS = (0.05, 0.10)


def _quad(f, *ends: float, n: int = 200_001) -> float:
    """Trapezoid rule in float64 over (0, ends[0]], (ends[0], ends[1]], ...: the profiles
    are smooth between their ends, where they drop to 0."""
    total, lo = 0.0, 0.0
    for hi in ends:
        tau = torch.linspace(lo, hi, n, dtype=torch.float64)
        total += float(torch.trapezoid(f(tau), tau))
        lo = hi
    return total


def _profile(t: float, gamma: float):
    return lambda tau: torch.where(tau <= t, (gamma + 1) * tau ** gamma / t ** (gamma + 1), 0.0)


@pytest.mark.parametrize("sigma_rel", [0.01, 0.05, 0.1, 0.2, phema.MAX_SIGMA_REL])
def test_gamma_is_the_root_of_edm2s_cubic(sigma_rel):
    g = phema.sigma_rel_to_gamma(sigma_rel)
    c = sigma_rel ** -2
    assert abs(g ** 3 + 7 * g ** 2 + (16 - c) * g + (12 - c)) <= 1e-9 * c * (g + 1) ** 2
    assert phema.gamma_to_sigma_rel(g) == pytest.approx(sigma_rel, rel=1e-12)


def test_known_exponents():
    # EDM2, Sec. 3.1: sigma_rel 0.05 and 0.10 are gamma 16.97 and 6.94.
    assert phema.sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.005)
    assert phema.sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.005)


@pytest.mark.parametrize("bad", [0.0, -0.1, 0.3, float("nan"), float("inf"), True, "0.1", None])
def test_sigma_rel_out_of_range_is_refused(bad):
    with pytest.raises(ValueError, match="sigma_rel must be"):
        phema.sigma_rel_to_gamma(bad)


@pytest.mark.parametrize("t_a, g_a, t_b, g_b", [(100, 6.94, 100, 16.97), (80, 6.94, 100, 16.97),
                                                 (100, 6.94, 70, 16.97), (50, 0.0, 100, 3.0)])
def test_inner_product_matches_quadrature(t_a, g_a, t_b, g_b):
    pa, pb = _profile(t_a, g_a), _profile(t_b, g_b)
    numeric = _quad(lambda tau: pa(tau) * pb(tau), min(t_a, t_b))
    assert float(phema.inner(t_a, g_a, t_b, g_b)) == pytest.approx(numeric, rel=1e-6)
    assert float(phema.inner(t_b, g_b, t_a, g_a)) == pytest.approx(numeric, rel=1e-6)


@pytest.mark.parametrize("sigma_rel", SIGMAS)
def test_beta_gives_each_step_the_profiles_mass(sigma_rel):
    g, T = phema.sigma_rel_to_gamma(sigma_rel), 300
    ema = torch.zeros(T, dtype=torch.float64)  # the EMA of one-hot signals: the weight of each step
    for t in range(1, T + 1):
        b = phema.beta(t, g)
        ema.mul_(b)
        ema[t - 1] += 1 - b
    tau = torch.arange(1, T + 1, dtype=torch.float64)
    mass = (tau ** (g + 1) - (tau - 1) ** (g + 1)) / T ** (g + 1)
    torch.testing.assert_close(ema, mass, rtol=1e-9, atol=1e-15)
    assert phema.beta(1, g) == 0.0  # step 1 copies the weights


def _stored():
    times = [1000, 950, 900] * 2
    gammas = [phema.sigma_rel_to_gamma(s) for s in SIGMAS for _ in range(3)]
    return times, gammas


def test_a_stored_profile_is_fit_exactly():
    times, gammas = _stored()
    for i in range(6):
        f = phema.fit(times, gammas, times[i], gammas[i])
        assert f.error < 1e-6 and f.weights[i] == pytest.approx(1.0, abs=1e-6)
        assert math.fsum(f.weights) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("sigma_rel", [0.03, 0.07, 0.13])
def test_fit_error_is_the_profiles_relative_l2_distance(sigma_rel):
    times, gammas = _stored()
    g_r = phema.sigma_rel_to_gamma(sigma_rel)
    f = phema.fit(times, gammas, 1000, g_r)
    target = _profile(1000, g_r)
    parts = [_profile(t, g) for t, g in zip(times, gammas)]
    residual = lambda tau: sum(x * p(tau) for x, p in zip(f.weights, parts)) - target(tau)  # noqa: E731
    numeric = math.sqrt(_quad(lambda tau: residual(tau) ** 2, 900, 950, 1000, n=20_001)
                        / _quad(lambda tau: target(tau) ** 2, 1000, n=20_001))
    assert f.error == pytest.approx(numeric, rel=1e-3, abs=1e-6)
    assert 0.001 < f.error < 0.2  # between and beyond the stored widths: an approximation


def test_fit_agrees_with_ema_pytorch():
    post_hoc = pytest.importorskip("ema_pytorch.post_hoc_ema")
    times, gammas = _stored()
    for sigma_rel in (0.03, 0.07, 0.13):
        g_r = phema.sigma_rel_to_gamma(sigma_rel)
        assert g_r == pytest.approx(post_hoc.sigma_rel_to_gamma(sigma_rel), rel=1e-9)
        theirs = post_hoc.solve_weights(torch.tensor(times, dtype=torch.float64), torch.tensor(gammas, dtype=torch.float64),
                                        torch.tensor([1000.0], dtype=torch.float64), torch.tensor([g_r], dtype=torch.float64))
        theirs = theirs.squeeze(-1) / theirs.sum()
        torch.testing.assert_close(torch.tensor(phema.fit(times, gammas, 1000, g_r).weights, dtype=torch.float64),
                                   theirs, rtol=1e-6, atol=1e-6)


def test_synthesised_ema_tracks_the_ema_computed_every_step():
    """On a random walk, the combination of stored EMA snapshots approximates the EMA of
    another width computed directly, about as well as their profile fit says."""
    g = torch.Generator().manual_seed(0)
    T, dim = 1000, 64
    walk = torch.randn(T, dim, generator=g, dtype=torch.float64).cumsum(0)
    widths = (*SIGMAS, 0.07)
    gam = {s: phema.sigma_rel_to_gamma(s) for s in widths}
    emas = {s: torch.zeros(dim, dtype=torch.float64) for s in widths}
    stored, times, gammas = [], [], []
    for t in range(1, T + 1):
        for s in widths:
            emas[s].lerp_(walk[t - 1], 1 - phema.beta(t, gam[s]))
        if t in (900, 950, 1000):
            for s in SIGMAS:
                stored.append(emas[s].clone()); times.append(t); gammas.append(gam[s])
    f = phema.fit(times, gammas, T, gam[0.07])
    synth = sum(x * th for x, th in zip(f.weights, stored))
    direct = emas[0.07]
    miss = (synth - direct).norm() / (direct - walk[-1]).norm()
    nearest = min((emas[s] - direct).norm() for s in SIGMAS) / (direct - walk[-1]).norm()
    assert miss < 0.2 * nearest
