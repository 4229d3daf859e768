"""Saving and loading the LAWA history inside the wrapped optimizer's state dict.

The layout is chosen so that ``torch.distributed.checkpoint`` handles it: per-parameter
tensors under ``state[i]`` (``lawa_history``: a ``(k, *shape)`` view of the ring and
``lawa_mean``: the running mean, in uniform mode; with ``history_dtype=torch.int8``
instead ``lawa_history``: the ``(k - 1, *shape)`` int8 delta codes, ``lawa_anchor``: the
newest snapshot in float32 and ``lawa_scales``: the ``(k - 1, blocks)`` float32 scales of
the parameter's blocks of 256 elements, ``(k - 1, rows, blocks per row)`` for a sharded
parameter, whose blocks are chunks of its rows (a sharded parameter that the rule of
:func:`lawa_optim.history.history_format` keeps in its own dtype saves the ring and the
mean instead); ``lawa_ema``: the average in EMA mode;
``lawa_history`` and ``lawa_phema``, the ``(E, *shape)`` power-function EMAs, in phema
mode; ``lawa_backup``: the training weights while swapped) and small counters and
settings under ``param_groups[g]["lawa"]`` (in phema mode also the widths, the EMA step
count and each slot's ``[t, width index]``: :func:`lawa_optim.posthoc.saved`), with no
extra top-level keys. DTensor parameters get
DTensor views of their local history (see :mod:`lawa_optim.distributed`).

Saving only reads. The running mean is saved as it is (a view in the accumulation
dtype, which the wrapped optimizer's loader never sees, so nothing casts it), so a
resumed run continues bit for bit; while the average is swapped in without a backup,
the mean and the training weights share the parameters and the mean's buffer, so the
dict gets new tensors holding each (``lawa_mean``, ``lawa_backup``), a copy of the
parameters' size. Versions 0.1.0 and 0.2.0 saved no ``lawa_mean`` (0.2.0 saved a
running sum, ``lawa_sum``, which this version ignores): the mean is rebuilt from the
ring on load, as a refresh computes it, so a run resumed from them continues exactly
but for that rebuild (within the guarantee; bit for bit from the next refresh on, at
most ``recompute_every`` snapshots later).

Loading checks everything (:mod:`lawa_optim.state_check`, and the wrapped optimizer's
part with :mod:`lawa_optim.optimizer_check`) before it changes anything,
builds and fills a new history, loads the wrapped optimizer and only then installs the
history, so a refused dict or a failed allocation leaves the optimizer as it was.
"""

from __future__ import annotations

from itertools import chain
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lawa_optim import posthoc
from lawa_optim.backends.reference import unexchanged
from lawa_optim.distributed import as_global
from lawa_optim.history import History, scales_shapes
from lawa_optim.optimizer_check import check_optimizer
from lawa_optim.state_check import KEYS, Checked, Layout, check, dtype_name

if TYPE_CHECKING:
    from lawa_optim.wrapper import LAWA


def _param_ids(opt: "LAWA", sd: dict[str, Any]) -> dict[int, Any]:
    live = chain.from_iterable(g["params"] for g in opt.param_groups)
    saved = chain.from_iterable(g["params"] for g in sd["param_groups"])
    return {id(p): i for p, i in zip(live, saved)}


def save_history(opt: "LAWA", sd: dict[str, Any]) -> None:
    """Add the history of ``opt`` to ``sd``, a state dict of the wrapped optimizer taken
    after :meth:`History.check_groups`; reads only."""
    hist = opt._history
    for b in hist.buckets:
        b.check_params()
        b.wait()
    pushes = [int(gen[0].pushes.item()) if gen else 0 for gen in hist.generations]
    for g, group in enumerate(sd["param_groups"]):
        gen = hist.group_generation[g] if g < len(hist.group_generation) else None
        group["lawa"] = {
            "k": hist.k,
            "mode": hist.mode,
            "history_dtype": dtype_name(hist.history_dtype),
            "decay": opt.decay,
            "every": opt.every,
            "start": opt.start,
            "recompute_every": hist.recompute_every,
            "steps": opt.steps,
            "generation": gen,
            "pushes": 0 if gen is None else pushes[gen],
            "swapped": opt.is_swapped,
        }
        if hist.mode == "phema":
            group["lawa"].update(posthoc.saved(hist, gen))
    ids = _param_ids(opt, sd)
    state = sd["state"]
    # An alias saves its owner's slice: torch gives a tensor listed twice one id (written
    # once), another tensor on the same memory an id and an entry of its own.
    placed = zip(chain.from_iterable(hist.group_params), chain.from_iterable(hist.placed()))
    for pid, (p, (b, i)) in {ids[id(p)]: (p, bi) for p, bi in placed}.items():
        # A fresh dict: the packed entries are the live optimizer's state dicts.
        entry = dict(state.get(pid, {}))
        mean, backup = b.view(b.total, i), None if b.backup is None else b.view(b.backup, i)
        if b.exchanged is not None:  # the mean and the training weights share two buffers
            mean, backup = unexchanged(b.params[i], mean)
        if b.int8:  # never exchanged: always a backup buffer
            entry["lawa_history"] = as_global(b.history_view(i), p, lead=hist.k - 1)
            entry["lawa_anchor"] = as_global(mean, p)
            scales = scales_shapes(p, hist.k)[0]
            entry["lawa_scales"] = as_global(b.saved_scales(i), p, lead=scales[0], shape=scales[1:])
        else:
            if hist.mode != "ema":
                entry["lawa_history"] = as_global(b.history_view(i), p, lead=hist.k)
            if hist.mode == "uniform":
                entry["lawa_mean"] = as_global(mean, p)
            elif hist.mode == "phema":
                emas = b.history_view(i, b.emas)
                if b.exchanged is not None:  # the first width's EMA was exchanged: a copy holds it
                    emas = emas.clone()
                    emas[0] = mean
                entry["lawa_phema"] = as_global(emas, p, lead=len(hist.sigma_rels))
            else:
                entry["lawa_ema"] = as_global(mean, p)
        if backup is not None:
            entry["lawa_backup"] = as_global(backup, p)
        state[pid] = entry


def _copied(value: Any) -> Any:
    """``value`` with every tensor in it copied (dicts, lists and tuples walked)."""
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _copied(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(map(_copied, value))
    return value


def strip_lawa(sd: dict[str, Any]) -> dict[str, Any]:
    """The wrapped optimizer's part of ``sd``: no history, and every tensor a copy.

    ``torch.optim``'s loader keeps the dict's tensors that are already on the right
    device and dtype; copies make the loaded optimizer independent of the dict (and of
    the optimizer it came from). Parameters left with no state get no entry, so
    optimizers that initialise on an empty state (Adam) still do.
    """
    out = dict(sd)
    out["param_groups"] = [{k: v for k, v in g.items() if k != "lawa"} for g in sd["param_groups"]]
    state = {}
    for pid, entry in sd["state"].items():
        kept = {k: _copied(v) for k, v in entry.items() if k not in KEYS}
        if kept:
            state[pid] = kept
    out["state"] = state
    return out


@torch.no_grad()
def read_history(opt: "LAWA", sd: dict[str, Any]) -> Checked:
    """Check ``sd`` and build a new history filled from it; ``opt`` is not changed.

    Raises ``ValueError`` naming the first field of ``sd`` that does not fit ``opt``.
    The new history's buffers are fresh: nothing in it is a view of ``sd``.
    """
    old = opt._history
    for b in old.buckets:
        b.wait()  # a pending copy into the old ring lands, or its failure raises, before any change
    checked = check(Layout.of(opt), sd)
    check_optimizer(opt._inner, opt.param_groups, sd)
    hist = History(
        old.k, old.mode, old.history_dtype, old.storage, old.requested_backend, old.recompute_every, old.sigma_rels
    )
    for end in checked.generation_ends:
        hist.extend(opt.param_groups[:end])
    for gen, buckets in enumerate(hist.generations):
        for b in buckets:
            b.pushes.fill_(checked.pushes[gen])
            if checked.phema is not None:
                b.steps, b.slots = checked.phema[gen][0], list(checked.phema[gen][1])
            for i, p in enumerate(b.sources):
                got = checked.tensors[id(p)]
                if b.int8:
                    b.history_view(i).copy_(got["lawa_history"])
                    b.view(b.total, i).copy_(got["lawa_anchor"])
                    b.saved_scales(i).copy_(got["lawa_scales"])
                    continue
                if hist.mode != "ema":
                    b.history_view(i).copy_(got["lawa_history"])
                if hist.mode == "phema":
                    b.history_view(i, b.emas).copy_(got["lawa_phema"])
                elif hist.mode == "uniform":
                    if "lawa_mean" in got:
                        b.view(b.total, i).copy_(got["lawa_mean"])
                else:
                    b.view(b.total, i).copy_(got["lawa_ema"])
            if hist.mode == "uniform" and not checked.has_mean and not b.int8:
                History.recompute(b)  # a 0.1.0 or 0.2.0 checkpoint: see the module docstring
            if any("lawa_backup" in checked.tensors[id(p)] for p in b.sources):
                b.backup = torch.empty(b.D, dtype=b.dtype, device=b.device, pin_memory=b.pinned)
                for i, p in enumerate(b.sources):
                    b.view(b.backup, i).copy_(checked.tensors[id(p)]["lawa_backup"])
    checked.history = hist
    return checked


def install(opt: "LAWA", loaded: Checked) -> None:
    """Make the history read by :func:`read_history` the one ``opt`` runs (nothing here
    can fail: :func:`read_history` waited for the old history's pending copies)."""
    run = opt._run
    run.history, run.steps, run.swapped = loaded.history, loaded.steps, loaded.swapped
    run.started = run.steps >= opt.start

