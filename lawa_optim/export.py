"""The LAWA average as a plain state dict, from a live optimizer or a checkpoint file.

Latest Weight Averaging (Kaddour 2022, arXiv:2209.14981) ships the average of the k
latest snapshots. The obvious export, ``with opt.averaged(): sd = model.state_dict()``,
returns tensors that share storage with the parameters, so after the block ``sd``
holds the training weights again; :func:`export_average` returns fresh tensors and
leaves the model and the optimizer as they were.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lawa_optim.bn import update_bn
from lawa_optim.history import accumulation_dtype
from lawa_optim.wrapper import LAWA


def export_average(
    model: nn.Module, source: LAWA | Mapping[str, Any], *, bn_loader: Iterable | None = None
) -> dict[str, Tensor]:
    """The state dict of ``model`` with every averaged parameter replaced by its LAWA average.

    Args:
        model: the model the average belongs to (the one trained, or a fresh one of the
            same architecture when ``source`` is a checkpoint).
        source: a :class:`LAWA` over ``model``'s parameters, or a state dict saved by
            ``LAWA.state_dict()`` (e.g. ``torch.load(path)`` of a checkpoint: no LAWA
            needed). Saved parameters are matched to ``model``'s by name where the state
            dict carries torch's ``param_names`` (optimizers built from
            ``model.named_parameters()``, and the Lightning and Hugging Face integrations
            of this package), otherwise by ``model.parameters()`` order.
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
    if isinstance(source, LAWA):
        averages = _from_lawa(model, source)
    elif isinstance(source, Mapping):
        averages = _from_state_dict(model, source)
    else:
        raise TypeError(
            "source must be a LAWA or a state dict saved by LAWA.state_dict(), "
            f"got {type(source).__name__}"
        )
    out = _assemble(model, averages)
    if bn_loader is not None:
        _recompute_bn(model, out, bn_loader)
    return out


def _fresh(t: Tensor) -> Tensor:
    return t.detach().clone(memory_format=torch.contiguous_format)


def _from_lawa(model: nn.Module, opt: LAWA) -> dict[int, Tensor]:
    if opt.is_swapped:
        raise RuntimeError(
            "export_average() while the average is swapped into the parameters: call it "
            "outside `with opt.averaged():` (it swaps by itself and swaps back)"
        )
    if opt.num_snapshots == 0:
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
    with opt.averaged():
        return {id(p): _fresh(p) for p in params}


def _from_state_dict(model: nn.Module, sd: Mapping[str, Any]) -> dict[int, Tensor]:
    groups, state = sd.get("param_groups"), sd.get("state")
    if not isinstance(groups, list) or not isinstance(state, Mapping):
        raise ValueError("source must have 'state' (a dict) and 'param_groups' (a list), as LAWA.state_dict() saves")
    for g, group in enumerate(groups):
        if not isinstance(group, Mapping) or not isinstance(group.get("lawa"), Mapping):
            raise ValueError(
                f"param group {g} of source has no LAWA history ('lawa' missing): it was not "
                "saved by LAWA.state_dict()"
            )
    targets = iter(_match(model, groups))
    averages = {}
    for g, group in enumerate(groups):
        meta = group["lawa"]
        # A group whose history was never built (generation None) holds no snapshot.
        pushes = meta.get("pushes") if meta.get("generation") is not None else 0
        if isinstance(pushes, bool) or not isinstance(pushes, int) or pushes < 0:
            raise ValueError(f"param group {g} of source has an invalid snapshot count {pushes!r}")
        for i, pid in enumerate(group["params"]):
            name, p = next(targets)
            if pushes > 0:
                where = f"parameter {i} of param group {g} of source (model parameter {name!r})"
                averages[id(p)] = _average(p, state.get(pid, {}), meta, pushes, where)
    if not averages:
        raise RuntimeError("export_average(): source holds no snapshot yet (saved before the first snapshot)")
    return averages


def _match(model: nn.Module, groups: list) -> list[tuple[str, Tensor]]:
    """The model parameter of every saved parameter, in saved order."""
    saved = [pid for group in groups for pid in group["params"]]
    named = [("param_names" in group) for group in groups]
    if any(named) and not all(named):
        raise ValueError("source has param_names in some param groups but not in all")
    if all(named) and groups:
        lookup = dict(model.named_parameters(remove_duplicate=False))
        out, seen = [], {}
        for g, group in enumerate(groups):
            names = group["param_names"]
            if len(names) != len(group["params"]):
                raise ValueError(
                    f"param group {g} of source has {len(group['params'])} parameters but "
                    f"{len(names)} param_names"
                )
            for name in names:
                p = lookup.get(name)
                if p is None:
                    raise ValueError(
                        f"source averages a parameter named {name!r} (param group {g}) that "
                        f"model does not have; model's parameters: {_some(lookup)}"
                    )
                if id(p) in seen:
                    raise ValueError(f"source names {seen[id(p)]!r} and {name!r}, one parameter of model, twice")
                seen[id(p)] = name
                out.append((name, p))
        return out
    params = list(model.named_parameters())
    if len(params) != len(saved):
        raise ValueError(
            f"source holds {len(saved)} parameters and carries no param_names, so they map to "
            f"model.parameters() in order, but model has {len(params)}; build the optimizer "
            "from model.named_parameters() to map by name"
        )
    return params


def _some(named: Mapping[str, Tensor]) -> str:
    names = list(named)
    return ", ".join(map(repr, names[:5])) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _saved_tensor(entry: Mapping, key: str, shape: tuple, dtype: torch.dtype, where: str) -> Tensor:
    t = entry.get(key)
    if not isinstance(t, Tensor):
        raise ValueError(f"{where}: {key} is missing from the saved state")
    if tuple(t.shape) != shape:
        raise ValueError(f"{where}: {key} has shape {tuple(t.shape)}, model needs {shape}")
    if t.dtype != dtype:
        raise ValueError(f"{where}: {key} has dtype {t.dtype}, model needs {dtype}")
    return t


@torch.no_grad()
def _average(p: Tensor, entry: Mapping, meta: Mapping, pushes: int, where: str) -> Tensor:
    """One parameter's average from its saved history, with the arithmetic of a swap
    (``lawa_optim.ops``): the slots summed in slot order in the accumulation dtype,
    divided by the count, rounded to the parameter's dtype."""
    acc = accumulation_dtype(p.dtype)
    shape = tuple(p.shape)
    mode = meta.get("mode")
    if mode == "ema":
        avg = _saved_tensor(entry, "lawa_ema", shape, acc, where)
    elif mode == "uniform":
        k, named = meta.get("k"), meta.get("history_dtype")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"{where}: the saved settings have an invalid k={k!r}")
        hdtype = p.dtype if named is None else getattr(torch, str(named), None)
        if not isinstance(hdtype, torch.dtype):
            raise ValueError(f"{where}: the saved settings have an unknown history_dtype={named!r}")
        history = _saved_tensor(entry, "lawa_history", (k, *shape), hdtype, where)
        count = min(pushes, k)
        if "lawa_sum" in entry:  # the running sum itself, where the saver keeps it
            total = _saved_tensor(entry, "lawa_sum", shape, acc, where)
        else:
            total = torch.zeros(shape, dtype=acc, device=history.device)
            for s in range(count):
                total.add_(history[s])
        # A 0-dim tensor divides exactly as the kernels do (a Python float may not on CUDA).
        avg = total / torch.tensor(float(count), dtype=acc, device=total.device)
    else:
        raise ValueError(f"{where}: unknown LAWA mode {mode!r} in the saved settings")
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
