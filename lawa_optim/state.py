"""Saving and loading the LAWA history inside the wrapped optimizer's state dict.

The layout is chosen so that ``torch.distributed.checkpoint`` handles it: per-parameter
tensors under ``state[i]`` (``lawa_history``: a ``(k, *shape)`` view of the ring;
``lawa_ema``: the float32 average in EMA mode; ``lawa_backup``: the training weights
while swapped) and small counters and settings under ``param_groups[g]["lawa"]``, with
no extra top-level keys. The running sum is not saved (``Optimizer.load_state_dict``
would cast it to the parameters' dtype); it is recomputed exactly from the ring.
"""

from __future__ import annotations

from itertools import chain
from typing import TYPE_CHECKING, Any

import torch

from lawa_optim.distributed import as_global, local_of_saved
from lawa_optim.history import History

if TYPE_CHECKING:
    from lawa_optim.wrapper import LAWA

_KEYS = ("lawa_history", "lawa_ema", "lawa_backup")


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _param_ids(opt: "LAWA", sd: dict[str, Any]) -> dict[int, Any]:
    live = chain.from_iterable(g["params"] for g in opt.param_groups)
    saved = chain.from_iterable(g["params"] for g in sd["param_groups"])
    return {id(p): i for p, i in zip(live, saved)}


def save_history(opt: "LAWA", sd: dict[str, Any]) -> None:
    """Add the history of ``opt`` to ``sd``, a state dict of the wrapped optimizer."""
    hist = opt._history
    for b in hist.buckets:
        # The loader rebuilds the sum from the ring; doing the same here keeps the
        # saved and the continuing run bit-identical.
        History.recompute(b)
    pushes = [int(gen[0].pushes.item()) if gen else 0 for gen in hist.generations]
    for g, group in enumerate(sd["param_groups"]):
        gen = hist.group_generation[g] if g < len(hist.group_generation) else None
        group["lawa"] = {
            "k": hist.k,
            "mode": hist.mode,
            "history_dtype": _dtype_name(hist.history_dtype),
            "decay": opt.decay,
            "every": opt.every,
            "start": opt.start,
            "recompute_every": hist.recompute_every,
            "steps": opt.steps,
            "generation": gen,
            "pushes": 0 if gen is None else pushes[gen],
            "swapped": opt.is_swapped,
        }
    ids = _param_ids(opt, sd)
    state = sd["state"]
    for b in hist.buckets:
        for i, p in enumerate(b.sources):
            # A fresh dict: the packed entries are the live optimizer's state dicts.
            entry = dict(state.get(ids[id(p)], {}))
            # DTensor parameters get DTensor views of their local history (see distributed.py).
            if hist.mode == "uniform":
                entry["lawa_history"] = as_global(b.history_view(i), p, lead=hist.k)
            else:
                entry["lawa_ema"] = as_global(b.view(b.total, i), p)
            if b.backup is not None:
                entry["lawa_backup"] = as_global(b.view(b.backup, i), p)
            state[ids[id(p)]] = entry


def strip_lawa(sd: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``sd`` without the history, for the wrapped optimizer's loader.

    Parameters left with no state get no entry, so optimizers that initialise on an
    empty state (Adam) still do.
    """
    out = dict(sd)
    out["param_groups"] = [{k: v for k, v in g.items() if k != "lawa"} for g in sd["param_groups"]]
    state = {}
    for pid, entry in sd["state"].items():
        kept = {k: v for k, v in entry.items() if k not in _KEYS}
        if kept:
            state[pid] = kept
    out["state"] = state
    return out


def _check_shape(name: str, value: Any, shape: tuple, where: str) -> None:
    if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"{where}: {name} has shape {got}, this optimizer needs {shape}")


def validate_lawa(opt: "LAWA", sd: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the first way ``sd`` does not fit ``opt``."""
    groups = sd.get("param_groups")
    if not isinstance(groups, list) or not isinstance(sd.get("state"), dict):
        raise ValueError("state_dict must have 'state' (a dict) and 'param_groups' (a list)")
    if len(groups) != len(opt.param_groups):
        raise ValueError(
            f"state_dict has {len(groups)} param groups, this optimizer has {len(opt.param_groups)}"
        )
    hist = opt._history
    metas = [g.get("lawa") for g in groups]
    if any(m is None for m in metas):
        raise ValueError(
            "state_dict has no LAWA history ('lawa' missing from its param groups): it was saved "
            "from a plain optimizer. Load it into the wrapped one with "
            "opt.optimizer.load_state_dict(sd) to start with an empty history."
        )
    want = {"k": hist.k, "mode": hist.mode, "history_dtype": _dtype_name(hist.history_dtype)}
    for g, (m, live) in enumerate(zip(metas, opt.param_groups)):
        for key, value in want.items():
            if m.get(key) != value:
                raise ValueError(f"state_dict was saved with {key}={m.get(key)!r}, this LAWA has {key}={value!r}")
        if len(groups[g]["params"]) != len(live["params"]):
            raise ValueError(
                f"param group {g} of the state_dict has {len(groups[g]['params'])} parameters, "
                f"this optimizer's has {len(live['params'])}"
            )
    gens = [m["generation"] for m in metas]
    built = [x for x in gens if x is not None]
    if gens[: len(built)] != built or built != sorted(built) or (built and built[0] != 0):
        raise ValueError(f"state_dict has an inconsistent LAWA generation list {gens}")
    swapped = metas[0]["swapped"]
    ids = _param_ids(opt, sd)
    for g, (m, live) in enumerate(zip(metas, opt.param_groups)):
        if m["generation"] is None:
            continue
        for i, p in enumerate(live["params"]):
            where = f"parameter {i} of param group {g}"
            entry = sd["state"].get(ids[id(p)], {})
            if hist.mode == "uniform":
                _check_shape("lawa_history", entry.get("lawa_history"), (hist.k, *p.shape), where)
            else:
                _check_shape("lawa_ema", entry.get("lawa_ema"), tuple(p.shape), where)
            if swapped and m["pushes"] > 0:
                if "lawa_backup" not in entry:
                    raise ValueError(
                        f"{where}: the state_dict was saved while the average was swapped in, "
                        "but holds no training weights ('lawa_backup'); "
                        "torch.distributed.checkpoint loads only the keys that the state dict it "
                        "loads into already has, and an optimizer that is not swapped has none. "
                        "Save distributed checkpoints outside `with opt.averaged():`."
                    )
                _check_shape("lawa_backup", entry["lawa_backup"], tuple(p.shape), where)


@torch.no_grad()
def load_history(opt: "LAWA", sd: dict[str, Any]) -> None:
    """Rebuild ``opt``'s history from a validated ``sd``."""
    old = opt._history
    hist = History(old.k, old.mode, old.history_dtype, old.storage, old.requested_backend, old.recompute_every)
    metas = [g["lawa"] for g in sd["param_groups"]]
    gens = [m["generation"] for m in metas]
    for gen in sorted(set(x for x in gens if x is not None)):
        end = max(g for g, x in enumerate(gens) if x == gen) + 1
        hist.extend(opt.param_groups[:end])
    ids = _param_ids(opt, sd)
    swapped = metas[0]["swapped"]
    for gen, buckets in enumerate(hist.generations):
        pushes = next(m["pushes"] for m in metas if m["generation"] == gen)
        for b in buckets:
            b.pushes.fill_(pushes)
            for i, p in enumerate(b.sources):
                entry, where = sd["state"][ids[id(p)]], f"parameter {ids[id(p)]}"
                dst = b.history_view(i) if hist.mode == "uniform" else b.view(b.total, i)
                key = "lawa_history" if hist.mode == "uniform" else "lawa_ema"
                dst.copy_(local_of_saved(entry[key], dst, where))
            History.recompute(b)
            if swapped and pushes > 0:
                b.backup = torch.empty(b.D, dtype=b.dtype, device=b.device, pin_memory=b.pinned)
                for i, p in enumerate(b.sources):
                    dst, saved = b.view(b.backup, i), sd["state"][ids[id(p)]]["lawa_backup"]
                    dst.copy_(local_of_saved(saved, dst, f"parameter {ids[id(p)]}"))
    run = opt._run
    run.history, run.steps, run.swapped = hist, metas[0]["steps"], swapped
