"""Sharded parameters: DTensor shards (FSDP2, tensor parallel) in the history.

Under ``torch.distributed.fsdp.fully_shard`` every parameter is a DTensor whose local
tensor is a view into the rank's own shard (uneven, possibly empty). The history keeps
only those local tensors, so snapshots and swaps touch the rank's shard and nothing
else: no collectives, no full-model gather. For checkpoints, the per-parameter views
of the history are wrapped back into DTensors with the parameter's placements, shifted
one dimension right for the leading ``k`` axis (``Shard(0)`` becomes ``Shard(1)``), so
``torch.distributed.checkpoint`` saves, loads and reshards them like any other
optimizer state.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from lawa_optim.wrapper import LAWA

DTensor = FSDPModule = Shard = _StridedShard = None
if torch.distributed.is_available():  # builds without it have no DTensor parameters
    from torch.distributed._composable_state import _module_state_mapping

    try:  # public names since torch 2.5/2.6
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # torch 2.4
        from torch.distributed._composable.fsdp import FSDPModule
        from torch.distributed._tensor import DTensor, Shard
    try:
        from torch.distributed.tensor.placement_types import _StridedShard
    except ImportError:  # torch 2.4 has no strided shards
        pass


def is_sharded(t: Tensor) -> bool:
    """True when ``t`` is a DTensor (a parameter sharded by FSDP2 or tensor parallel)."""
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The rank's local tensor of a DTensor, ``t`` itself otherwise.

    ``_local_tensor`` is the very tensor FSDP2 narrows out of its sharded storage, so
    in-place writes into it are what the next all-gather reads; ``to_local()`` would
    build a new view object on every call.
    """
    return t._local_tensor if is_sharded(t) else t


def _shift(placement):
    if _StridedShard is not None and isinstance(placement, _StridedShard):
        return _StridedShard(placement.dim + 1, split_factor=placement.split_factor)
    if isinstance(placement, Shard):
        return Shard(placement.dim + 1)
    return placement


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for n in reversed(shape):
        stride.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(stride))


def as_global(view: Tensor, param: Tensor, lead: int | None = None, shape: tuple[int, ...] | None = None) -> Tensor:
    """Wrap ``view`` (shaped like ``local(param)``, or ``(lead, *local shape)``) as a
    DTensor laid out like ``param``; a plain ``param`` returns ``view`` unchanged. With
    ``shape``, the global shape after ``lead`` is ``shape`` instead of the parameter's (a
    tensor sharded like the parameter's rows: the same first dimension).

    No communication: ``run_check=False`` and the global shape and stride are given.
    """
    if not is_sharded(param):
        return view
    shape = tuple(param.shape if shape is None else shape)
    placements = tuple(param.placements)
    if lead is not None:
        shape = (lead, *shape)
        placements = tuple(_shift(pl) for pl in placements)
    return DTensor.from_local(
        view,
        param.device_mesh,
        placements,
        run_check=False,
        shape=torch.Size(shape),
        stride=_contiguous_stride(shape),
    )


def local_of_saved(value: Tensor, shape: tuple[int, ...], where: str) -> Tensor:
    """The local part of a loaded state entry; ``ValueError`` unless it has ``shape``, that
    of this rank's shard of the history."""
    if is_sharded(value):
        value = value.to_local()
    if tuple(value.shape) != tuple(shape):
        raise ValueError(
            f"{where}: the loaded tensor's local part has shape {tuple(value.shape)}, this rank's "
            f"shard of the history needs {tuple(shape)}; load sharded checkpoints with "
            "torch.distributed.checkpoint and set_optimizer_state_dict, which reshard them"
        )
    return value


def reshard_fsdp(params: Iterable[Tensor]) -> None:
    """Reshard every FSDP2 module that manages one of ``params``.

    After a forward under ``reshard_after_forward=False`` (the root module's default) a
    module keeps its gathered parameters and the next forward reuses them without a new
    all-gather, so a swap written into the shards would be silently ignored. ``reshard``
    frees the gathered copies and is a no-op on a module already sharded.
    """
    if FSDPModule is None:
        return
    ids = {id(p) for p in params if is_sharded(p)}
    if not ids:
        return
    for module in list(_module_state_mapping.keys()):
        if not isinstance(module, FSDPModule):
            continue
        groups = module._get_fsdp_state()._fsdp_param_groups
        if any(id(fp.sharded_param) in ids for g in groups for fp in g.fsdp_params):
            module.reshard()


def check_in_sync(opt: "LAWA", group: "torch.distributed.ProcessGroup | None" = None) -> None:
    """Raise ``RuntimeError`` on every rank when the ranks' LAWA counters differ.

    Under DDP every rank keeps the same history with no communication, which holds only
    while all ranks step, snapshot and swap together. This costs one small all-gather
    (call it on every rank of ``group``, e.g. before swapping or saving) and catches a
    snapshot or swap taken on some ranks only.
    """
    pushes = [int(gen[0].pushes.item()) if gen else 0 for gen in opt._history.generations]
    mine = {"steps": opt.steps, "snapshots pushed": pushes, "swapped": opt.is_swapped}
    world = torch.distributed.get_world_size(group)
    states: list = [None] * world
    torch.distributed.all_gather_object(states, mine, group=group)
    if any(s != states[0] for s in states):
        table = "; ".join(f"rank {r}: {s}" for r, s in enumerate(states))
        raise RuntimeError(
            f"LAWA state differs across ranks ({table}): call step(), snapshot(), "
            "swap_to_average() and swap_back() on every rank"
        )
