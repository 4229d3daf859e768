"""Loading a state dict by torch's parameter names (``param_names``).

An optimizer built from ``model.named_parameters()`` saves each param group's names
beside its state ids. ``torch.optim`` loads by position whatever the names say, and then
takes the dict's names for its own; a LAWA matches them first (:func:`match_names`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lawa_optim.state_check import shown


def match_names(param_groups: Sequence[dict], sd: Any) -> Any:
    """``sd`` with its parameters matched to ``param_groups`` by torch's ``param_names``.

    Where a saved param group and the live one both have names, the same names in the
    same order load as they are; the same names in another order (none twice) load by
    name: the saved group's ids are put in the live order. Any other difference raises
    ``ValueError`` naming the first position whose names differ. Where the live group has
    no names the saved ones are dropped, so loading never names an optimizer (torch's
    loader would take them on). ``sd`` is not changed; a dict whose structure does not fit
    is returned as it is, for :func:`lawa_optim.state_check.check` to refuse.
    """
    groups = sd.get("param_groups") if isinstance(sd, dict) else None
    if not isinstance(groups, list) or len(groups) != len(param_groups):
        return sd
    out = []
    for g, (group, live) in enumerate(zip(groups, param_groups)):
        if not isinstance(group, dict) or "param_names" not in group:
            out.append(group)
            continue
        group = dict(group)
        names = group.pop("param_names")
        if "param_names" not in live:
            out.append(group)
            continue
        ids, own = group.get("params"), live["param_names"]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(
                f"param group {g} of the state_dict: param_names must be a list of str, got {shown(names)}"
            )
        if not isinstance(ids, list) or len(ids) != len(names):
            raise ValueError(
                f"param group {g} of the state_dict has {len(names)} param_names for "
                f"{len(ids) if isinstance(ids, list) else shown(ids)} params"
            )
        if len(names) != len(own):
            out.append(group)  # check() names the count
            continue
        if names != own:
            if sorted(names) != sorted(own) or len(set(own)) != len(own):
                i = next(i for i, (a, b) in enumerate(zip(names, own)) if a != b)
                raise ValueError(
                    f"parameter {i} of param group {g} is named {names[i]!r} in the state_dict and "
                    f"{own[i]!r} in this optimizer: the state_dict holds other parameters (a param "
                    "group with the same names in another order is loaded by name)"
                )
            where = {n: j for j, n in enumerate(names)}
            group["params"] = [ids[where[n]] for n in own]
        group["param_names"] = list(own)
        out.append(group)
    return {**sd, "param_groups": out}
