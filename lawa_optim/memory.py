"""What a LAWA history costs in memory, held now or before anything is allocated.

LAWA's price is memory (Kaddour 2022 keeps k checkpoints; this library keeps them
flat): ``k`` slots of the history dtype per parameter element, a float32 running mean,
and, only while an average is swapped in with a copy (float16 parameters, an 8-bit
history, ``last=``, ``weights=``, ``backup=``), a backup of the training weights.
:meth:`lawa_optim.LAWA.memory` reads the buffers a LAWA holds; :func:`history_bytes`
computes the same record from parameter shapes alone (meta tensors included), so k
and the history dtype can be chosen for a model that does not fit yet.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lawa_optim.distributed import local

#: Fields of :class:`Memory` that count bytes, in the order they are shown.
BUFFERS = ("history", "sum", "scales", "staging", "backup")


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError  # unreachable: the loop returns at "GB"


@dataclass(frozen=True)
class Memory:
    """Bytes of a LAWA history, by buffer (decimal units in ``str``).

    Attributes:
        parameters: parameter elements averaged, each counted once.
        history: the ring of snapshots and its snapshot counters; for an 8-bit history
            its int8 delta codes and its anchor (the newest snapshot, float32).
        sum: the running mean (float32; float64 for float64 parameters), or the
            average itself in EMA mode, or in phema mode the power-function EMAs, one
            row per width (``mode="phema"`` keeps no running mean); 0 for an 8-bit
            history, which keeps none.
        scales: quantisation scales of an 8-bit history (float32, one per block of 256
            elements and delta slot; 0 for the other formats).
        staging: the page-locked copy of the weights that ``storage="pinned"`` keeps
            for asynchronous snapshots of GPU parameters.
        backup: the training weights copied while an average is swapped in with a
            backup (0 for the in-place swap, which keeps them in the running mean's
            buffer).
    """

    parameters: int = 0
    history: int = 0
    sum: int = 0
    scales: int = 0
    staging: int = 0
    backup: int = 0

    @property
    def total(self) -> int:
        """All bytes held."""
        return sum(getattr(self, f) for f in BUFFERS)

    @property
    def per_parameter(self) -> float:
        """``total / parameters`` (0.0 for no parameters); alignment padding included."""
        return self.total / self.parameters if self.parameters else 0.0

    def __add__(self, other: "Memory") -> "Memory":
        if not isinstance(other, Memory):
            return NotImplemented
        return Memory(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))

    def __str__(self) -> str:
        parts = ", ".join(f"{f} {_size(getattr(self, f))}" for f in BUFFERS)
        return (
            f"{self.per_parameter:.2f} B/param, {_size(self.total)} for "
            f"{self.parameters:,} parameters ({parts})"
        )


def _tensors(params: Any) -> list[Tensor]:
    """The parameters of a module, or of an iterable as an optimizer takes it (tensors,
    ``(name, tensor)`` pairs or param-group dicts), each object once, in order."""
    if isinstance(params, nn.Module):
        params = params.parameters()
    elif isinstance(params, Tensor):
        params = [params]
    elif not isinstance(params, Iterable) or isinstance(params, (str, bytes, dict)):
        raise TypeError(
            "params must be an nn.Module or an iterable of tensors, (name, tensor) pairs or "
            f"param-group dicts, got {type(params).__name__}"
        )
    out: dict[int, Tensor] = {}
    for item in params:
        group = item["params"] if isinstance(item, dict) else [item]
        group = [group] if isinstance(group, Tensor) else group
        for p in group:
            if isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str):
                p = p[1]
            if not isinstance(p, Tensor):
                raise TypeError(f"params: expected tensors, got {type(p).__name__}")
            out.setdefault(id(p), p)
    return list(out.values())


def history_bytes(
    params: Any,
    k: int = 6,
    *,
    history_dtype: torch.dtype | None = None,
    mode: str = "uniform",
    storage: str = "device",
    swapped: bool = False,
    sigma_rels: Any = None,
) -> Memory:
    """The :class:`Memory` that ``LAWA(opt, k, history_dtype=..., mode=..., storage=...)``
    over ``params`` will hold, computed from shapes and dtypes alone.

    ``params`` is an ``nn.Module`` or what an optimizer takes (tensors, ``(name,
    tensor)`` pairs, param-group dicts); meta tensors work, so the cost of a model that
    does not fit yet can be read off a model built under ``torch.device("meta")``.
    ``swapped=True`` adds the backup that :meth:`lawa_optim.LAWA.swap_to_average` of the
    full average allocates while it is swapped in: one for float16 parameters and for an
    8-bit history only (the others trade places with the running mean). Not predicted: a mean that is not finite,
    and swaps with ``last=``, ``weights=`` or ``backup=``, which back up every parameter
    (``D`` elements of its dtype), unless, right after a snapshot into a history of the
    parameters' dtype, the newest slot holds them (then nothing, float16 included).
    ``sigma_rels`` (``mode="phema"`` only, default ``(0.05, 0.10)``) gives the widths, one
    float32 EMA each. A DTensor parameter counts this rank's shard, in the format the
    history gives it (:func:`lawa_optim.history.history_format`: with
    ``history_dtype=torch.int8``, sharded parameters whose rows are no multiple of 256
    elements keep their own dtype). Nothing is allocated.

    Example::

        with torch.device("meta"):
            model = build_model()
        print(history_bytes(model, k=6, history_dtype=torch.bfloat16))
    """
    # Imported here: lawa_optim.history imports this module for Bucket.memory().
    from lawa_optim.history import (
        accumulation_dtype,
        blocks,
        check_dtype,
        check_history_dtype,
        history_format,
        is_int,
        is_int8,
        layout,
    )
    from lawa_optim.wrapper import MODES, STORAGES

    if not is_int(k) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    check_history_dtype(history_dtype, mode)
    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
    widths = 0
    if mode == "phema":
        from lawa_optim.posthoc import SIGMA_RELS, check_sigma_rels

        widths = len(check_sigma_rels(SIGMA_RELS if sigma_rels is None else sigma_rels))
    elif sigma_rels is not None:
        raise ValueError(f"sigma_rels= is for mode='phema', got mode={mode!r}")
    if not isinstance(swapped, bool):
        raise TypeError(f"swapped must be a bool, got {type(swapped).__name__}")
    buckets: dict[tuple, list[Tensor]] = {}
    for i, p in enumerate(_tensors(params)):
        where = f"params: parameter {i}"
        check_dtype(p, where, history_dtype)
        buckets.setdefault((p.device, p.dtype, history_format(p, history_dtype, where)), []).append(p)
    total = Memory()
    for (device, dtype, fmt), ps in buckets.items():
        numels = [local(p).numel() for p in ps]  # a DTensor: this rank's shard
        D = layout(numels)[1]
        slot = (fmt or dtype).itemsize
        width = dtype.itemsize
        # An 8-bit history: k - 1 int8 delta slots, the float32 anchor (its newest snapshot,
        # counted as history) and a float32 scale per block and slot; no running mean.
        int8 = is_int8(fmt)
        if int8:
            history = (k - 1) * D + 4 * D + 8
        else:
            history = k * D * slot + 8 if mode != "ema" else 8
        total += Memory(
            parameters=sum(numels),
            history=history,
            sum=0 if int8 else max(widths, 1) * D * accumulation_dtype(dtype).itemsize,
            scales=4 * (k - 1) * blocks(numels)[1] if int8 else 0,
            staging=D * width if storage == "pinned" and mode == "uniform" and device.type == "cuda" else 0,
            backup=D * width if swapped and (dtype == torch.float16 or int8) else 0,
        )
    return total
