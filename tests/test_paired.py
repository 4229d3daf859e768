"""Paired statistics against answers known in closed form."""

import math
import statistics

import pytest
import torch

from lawa_optim.paired import (MIN_SEEDS, conclusion, first_epoch, paired, reach, reach_conclusion, t_interval,
                               t_quantile)


@pytest.mark.parametrize("p", [0.6, 0.975, 1 - 0.025 / 7, 0.9995])
def test_t_quantile_matches_closed_forms(p):
    # df 1 is the Cauchy distribution; df 2 has F^-1(p) = (2p - 1) / sqrt(2 p (1 - p))
    assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)
    assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9)
    assert t_quantile(1 - p, 2) == -t_quantile(p, 2)


def test_t_quantile_tabulated_and_normal_limit():
    # the textbook table's 97.5 % column
    for df, t in ((3, 3.182446305284263), (9, 2.262157162740992), (19, 2.093024054408309)):
        assert t_quantile(0.975, df) == pytest.approx(t, rel=1e-9)
    assert t_quantile(0.975, 100_000) == pytest.approx(1.959963984540054, rel=1e-4)
    with pytest.raises(ValueError, match="df must be an int >= 1, got 0"):
        t_quantile(0.975, 0)
    with pytest.raises(ValueError, match=r"p must be in \(0, 1\), got 1.0"):
        t_quantile(1.0, 3)


def test_t_interval_by_hand():
    x = [1.0, 3.0, 4.0, 8.0]  # mean 4, sample variance 26 / 3
    half = 3.182446305284263 * math.sqrt(26 / 3) / 2
    lo, hi = t_interval(x)
    assert lo == pytest.approx(4 - half, rel=1e-12) and hi == pytest.approx(4 + half, rel=1e-12)
    assert t_interval([0.25] * 7) == (0.25, 0.25)
    assert all(math.isnan(v) for v in t_interval([1.0]))
    with pytest.raises(ValueError, match="level must be in"):
        t_interval(x, level=1.0)
    with pytest.raises(ValueError, match="at least one number"):
        t_interval([])


def test_t_interval_covers_at_ten_seeds():
    # 4000 samples of 10 normal values: the 95 % interval holds the true mean in 95 %
    # of them (binomial standard error 0.0034); a percentile bootstrap covers about 90 % here
    g = torch.Generator().manual_seed(0)
    samples = (torch.randn(4000, 10, generator=g, dtype=torch.float64) + 1.5).tolist()
    covered = sum(lo <= 1.5 <= hi for lo, hi in map(t_interval, samples))
    assert abs(covered / 4000 - 0.95) < 0.015


def test_paired_interval_rests_on_the_per_seed_differences():
    # seeds differ a lot from each other, and a - b varies little (and not constantly) within a seed
    b = [1.0, 5.0, 2.0, 9.0, 4.0, 7.0, 3.0]
    d = [0.3, 0.5, 0.2, 0.6, 0.4, 0.1, 0.5]
    a = [x + y for x, y in zip(b, d)]
    p = paired(a, b)
    lo, hi = t_interval(d)
    assert (p.lo, p.hi) == pytest.approx((lo, hi), rel=1e-12) and p.mean == pytest.approx(statistics.fmean(d))
    # the unpaired (Welch) interval of the same numbers: the seeds' spread swamps it
    n, va, vb = len(a), statistics.variance(a), statistics.variance(b)
    se = math.sqrt(va / n + vb / n)
    df = (va / n + vb / n) ** 2 / ((va / n) ** 2 / (n - 1) + (vb / n) ** 2 / (n - 1))
    half = t_quantile(0.975, math.floor(df)) * se
    assert p.lo > 0 and p.sign == 1  # paired: resolved
    assert p.mean - half < 0 < p.mean + half  # unpaired: contains 0
    assert p.hi - p.lo < half  # and far wider


def test_paired_summary():
    p = paired([1.0, 2.0, 5.0, 4.0, 3.0, 3.0], [2.0, 2.0, 3.0, 1.0, 3.0, 3.0])  # differences -1, 0, 2, 3, 0, 0
    assert (p.mean, p.median, p.below, p.above, p.n) == (4 / 6, 0.0, 1, 2, 6)
    assert p.lo < p.mean < p.hi and p.sign == 0
    assert p.text("+.2f") == f"+0.67 [{p.lo:+.2f}, {p.hi:+.2f}]"
    assert paired([0.0] * 6, [1.0, 2.0, 1.5, 1.2, 1.1, 1.3]).sign == -1
    with pytest.raises(ValueError, match="equally long and non-empty .* got 2 and 1"):
        paired([1.0, 2.0], [1.0])


def test_too_few_seeds_carry_no_verdict_and_no_interval():
    # two seeds that agree exactly: a zero-width interval would "resolve" anything
    few = paired([1.0] * (MIN_SEEDS - 1), [0.0] * (MIN_SEEDS - 1))
    assert few.text() == f"+1.0000 (mean of {MIN_SEEDS - 1} seed(s), no interval)"
    assert conclusion(few, 0.005, "lower", "higher") == f"no verdict ({MIN_SEEDS - 1} seed(s); at least {MIN_SEEDS} are needed)"
    enough = paired([1.0, 1.1, 0.9, 1.0, 1.2, 0.8], [0.0] * MIN_SEEDS)
    assert conclusion(enough, 0.005, "lower", "higher") == "higher"
    assert conclusion(paired([0.001, -0.001] * 3, [0.0] * 6), 0.005, "lower", "higher") == "equal within +-0.005"


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
    assert (r.a_median, r.b_median, r.b_missed, r.epochs) == (4, 2, 1, 4)
    assert (r.saved.mean, r.saved.median, r.saved.below, r.saved.above) == (1.0, 2.0, 1, 2)
    with pytest.raises(ValueError, match="never reaches its own target"):
        reach(live, lawa, [0.0, 0.0, 0.0])


def _curves(hits, epochs=10):
    """Loss curves that first reach 0.5 at the given epochs (None: never)."""
    return [[1.0] * epochs if h is None else [1.0] * (h - 1) + [0.5] * (epochs - h + 1) for h in hits]


def test_a_saving_is_claimed_only_where_mean_and_medians_agree():
    live = _curves([6] * 9)
    # four seeds two epochs earlier, five the same: the mean's interval excludes 0, the medians say 0
    mixed = reach(live, _curves([6, 6, 6, 6, 6, 4, 4, 4, 4]), [0.5] * 9)
    assert mixed.saved.sign == 1 and mixed.saved.median == 0 and not mixed.agree
    assert reach_conclusion(mixed, "LAWA later", "LAWA earlier") == (
        "not resolved (the mean's interval excludes 0, but the median saving is +0 and the median epochs differ by +0)")
    live = _curves([6] * 7)
    agreeing = reach(live, _curves([4, 5, 4, 3, 4, 5, 4]), [0.5] * 7)
    assert agreeing.agree and reach_conclusion(agreeing, "LAWA later", "LAWA earlier") == "LAWA earlier"
