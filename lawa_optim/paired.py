"""Paired comparisons over seeds, for the evidence behind LAWA's claims.

Kaddour 2022 (arXiv:2209.14981) compares the LAWA average with the live weights of
the *same* run, epoch by epoch, and reports how many epochs earlier the average
reaches the baseline's performance. Both comparisons are paired: each seed gives one
difference, and the question is whether the mean difference is away from zero. Here
that is answered with a percentile bootstrap over seeds (a fixed resampling seed, so
the interval is a function of the data alone), and first-hit epochs are summarised by
medians, which one slow seed cannot drag.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

#: Bootstrap resamples; the interval's ends move by about 0.01 standard errors between
#: resampling seeds at this number.
RESAMPLES = 10_000
LEVEL = 0.95


def bootstrap_ci(values: Sequence[float], level: float = LEVEL, resamples: int = RESAMPLES) -> tuple[float, float]:
    """Percentile bootstrap interval for the mean of ``values``: resample the values
    with replacement ``resamples`` times (generator seeded 0), take the mean of each,
    return the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of those means."""
    if len(values) < 1:
        raise ValueError("values must hold at least one number, got none")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    x = torch.tensor(list(values), dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    means = x[torch.randint(len(x), (resamples, len(x)), generator=g)].mean(1)
    lo, hi = torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    return lo.item(), hi.item()


@dataclass
class Paired:
    """Summary of per-seed differences ``a - b``."""

    mean: float
    lo: float
    hi: float
    median: float
    below: int  # seeds with a < b
    above: int  # seeds with a > b
    n: int

    @property
    def sign(self) -> int:
        """-1 when the interval lies below 0, +1 above, 0 when it contains 0."""
        return -1 if self.hi < 0 else (1 if self.lo > 0 else 0)

    def text(self, fmt: str = "+.4f") -> str:
        """``"+0.0123 [+0.0040, +0.0210]"``: the mean and its 95 % interval."""
        return f"{self.mean:{fmt}} [{self.lo:{fmt}}, {self.hi:{fmt}}]"

    def asdict(self) -> dict:
        return asdict(self)


def paired(a: Sequence[float], b: Sequence[float]) -> Paired:
    """Mean, bootstrap interval and median of the differences ``a[s] - b[s]`` over seeds ``s``,
    and how many seeds fall on each side."""
    if len(a) != len(b) or not a:
        raise ValueError(f"a and b must be equally long and non-empty (one value per seed), got {len(a)} and {len(b)}")
    d = [x - y for x, y in zip(a, b)]
    lo, hi = bootstrap_ci(d)
    return Paired(statistics.fmean(d), lo, hi, statistics.median(d),
                  sum(v < 0 for v in d), sum(v > 0 for v in d), len(d))


def first_epoch(curve: Sequence[float], target: float, higher_is_better: bool = False) -> int | None:
    """First epoch (counted from 1) whose value reaches ``target``, or None if none does."""
    for epoch, v in enumerate(curve, start=1):
        if (v >= target) if higher_is_better else (v <= target):
            return epoch
    return None


@dataclass
class Reach:
    """Epochs for curves ``a`` and ``b`` to reach a per-seed target, paired over seeds."""

    a_hits: list[int]  # first epoch per seed
    b_hits: list[int]  # first epoch per seed; T + 1 where b never reaches the target
    a_median: float
    b_median: float
    saved: Paired  # epochs saved by b: first epoch of a minus first epoch of b
    b_missed: int  # seeds where b never reaches the target

    def asdict(self) -> dict:
        return {**asdict(self), "saved": self.saved.asdict()}


def reach(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]], targets: Sequence[float],
          higher_is_better: bool = False) -> Reach:
    """Per seed ``s``, the first epochs at which ``a[s]`` and ``b[s]`` reach ``targets[s]``.

    The targets come from curve ``a`` (for example its final value), so ``a`` reaches
    each of them; a seed where ``b`` never does counts as epoch ``T + 1``, which makes
    the saving an upper bound for that seed.
    """
    hits_a, hits_b = [], []
    for ca, cb, t in zip(a, b, targets):
        ea = first_epoch(ca, t, higher_is_better)
        if ea is None:
            raise ValueError(f"curve a never reaches its own target {t!r}; targets must come from a")
        eb = first_epoch(cb, t, higher_is_better)
        hits_a.append(ea)
        hits_b.append(len(cb) + 1 if eb is None else eb)
    return Reach(hits_a, hits_b, statistics.median(hits_a), statistics.median(hits_b), paired(hits_a, hits_b),
                 sum(first_epoch(cb, t, higher_is_better) is None for cb, t in zip(b, targets)))
