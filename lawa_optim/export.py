"""The LAWA average as a plain state dict, from a live optimizer or a checkpoint file.

Latest Weight Averaging (Kaddour 2022, arXiv:2209.14981) ships the average of the k
latest snapshots. The obvious export, ``with opt.averaged(): sd = model.state_dict()``,
returns tensors that share storage with the parameters, so after the block ``sd``
holds the training weights again; :func:`export_average` returns fresh tensors and
leaves the model and the optimizer as they were.
"""

from __future__ import annotations

import copy
import os
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lawa_optim import posthoc, weighting
from lawa_optim.backends.reference import compensated_sum, dequantise, rounded, weighted_sum, wide_where_overflowed
from lawa_optim.bn import update_bn
from lawa_optim.history import HISTORY_DTYPES, accumulation_dtype, is_int
from lawa_optim.ops import suffix_coefficients
from lawa_optim.state_check import Layout, check, dtype_name, shown
from lawa_optim.wrapper import LAWA, MODES


def export_average(
    model: nn.Module,
    source: LAWA | Mapping[str, Any] | str | os.PathLike,
    *,
    weights: Sequence[float] | Tensor | None = None,
    sigma_rel: float | None = None,
    bn_loader: Iterable | None = None,
) -> dict[str, Tensor]:
    """The state dict of ``model`` with every averaged parameter replaced by its LAWA average.

    Args:
        model: the model the average belongs to (the one trained, or a fresh one of the
            same architecture when ``source`` is a checkpoint).
        source: a :class:`LAWA` over ``model``'s parameters, a state dict saved by
            ``LAWA.state_dict()`` (e.g. ``torch.load(path)`` of a checkpoint: no LAWA
            needed), or the path (``str`` or ``os.PathLike``) of a file that
            ``torch.save`` wrote holding such a state dict, either itself or under the
            key ``"optimizer"`` of a dict; it is read with ``torch.load(path,
            weights_only=True, map_location="cpu")``; a missing file raises
            ``FileNotFoundError``, an unreadable one or one that holds neither
            ``ValueError``, each naming the path. Saved parameters are matched to
            ``model``'s by name where the state dict carries torch's ``param_names``
            (optimizers built from ``model.named_parameters()``, and the Lightning and
            Hugging Face integrations of this package), otherwise by
            ``model.parameters()`` order.
        weights: coefficients over the stored snapshots, newest first, as for
            :meth:`LAWA.swap_to_average` (checked the same way, the same rule for
            parameters that hold fewer snapshots, the same bits from a live ``LAWA`` as
            from its saved state dict); ``None`` (default): the plain average (in
            ``mode="phema"``: the live EMA of the first width).
        sigma_rel: ``mode="phema"`` only: the power-function EMA of this width at the
            newest snapshot, synthesised as :meth:`LAWA.swap_to_average` does (the same
            bits from a live ``LAWA`` as from its state dict). From a state dict, fits
            whose relative profile error exceeds :data:`lawa_optim.posthoc.MAX_FIT_ERROR`
            are refused (from a ``LAWA``: its ``max_fit_error``); the fit of a live
            ``LAWA`` is in its :attr:`LAWA.last_fit`.
        bn_loader: if given, BatchNorm running statistics are recomputed for the averaged
            weights with :func:`lawa_optim.update_bn` over this loader (batches that are
            the model's input, or lists/tuples whose first item is), on a copy of the
            model (which must be deep-copyable); the random number generators are left as
            they were.

    Returns:
        exactly the keys of ``model.state_dict()``: averaged parameters, everything else
        as the model holds it, each tensor a fresh contiguous copy that shares storage
        with nothing (tied weights too, so ``safetensors`` can save it).

    The model and the LAWA are left bit for bit as they were. A parameter that has no
    snapshot yet (added with ``add_param_group`` after the last one) keeps its live
    value, as a swap leaves it. Raises ``ValueError`` when the saved parameters do not
    fit ``model`` (count, name, shape or dtype), ``RuntimeError`` when there is no
    snapshot or the LAWA is swapped.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(source, (str, os.PathLike)):
        source = _load(source)
    if sigma_rel is not None:
        sigma_rel = posthoc.check_width(sigma_rel)
        if weights is not None:
            raise ValueError(f"sigma_rel={sigma_rel!r} with weights=; give one (sigma_rel= computes its own weights)")
    if isinstance(source, LAWA):
        averages = _from_lawa(model, source, weights, sigma_rel)
    elif isinstance(source, Mapping):
        averages = _from_state_dict(model, source, weights, sigma_rel)
    else:
        raise TypeError(
            "source must be a LAWA, a state dict saved by LAWA.state_dict() or the path of a "
            f"file holding one, got {type(source).__name__}"
        )
    out = _assemble(model, averages)
    if bn_loader is not None:
        _recompute_bn(model, out, bn_loader)
    return out


def _fresh(t: Tensor) -> Tensor:
    return t.detach().clone(memory_format=torch.contiguous_format)


def _load(path: str | os.PathLike) -> Mapping[str, Any]:
    """The LAWA state dict in the file at ``path``: the file's object itself, or its
    ``"optimizer"`` entry."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"export_average(): no checkpoint file at {os.fspath(path)!r}")
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # an unpickling, zip or format error: the file is not a checkpoint
        reason = str(exc).strip().splitlines()
        raise ValueError(
            f"export_average(): {os.fspath(path)!r} could not be read with torch.load(weights_only=True) "
            f"({type(exc).__name__}: {reason[0] if reason else 'no message'})"
        ) from exc
    if isinstance(obj, Mapping) and not ("state" in obj and "param_groups" in obj):
        obj = obj.get("optimizer")
    if not isinstance(obj, Mapping) or not ("state" in obj and "param_groups" in obj):
        raise ValueError(
            f"export_average(): {os.fspath(path)!r} holds no LAWA state dict; accepted: what "
            "LAWA.state_dict() returns, or a dict holding it under the key 'optimizer'"
        )
    return obj


def _from_lawa(
    model: nn.Module, opt: LAWA, weights: Sequence[float] | Tensor | None, sigma_rel: float | None
) -> dict[int, Tensor]:
    if opt.is_swapped:
        raise RuntimeError(
            "export_average() while the average is swapped into the parameters: call it "
            "outside `with opt.averaged():` (it swaps by itself and swaps back)"
        )
    live = opt.mode == "phema" and weights is None and sigma_rel is None  # needs a step, not a snapshot
    if opt.num_snapshots == 0 and not live:
        raise RuntimeError(
            f"export_average(): the LAWA holds no snapshot yet (steps={opt.steps}, "
            f"start={opt.start}); call opt.snapshot() first"
        )
    own = {id(p) for p in model.parameters()}
    params = [p for g in opt.param_groups for p in g["params"]]
    for g, group in enumerate(opt.param_groups):
        for i, p in enumerate(group["params"]):
            if id(p) not in own:
                raise ValueError(
                    f"parameter {i} of param group {g} of the LAWA (shape {tuple(p.shape)}) "
                    "is not a parameter of model; pass the model this LAWA optimizes"
                )
    # The swap computes the average exactly as evaluation inside averaged() sees it.
    with opt.averaged(weights=weights, sigma_rel=sigma_rel):
        return {id(p): _fresh(p) for p in params}


def _from_state_dict(
    model: nn.Module, sd: Mapping[str, Any], weights: Sequence[float] | Tensor | None, sigma_rel: float | None
) -> dict[int, Tensor]:
    if weights is not None:
        weights = weighting.parse(weights)
    groups, state = sd.get("param_groups"), sd.get("state")
    if not isinstance(groups, list) or not isinstance(state, Mapping) or not groups:
        raise ValueError("source must have 'state' (a dict) and 'param_groups' (a non-empty list), as LAWA.state_dict() saves")
    for g, group in enumerate(groups):
        if not isinstance(group, Mapping) or not isinstance(group.get("params"), list):
            raise ValueError(f"param group {g} of source must be a dict with a 'params' list, got {shown(group)}")
        if not isinstance(group.get("lawa"), Mapping):
            raise ValueError(
                f"param group {g} of source has no LAWA history ('lawa' missing): it was not "
                "saved by LAWA.state_dict()"
            )
    targets = iter(_match(model, groups))
    matched = [[next(targets) for _ in group["params"]] for group in groups]
    live = [{"params": [p for _, p in group]} for group in matched]
    names = [[name for name, _ in group] for group in matched]
    meta = groups[0]["lawa"]
    # The same check as LAWA.load_state_dict, against the model's parameters and the
    # settings the checkpoint names (every group must agree with the first).
    k, mode, history_dtype = _settings(meta)
    sigma_rels = ()
    if mode == "phema":
        try:
            sigma_rels = posthoc.check_sigma_rels(meta.get("sigma_rels"))
        except ValueError as exc:
            raise ValueError(f"source's LAWA settings (mode 'phema'): {exc}") from None
    layout = Layout(live, k, mode, history_dtype, target="model", names=names, sigma_rels=sigma_rels, by_keys=True)
    checked = check(layout, dict(sd))
    fitted = {}
    if sigma_rel is not None:
        if mode != "phema":
            raise ValueError(
                f"sigma_rel= needs a checkpoint of mode 'phema'; source has mode={mode!r}, which "
                "keeps no power-function EMAs to synthesise from"
            )
        fits = {}
        group_generation = [group["lawa"]["generation"] for group in groups]
        for gen, (n, (_, slots)) in enumerate(zip(checked.pushes, checked.phema)):
            if n > 0:
                where = posthoc.added_later(group_generation, gen)
                fits[gen] = posthoc.fit_slots(n, k, slots, sigma_rels, sigma_rel, posthoc.MAX_FIT_ERROR, where)
        if not fits:
            raise RuntimeError("export_average(): source holds no snapshot yet (saved before the first snapshot)")
        for g, group in enumerate(groups):
            gen = group["lawa"]["generation"]
            if gen in fits:
                fitted[g] = tuple(fits[gen][1].weights)
    if weights is not None:
        if mode == "ema":
            raise ValueError(
                f"weights= needs a checkpoint of mode 'uniform' or 'phema'; source has mode={mode!r}, "
                "which keeps no ring of snapshots to weight, only their running average"
            )
        held = min(max(checked.pushes, default=0), k)
        if held:  # none: refused below as a checkpoint without a snapshot
            weighting.check_length(weights, held)
        for g, group in enumerate(groups):
            gen = group["lawa"]["generation"]
            if gen is not None and checked.pushes[gen] > 0:
                count = min(checked.pushes[gen], k)
                fitted[g] = weighting.fit(weights, count, f"param group {g} of source")
    averages = {}
    phema_live = mode == "phema" and weights is None and sigma_rel is None
    for g, (group, saved) in enumerate(zip(live, groups)):
        gen = saved["lawa"]["generation"]
        pushes = 0 if gen is None else checked.pushes[gen]
        if phema_live:  # the live EMA of the first width exists from the first step on
            pushes = 0 if gen is None else checked.phema[gen][0]
        for p in group["params"]:
            if pushes > 0 and "lawa_anchor" in checked.tensors[id(p)]:  # 8 bits (checked by its keys)
                averages[id(p)] = _average_int8(p, checked.tensors[id(p)], pushes, k, fitted.get(g))
            elif pushes > 0:
                averages[id(p)] = _average(p, checked.tensors[id(p)], pushes, k, mode, fitted.get(g))
    if not averages:
        raise RuntimeError("export_average(): source holds no snapshot yet (saved before the first snapshot)")
    return averages


def _settings(meta: Mapping[str, Any]) -> tuple[int, str, torch.dtype | None]:
    """``k``, ``mode`` and the history dtype a saved param group names, checked."""
    k, mode, name = meta.get("k"), meta.get("mode"), meta.get("history_dtype")
    if not is_int(k) or k < 1:
        raise ValueError(f"source's LAWA settings have k={k!r}; a LAWA state dict has an int >= 1")
    if mode not in MODES:
        raise ValueError(f"source's LAWA settings have mode={mode!r}; accepted: {MODES}")
    dtype = None if name is None else getattr(torch, name, None) if isinstance(name, str) else None
    if name is not None and dtype not in HISTORY_DTYPES:
        raise ValueError(
            f"source's LAWA settings have history_dtype={name!r}; accepted: None or one of "
            f"{[dtype_name(d) for d in HISTORY_DTYPES]}"
        )
    return k, mode, dtype


def _match(model: nn.Module, groups: list) -> list[tuple[str, Tensor]]:
    """The model parameter of every saved parameter, in saved order."""
    saved = [pid for group in groups for pid in group["params"]]
    named = [("param_names" in group) for group in groups]
    if any(named) and not all(named):
        raise ValueError("source has param_names in some param groups but not in all")
    if all(named):
        lookup = dict(model.named_parameters(remove_duplicate=False))
        out, seen, given = [], {}, {}
        for g, group in enumerate(groups):
            names = group["param_names"]
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ValueError(f"param group {g} of source: param_names must be a list of str, got {shown(names)}")
            if len(names) != len(group["params"]):
                raise ValueError(
                    f"param group {g} of source has {len(group['params'])} parameters but "
                    f"{len(names)} param_names"
                )
            for pid, name in zip(group["params"], names):
                if _key(pid) in given:
                    # One id twice: torch saves a parameter listed twice so (see parameter_owners).
                    first = given[_key(pid)]
                    if first[0] != name:
                        raise ValueError(f"source names its parameter {pid!r} both {first[0]!r} and {name!r}")
                    out.append(first)
                    continue
                p = lookup.get(name)
                if p is None:
                    raise ValueError(
                        f"source averages a parameter named {name!r} (param group {g}) that "
                        f"model does not have; model's parameters: {_some(lookup)}"
                    )
                if id(p) in seen:
                    raise ValueError(f"source names {seen[id(p)]!r} and {name!r}, one parameter of model, twice")
                seen[id(p)] = name
                given[_key(pid)] = (name, p)
                out.append((name, p))
        return out
    params = list(model.named_parameters())
    # A parameter listed twice is saved under one id twice: it is one parameter of model.
    distinct = list(dict.fromkeys(map(_key, saved)))
    if len(params) != len(distinct):
        raise ValueError(
            f"source holds {len(distinct)} parameters and carries no param_names, so they map to "
            f"model.parameters() in order, but model has {len(params)}; build the optimizer "
            "from model.named_parameters() to map by name"
        )
    of = dict(zip(distinct, params))
    return [of[_key(pid)] for pid in saved]


def _key(pid: Any) -> Any:
    """``pid`` as a dict key: an unhashable id (refused by the check) stands for itself."""
    try:
        hash(pid)
    except TypeError:
        return ("unhashable", id(pid))
    return pid


def _some(named: Mapping[str, Tensor]) -> str:
    names = list(named)
    return ", ".join(map(repr, names[:5])) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


@torch.no_grad()
def _average(
    p: Tensor, saved: Mapping[str, Tensor], pushes: int, k: int, mode: str, weights: tuple[float, ...] | None
) -> Tensor:
    """One parameter's average from its checked saved history after ``pushes`` pushes,
    with the arithmetic of a swap (``lawa_optim.ops``): the weighted sum of the newest
    slots with ``weights``, else the running mean (or, where a 0.1.0 or 0.2.0 checkpoint
    saved none, the mean of the slots in slot order, as a refresh computes it), the
    float64 mean of the slots where that mean is not finite, rounded to the parameter's
    dtype as a swap rounds it."""
    count = min(pushes, k)
    if weights is not None:
        history = saved["lawa_history"]
        coefficients = torch.tensor(weights, dtype=accumulation_dtype(p.dtype), device=history.device)
        avg = weighted_sum([history[(pushes - 1 - j) % k] for j in range(len(weights))], coefficients)
    elif mode == "ema":
        avg = saved["lawa_ema"]
    elif mode == "phema":
        avg = saved["lawa_phema"][0]
    else:
        history = saved["lawa_history"]
        slots = [history[s] for s in range(count)]
        avg = saved.get("lawa_mean")
        if avg is None:
            like = torch.zeros(history.shape[1:], dtype=accumulation_dtype(p.dtype), device=history.device)
            total = compensated_sum(slots, like)
            # A 0-dim tensor divides exactly as the kernels do (a Python float may not on CUDA).
            avg = wide_where_overflowed(total / torch.tensor(float(count), dtype=total.dtype, device=total.device), total, slots)
        avg = wide_where_overflowed(avg, avg, slots)
    avg = rounded(avg, p.dtype)
    return avg.to(device=p.device, memory_format=torch.contiguous_format, copy=True)


@torch.no_grad()
def _average_int8(p: Tensor, saved: Mapping[str, Tensor], pushes: int, k: int, weights: tuple[float, ...] | None) -> Tensor:
    """One parameter's average from its checked saved 8-bit history, with the arithmetic
    of its swap-in (``lawa_optim.ops``). Blocks follow the memory order of ``p``, as they
    did in the history that saved it."""
    anchor = saved["lawa_anchor"]
    count = min(pushes, k) if weights is None else len(weights)
    given = None if weights is None else torch.tensor(weights, dtype=torch.float32)
    coefficients = suffix_coefficients(given, count, anchor.device)

    def flat(t: Tensor) -> Tensor:  # memory order of p: its strides over a flat buffer
        out = torch.empty(p.numel(), dtype=t.dtype, device=t.device)
        out.as_strided(p.shape, p.stride()).copy_(t)
        return out

    slots = [(pushes - 1 - j) % (k - 1) for j in range(1, count)]
    terms = [flat(anchor)]
    terms += [dequantise(flat(saved["lawa_history"][s]), saved["lawa_scales"][s]) for s in slots]
    avg = weighted_sum(terms, coefficients).as_strided(p.shape, p.stride())
    return avg.to(device=p.device, dtype=p.dtype, memory_format=torch.contiguous_format, copy=True)


def _assemble(model: nn.Module, averages: dict[int, Tensor]) -> dict[str, Tensor]:
    live = model.state_dict(keep_vars=True)
    held = {id(v) for v in live.values()}
    for name, p in model.named_parameters():
        if id(p) in averages and id(p) not in held:
            raise ValueError(
                f"model.state_dict() does not hold parameter {name!r} as the module does (a "
                "state-dict hook replaces it), so its average has no key to go to"
            )
    out: dict[str, Any] = OrderedDict()
    used: set[int] = set()
    for key, value in live.items():
        avg = averages.get(id(value))
        if avg is not None:
            # Tied weights: every key gets storage of its own.
            out[key] = avg if id(value) not in used else avg.clone()
            used.add(id(value))
        else:
            out[key] = _fresh(value) if isinstance(value, Tensor) else copy.deepcopy(value)
    metadata = getattr(live, "_metadata", None)
    if metadata is not None:
        out._metadata = copy.deepcopy(metadata)  # module versions, read by load_state_dict
    return out


def _recompute_bn(model: nn.Module, out: dict[str, Tensor], loader: Iterable) -> None:
    """Run ``update_bn`` on a copy of ``model`` whose tensors are those of ``out``."""
    memo: dict[int, Any] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        if id(value) in memo or not isinstance(value, Tensor):
            continue
        if isinstance(value, nn.Parameter):
            memo[id(value)] = nn.Parameter(out[key], requires_grad=value.requires_grad)
        else:
            memo[id(value)] = out[key]
    twin = copy.deepcopy(model, memo)  # shares out's tensors: update_bn writes into them
    cuda = sorted({t.device.index or 0 for t in out.values() if isinstance(t, Tensor) and t.is_cuda})
    # A forward in training mode draws dropout masks: keep the training run's random stream.
    with torch.random.fork_rng(devices=cuda):
        update_bn(loader, twin)
