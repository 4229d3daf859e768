"""Paired statistics against answers known in closed form."""

import math

import pytest

from lawa_optim.paired import bootstrap_ci, first_epoch, paired, reach


def _exact_quantile(n: int, ones: int, q: float) -> float:
    """Quantile of the exact bootstrap distribution of the mean of ``ones`` ones and
    ``n - ones`` zeros: the resampled count of ones is Binomial(n, ones / n)."""
    p, cdf = ones / n, 0.0
    for j in range(n + 1):
        cdf += math.comb(n, j) * p**j * (1 - p) ** (n - j)
        if cdf >= q:
            return j / n
    return 1.0


@pytest.mark.parametrize("n, ones", [(4, 1), (6, 3), (10, 5)])
def test_bootstrap_matches_exact_bootstrap_distribution(n, ones):
    # In these cases 0.025 and 0.975 lie at least 0.009 from every jump of the exact CDF,
    # 7 standard errors of the CDF estimated from 10,000 resamples: the estimated
    # quantiles are the exact ones.
    values = [1.0] * ones + [0.0] * (n - ones)
    lo, hi = bootstrap_ci(values)
    assert (lo, hi) == (_exact_quantile(n, ones, 0.025), _exact_quantile(n, ones, 0.975))


def test_bootstrap_constant_and_shift():
    assert bootstrap_ci([0.25] * 7) == (0.25, 0.25)
    x = [1.0, 3.0, 4.0, 8.0]  # n a power of 2 and small integers: every mean is exact
    lo, hi = bootstrap_ci(x)
    assert bootstrap_ci([v + 16.0 for v in x]) == (lo + 16.0, hi + 16.0)
    with pytest.raises(ValueError, match="level must be in"):
        bootstrap_ci(x, level=1.0)
    with pytest.raises(ValueError, match="at least one number"):
        bootstrap_ci([])


def test_paired_summary():
    p = paired([1.0, 2.0, 5.0, 4.0], [2.0, 2.0, 3.0, 1.0])  # differences -1, 0, 2, 3
    assert (p.mean, p.median, p.below, p.above, p.n) == (1.0, 1.0, 1, 2, 4)
    assert p.lo < p.mean < p.hi and p.sign == 0
    assert p.text("+.2f") == f"+1.00 [{p.lo:+.2f}, {p.hi:+.2f}]"
    q = paired([2.0, 3.0, 4.0], [1.0, 1.0, 1.0])  # differences 1, 2, 3: every resample mean >= 1
    assert q.lo >= 1.0 and q.sign == 1
    assert paired([0.0, 0.0], [1.0, 2.0]).sign == -1
    with pytest.raises(ValueError, match="equally long and non-empty .* got 2 and 1"):
        paired([1.0, 2.0], [1.0])


def test_first_epoch():
    assert first_epoch([0.5, 0.2, 0.09], 0.1) == 3
    assert first_epoch([0.5, 0.2, 0.1], 0.1) == 3  # reaching counts
    assert first_epoch([0.5, 0.96, 0.98], 0.97, higher_is_better=True) == 3
    assert first_epoch([0.5, 0.4], 0.1) is None


def test_reach_medians_and_censoring():
    live = [[0.9, 0.5, 0.3, 0.2], [0.8, 0.6, 0.4, 0.3], [0.9, 0.9, 0.5, 0.4]]
    lawa = [[0.9, 0.2, 0.2, 0.2], [0.8, 0.6, 0.6, 0.6], [0.9, 0.4, 0.4, 0.4]]
    r = reach(live, lawa, [c[-1] for c in live])
    assert r.a_hits == [4, 4, 4] and r.b_hits == [2, 5, 2]  # seed 1 never: counted as T + 1 = 5
    assert (r.a_median, r.b_median, r.b_missed) == (4, 2, 1)
    assert (r.saved.mean, r.saved.median, r.saved.below, r.saved.above) == (1.0, 2.0, 1, 2)
    with pytest.raises(ValueError, match="never reaches its own target"):
        reach(live, lawa, [0.0, 0.0, 0.0])
