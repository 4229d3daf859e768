"""Checking the wrapped optimizer's part of a LAWA state dict before any of it is loaded.

``torch.optim``'s loaders take nearly any dict and fail at the next ``step()`` (or, for a
dict of another optimizer, halfway through loading). :func:`check_optimizer` compares
the dict with what the wrapped optimizer itself saves and raises ``ValueError`` naming
the field:

* a param group that lacks one of the optimizer's hyperparameters (a key of its
  ``defaults`` that the live groups hold), unless the optimizer's own ``__setstate__``
  fills it in (it does so for keys that older torch versions did not save). Keys the
  live groups lack are loaded as saved, as torch does (LR schedulers add
  ``initial_lr``);
* a parameter's state (LAWA's ``lawa_*`` keys aside) that is not empty and whose keys
  differ from the ones the optimizer saves; a state tensor of another dtype than the
  optimizer's (nothing is cast), not of the parameter's shape where the optimizer's has
  it, not 0-dim where the optimizer's is; a value that is neither a tensor nor a number
  where the optimizer saves a tensor (a number is how old versions saved ``step``); any
  state tensor on the meta device.

What the optimizer saves is learned from a probe: an optimizer of the same class with
the saved group's hyperparameters over one small stand-in of the parameter's dtype,
device and number of dimensions, stepped once with a zero gradient (a few elements per
probe; nothing of the model's size is allocated). A saved group whose hyperparameters
make the probe fail, where the live group's do not, is refused. Probes are made for the
optimizers of ``torch.optim`` only, whose state depends on no more than a parameter's
dtype, device and number of dimensions; other classes (their constructor may need other
arguments, or their state depend on a parameter's size) are checked against the live
optimizer's state for the parameter where it has some (its keys, and each tensor's dtype
and shape), and otherwise only for meta tensors. Likewise where a ``torch.optim`` optimizer cannot be probed (one that needs a
closure or sparse gradients).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lawa_optim.distributed import local
from lawa_optim.state_check import KEYS, shown

#: What a parameter's state holds: key -> (dtype, the shape it must have: a tuple, PARAM
#: for the parameter's, None for any) of a tensor, or None for a value that is not one.
Reference = dict[Any, "tuple[torch.dtype, tuple[int, ...] | str | None] | None"]
PARAM = "the parameter's shape"


def check_optimizer(optimizer: Optimizer, param_groups: Sequence[dict], sd: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the first field of the wrapped optimizer's part of ``sd``
    that ``optimizer`` would not load as its own; ``sd`` has passed
    :func:`lawa_optim.state_check.check`, so its structure fits ``param_groups``."""
    fillable = _filled_keys(optimizer)
    cls = type(optimizer)
    probeable = cls.__module__.startswith("torch.optim")
    probes: dict[tuple, Reference | None] = {}
    for g, (group, live) in enumerate(zip(sd["param_groups"], param_groups)):
        missing = [key for key in optimizer.defaults if key in live and key not in group and key not in fillable]
        if missing:
            raise ValueError(
                f"param group {g} of the state_dict lacks {missing[0]!r}, a hyperparameter of "
                f"{cls.__name__} (the state_dict was saved by another optimizer, or edited)"
            )
        hyper = {key: value for key, value in group.items() if key not in ("params", "param_names", "lawa")}
        own = {key: value for key, value in live.items() if key not in ("params", "param_names")}
        for i, (p, pid) in enumerate(zip(live["params"], group["params"])):
            entry = {key: value for key, value in sd["state"].get(pid, {}).items() if key not in KEYS}
            field = f"state[{pid!r}]"
            _no_meta(entry, field)
            if not entry:
                continue  # no state yet: the optimizer initialises it at its next step
            ref = None
            if probeable:
                at = (g, p.dtype, p.device, p.dim())
                if at not in probes:
                    probes[at] = _probe(cls, hyper, own, p, g)
                ref = probes[at]
            if ref is None:
                ref = _live(optimizer.state.get(p), p)
            if ref is not None:
                _compare(entry, ref, field, f"parameter {i} of param group {g}", p, cls.__name__)


def _no_meta(value: Any, field: str) -> None:
    if isinstance(value, Tensor):
        if value.device.type == "meta":
            raise ValueError(f"{field} is on the meta device and holds no values")
    elif isinstance(value, dict):
        for key, v in value.items():
            _no_meta(v, f"{field}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for j, v in enumerate(value):
            _no_meta(v, f"{field}[{j}]")


def _compare(entry: dict, ref: Reference, field: str, where: str, p: Tensor, name: str) -> None:
    if set(entry) != set(ref):
        raise ValueError(
            f"{field} holds the keys {sorted(map(str, entry))}, but {name} saves "
            f"{sorted(map(str, ref))} for {where} (the state_dict was saved by another "
            "optimizer or with other hyperparameters, or edited)"
        )
    for key, spec in ref.items():
        value = entry[key]
        if spec is None:
            continue
        dtype, shape = spec
        if not isinstance(value, Tensor):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                continue  # how old versions saved a step count; the optimizer converts it
            raise ValueError(f"{field}[{key!r}] must be a tensor, got {shown(value)}")
        if value.dtype != dtype:
            raise ValueError(
                f"{field}[{key!r}] has dtype {value.dtype}, {name} holds {dtype} for {where}; "
                "nothing is cast"
            )
        if shape == PARAM and value.shape != p.shape:
            raise ValueError(
                f"{field}[{key!r}] has shape {tuple(value.shape)} but {where} has shape {tuple(p.shape)}"
            )
        if isinstance(shape, tuple) and tuple(value.shape) != shape:
            raise ValueError(f"{field}[{key!r}] has shape {tuple(value.shape)}, {name} holds {shape} for {where}")


def _live(state: dict | None, p: Tensor) -> Reference | None:
    """The reference of the live optimizer's state for ``p``, if it has some."""
    if not state:
        return None
    return {
        key: (v.dtype, PARAM if v.shape == p.shape else tuple(v.shape)) if isinstance(v, Tensor) else None
        for key, v in state.items()
    }


def _probe(cls: type, hyper: dict, own: dict, p: Tensor, g: int) -> Reference | None:
    """The reference learned from a probe with the saved hyperparameters ``hyper``; None
    when ``cls`` cannot be probed even with the live ones ``own``."""
    try:
        return _step_probe(cls, hyper, p)
    except Exception as saved_error:  # noqa: BLE001 -- any failure: try the live hyperparameters
        try:
            _step_probe(cls, own, p)
        except Exception:  # noqa: BLE001 -- the optimizer cannot be probed at all
            return None
        raise ValueError(
            f"param group {g} of the state_dict: {cls.__name__} cannot step with its "
            f"hyperparameters ({type(saved_error).__name__}: {saved_error})"
        ) from None


def _step_probe(cls: type, hyper: dict, p: Tensor) -> Reference:
    shape = tuple(2 + d % 3 for d in range(p.dim()))  # 2, 3, 4, 2, ...: a few elements
    x = torch.zeros(shape, dtype=p.dtype, device=local(p).device, requires_grad=True)
    x.grad = torch.zeros_like(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        probe = cls([{**hyper, "params": [x]}])
        probe.step()
    out: Reference = {}
    for key, v in probe.state[x].items():
        if not isinstance(v, Tensor):
            out[key] = None
        elif tuple(v.shape) == shape:
            out[key] = (v.dtype, PARAM)
        else:
            out[key] = (v.dtype, () if v.dim() == 0 else None)
    return out


def _filled_keys(optimizer: Optimizer) -> set:
    """The param group keys the optimizer's ``__setstate__`` fills in when a loaded group
    lacks them."""
    blank = type(optimizer).__new__(type(optimizer))
    group: dict[str, Any] = {"params": []}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            type(optimizer).__setstate__(
                blank, {"defaults": dict(optimizer.defaults), "state": {}, "param_groups": [group]}
            )
    except Exception:  # noqa: BLE001 -- a custom __setstate__: nothing is filled in
        return set()
    return set(group) - {"params"}
