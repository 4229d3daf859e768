"""Paired comparisons over seeds, for the evidence behind LAWA's claims.

Kaddour 2022 (arXiv:2209.14981) compares the LAWA average with the live weights of
the *same* run, epoch by epoch, and reports how many epochs earlier the average
reaches the baseline's performance. Both comparisons are paired: each seed gives one
difference, and the question is whether the mean difference is away from zero. Here
that is answered with a percentile bootstrap over seeds (a fixed resampling seed, so
the interval is a function of the data alone), and first-hit epochs are summarised by
medians, which one slow seed cannot drag.

The rules that turn these into words are here too, shared by ``lawa_optim.demo`` and
``examples/lawa_experiment.py``: the targets set from the live weights' final values,
the margins within which a difference is negligible, and the run cut into thirds.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

#: Bootstrap resamples; the interval's ends move by about 0.01 standard errors between
#: resampling seeds at this number.
RESAMPLES = 10_000
LEVEL = 0.95

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


def reach(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]], targets: Sequence[float],
          higher_is_better: bool = False) -> Reach:
    """Per seed ``s``, the first epochs at which ``a[s]`` and ``b[s]`` reach ``targets[s]``.

    The targets come from curve ``a`` (for example its final value), so ``a`` reaches
    each of them; a seed where ``b`` never does counts as epoch ``T + 1``, which makes
    the saving an upper bound for that seed.
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
    return Reach(hits_a, hits_b, statistics.median(hits_a), statistics.median(hits_b), paired(hits_a, hits_b), missed)


def targets(curve: Sequence[float], metric: str) -> float:
    """The target for ``metric`` (``"loss"`` or ``"acc"``) from a live curve's final value."""
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
    """What the interval of ``p`` supports, in words: equal within ``+-margin`` when the
    whole interval lies inside it, else ``lower``/``higher`` when it excludes 0."""
    if -margin < p.lo and p.hi < margin:
        return f"equal within +-{margin:g}"
    return {-1: lower, 1: higher, 0: "not resolved (the interval contains 0)"}[p.sign]


class ReachText(NamedTuple):
    """A :class:`Reach` of curve ``b`` against curve ``a`` in words."""

    target: str  # "1.1 x final loss", "final accuracy - 0.01" (with `whose` before "final")
    medians: str  # "live median 8, LAWA median 6"
    saved: str  # the epochs b saves, "+2.4 [+0.7, +4.3]"
    says: str  # what that interval supports: "LAWA earlier", "LAWA later", "equal within +-1", ...


def reach_text(r: Reach, metric: str, a: str, b: str, whose: str = "") -> ReachText:
    """The words for ``r``, the epochs curves named ``a`` and ``b`` take to reach the
    :func:`targets` of ``metric`` set from the final values of ``whose`` (``""`` or, for
    example, ``"the live weights' "``)."""
    target = (f"{LOSS_TARGET_RATIO:g} x {whose}final loss" if metric == "loss"
              else f"{whose}final accuracy - {ACC_TARGET_GAP:g}")
    return ReachText(target, f"{a} median {r.a_median:g}, {b} median {r.b_median:g}", r.saved.text("+.1f"),
                     conclusion(r.saved, MARGINS["epochs"], f"{b} later", f"{b} earlier"))
