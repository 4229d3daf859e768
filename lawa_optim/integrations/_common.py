"""What the framework integrations share: argument checks and parameter names in saved
state dicts."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lawa_optim import LAWA


def check_lawa_arguments(k: int, lawa_kwargs: dict[str, Any]) -> None:
    """Raise the error ``LAWA(optimizer, k, **lawa_kwargs)`` would, before anything is built
    (a LAWA allocates nothing until its first step, so the probe costs nothing)."""
    probe = torch.zeros(1, requires_grad=True)
    LAWA(torch.optim.SGD([probe], lr=0.0), k, **lawa_kwargs)


def record_names(opt: LAWA, module: nn.Module) -> None:
    """Save the names in ``module`` of ``opt``'s parameters in every state dict ``opt`` saves.

    Frameworks build optimizers from bare parameters in their own order (Hugging Face's
    Trainer: one group with weight decay, one without), so a checkpoint's parameter
    order is not ``module.parameters()`` order; torch's ``param_names`` let
    :func:`lawa_optim.export_average` map them by name. On load, the names are checked
    against this optimizer's and removed, so the optimizer stays as it was built (one
    with names refuses ``add_param_group`` without them).
    """

    def names() -> list[list[str | None]]:
        lookup = {id(p): n for n, p in module.named_parameters()}
        return [[lookup.get(id(p)) for p in g["params"]] for g in opt.param_groups]

    def built_with_names() -> bool:
        return any("param_names" in g for g in opt.param_groups)

    def add(_: Any, sd: dict[str, Any]) -> None:
        current = names()
        if built_with_names() or any(n is None for ns in current for n in ns):
            return  # torch saves them already, or a parameter lies outside module
        for group, ns in zip(sd["param_groups"], current):
            group["param_names"] = ns

    def check_and_strip(_: Any, sd: dict[str, Any]) -> dict[str, Any] | None:
        groups = sd.get("param_groups")
        if built_with_names() or not isinstance(groups, list):
            return None
        if not all(isinstance(g, dict) and "param_names" in g for g in groups):
            return None
        for g, (group, ns) in enumerate(zip(groups, names())):
            for i, (saved, live) in enumerate(zip(group["param_names"], ns)):
                if live is not None and saved != live:
                    raise ValueError(
                        f"parameter {i} of param group {g} of the state_dict is {saved!r}, this "
                        f"optimizer's is {live!r}: the checkpoint was saved with another parameter layout"
                    )
        sd = dict(sd)
        sd["param_groups"] = [{k: v for k, v in g.items() if k != "param_names"} for g in groups]
        return sd

    opt.register_state_dict_post_hook(add)
    opt.register_load_state_dict_pre_hook(check_and_strip)
