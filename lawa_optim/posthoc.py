"""Post-hoc power-function EMA from memory: the history of ``LAWA(mode="phema")``.

EDM2 (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", Sec. 3) keeps two power-function EMAs of the weights during training, saves
snapshots of both every so often, and after training synthesises the EMA of any width
as the least-squares combination of the stored snapshots (:mod:`lawa_optim.phema`).
EDM2 and ``ema_pytorch.PostHocEMA`` write the snapshots to disk; here they stay in the
ring buffer of the history, so the synthesis is one weighted pass over memory.

Each bucket keeps ``emas``, one float32 row per width, updated after every optimizer
step ``t`` (``t = 1`` copies the weights, then ``beta(t) = (1 - 1/t) ** (gamma + 1)``,
in one fused pass per bucket: :func:`lawa_optim.ops.phema_update`). A snapshot pushes
each row, cast to the history dtype, into the next ring slot, and records the slot's
``(t, width index)``, so the profile of every stored snapshot is known. Parameters added
later (``add_param_group``) count their own ``t`` from their first step, so their
buckets are fitted on their own clock.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from lawa_optim import ops, phema
from lawa_optim.history import FLOAT16_MAX, FLOAT16_OVERFLOW

if TYPE_CHECKING:
    from lawa_optim.history import Bucket, History

#: Default largest relative profile error of a synthesised EMA (``LAWA(max_fit_error=)``):
#: a request whose fit is further from the target profile is refused.
MAX_FIT_ERROR = 0.05
#: A synthesised EMA whose fit error exceeds this (but not the limit) comes with a warning.
WARN_FIT_ERROR = 0.025
#: Widths of the EMAs kept when ``sigma_rels`` is not given (EDM2's pair).
SIGMA_RELS = (0.05, 0.10)


@dataclass(frozen=True)
class PostHocFit:
    """How an EMA of width ``sigma_rel`` was synthesised from the stored snapshots.

    Attributes:
        sigma_rel: the width asked for.
        time: the step ``t`` it is synthesised at: that of the newest snapshot (of the
            parameters present from the start; later ones at their own newest).
        weights: the coefficients over the stored snapshots, newest first, as
            ``weights=`` takes them (of the parameters present from the start).
        times: the step ``t`` of each of those snapshots, newest first.
        error: the relative L2 distance of the combined profile from the target
            profile (:class:`lawa_optim.phema.Fit`), the largest over all parameters.
    """

    sigma_rel: float
    time: int
    weights: tuple[float, ...]
    times: tuple[int, ...]
    error: float


def check_sigma_rels(sigma_rels: object) -> tuple[float, ...]:
    """``sigma_rels`` as a tuple of floats, checked: a non-empty sequence of distinct
    widths each in ``(0, phema.MAX_SIGMA_REL]``; ``ValueError`` otherwise."""
    if not isinstance(sigma_rels, Sequence) or isinstance(sigma_rels, (str, bytes)) or not sigma_rels:
        raise ValueError(f"sigma_rels must be a non-empty sequence of floats, got {sigma_rels!r}")
    out = []
    for i, s in enumerate(sigma_rels):
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 < s <= phema.MAX_SIGMA_REL:
            raise ValueError(
                f"sigma_rels[{i}] must be a float in (0, {phema.MAX_SIGMA_REL:.4f}], got {s!r}"
            )
        out.append(float(s))
    if len(set(out)) != len(out):
        raise ValueError(f"sigma_rels must be distinct, got {tuple(out)}")
    return tuple(out)


@functools.lru_cache(maxsize=8)
def _gammas(sigma_rels: tuple[float, ...]) -> list[float]:
    # Solved once per set of widths, not at every step.
    return [phema.sigma_rel_to_gamma(s) for s in sigma_rels]


@torch.no_grad()
def update(hist: "History") -> None:
    """One optimizer step into every EMA of every bucket: one fused pass per bucket."""
    buckets = hist.buckets
    for b in buckets:  # all checked before any is updated: a refusal leaves every t equal
        b.check_params()
    exponents = _gammas(hist.sigma_rels)
    for b in buckets:
        t = b.steps + 1
        alphas = torch.tensor([phema.alpha(t, g) for g in exponents], dtype=b.emas.dtype)
        ops.phema_update(b, alphas.to(b.device))
        b.steps = t


@torch.no_grad()
def push(hist: "History") -> bool:
    """Push every EMA of every bucket that has one (``t >= 1``) into the ring, width by
    width; whether anything was pushed."""
    buckets = [b for b in hist.buckets if b.steps > 0]
    for b in buckets:
        b.check_params()
    for b in buckets:
        if b.history_dtype == torch.float16 and not b.range_warned:
            _warn_float16_overflow(b)
        n = int(b.pushes.item())
        for e in range(b.emas.shape[0]):
            s = (n + e) % b.k
            b.ring[s].copy_(b.emas[e])
            b.slots[s] = (b.steps, e)
        b.pushes.add_(b.emas.shape[0])
    return bool(buckets)


def _warn_float16_overflow(b: "Bucket") -> None:
    """Warn, once per bucket, at a push of EMAs that float16 history stores as infinity."""
    over = int(((b.emas.abs() >= FLOAT16_OVERFLOW) & b.emas.isfinite()).sum())
    if over:
        b.range_warned = True
        warnings.warn(
            f"LAWA(mode='phema') stores {over} finite EMA element(s) as infinity: "
            f"history_dtype=torch.float16 holds magnitudes up to {FLOAT16_MAX:g}, so averages "
            "synthesised from this snapshot are infinite there. Use history_dtype=torch.bfloat16 "
            "or None; this is the only such warning for these parameters",
            RuntimeWarning,
            stacklevel=4,
        )


def fit_slots(
    n: int, k: int, slots: Sequence[tuple[int, int] | None], sigma_rels: Sequence[float], sigma_rel: float,
    max_error: float, where: str = "",
) -> tuple[list[int], phema.Fit]:
    """The fit of the EMA of width ``sigma_rel`` at the newest of the ``min(n, k)``
    snapshots held after ``n`` pushes into the slots ``slots`` (``(t, width index)``
    each): ``(times, fit)``, the snapshots' steps and the coefficients, newest first. ``ValueError`` naming the error,
    the width asked for and the widths and steps stored when the error exceeds
    ``max_error`` (``where`` names the parameters, when they are not all)."""
    times, gs = [], []
    for j in range(min(n, k)):
        t, e = slots[(n - 1 - j) % k]
        times.append(t)
        gs.append(phema.sigma_rel_to_gamma(sigma_rels[e]))
    result = phema.fit(times, gs, times[0], phema.sigma_rel_to_gamma(sigma_rel))
    if result.error > max_error:
        raise ValueError(
            f"sigma_rel={sigma_rel!r} cannot be synthesised from the stored snapshots{where}: the "
            f"fit's relative profile error is {result.error:.2%}, above max_fit_error="
            f"{max_error!r}. Stored: widths {list(sigma_rels)} at steps {sorted(set(times))}; ask "
            "for a width between the stored ones, keep more snapshots (a larger k) or widths "
            "closer to it"
        )
    return times, result


def fit(hist: "History", sigma_rel: float, max_error: float) -> tuple[dict["Bucket", tuple[float, ...]], PostHocFit]:
    """Each bucket's coefficients for the EMA of width ``sigma_rel`` at its newest
    snapshot, and the fit (:func:`fit_slots` per generation; its ``ValueError``),
    ``RuntimeError`` when nothing is stored. Reads only."""
    fitted: dict[Bucket, tuple[float, ...]] = {}
    fits = []
    for g, gen in enumerate(hist.generations):
        stored = [(b, int(b.pushes.item())) for b in gen]
        stored = [(b, n) for b, n in stored if n > 0]
        if stored:
            b, n = stored[0]
            where = added_later(hist.group_generation, g)
            fits.append(fit_slots(n, b.k, b.slots, hist.sigma_rels, sigma_rel, max_error, where))
            for b, _ in stored:
                fitted[b] = tuple(fits[-1][1].weights)
    if not fits:
        raise RuntimeError("no snapshot of the EMAs is stored yet: call opt.snapshot() (or set every=)")
    return fitted, summary(sigma_rel, fits)


def added_later(group_generation: Sequence[int | None], gen: int) -> str:
    """How an error names the param groups of generation ``gen`` when it is not the first."""
    if gen == 0:
        return ""
    groups = [str(g) for g, x in enumerate(group_generation) if x == gen]
    return f" of param group{'s' * (len(groups) > 1)} {', '.join(groups)} (added later, fitted on its own steps)"


def summary(sigma_rel: float, fits: list[tuple[list[int], phema.Fit]]) -> PostHocFit:
    """The :class:`PostHocFit` of the fits of each generation, oldest first."""
    times, first = fits[0]
    return PostHocFit(float(sigma_rel), times[0], tuple(first.weights), tuple(times), max(f.error for _, f in fits))


def saved(hist: "History", gen: int | None) -> dict[str, Any]:
    """The phema entries of a param group's ``lawa`` settings in a state dict: the widths,
    the generation's EMA step count and each slot's ``[t, width index]`` (``None``: empty)."""
    b = hist.generations[gen][0] if gen is not None and hist.generations[gen] else None
    return {
        "sigma_rels": list(hist.sigma_rels),
        "phema_steps": 0 if b is None else b.steps,
        "phema_slots": [None] * hist.k if b is None else [None if x is None else list(x) for x in b.slots],
    }


def check_saved(
    k: int, sigma_rels: tuple[float, ...], metas: list[dict], gens: list[int | None], pushes: list[int],
    counter: Callable[[dict, str, int], int],
) -> list[tuple[int, list]]:
    """Each generation's ``(t, slots)`` from the checked ``lawa`` settings of a state dict
    (``pushes``: each generation's snapshot count); ``ValueError`` naming the first field
    that no run of a LAWA with these ``k`` and ``sigma_rels`` can leave: the widths must be
    this LAWA's; ``phema_steps`` a count that ``counter(meta, key, group)`` accepts (the
    check of the other counters), 0 for groups not built; every group of a
    generation the same; and ``phema_slots`` one entry per slot, where the ``min(pushes,
    k)`` newest pushes ``q`` hold ``[t, q % E]`` (snapshots push every width, in order)
    with ``1 <= t <= phema_steps``, ``t`` never growing backwards and shared by the pushes of
    one snapshot, and every other slot ``None``."""
    E = len(sigma_rels)
    out: dict[int, tuple[int, list]] = {}
    for g, (m, gen) in enumerate(zip(metas, gens)):
        missing = [key for key in ("sigma_rels", "phema_steps", "phema_slots") if key not in m]
        if missing:
            raise ValueError(f"param group {g}: 'lawa' lacks {', '.join(map(repr, missing))} (mode 'phema')")
        widths = m["sigma_rels"]
        if not isinstance(widths, (list, tuple)) or [float(x) if isinstance(x, (int, float)) else x for x in widths] != list(sigma_rels):
            raise ValueError(f"state_dict was saved with sigma_rels={widths!r}, this LAWA has sigma_rels={list(sigma_rels)}")
        t = counter(m, "phema_steps", g)
        slots = m["phema_slots"]
        if not isinstance(slots, (list, tuple)) or len(slots) != k:
            raise ValueError(f"param group {g}: lawa 'phema_slots' must be a list of k={k} entries, got {slots!r:.200}")
        slots = [None if x is None else tuple(x) if isinstance(x, (list, tuple)) else x for x in slots]
        if gen is None:
            if t != 0 or any(x is not None for x in slots):
                raise ValueError(f"param group {g}: the group has no history (generation None) but phema entries")
            continue
        if gen in out:
            if out[gen] != (t, slots):
                raise ValueError(f"param group {g}: lawa 'phema_steps' or 'phema_slots' differ from its generation's other groups")
            continue
        _check_slots(g, k, E, t, slots, pushes[gen])
        out[gen] = (t, slots)
    return [out[gen] for gen in sorted(out)]


def _check_slots(g: int, k: int, E: int, t: int, slots: list, n: int) -> None:
    where = f"param group {g}: lawa 'phema_slots' {slots!r:.200}"
    if n % E or (n and not t):
        raise ValueError(
            f"param group {g}: lawa 'pushes' is {n} with phema_steps={t}; every snapshot pushes all "
            f"{E} widths after at least one EMA update"
        )
    held = {(n - 1 - j) % k: n - 1 - j for j in range(min(n, k))}
    newer_t = newer_snapshot = None
    for q in sorted(held.values(), reverse=True):
        x = slots[q % k]
        valid = (
            isinstance(x, tuple) and len(x) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in x)
            and x[1] == q % E and 1 <= x[0] <= t
        )
        if valid and newer_t is not None:  # one snapshot shares its t; older ones are no later
            valid = x[0] == newer_t if q // E == newer_snapshot else x[0] <= newer_t
        if not valid:
            raise ValueError(f"{where}: slot {q % k} (push {q}) cannot hold {x!r}; expected [t, {q % E}] with 1 <= t <= {t}")
        newer_t, newer_snapshot = x[0], q // E
    for s, x in enumerate(slots):
        if s not in held and x is not None:
            raise ValueError(f"{where}: slot {s} is empty ({n} pushes) but records {x!r}")


def describe(fit_: PostHocFit) -> str:
    """One line for a warning about a fit's error."""
    return (
        f"the EMA of sigma_rel={fit_.sigma_rel!r} synthesised at step {fit_.time} differs from "
        f"the exact power-function profile by {fit_.error:.2%} (relative L2 error of the profiles)"
    )


def check_width(sigma_rel: object) -> float:
    """``sigma_rel`` checked as one width: ``ValueError`` naming it otherwise."""
    if isinstance(sigma_rel, bool) or not isinstance(sigma_rel, (int, float)) or not math.isfinite(sigma_rel):
        raise ValueError(f"sigma_rel must be a float in (0, {phema.MAX_SIGMA_REL:.4f}], got {sigma_rel!r}")
    phema.sigma_rel_to_gamma(sigma_rel)  # the range check, with its message
    return float(sigma_rel)
