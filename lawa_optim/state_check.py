"""Checking a LAWA state dict before any of it is loaded.

Everything that :func:`lawa_optim.state.read_history` reads is checked here first, so a
dict that does not fit raises ``ValueError`` naming the field (and the parameter)
before the optimizer changes. What is refused:

* the structure: ``state`` a dict, ``param_groups`` a list of dicts with a ``params``
  list each, as many groups and parameters as the optimizer has, a ``lawa`` dict in
  every group holding ``k``, ``mode``, ``history_dtype`` (equal to this LAWA's),
  ``steps``, ``pushes``, ``generation`` and ``swapped``; ``decay``, ``every``,
  ``start`` and ``recompute_every`` are saved for reference only, never loaded;
* counters: ``steps`` and ``pushes`` Python ints (not bools) in ``[0, 2**62]``
  (:data:`MAX_COUNT`), ``steps`` and ``swapped`` (a bool) the same
  in every group. ``pushes`` must be what a run can reach: equal within a generation,
  0 for groups not built and for generations without parameters, never larger in a
  later generation than in an earlier one (every snapshot pushes every generation, and
  later ones are built later), and above 0 somewhere when ``swapped``. ``steps`` and
  ``pushes`` bound each other in no way: explicit snapshots need no step;
* generations: ``None`` (not built) or ints, the built groups first, numbered from 0
  without gaps;
* state ids: hashable, and one id at two places of ``param_groups`` only where the live
  parameters there are one parameter (:func:`lawa_optim.history.parameter_owners`: torch saves a parameter
  listed twice under one id);
* tensors: exactly the keys the mode saves (``lawa_backup`` exactly where a swap
  changed the weights; ``lawa_mean`` for every parameter or for none; version 0.2.0's
  ``lawa_sum`` is checked and not used), each a dense
  (strided), non-meta tensor of exactly the dtype the history holds (history: the
  history dtype; mean, sum and EMA: the accumulation dtype; backup: the parameter's dtype;
  nothing is cast) and of the parameter's shape (with ``k`` in front for the history);
  no other ``lawa_*`` key; with ``history_dtype=torch.int8``, each entry in the format
  :func:`lawa_optim.history.history_format` gives its parameter (an export reads each in
  the format its keys name: a gathered checkpoint of sharded parameters mixes them), and
  scales shaped ``(k - 1, rows, blocks per row)`` for sharded parameters;
* in ``mode="phema"``: ``sigma_rels`` equal to this LAWA's, and each generation's EMA
  step count and slot records what a run can leave (:func:`lawa_optim.posthoc.check_saved`);
  ``lawa_phema`` (the EMAs, the number of widths in front) beside ``lawa_history``.

Parameter names (torch's ``param_names``) are matched before, by
:func:`lawa_optim.names.match_names`.
The wrapped optimizer's part is checked by :mod:`lawa_optim.optimizer_check`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lawa_optim.distributed import is_sharded, local, local_of_saved
from lawa_optim.history import (
    History,
    accumulation_dtype,
    history_format,
    is_int,
    is_int8,
    parameter_owners,
    row_blocks,
    scales_shapes,
)
from lawa_optim.posthoc import check_saved

if TYPE_CHECKING:
    from lawa_optim.wrapper import LAWA

#: The per-parameter keys of the history in ``state[i]``.
KEYS = ("lawa_history", "lawa_mean", "lawa_sum", "lawa_ema", "lawa_phema", "lawa_backup", "lawa_anchor", "lawa_scales")
_REQUIRED = ("k", "mode", "history_dtype", "steps", "pushes", "generation", "swapped")
#: The largest snapshot count (``pushes``), step count and ``recompute_every`` accepted.
#: No run reaches it (2**62 snapshots), and below it nothing the kernels compute from these
#: in int64 (``pushes + 1``, ``(n + 1) % recompute_every``, slot ``n % k``) overflows; Triton
#: passes a value of at most 2**63 - 1 as an int64 and the C and CUDA kernels take int64.
MAX_COUNT = 2**62


@dataclass(frozen=True)
class Layout:
    """What a state dict is checked against: the live parameters of each param group
    (dicts with a ``params`` list, as ``Optimizer.param_groups`` holds them) and the
    history's settings. A LAWA checks against its own (:meth:`of`); an export from a
    checkpoint against a model's parameters and the settings the checkpoint names."""

    param_groups: Sequence[dict]
    k: int
    mode: str
    history_dtype: torch.dtype | None
    #: How errors name what the state dict must fit, and optionally each parameter.
    target: str = "this optimizer"
    names: Sequence[Sequence[str]] | None = None
    sigma_rels: tuple[float, ...] = ()  # mode="phema": the widths kept
    #: Read each entry of an 8-bit history in the format its keys name (``lawa_anchor``:
    #: 8 bits, else a ring of the parameter's dtype), as a gathered checkpoint of sharded
    #: parameters mixes them (:func:`lawa_optim.history.history_format`); else the format
    #: the rule gives the live parameter, and a dict in another is refused.
    by_keys: bool = False

    @classmethod
    def of(cls, opt: "LAWA") -> "Layout":
        return cls(opt.param_groups, opt.k, opt.mode, opt._history.history_dtype, sigma_rels=opt.sigma_rels)


@dataclass
class Checked:
    """What a checked state dict holds, ready to be copied into a new history."""

    steps: int
    swapped: bool
    pushes: list[int]  # per generation
    generation_ends: list[int]  # per generation: one past its last param group
    tensors: dict[int, dict[str, Tensor]]  # id(parameter) -> key -> the saved local tensor
    has_mean: bool
    history: History | None = None  # filled by lawa_optim.state.read_history
    phema: list[tuple[int, list]] | None = None  # mode="phema": per generation (t, slots)


def dtype_name(dtype: torch.dtype | None) -> str | None:
    """How a history dtype is written into a state dict."""
    return None if dtype is None else str(dtype).removeprefix("torch.")


def shown(value: Any) -> str:
    return repr(value) if value is None or isinstance(value, (bool, int, float, str)) else type(value).__name__


def check(opt: Layout, sd: Any) -> Checked:
    """Raise ``ValueError`` naming the first way ``sd`` does not fit ``opt``."""
    groups = _groups(opt, sd)
    metas = _metas(opt, groups)
    steps = _same("steps", [_counter(m, "steps", g) for g, m in enumerate(metas)])
    for g, m in enumerate(metas):
        if not isinstance(m["swapped"], bool):
            raise ValueError(f"param group {g}: lawa 'swapped' must be a bool, got {shown(m['swapped'])}")
    swapped = _same("swapped", [m["swapped"] for m in metas])
    gens = _generations(metas)
    pushes, ends = _pushes(opt, metas, gens)
    if swapped and not any(pushes):
        raise ValueError(
            "the state_dict says the average was swapped in (lawa 'swapped' is True), but no "
            "param group has a snapshot (every lawa 'pushes' is 0)"
        )
    tensors, sums = {}, set()
    for g, (group, live) in enumerate(zip(groups, opt.param_groups)):
        gen = gens[g]
        for i, (p, pid) in enumerate(zip(live["params"], group["params"])):
            where = f"parameter {i} of param group {g}"
            if opt.names is not None:
                where += f" ({opt.target} parameter {opt.names[g][i]!r})"
            entry = sd["state"].get(pid, {})
            if not isinstance(entry, dict):
                raise ValueError(f"{where}: its state must be a dict, got {shown(entry)}")
            got = _param_tensors(opt, p, entry, where, gen, swapped and gen is not None and pushes[gen] > 0)
            if gen is not None:
                tensors[id(p)] = got
                if "lawa_anchor" not in got:  # an 8-bit entry keeps no mean
                    sums.add("lawa_mean" in got)
    if opt.mode == "uniform" and len(sums) > 1:
        raise ValueError(
            "the state_dict holds lawa_mean for some parameters and not for others; a state dict "
            "from state_dict() holds it for every parameter (versions 0.1.0 and 0.2.0 for none)"
        )
    phema = None
    if opt.mode == "phema":
        phema = check_saved(opt.k, opt.sigma_rels, metas, gens, pushes, _counter)
    return Checked(steps, swapped, pushes, ends, tensors, has_mean=sums == {True}, phema=phema)


def _groups(opt: Layout, sd: Any) -> list[dict]:
    groups = sd.get("param_groups") if isinstance(sd, dict) else None
    if not isinstance(groups, list) or not isinstance(sd.get("state"), dict):
        raise ValueError("state_dict must have 'state' (a dict) and 'param_groups' (a list)")
    if len(groups) != len(opt.param_groups):
        raise ValueError(
            f"state_dict has {len(groups)} param groups, this optimizer has {len(opt.param_groups)}"
        )
    for g, (group, live) in enumerate(zip(groups, opt.param_groups)):
        if not isinstance(group, dict) or not isinstance(group.get("params"), list):
            raise ValueError(f"param group {g} of the state_dict must be a dict with a 'params' list")
        if len(group["params"]) != len(live["params"]):
            raise ValueError(
                f"param group {g} of the state_dict has {len(group['params'])} parameters, "
                f"this optimizer's has {len(live['params'])}"
            )
    _check_ids(opt, groups)
    return groups


def _check_ids(opt: Layout, groups: list[dict]) -> None:
    """Every state id hashable, and one id at two places only for one parameter (by
    :func:`lawa_optim.history.parameter_owners`, the rule the history follows)."""
    first: dict[Any, tuple[int, int]] = {}
    owners = None
    for g, (group, live) in enumerate(zip(groups, opt.param_groups)):
        for i, pid in enumerate(group["params"]):
            try:
                hash(pid)
            except TypeError:
                raise ValueError(
                    f"param group {g} of the state_dict: params[{i}] is {pid!r:.80}, which is not a "
                    "state id (ids are hashable, ints as state_dict() saves them)"
                ) from None
            if pid not in first:
                first[pid] = (g, i)
                continue
            g0, i0 = first[pid]
            owners = owners or parameter_owners(opt.param_groups)
            if owners[g0][i0] != owners[g][i]:
                raise ValueError(
                    f"the state_dict gives parameter {i0} of param group {g0} and parameter {i} of "
                    f"param group {g} one state id ({pid!r}), but they are two parameters of "
                    f"{opt.target}: a saved parameter's state can belong to one parameter only"
                )


def _metas(opt: Layout, groups: list[dict]) -> list[dict]:
    metas = [g.get("lawa") for g in groups]
    if all(m is None for m in metas):
        raise ValueError(
            "state_dict has no LAWA history ('lawa' missing from its param groups): it was saved "
            "from a plain optimizer. Load it into the wrapped one with "
            "opt.optimizer.load_state_dict(sd) to start with an empty history."
        )
    want = {"k": opt.k, "mode": opt.mode, "history_dtype": dtype_name(opt.history_dtype)}
    for g, m in enumerate(metas):
        if not isinstance(m, dict):
            raise ValueError(
                f"param group {g}: 'lawa' must be a dict of LAWA settings and counters, got {shown(m)}"
            )
        missing = [key for key in _REQUIRED if key not in m]
        if missing:
            raise ValueError(f"param group {g}: 'lawa' lacks {', '.join(map(repr, missing))}")
        for key, value in want.items():
            if type(m[key]) is not type(value) or m[key] != value:
                raise ValueError(f"state_dict was saved with {key}={shown(m[key])}, this LAWA has {key}={value!r}")
    return metas


def _counter(m: dict, key: str, g: int) -> int:
    value = m[key]
    if not is_int(value) or not 0 <= value <= MAX_COUNT:
        raise ValueError(f"param group {g}: lawa {key!r} must be an int in [0, 2**62], got {shown(value)}")
    return value


def _same(key: str, values: list) -> Any:
    if any(v != values[0] for v in values):
        raise ValueError(f"the param groups of the state_dict disagree on lawa {key!r}: {values}")
    return values[0]


def _generations(metas: list[dict]) -> list[int | None]:
    gens = [m["generation"] for m in metas]
    for g, x in enumerate(gens):
        if x is not None and (not is_int(x) or x < 0):
            raise ValueError(f"param group {g}: lawa 'generation' must be None or an int >= 0, got {shown(x)}")
    built = [x for x in gens if x is not None]
    steps = [b - a for a, b in zip(built, built[1:])]
    if gens[: len(built)] != built or (built and built[0] != 0) or any(s not in (0, 1) for s in steps):
        raise ValueError(
            f"state_dict has an inconsistent LAWA generation list {gens}: the groups with a "
            "history come first, numbered 0, 1, ... in order"
        )
    return gens


def _pushes(opt: Layout, metas: list[dict], gens: list[int | None]) -> tuple[list[int], list[int]]:
    """Each generation's snapshot count, and one past its last param group."""
    pushes: list[int] = []
    ends: list[int] = []
    sizes: list[int] = []
    for g, (m, gen, live) in enumerate(zip(metas, gens, opt.param_groups)):
        n = _counter(m, "pushes", g)
        if gen is None:
            if n != 0:
                raise ValueError(f"param group {g}: lawa 'pushes' is {n}, but the group has no history (generation None)")
            continue
        if gen == len(pushes):
            pushes.append(n)
            ends.append(g + 1)
            sizes.append(0)
        elif n != pushes[gen]:
            raise ValueError(f"param group {g}: lawa 'pushes' is {n}, other groups of generation {gen} have {pushes[gen]}")
        ends[gen] = g + 1
        sizes[gen] += len(live["params"])
    held = [n for n, size in zip(pushes, sizes) if size]
    for gen, (n, size) in enumerate(zip(pushes, sizes)):
        if not size and n:
            raise ValueError(f"generation {gen} holds no parameters, but its lawa 'pushes' is {n}, not 0")
    if any(b > a for a, b in zip(held, held[1:])):
        raise ValueError(
            f"lawa 'pushes' grows from one generation to the next ({pushes}); every snapshot "
            "pushes all generations and later ones are built later, so no run reaches this"
        )
    return pushes, ends


def _param_tensors(
    opt: Layout, p: Tensor, entry: dict, where: str, gen: int | None, backed_up: bool
) -> dict[str, Tensor]:
    """The checked local tensors of one parameter's history in ``entry``."""
    unknown = [key for key in entry if isinstance(key, str) and key.startswith("lawa_") and key not in KEYS]
    if unknown:
        raise ValueError(
            f"{where}: the state_dict holds {unknown[0]!r}, which LAWA does not save "
            f"(its keys: {', '.join(KEYS)}); it would land in the wrapped optimizer's state"
        )
    present = [key for key in KEYS if key in entry]
    if gen is None:
        if present:
            raise ValueError(f"{where}: the state_dict holds {present[0]}, but its param group has no history (generation None)")
        return {}
    fmt = history_format(p, opt.history_dtype, where)
    if opt.by_keys and is_int8(opt.history_dtype):
        fmt = opt.history_dtype if "lawa_anchor" in entry else None
    int8 = is_int8(fmt)
    if int8:
        needed = ["lawa_history", "lawa_anchor", "lawa_scales"]
    else:
        needed = {"uniform": ["lawa_history"], "ema": ["lawa_ema"], "phema": ["lawa_history", "lawa_phema"]}[opt.mode]
    # lawa_sum: version 0.2.0's running sum, checked and then not used (the mean is rebuilt).
    allowed = {"uniform": {"lawa_history", "lawa_mean", "lawa_sum"}, "ema": {"lawa_ema"}}.get(opt.mode, set(needed))
    if int8:
        allowed = set(needed)
    if backed_up:
        needed.append("lawa_backup")
        allowed.add("lawa_backup")
    for key in present:
        if key == "lawa_backup" and key not in allowed:
            raise ValueError(
                f"{where}: the state_dict holds lawa_backup, but no swap changed this parameter "
                "(not saved while swapped, or its group had no snapshot then)"
            )
        if key not in allowed and is_int8(opt.history_dtype):
            raise ValueError(f"{where}: the state_dict holds {key}, which {_held_as(p, int8)} does not save")
        if key not in allowed:
            raise ValueError(f"{where}: the state_dict holds {key}, which a LAWA with mode={opt.mode!r} does not save")
    for key in needed:
        if key in entry:
            continue
        if key == "lawa_backup":
            raise ValueError(
                f"{where}: the state_dict was saved while the average was swapped in, "
                "but holds no training weights ('lawa_backup'); "
                "torch.distributed.checkpoint loads only the keys that the state dict it "
                "loads into already has, and an optimizer that is not swapped has none. "
                "Save distributed checkpoints outside `with opt.averaged():`."
            )
        raise ValueError(f"{where}: the state_dict holds no {key}")
    shape, local_shape = tuple(p.shape), tuple(local(p).shape)
    acc = accumulation_dtype(p.dtype)
    hdtype = fmt or p.dtype
    slots = opt.k - 1 if int8 else opt.k  # an 8-bit history keeps k - 1 deltas
    nb, local_nb = scales_shapes(p, opt.k)
    scales, per_row = entry.get("lawa_scales"), row_blocks(p.shape)
    # Gathered from a sharded parameter: a row of blocks per row of the parameter.
    gathered = opt.by_keys and per_row > 0 and not is_sharded(p) and isinstance(scales, Tensor) and scales.dim() == 3
    if gathered:
        nb = local_nb = (opt.k - 1, p.shape[0], per_row)
    elif int8 and not is_sharded(p) and isinstance(scales, Tensor) and scales.dim() == 3:
        raise ValueError(
            f"{where}: lawa_scales has shape {tuple(scales.shape)}, a row of blocks per row: it "
            "was saved from a sharded parameter, and a checkpoint of sharded parameters loads "
            "into sharded models only (export_average reads it)"
        )
    specs = {
        "lawa_history": (hdtype, "the history dtype", (slots, *shape), (slots, *local_shape)),
        "lawa_anchor": (torch.float32, "the anchor's dtype", shape, local_shape),
        "lawa_scales": (torch.float32, "the scales' dtype", nb, local_nb),
        "lawa_mean": (acc, "the running mean's dtype", shape, local_shape),
        "lawa_sum": (acc, "the running sum's dtype", shape, local_shape),
        "lawa_ema": (acc, "the running average's dtype", shape, local_shape),
        "lawa_phema": (acc, "the EMAs' dtype", (len(opt.sigma_rels), *shape), (len(opt.sigma_rels), *local_shape)),
        "lawa_backup": (p.dtype, "the parameter's dtype", shape, local_shape),
    }
    out = {key: _tensor(entry[key], key, where, opt.target, *specs[key]) for key in present}
    if int8:
        _check_int8(out, p, entry["lawa_anchor"], where)
        if gathered:  # the same blocks, counted flat: rows are whole blocks
            out["lawa_scales"] = out["lawa_scales"].flatten(1)
    return out


def _held_as(p: Tensor, int8: bool) -> str:
    """How the history of ``history_dtype=torch.int8`` holds ``p``, for errors naming a
    state dict of the other format."""
    if int8:
        how = "this parameter's 8-bit history (lawa_history, lawa_anchor, lawa_scales)"
        if not is_sharded(p):
            how += (
                "; a checkpoint of sharded parameters keeps those whose rows are not multiples "
                "of 256 elements in their own dtype and loads into sharded models only "
                "(export_average reads it)"
            )
        return how
    return (
        "this parameter's history (lawa_history in its own dtype and lawa_mean: under "
        "history_dtype=torch.int8, a sharded parameter whose rows are not a multiple of 256 "
        "elements keeps one, as no 8-bit block may straddle a shard)"
    )


def memory_order(t: Tensor) -> tuple[int, ...]:
    """The dimensions of ``t`` longer than 1 from the outermost in memory to the innermost."""
    return tuple(d for _, d in sorted((-t.stride(d), d) for d in range(t.dim()) if t.shape[d] > 1))


def _check_int8(tensors: dict[str, Tensor], p: Tensor, anchor: Tensor, where: str) -> None:
    """Codes and scales an 8-bit push can write (codes in [-127, 127]; scales 0, positive
    and finite, or NaN: a block that restarted), saved from a parameter laid out in memory
    as ``p`` is: its blocks are runs of 256 elements in memory order."""
    if memory_order(anchor) != memory_order(p):
        raise ValueError(
            f"{where}: lawa_anchor is laid out in memory in the dimension order "
            f"{memory_order(anchor)} (strides {anchor.stride()}), the parameter in {memory_order(p)} "
            f"(strides {p.stride()}); an 8-bit history's blocks are runs of 256 elements in the "
            "parameter's memory order, so it loads only into a parameter of the memory format "
            "it was saved from (e.g. convert the model with .to(memory_format=...) first)"
        )
    codes, scales = tensors["lawa_history"], tensors["lawa_scales"]
    if codes.numel() and int(codes.min()) < -127:
        raise ValueError(f"{where}: lawa_history holds the code {int(codes.min())}; an 8-bit history's codes lie in [-127, 127]")
    bad = ~((scales >= 0) & scales.isfinite() | scales.isnan())
    if bool(bad.any()):
        raise ValueError(
            f"{where}: lawa_scales holds {scales[bad][0].item()!r}; an 8-bit history's scales are "
            "0, positive and finite, or NaN"
        )


def _tensor(
    value: Any, key: str, where: str, target: str, dtype: torch.dtype, what: str, shape: tuple, local_shape: tuple
) -> Tensor:
    if not isinstance(value, Tensor):
        raise ValueError(f"{where}: {key} must be a tensor, got {shown(value)}")
    if tuple(value.shape) != shape:
        raise ValueError(f"{where}: {key} has shape {tuple(value.shape)}, {target} needs {shape}")
    if is_sharded(value):
        value = value.to_local()
    if value.layout != torch.strided:
        raise ValueError(f"{where}: {key} is a sparse tensor (layout {value.layout}); the history is dense")
    if value.device.type == "meta":
        raise ValueError(f"{where}: {key} is on the meta device and holds no values")
    if value.dtype != dtype:
        raise ValueError(
            f"{where}: {key} has dtype {value.dtype}, {target} needs {dtype} ({what}); "
            "nothing is cast"
        )
    return local_of_saved(value, local_shape, where)
