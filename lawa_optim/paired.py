"""Paired comparisons over seeds, for the evidence behind LAWA's claims.

Kaddour 2022 (arXiv:2209.14981) compares the LAWA average with the live weights of
the *same* run, epoch by epoch, and reports how many epochs earlier the average
reaches the baseline's performance. Both comparisons are paired: each seed gives one
difference, and the question is whether the mean difference is away from zero. Here
that is answered with a Student-t interval on the per-seed differences (a percentile
bootstrap under-covers at 10 or 20 seeds), and no verdict at all below
:data:`MIN_SEEDS` seeds. Epochs to a target are integers, and a seed whose average
never reaches the target has no epoch at all: a saving is claimed only where the mean's
interval, the median of the per-seed savings and the gap between the median first
epochs all point the same way, and the seeds that never reach it are counted.

The rules that turn these into words are here too, shared by ``lawa_optim.demo`` and
``examples/lawa_experiment.py``: the targets set from the live weights' final values,
the margins within which a difference is negligible, and the run cut into thirds.
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

LEVEL = 0.95
#: Fewer seeds than this carry no verdict: with 5, even every seed agreeing in sign is
#: not significant at 5 % by a sign test (2 / 2**5 = 0.0625); with 6 it is (0.031).
MIN_SEEDS = 6

#: Targets for "epochs to reach", fixed from the live weights' own final values: loss
#: within 10 % above the final loss, accuracy 1 point below the final accuracy. The
#: exact final values sit on the flat end of a cosine run, where the first epoch that
#: reaches them is decided by differences of 1e-5 that change from one CPU to the next.
LOSS_TARGET_RATIO = 1.10
ACC_TARGET_GAP = 0.01

#: Differences smaller than these are negligible here (1 validation image of the demo is
#: 0.0017 of accuracy): when a whole interval lies within +-margin the verdict says "equal
#: within", so a difference of 1e-4 that one CPU resolves and the next does not is not a claim.
MARGINS = {"loss": 0.005, "acc": 0.005, "epochs": 1.0}


@functools.cache
def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t distribution with ``df`` degrees of freedom.

    With ``t = sqrt(df) tan(theta)`` the density becomes proportional to
    ``cos(theta) ** (df - 1)`` on ``(-pi/2, pi/2)``, smooth and bounded; its integral
    from 0 (Simpson's rule, 2048 intervals) against the closed-form total, solved for
    ``theta`` by Newton's method kept inside a shrinking bracket, is accurate to 1e-9 or better."""
    if df < 1:
        raise ValueError(f"df must be an int >= 1, got {df!r}")
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p!r}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    # the integral of cos ** (df - 1) over [0, pi/2]
    half = math.exp(0.5 * math.log(math.pi) + math.lgamma(df / 2) - math.lgamma((df + 1) / 2)) / 2
    target = (2 * p - 1) * half
    weights = [1.0] + [4.0 if i % 2 else 2.0 for i in range(1, 2048)] + [1.0]

    def mass(theta: float) -> float:
        h = theta / 2048
        return h / 3 * sum(w * math.cos(i * h) ** (df - 1) for i, w in enumerate(weights))

    lo, hi, theta = 0.0, math.pi / 2, math.atan(1.0 / math.sqrt(df))
    for _ in range(200):
        f = mass(theta) - target
        if abs(f) <= 1e-14 * half or hi - lo < 1e-15:
            break
        lo, hi = (theta, hi) if f < 0 else (lo, theta)
        step = theta - f / math.cos(theta) ** (df - 1)
        theta = step if lo < step < hi else (lo + hi) / 2
    return math.sqrt(df) * math.tan(theta)


def t_interval(values: Sequence[float], level: float = LEVEL) -> tuple[float, float]:
    """Student-t interval for the mean of ``values``: mean +- t(n - 1) * s / sqrt(n).
    At n = 10 it covers the mean at its level for normal data, where a percentile
    bootstrap is too narrow; ``(nan, nan)`` for a single value, which has no spread."""
    if len(values) < 1:
        raise ValueError("values must hold at least one number, got none")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    n, mean = len(values), statistics.fmean(values)
    if n == 1:
        return math.nan, math.nan
    half = t_quantile((1 + level) / 2, n - 1) * statistics.stdev(values) / math.sqrt(n)
    return mean - half, mean + half


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
    level: float = LEVEL

    @property
    def sign(self) -> int:
        """-1 when the interval lies below 0, +1 above, 0 when it contains 0 (or there is none)."""
        return -1 if self.hi < 0 else (1 if self.lo > 0 else 0)

    def text(self, fmt: str = "+.4f") -> str:
        """``"+0.0123 [+0.0040, +0.0210]"``: the mean and its interval; the mean alone below
        :data:`MIN_SEEDS` seeds, where an interval would claim what the seeds cannot show
        (two seeds that happen to agree give one of zero width)."""
        if self.n < MIN_SEEDS:
            return f"{self.mean:{fmt}} (mean of {self.n} seed(s), no interval)"
        return f"{self.mean:{fmt}} [{self.lo:{fmt}}, {self.hi:{fmt}}]"


def paired(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> Paired:
    """Mean, Student-t interval (at ``level``) and median of the differences ``a[s] - b[s]``
    over seeds ``s``, and how many seeds fall on each side. The interval rests on the
    per-seed differences, so what the seeds share (their split, initialisation and batch
    order) cancels: it is narrower than one from ``a`` and ``b`` taken apart."""
    if len(a) != len(b) or not a:
        raise ValueError(f"a and b must be equally long and non-empty (one value per seed), got {len(a)} and {len(b)}")
    d = [x - y for x, y in zip(a, b)]
    lo, hi = t_interval(d, level)
    return Paired(statistics.fmean(d), lo, hi, statistics.median(d),
                  sum(v < 0 for v in d), sum(v > 0 for v in d), len(d), level)


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
    epochs: int  # T, the length of the curves

    @property
    def agree(self) -> bool:
        """Whether the saving's interval, its median over seeds and the gap between the
        median first epochs all lie on the same side of 0."""
        signs = {self.saved.sign, _sign(self.saved.median), _sign(self.a_median - self.b_median)}
        return len(signs) == 1 and 0 not in signs


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def reach(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]], targets: Sequence[float],
          higher_is_better: bool = False, level: float = LEVEL) -> Reach:
    """Per seed ``s``, the first epochs at which ``a[s]`` and ``b[s]`` reach ``targets[s]``.

    The targets come from curve ``a`` (for example its final value), so ``a`` reaches
    each of them; a seed where ``b`` never does counts as epoch ``T + 1``, which makes
    the saving an upper bound for that seed (the medians are robust to a few of them).
    """
    hits_a, hits_b, missed = [], [], 0
    for ca, cb, t in zip(a, b, targets):
        ea = first_epoch(ca, t, higher_is_better)
        if ea is None:
            raise ValueError(f"curve a never reaches its own target {t!r}; targets must come from a")
        eb = first_epoch(cb, t, higher_is_better)
        hits_a.append(ea)
        hits_b.append(len(cb) + 1 if eb is None else eb)
        missed += eb is None
    return Reach(hits_a, hits_b, statistics.median(hits_a), statistics.median(hits_b),
                 paired(hits_a, hits_b, level), missed, len(b[0]))


def targets(curve: Sequence[float], metric: str, exact: bool = False) -> float:
    """The target for ``metric`` (``"loss"`` or ``"acc"``) from a live curve's final value:
    relaxed (1.1 x the loss, the accuracy - 1 point), or the final value itself."""
    if exact:
        return curve[-1]
    return curve[-1] * LOSS_TARGET_RATIO if metric == "loss" else curve[-1] - ACC_TARGET_GAP


def phases(epochs: int) -> list[tuple[int, int]]:
    """The run cut into thirds (first and last epoch of each, counted from 1)."""
    cuts = [0, epochs // 3, (2 * epochs) // 3, epochs]
    return [(cuts[i] + 1, cuts[i + 1]) for i in range(3) if cuts[i + 1] > cuts[i]]


def per_epoch(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> list[Paired]:
    """Per epoch ``e``, the paired difference ``a[s][e] - b[s][e]`` over the seeds ``s``."""
    return [paired([c[e] for c in a], [c[e] for c in b]) for e in range(len(a[0]))]


def per_phase(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> list[tuple[int, int, Paired]]:
    """Per third of the run (:func:`phases`), its first and last epoch and the paired
    difference of the curves' means over it, ``a[s]`` minus ``b[s]`` over the seeds ``s``."""
    out = []
    for first, last in phases(len(a[0])):
        mean = lambda c: sum(c[first - 1:last]) / (last - first + 1)  # noqa: E731
        out.append((first, last, paired([mean(c) for c in a], [mean(c) for c in b])))
    return out


def conclusion(p: Paired, margin: float, lower: str, higher: str) -> str:
    """What the interval of ``p`` supports, in words: nothing below :data:`MIN_SEEDS`
    seeds; equal within ``+-margin`` when the whole interval lies inside it, else
    ``lower``/``higher`` when it excludes 0."""
    if p.n < MIN_SEEDS:
        return no_verdict(p.n)
    if -margin < p.lo and p.hi < margin:
        return f"equal within +-{margin:g}"
    return {-1: lower, 1: higher, 0: "not resolved (the interval contains 0)"}[p.sign]


def no_verdict(n: int) -> str:
    """Why ``n`` seeds carry no verdict."""
    return f"no verdict ({n} seed(s); at least {MIN_SEEDS} are needed)"


def reach_conclusion(r: Reach, later: str, earlier: str) -> str:
    """What the epochs saved in ``r`` support: as :func:`conclusion` with the epochs'
    margin, and a direction only where the interval and both medians agree on it."""
    says = conclusion(r.saved, MARGINS["epochs"], later, earlier)
    if says in (later, earlier) and not r.agree:
        return (f"not resolved (the mean's interval excludes 0, but the median saving is {r.saved.median:+g} "
                f"and the median epochs differ by {r.a_median - r.b_median:+g})")
    return says


class ReachText(NamedTuple):
    """A :class:`Reach` of curve ``b`` against curve ``a`` in words."""

    target: str  # "1.1 x final loss", "final accuracy - 0.01" (with `whose` before "final")
    medians: str  # "live median 8, LAWA median 6 (-2)"
    saved: str  # the epochs b saves per seed: "mean +2.4 [+0.7, +4.3], median +2; earlier in 7 of 10 seeds, later in 1"
    says: str  # what that supports: "LAWA earlier", "LAWA later", "equal within +-1", "no verdict ...", ...


def target_text(metric: str, whose: str = "", exact: bool = False) -> str:
    """``"1.1 x final loss"``, ``"final accuracy - 0.01"``, ``"final accuracy"`` (with
    ``whose`` before "final")."""
    if exact:
        return f"{whose}final {'loss' if metric == 'loss' else 'accuracy'}"
    return (f"{LOSS_TARGET_RATIO:g} x {whose}final loss" if metric == "loss"
            else f"{whose}final accuracy - {ACC_TARGET_GAP:g}")


def reach_text(r: Reach, metric: str, a: str, b: str, whose: str = "", exact: bool = False) -> ReachText:
    """The words for ``r``, the epochs curves named ``a`` and ``b`` take to reach the
    :func:`targets` of ``metric`` set from the final values of ``whose`` (``""`` or, for
    example, ``"the live weights' "``)."""
    s = r.saved
    missed = f", {r.b_missed} never reach it (counted as epoch {r.epochs + 1})" if r.b_missed else ""
    saved = (f"mean {s.text('+.1f')}, median {s.median:+g}; "
             f"{b} earlier in {s.above} of {s.n} seeds, later in {s.below}{missed}")
    return ReachText(target_text(metric, whose, exact),
                     f"{a} median {r.a_median:g}, {b} median {r.b_median:g}", saved,
                     reach_conclusion(r, f"{b} later", f"{b} earlier"))
