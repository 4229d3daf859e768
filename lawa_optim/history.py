"""The flat ring-buffer history behind LAWA (Kaddour 2022, arXiv:2209.14981).

Parameters are grouped into buckets that share a device and a dtype. A bucket keeps

* ``ring``: ``(k, D)`` in the history dtype, one row ("slot") per snapshot;
* ``total``: ``(D,)`` running mean of the filled slots *as stored* (float32; float64
  for float64 parameters), or the exponential average itself in EMA mode;
* with ``history_dtype=torch.int8`` (the 8-bit history, :mod:`lawa_optim.ops`) instead:
  ``total`` is the *anchor*, the newest stored snapshot in float32, ``ring`` holds
  ``k - 1`` int8 deltas between consecutive stored snapshots and ``scales`` their
  float32 scales, ``(k - 1, blocks)``, one per block of ``QBLOCK`` elements. Sharded
  parameters keep it only where their blocks are chunks of whole rows under ``Shard(0)``
  (:func:`history_format`; the others a ring of their own dtype, in a bucket of their
  own), so the blocks, and the checkpoints, do not depend on the number of ranks;
* ``pushes``: a one-element int64 tensor beside the ring counting snapshots ever
  pushed. Slot ``s`` holds the snapshot number ``n`` with ``n % k == s``, the next
  push writes slot ``pushes % k`` and ``min(pushes, k)`` slots are filled. It lives on
  the device (not in a Python int) so kernels read it without a host sync.

The O(1) update ``total += (new - old) / k`` cancels catastrophically when magnitudes
change (two snapshots at 1e8 then two at 1.0 leave 0.0 for k = 2) and keeps a NaN
forever. So every ``refresh_every``-th push (default: every k-th, the one that
completes a pass over the ring) rebuilds ``total`` from the ring instead, in the same
pass, with a compensated sum whose error does not grow with k, divided by the count.
The kernels decide that from ``pushes`` on the device, so compiled and graph-captured
snapshots refresh at the right push too. Hence the guarantee (README, "The numerical
guarantee"): at most ``refresh_every`` snapshots after a value has left the window it
no longer affects the average, which is then the mean of the stored window within
``(4 + r (1 + 4/k)) 2**-24`` of the largest magnitude, ``r`` snapshots after the last
refresh, whatever k (while the ring first fills, the n-th snapshot adds ``(1 + 4/n)
2**-24``).

Because ``total`` is the average itself, the full average swaps in without a copy
(:meth:`History.swap_in`): float32 and float64 parameters exchange their bits with it,
a bfloat16 parameter takes the mean rounded (ties away from zero) and the mean's word
keeps the weight's 16 bits beside its own low 16 bits; the swap-back undoes both
exactly. The int8 history's float32 anchor can be exchanged the same way where it holds
the average.

Each parameter owns a slice of the flat buffers that starts on a multiple of
``ALIGN`` elements and holds its elements in the parameter's *memory* order, so a
snapshot of a ``channels_last`` weight is a plain linear copy for every backend.
A parameter is counted once, by its memory (:func:`parameter_owners`): entries of the
param groups that cover the same bytes as an earlier one, with the same dtype, shape
and strides, are aliases that have no slice of their own, so no backend ever backs up
or writes one memory twice; memory shared in any other way is refused.

The kernels themselves live in :mod:`lawa_optim.ops`; this module only lays out
memory and keeps the bookkeeping (which buckets exist, whether parameters moved).
"""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from lawa_optim import compiled, ops, weighting
from lawa_optim.backends import cpu_kernels
from lawa_optim.distributed import Shard, is_sharded, local, reshard_fsdp
from lawa_optim.memory import Memory
from lawa_optim.offload import Offload

#: Slice alignment in elements: 128 bytes for 2-byte dtypes, 256 for float32.
ALIGN = 64

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
#: Accepted ``history_dtype`` values: a float dtype, or ``torch.int8`` for the 8-bit
#: delta-coded history (:func:`is_int8`).
HISTORY_DTYPES = (*FLOAT_DTYPES, torch.int8)

QBLOCK = ops.QBLOCK


def is_int8(history_dtype: torch.dtype | None) -> bool:
    """Whether ``history_dtype`` selects the 8-bit delta-coded history."""
    return history_dtype == torch.int8


def row_blocks(shape: Sequence[int]) -> int:
    """Blocks per row (``QBLOCK`` elements each) of a parameter of (global) ``shape`` whose
    rows, ``shape[1:]``, hold a positive multiple of ``QBLOCK`` elements, and which has a
    row; 0 for any other shape. Under ``Shard(0)`` a rank holds whole rows, so blocks
    counted from its shard's first element are (row, 256-element chunk) blocks, the same
    whatever the number of ranks."""
    row = math.prod(shape[1:]) if len(shape) else 0
    return row // QBLOCK if len(shape) and shape[0] > 0 and row > 0 and row % QBLOCK == 0 else 0


def history_format(p: Tensor, history_dtype: torch.dtype | None, where: str = "the parameter") -> torch.dtype | None:
    """The history dtype that holds parameter ``p`` in a LAWA of ``history_dtype``
    (``None``: the parameter's own dtype); the one rule for building, loading and
    :func:`lawa_optim.history_bytes`, read off the parameter alone.

    ``history_dtype`` itself, but for a sharded parameter (DTensor) in an 8-bit history,
    whose blocks must mean the same whatever the number of ranks, or no checkpoint could
    be resharded: under ``Shard(0)`` and ``Replicate`` placements a parameter whose rows
    are multiples of ``QBLOCK`` elements (:func:`row_blocks`) keeps 8 bits, its blocks
    chunks of its rows; any other (norms, biases) gets ``None``, a ring of its own dtype.
    Other placements, and a shard not laid out row by row, raise ``ValueError`` (``where``
    names ``p``)."""
    if not is_int8(history_dtype) or not is_sharded(p):
        return history_dtype
    if not all(pl.is_replicate() or (type(pl) is Shard and pl.dim == 0) for pl in p.placements):
        raise ValueError(
            f"{where} is a DTensor with placements {tuple(p.placements)}; "
            "history_dtype=torch.int8 holds sharded parameters only under Shard(0) and Replicate "
            "(FSDP2's placements), whose shards hold whole rows, so that no block of 256 elements "
            "straddles a shard and a checkpoint reshards exactly: use history_dtype=torch.bfloat16"
        )
    if not row_blocks(p.shape):
        return None
    shard = local(p)
    if not shard.is_contiguous():
        raise ValueError(
            f"{where} is a DTensor whose local shard (shape {tuple(shard.shape)}, stride "
            f"{shard.stride()}) is not laid out row by row; history_dtype=torch.int8 keeps a "
            "sharded parameter's blocks of 256 elements as chunks of its rows: make the shard "
            "contiguous, or use history_dtype=torch.bfloat16"
        )
    return history_dtype


def scales_shapes(p: Tensor, k: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Global and local shape of the scales that a state dict holds for parameter ``p``
    of an 8-bit history of ``k`` snapshots (:meth:`Bucket.saved_scales`)."""
    if is_sharded(p):
        per_row = row_blocks(p.shape)
        return (k - 1, p.shape[0], per_row), (k - 1, local(p).shape[0], per_row)
    flat = (k - 1, param_blocks(p.numel()))
    return flat, flat


def blocks(numels: Sequence[int]) -> tuple[list[int], int]:
    """Index of each parameter's first quantisation block (``QBLOCK`` elements, counted
    from the parameter's first element; an empty parameter still takes one) and the
    number of blocks."""
    bases, n = [], 0
    for numel in numels:
        bases.append(n)
        n += param_blocks(numel)
    return bases, n


def is_dense(t: Tensor) -> bool:
    """True when ``t`` covers exactly ``numel`` consecutive elements of its storage."""
    if t.numel() <= 1:
        return True
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def layout(numels: Sequence[int]) -> tuple[list[int], int]:
    """Offsets of parameters of ``numels`` elements in a flat buffer, each starting on a
    multiple of ``ALIGN`` elements (an empty parameter still takes one block), and the
    buffer's length ``D``."""
    offsets, size = [], 0
    for n in numels:
        offsets.append(size)
        size += -(-max(n, 1) // ALIGN) * ALIGN
    return offsets, size


def is_int(x: Any) -> bool:
    """True for a Python int that is not a bool."""
    return isinstance(x, int) and not isinstance(x, bool)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the running mean for parameters of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class Bucket:
    """The history of parameters sharing one device and dtype.

    Backends read ``params``, ``offsets``, ``numels``, ``ring``, ``total``,
    ``pushes`` and ``backup`` and may keep private data (pointer tables) in
    ``cache``, which is cleared whenever a parameter's storage moves. ``params`` are
    the tensors written and read: the local shards of DTensor parameters (FSDP2),
    the parameters themselves otherwise; ``sources`` are the optimizer's parameters.
    """

    def __init__(
        self,
        params: Sequence[Tensor],
        k: int,
        mode: str,
        history_dtype: torch.dtype | None,
        storage: str,
        backend: str,
        refresh_every: int | None = None,
        sharing: "Sharing | None" = None,
        widths: int = 0,
    ) -> None:
        self.sources = list(params)
        #: Optimizer parameters that share the memory of one of ``sources`` (no slice of
        #: their own): watched for moves, never written.
        self.aliases: list[Tensor] = []
        self.sharing = sharing
        self.sharded = any(map(is_sharded, self.sources))
        self.params = [local(p) for p in self.sources]
        self.k = k
        self.mode = mode
        #: Every this many pushes the push rebuilds ``total`` exactly from the ring.
        self.refresh_every = k if refresh_every is None else refresh_every
        self.dtype = self.params[0].dtype
        self.param_device = self.params[0].device
        self.numels = [p.numel() for p in self.params]
        self.offsets, self.D = layout(self.numels)
        self.device = history_device(self.param_device, storage)
        pin = storage == "pinned"
        self.pinned = pin
        self.history_dtype = history_dtype or self.dtype
        #: The 8-bit delta-coded format: ``ring`` holds ``k - 1`` delta slots.
        self.int8 = is_int8(self.history_dtype)
        self.block_bases, self.blocks = blocks(self.numels)
        self.ring = (
            torch.zeros(k - self.int8, self.D, dtype=self.history_dtype, device=self.device, pin_memory=pin)
            if mode != "ema"
            else None
        )
        self.scales = (
            torch.zeros(k - 1, self.blocks, dtype=torch.float32, device=self.device, pin_memory=pin)
            if self.int8
            else None
        )
        acc = accumulation_dtype(self.dtype)
        #: mode="phema": one power-function EMA per width (see :mod:`lawa_optim.posthoc`).
        self.emas = (
            torch.zeros(widths, self.D, dtype=acc, device=self.device, pin_memory=pin) if mode == "phema" else None
        )
        # In phema mode no running mean: total is the first width's EMA, what a plain swap writes.
        self.total = self.emas[0] if self.emas is not None else torch.zeros(
            self.D, dtype=acc, device=self.device, pin_memory=pin
        )
        #: mode="phema": EMA updates so far (the step t of EDM2's profiles), and each slot's
        #: (t, width index) or None while empty.
        self.steps = 0
        self.slots: list[tuple[int, int] | None] = [None] * k
        self.pushes = torch.zeros(1, dtype=torch.int64, device=self.device)
        self.backup: Tensor | None = None
        #: The parameters' version counters right after an in-place swap-in (the average
        #: exchanged with the running mean, no backup; -1 where not known); ``None`` when
        #: not so swapped.
        self.exchanged: list[int] | None = None
        self.cache: dict = {}
        #: Whether a snapshot already warned that float16 history stored an infinity.
        self.range_warned = False
        self._ptrs = [p.data_ptr() for p in self.params]
        self._dtypes = [self.dtype] * len(self.params)
        self._strides = [p.stride() for p in self.params]
        self._shapes = [p.shape for p in self.params]
        self.backend = ops.resolve(backend, self)
        # Weights on a GPU, ring in pinned host memory: snapshots copy asynchronously.
        self.offload = Offload(self) if pin and mode == "uniform" and self.param_device.type == "cuda" else None
        self.key = compiled.register(self)

    # A copy (deepcopy, pickle) gets its own key: with the original's, a compiled snapshot
    # of the copy would push the original's weights into the original's history. The
    # pointer tables are the original's addresses: the copy builds its own.
    # A copy's parameters count their versions afresh: it cannot tell a write while
    # swapped from the copying (-1: not known).
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["key"], state["cache"]
        if self.exchanged is not None:
            state["exchanged"] = [-1] * len(self.exchanged)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if state.get("emas") is not None:  # pickle copies tensors one by one: total is emas[0] again
            self.total = self.emas[0]
        self.cache = {}
        self._ptrs = []  # the first check_params looks at every parameter
        self.key = compiled.register(self)

    # -- views ---------------------------------------------------------------
    def view(self, flat: Tensor, i: int, base: int = 0) -> Tensor:
        """Parameter ``i``'s slice of a flat ``(D,)`` buffer (or of a chunk of one
        starting at element ``base``), shaped and strided like the parameter."""
        p = self.params[i]
        return flat.as_strided(p.shape, p.stride(), flat.storage_offset() + self.offsets[i] - base)

    def views(self, flat: Tensor) -> list[Tensor]:
        """Every parameter's slice of a flat ``(D,)`` buffer."""
        return [self.view(flat, i) for i in range(len(self.params))]

    def history_view(self, i: int, rows: Tensor | None = None) -> Tensor:
        """Parameter ``i``'s history as a ``(k, *shape)`` view into the ring (``(k - 1,
        *shape)``: its delta codes, for an 8-bit history; or its slice of another
        ``(rows, D)`` buffer, ``emas``, as ``(rows, *shape)``)."""
        p, buf = self.params[i], self.ring if rows is None else rows
        return buf.as_strided(
            (buf.shape[0], *p.shape), (self.D, *p.stride()), buf.storage_offset() + self.offsets[i]
        )

    def scales_view(self, i: int) -> Tensor:
        """Parameter ``i``'s scales of an 8-bit history: a ``(k - 1, blocks of i)`` view."""
        lo = self.block_bases[i]
        return self.scales[:, lo:lo + param_blocks(self.numels[i])]

    def saved_scales(self, i: int) -> Tensor:
        """Parameter ``i``'s scales as a state dict holds them: :meth:`scales_view`, but
        for a sharded parameter ``(k - 1, local rows, blocks per row)`` (:func:`row_blocks`:
        its blocks are row chunks), the local part of a tensor laid out like the rows."""
        if not is_sharded(self.sources[i]):
            return self.scales_view(i)
        per_row, rows = row_blocks(self.sources[i].shape), self.params[i].shape[0]
        lo = self.block_bases[i]
        return self.scales[:, lo:lo + rows * per_row].unflatten(1, (rows, per_row))

    # -- bookkeeping ---------------------------------------------------------
    def count(self) -> int:
        """Snapshots the average holds now (reads the device counter: a sync on GPU)."""
        self.wait()
        n = int(self.pushes.item())
        return n if self.mode == "ema" else min(n, self.k)

    def wait(self) -> None:
        """Finish a snapshot still on its way into a pinned history; a no-op otherwise."""
        if self.offload is not None:
            self.offload.wait()

    def memory(self) -> Memory:
        """Bytes held by this bucket's buffers, by kind."""
        # The anchor of an 8-bit history is its newest snapshot: history, not a sum.
        anchor = _nbytes(self.total) if self.int8 else 0
        return Memory(
            parameters=sum(self.numels),
            history=_nbytes(self.ring) + _nbytes(self.pushes) + anchor,
            sum=_nbytes(self.total if self.emas is None else self.emas) - anchor,
            scales=_nbytes(self.scales),
            staging=self.offload.nbytes() if self.offload is not None else 0,
            backup=0 if in_ring(self, self.backup) else _nbytes(self.backup),
        )

    def check_params(self) -> None:
        """Notice parameters whose storage was replaced (``p.data = ...``, ``module.to``).

        Backends cache raw pointers, so a moved parameter must clear the cache; a
        parameter whose dtype, shape, layout or device changed no longer fits the
        history and raises ``RuntimeError``. The dtype is compared on every call (a
        ``bfloat16`` weight viewed as ``float16`` keeps its address).
        """
        if self.sharded:
            # FSDP2 may point a DTensor at a new local tensor (lazy init, state loading).
            self.params = [local(p) for p in self.sources]
        watched = self.params + [local(a) for a in self.aliases]
        try:
            ptrs = list(map(Tensor.data_ptr, watched))
        except RuntimeError:  # a parameter made sparse has no storage: the loop names it
            ptrs = None
        if ptrs == self._ptrs and list(map(_dtype_of, watched)) == self._dtypes:
            return
        for i, p in enumerate(self.params):
            fits = (
                p.layout == torch.strided
                and p.dtype == self.dtype
                and p.device == self.param_device
                and p.shape == self._shapes[i]
                and p.stride() == self._strides[i]
            )
            if not fits:
                raise RuntimeError(
                    f"parameter {i} of a LAWA bucket changed dtype, shape, layout or device since the "
                    f"history was built "
                    f"(was {self.dtype}, shape {tuple(self._shapes[i])}, stride {self._strides[i]} on "
                    f"{self.param_device}; now {_describe(p)}); the history holds it as it was. "
                    "Convert the model back (e.g. `model.float()`), or build a new LAWA optimizer "
                    "after converting, moving or reshaping the model"
                )
        if self.sharing is not None:
            self.sharing.check()
        self._ptrs = ptrs
        self._dtypes = [self.dtype] * len(watched)
        self.cache.clear()


_dtype_of = operator.attrgetter("dtype")


def param_blocks(numel: int) -> int:
    """Quantisation blocks of a parameter of ``numel`` elements."""
    return -(-max(numel, 1) // QBLOCK)


def in_ring(b: "Bucket", t: Tensor | None) -> bool:
    """Whether ``t`` is a view of ``b``'s ring (a backup that is the newest slot)."""
    return t is not None and b.ring is not None and t.untyped_storage().data_ptr() == b.ring.untyped_storage().data_ptr()


def _nbytes(t: Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _describe(p: Tensor) -> str:
    layout = f"shape {tuple(p.shape)}, stride {p.stride()}" if p.layout == torch.strided else f"layout {p.layout}"
    return f"{p.dtype}, {layout} on {p.device}"


def history_device(param_device: torch.device, storage: str) -> torch.device:
    """Where the history of parameters on ``param_device`` lives."""
    return param_device if storage == "device" else torch.device("cpu")


def _bucket_params(params: Sequence[Tensor], history_dtype: torch.dtype | None) -> list[tuple[torch.dtype | None, list[Tensor]]]:
    """The parameters grouped by device, dtype and :func:`history_format`, with the format."""
    groups: dict[tuple, list[Tensor]] = {}
    for p in params:
        groups.setdefault((p.device, p.dtype, history_format(p, history_dtype)), []).append(p)
    return [(key[2], ps) for key, ps in groups.items()]


Position = tuple[int, int]  # (param group, index in the group)


def parameter_owners(param_groups: Sequence[dict]) -> list[list[Position]]:
    """Which entry of ``param_groups`` holds each parameter's history: LAWA counts a
    parameter once, by its memory.

    Two entries are one parameter when they are the same tensor, or when they cover the
    same bytes of one device with the same dtype, shape and strides (``SGD([p, p])``, a
    tied weight listed twice, two ``Parameter`` objects viewing one storage). The first
    of them in ``param_groups`` order owns the slice; the others are aliases. Returns,
    per group and index, the position ``(group, index)`` of the entry's owner (its own
    position for an owner). Raises ``RuntimeError`` naming both entries when two of them
    share memory in any other way (overlapping bytes, or the same bytes seen with
    another dtype, shape or strides): no average can be written into both.
    """
    owners: list[list[Position]] = []
    first: dict[int, Position] = {}
    spans = []
    for g, group in enumerate(param_groups):
        row = []
        for i, p in enumerate(group["params"]):
            pos = first.setdefault(id(p), (g, i))
            row.append(pos)
            t = local(p)
            if pos == (g, i) and t.numel() > 0:  # an empty tensor shares no byte
                start = t.data_ptr()
                spans.append((str(t.device), start, start + t.numel() * t.element_size(), g, i, t))
        owners.append(row)
    spans.sort(key=lambda s: (s[0], s[1], -s[2], s[3], s[4]))
    reach = None  # of the spans seen on this device, the one reaching furthest
    for span in spans:
        device, start, end, g, i, t = span
        if reach is None or reach[0] != device or start >= reach[2]:
            reach = span
            continue
        _, _, _, h, j, u = reach
        if (start, end, t.dtype, t.shape, t.stride()) != (reach[1], reach[2], u.dtype, u.shape, u.stride()):
            a, b = sorted([(g, i, t), (h, j, u)], key=lambda x: x[:2])
            raise RuntimeError(
                f"{_where(*a)} and {_where(*b)} share memory on {device} without being the "
                "same parameter (overlapping bytes, or the same bytes with another dtype, shape "
                "or strides); LAWA counts a parameter once by its memory and cannot write an "
                "average into both: give each parameter memory of its own (e.g. "
                "`p.data = p.data.clone()`), or pass the optimizer only one of them"
            )
        owners[g][i] = owners[h][j]
    return owners


def _where(g: int, i: int, t: Tensor) -> str:
    return f"parameter {i} of param group {g} ({t.dtype}, shape {tuple(t.shape)}, stride {t.stride()})"


class Sharing:
    """Which built parameters share memory (:func:`parameter_owners`), kept by the history
    and checked again by every bucket that notices a moved parameter: the layout holds
    one slice per owner, so a change in who shares with whom no longer fits it."""

    def __init__(self) -> None:
        self.groups: list[list[Tensor]] = []  # the parameters of each built group
        self.owners: list[list[Position]] = []

    def extend(self, new: Sequence[dict]) -> list[list[Position]]:
        """The owners of the built groups followed by ``new``; raises (changing nothing)
        when they share memory in a way the rule refuses or the history cannot hold."""
        owners = parameter_owners([{"params": ps} for ps in self.groups] + list(new))
        self._compare(owners[: len(self.groups)])
        built = len(self.groups)
        for g, row in enumerate(owners[built:], built):
            for i, (h, j) in enumerate(row):
                if h < built:
                    raise RuntimeError(
                        f"parameter {i} of param group {g} shares the memory of parameter {j} of "
                        f"param group {h}, whose history was built before: a parameter joins "
                        "the history once, with its first param group; leave it out of the "
                        "added group"
                    )
        return owners

    def check(self) -> None:
        """Raise ``RuntimeError`` when the built parameters no longer share memory as
        they did when the history was built."""
        self._compare(parameter_owners([{"params": ps} for ps in self.groups]))

    def _compare(self, owners: list[list[Position]]) -> None:
        for g, (now, then) in enumerate(zip(owners, self.owners)):
            for i, (a, b) in enumerate(zip(now, then)):
                if a != b:
                    raise RuntimeError(
                        f"parameter {i} of param group {g} shared memory with "
                        f"{_owner(b, (g, i))} when the LAWA history was built and now shares it "
                        f"with {_owner(a, (g, i))}; the history holds one slice per memory as it "
                        "was: undo the change, or build a new LAWA optimizer after it"
                    )


def _owner(owner: Position, pos: Position) -> str:
    return "no other parameter" if owner == pos else f"parameter {owner[1]} of param group {owner[0]}"


def check_history_dtype(history_dtype: Any, mode: str) -> None:
    """Raise ``ValueError`` for a ``history_dtype`` that ``mode`` cannot keep."""
    if history_dtype is not None and history_dtype not in HISTORY_DTYPES:
        raise ValueError(f"history_dtype must be None or one of {HISTORY_DTYPES}, got {history_dtype!r}")
    if is_int8(history_dtype) and mode == "ema":
        raise ValueError(
            "history_dtype=torch.int8 stores the ring of snapshots in 8 bits, but mode='ema' "
            "keeps no ring (only its running average, in float32); use mode='uniform' for an "
            "8-bit history, or history_dtype=None"
        )
    if is_int8(history_dtype) and mode != "uniform":
        raise ValueError(
            f"history_dtype=torch.int8 is the 8-bit ring of mode='uniform'; mode={mode!r} stores "
            "snapshots of its float32 EMAs and fits widths from them, which it does not do from "
            "8-bit deltas: use history_dtype=None or torch.bfloat16 with it"
        )


def check_dtype(p: Tensor, where: str, history_dtype: torch.dtype | None = None) -> None:
    """Raise a clear error for a parameter dtype the history (of ``history_dtype``) cannot
    hold; reads only the dtype, so meta tensors can be checked too."""
    if p.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{where} has dtype {p.dtype}; LAWA averages floating-point parameters only "
            f"(accepted: {', '.join(str(d) for d in FLOAT_DTYPES)})"
        )
    if is_int8(history_dtype) and p.dtype == torch.float64:
        raise ValueError(
            f"{where} is float64, which history_dtype=torch.int8 does not hold (its anchor and "
            "scales are float32): use history_dtype=None for float64 parameters"
        )


def check_param(p: Tensor, where: str, history_dtype: torch.dtype | None = None) -> None:
    """Raise a clear error for a parameter the history (of ``history_dtype``) cannot hold."""
    if not isinstance(p, Tensor):
        raise TypeError(f"{where}: expected a torch.Tensor, got {type(p).__name__}")
    check_dtype(p, where, history_dtype)
    history_format(p, history_dtype, where)
    p = local(p)
    if p.layout != torch.strided:
        raise ValueError(
            f"{where} is a sparse tensor (layout {p.layout}); LAWA averages dense (strided) "
            "parameters only: make the parameter dense, or leave it out of the optimizer that "
            "LAWA wraps"
        )
    if p.device.type == "meta":
        raise ValueError(
            f"{where} is on the meta device and holds no values to average; materialise the "
            "model first (e.g. `model.to_empty(device=...)` and initialise it), then build the "
            "optimizer"
        )
    if not is_dense(p):
        raise ValueError(
            f"{where} (shape {tuple(p.shape)}, stride {p.stride()}) does not cover a dense block "
            "of memory; make it contiguous (e.g. `p.data = p.data.contiguous()`) before wrapping"
        )


_pinned_warned = False


def resolve_storage(storage: str) -> str:
    """``"pinned"`` needs CUDA; without it, warn once and use ``"cpu"``."""
    global _pinned_warned
    if storage == "pinned" and not torch.cuda.is_available():
        if not _pinned_warned:
            warnings.warn(
                "storage='pinned' needs CUDA, which is not available; keeping the history in "
                "ordinary host memory (storage='cpu') instead",
                stacklevel=3,
            )
            _pinned_warned = True
        return "cpu"
    return storage


#: float16's largest finite value; a finite value of magnitude FLOAT16_OVERFLOW or more
#: rounds to infinity in float16.
FLOAT16_MAX, FLOAT16_OVERFLOW = 65504.0, 65520.0


def warn_float16_overflow(b: Bucket) -> None:
    """Warn, once per bucket, at a snapshot of wider parameters into float16 history that
    stores an infinity for a finite weight. One more read of the weights and a host sync
    per snapshot, in this configuration only."""
    peak = torch.stack(torch._foreach_norm(b.params, math.inf)).max() if b.params else None
    if peak is None or float(peak) < FLOAT16_OVERFLOW:
        return
    over = sum(int(((p.abs() >= FLOAT16_OVERFLOW) & p.isfinite()).sum()) for p in b.params)
    if over == 0:  # the peak is an infinity of the weights themselves: stored as it is
        return
    b.range_warned = True
    largest = max(float(p.abs().masked_fill(~p.isfinite(), 0).max()) for p in b.params if p.numel())
    warnings.warn(
        f"LAWA snapshot {int(b.pushes.item()) + 1} stores {over} finite weight element(s) as "
        f"infinity: history_dtype=torch.float16 holds magnitudes up to {FLOAT16_MAX:g} (its "
        f"largest finite value) and these weights reach {largest:.6g}, so averages over the "
        "windows that hold this snapshot are infinite there. Use history_dtype=torch.bfloat16 "
        "(float32's range at the same memory) or None; this is the only such warning for "
        "these parameters",
        RuntimeWarning,
        stacklevel=2,
    )


#: Elements compared at a time by :func:`_newest_holds_the_weights` (bounded temporaries).
COMPARE_PIECE = 1 << 18


def _newest_holds_the_weights(b: Bucket) -> bool:
    """Whether the newest ring slot holds every parameter's bits (the history stores the
    parameters' dtype, on their device, and nothing wrote into them since the snapshot):
    then it is their backup. Compared bit for bit, piece by piece (version counters miss
    writes through ``.data``)."""
    if b.ring is None or b.history_dtype != b.dtype or b.device != b.param_device:
        return False
    n = int(b.pushes.item())
    if n == 0:
        return False
    slot = b.ring[(n - 1) % b.k]
    ints = {8: torch.int64, 4: torch.int32, 2: torch.int16}[b.dtype.itemsize]
    for p, off, size in zip(b.params, b.offsets, b.numels):
        flat = p.detach().as_strided((size,), (1,), p.storage_offset()).view(ints)
        kept = slot[off:off + size].view(ints)
        for lo in range(0, size, COMPARE_PIECE):
            if not torch.equal(flat[lo:lo + COMPARE_PIECE], kept[lo:lo + COMPARE_PIECE]):
                return False
    return True


def _finite(t: Tensor) -> bool:
    """Whether every element of ``t`` is finite: one read, no temporary of its size (on
    the CPU not even the code pages a first torch reduction maps)."""
    finite = cpu_kernels.all_finite(t)
    if finite is None:
        lo, hi = torch.aminmax(t)
        finite = bool(torch.isfinite(lo) & torch.isfinite(hi))
    return finite


def snapshot_bucket(b: Bucket, decay: float | None) -> None:
    """One bucket's snapshot: push into the ring (``decay=None``; nothing in EMA mode) or
    fold into the exponential average with ``decay``. The caller has run
    :meth:`Bucket.check_params`."""
    if decay is not None:
        ops.ema_update(b, decay)
    elif b.mode == "uniform":
        if b.history_dtype == torch.float16 and b.dtype != torch.float16 and not b.range_warned:
            warn_float16_overflow(b)
        if b.offload is not None:
            b.offload.push()
        else:
            ops.push(b)


class History:
    """All buckets of one LAWA optimizer, built generation by generation.

    The parameter groups present when the history is first built form generation 0;
    groups added later with ``add_param_group`` form a new generation at the next
    build, with their own snapshot counter (they join the average from their first
    snapshot on).
    """

    def __init__(
        self,
        k: int,
        mode: str,
        history_dtype: torch.dtype | None,
        storage: str,
        backend: str,
        recompute_every: int | None,
        sigma_rels: tuple[float, ...] = (),
    ) -> None:
        self.k = k
        self.mode = mode
        #: mode="phema": the widths of the EMAs kept, in the order they are pushed.
        self.sigma_rels = sigma_rels
        self.history_dtype = history_dtype
        self.storage = storage
        self.requested_backend = backend
        self.recompute_every = recompute_every  # None: every k pushes
        self.generations: list[list[Bucket]] = []
        self.group_generation: list[int] = []  # generation of each built param group
        self.sharing = Sharing()

    @property
    def group_params(self) -> list[list[Tensor]]:
        """The parameters of each built group, aliases included."""
        return self.sharing.groups

    @property
    def buckets(self) -> list[Bucket]:
        return [b for gen in self.generations for b in gen]

    def extend(self, param_groups: Sequence[dict]) -> None:
        """Build buckets for the parameter groups not yet in the history."""
        new = param_groups[len(self.group_generation):]
        if new:
            self._add_generation(new)

    # Allocating inside a compiled region would make the buffers graph temporaries: build
    # eagerly (one graph break, once), so compiled snapshots find them allocated.
    @torch.compiler.disable
    def _add_generation(self, new: Sequence[dict]) -> None:
        sharing = self.sharing
        built = len(sharing.groups)
        owners = sharing.extend(new)
        # An alias has no slice: only the owner of each memory joins a bucket.
        params = [
            p for g, group in enumerate(new, built)
            for i, p in enumerate(group["params"]) if owners[g][i] == (g, i)
        ]
        buckets = [
            Bucket(
                ps, self.k, self.mode, fmt, self.storage, self.requested_backend,
                self.recompute_every, sharing, widths=len(self.sigma_rels),
            )
            for fmt, ps in _bucket_params(params, self.history_dtype)
        ]
        self.group_generation.extend([len(self.generations)] * len(new))
        sharing.groups.extend(list(g["params"]) for g in new)
        sharing.owners = owners
        self.generations.append(buckets)
        bucket_of = {id(p): b for b in buckets for p in b.sources}
        for alias, owner in self.aliases():
            b = bucket_of.get(id(owner))
            if b is not None:
                b.aliases.append(alias)

    def placed(self) -> list[list[tuple[Bucket, int]]]:
        """Per built group and index: the bucket and the index in it of the slice that
        holds the parameter (its owner's, for an alias)."""
        at = {id(p): (b, i) for b in self.buckets for i, p in enumerate(b.sources)}
        groups = self.sharing.groups
        return [[at[id(groups[h][j])] for h, j in row] for row in self.sharing.owners]

    def aliases(self) -> list[tuple[Tensor, Tensor]]:
        """``(alias, owner)`` for every built parameter that is another tensor than the
        owner of its memory (the same tensor listed twice is not one)."""
        groups = self.sharing.groups
        return [
            (groups[g][i], groups[h][j])
            for g, row in enumerate(self.sharing.owners)
            for i, (h, j) in enumerate(row)
            if groups[g][i] is not groups[h][j]
        ]

    def check_groups(self, param_groups: Sequence[dict]) -> None:
        """Raise ``RuntimeError`` when a parameter of the history was removed from or
        replaced in ``param_groups``: the history would go on averaging a tensor the
        optimizer no longer trains, and never the one that took its place."""
        if len(param_groups) < len(self.group_params):
            raise RuntimeError(
                f"param groups were removed from the optimizer after the LAWA history was built "
                f"({len(self.group_params)} groups then, {len(param_groups)} now); the history "
                "cannot follow: build a new LAWA optimizer (groups can be added with "
                "add_param_group)"
            )
        for g, (group, built) in enumerate(zip(param_groups, self.group_params)):
            live = group["params"]
            if len(live) == len(built) and all(map(operator.is_, live, built)):
                continue
            i = next(
                (i for i, (a, b) in enumerate(zip(live, built)) if a is not b),
                min(len(live), len(built)),
            )
            raise RuntimeError(
                f"parameter {i} of param group {g} was removed from or replaced in the "
                f"optimizer's param_groups after the LAWA history was built (the group had "
                f"{len(built)} parameters then, {len(live)} now); the history cannot follow: "
                "build a new LAWA optimizer (parameters can be added with add_param_group)"
            )

    def push(self) -> None:
        """Record the current weights of every built parameter: one fused pass per bucket."""
        self._snapshot(None)

    def push_ema(self, decay: float) -> None:
        """Fold the current weights into the exponential average."""
        self._snapshot(decay)

    @torch.no_grad()
    def _snapshot(self, decay: float | None) -> None:
        buckets = self.buckets
        if torch.compiler.is_compiling():
            for b in buckets:
                compiled.snapshot(b, decay)
            return
        # Every bucket is checked before any is pushed: a refusal leaves all counts equal.
        for b in buckets:
            b.check_params()
        for b in buckets:
            snapshot_bucket(b, decay)

    @staticmethod
    @torch.no_grad()
    def recompute(b: Bucket) -> None:
        """Rebuild ``total`` exactly from the ring."""
        b.wait()
        if b.mode == "uniform":
            ops.recompute(b)

    def backend_names(self, param_groups: Sequence[dict]) -> list[str]:
        """Backends of the built buckets, and those that groups not yet built will get."""
        names = [b.backend for b in self.buckets]
        pending = [p for g in param_groups[len(self.group_generation):] for p in g["params"]]
        for fmt, ps in _bucket_params(pending, self.history_dtype):
            probe = SimpleNamespace(
                device=history_device(ps[0].device, self.storage),
                param_device=ps[0].device,
                dtype=ps[0].dtype,
                history_dtype=fmt or ps[0].dtype,
            )
            names.append(ops.resolve(self.requested_backend, probe))
        return names

    def counts(self) -> list[int]:
        """Snapshot count of every generation (0 for none, and for a generation of empty
        param groups)."""
        return [gen[0].count() if gen else 0 for gen in self.generations]

    def held(self) -> int:
        """Snapshots the oldest generation holding parameters has: later ones joined later
        and hold no more."""
        return max(self.counts(), default=0)

    @torch.no_grad()
    def swap_in(
        self,
        last: int | None,
        weights: tuple[float, ...] | None = None,
        fitted: dict[Bucket, tuple[float, ...]] | None = None,
        backup: str | None = None,
    ) -> None:
        """Write the average into the parameters in place, keeping the training weights:
        the weighted sum of the newest snapshots with ``weights`` (checked by
        :func:`lawa_optim.weighting.parse`; a generation holding fewer snapshots takes
        :func:`lawa_optim.weighting.fit` of them), or with each bucket's own coefficients
        ``fitted`` (the buckets left out keep their weights). In phema mode without
        either, the live EMA of the first width.

        The full average (``last``, ``weights`` and ``fitted`` None) of float32, bfloat16
        and float64 parameters is exchanged with the running mean (the EMA in EMA mode, the
        first width's in phema mode) where it is finite, allocating nothing. Otherwise the newest ring slot is the backup where it holds the weights
        bit for bit (right after a snapshot into a history of their dtype), and else, or
        with ``backup`` (``"device"``: beside the parameters, ``"cpu"``: in host memory),
        the weights are copied into a new backup first (on the history's device when
        ``backup`` is None). Every bucket is checked and every
        backup allocated before the first weight is written, so a refusal or an
        allocation failure leaves the training weights in place; a kernel that refuses
        a bucket (writing nothing) has the buckets swapped before it swapped back.
        """
        self.reshard()
        if fitted is not None:
            held = [(b, len(c)) for b, c in fitted.items()]
        elif self.mode == "phema" and weights is None:
            held = [(b, b.steps) for b in self.buckets if b.steps > 0]
        else:
            held = [(b, b.count()) for b in self.buckets]
            held = [(b, n) for b, n in held if n > 0]
        for b, _ in held:
            b.check_params()
        if fitted is not None:
            coefficients = {b: torch.tensor(c, dtype=b.total.dtype, device=b.device) for b, c in fitted.items()}
        else:
            coefficients = {} if weights is None else self._coefficients(weights, held)
        full = last is None and weights is None and fitted is None
        plans = [self._backup_for(b, full, backup) for b, _ in held]
        done = []
        try:
            for (b, n), plan in zip(held, plans):
                self._swap_bucket(b, n, last, coefficients.get(b), plan)
                done.append(b)
        except BaseException:
            # A kernel that refused a bucket wrote nothing in it: undo the buckets before it.
            for b in done:
                self._unswap(b)
            raise

    @staticmethod
    def _backup_for(b: Bucket, full: bool, backup: str | None) -> Tensor | None:
        """The backup buffer a swap of ``b`` (of the ``full`` average, or not) needs:
        ``None`` for the in-place swap, the newest ring slot where it holds the weights bit
        for bit, else a new buffer."""
        if backup is None and full and ops.exchanges(b) and _finite(b.total):
            return None
        if backup is None and _newest_holds_the_weights(b):
            return b.ring[(int(b.pushes.item()) - 1) % b.k]
        if backup == "cpu":
            pin = b.param_device.type == "cuda"
            return torch.empty(b.D, dtype=b.dtype, device="cpu", pin_memory=pin)
        device = b.param_device if backup == "device" else b.device
        return torch.empty(b.D, dtype=b.dtype, device=device, pin_memory=b.pinned and device == b.device)

    @staticmethod
    def _swap_bucket(b: Bucket, n: int, last: int | None, coefficients: Tensor | None, backup: Tensor | None) -> None:
        b.backup = backup
        try:
            if coefficients is not None:
                ops.swap_in(b, None, coefficients)
            else:
                ops.swap_in(b, None if last is None else min(last, n))
        except BaseException:
            b.backup = None
            raise
        if backup is None:
            b.exchanged = [p._version for p in b.params]

    def _coefficients(self, weights: tuple[float, ...], held: list[tuple[Bucket, int]]) -> dict[Bucket, Tensor]:
        """Each held bucket's coefficients in its accumulation dtype, on its device."""
        generation = {b: g for g, gen in enumerate(self.generations) for b in gen}
        out = {}
        for b, n in held:
            g = generation[b]
            groups = [str(i) for i, x in enumerate(self.group_generation) if x == g]
            where = f"param group{'s' * (len(groups) > 1)} {', '.join(groups)}"
            fitted = weighting.fit(weights, n, where)
            out[b] = torch.tensor(fitted, dtype=b.total.dtype, device=b.device)
        return out

    @torch.no_grad()
    def swap_back(self) -> None:
        """Restore the training weights bit for bit and free the backups."""
        self.reshard()
        swapped = self.swapped()
        for b in swapped:
            b.check_params()  # fused backends write through cached addresses
        for b in swapped:
            self._unswap(b)

    def swapped(self) -> list[Bucket]:
        """The buckets holding an average."""
        return [b for b in self.buckets if b.backup is not None or b.exchanged is not None]

    @staticmethod
    def _unswap(b: Bucket) -> None:
        written = b.exchanged is not None and any(
            v not in (-1, p._version) for v, p in zip(b.exchanged, b.params)
        )
        ops.swap_back(b)
        b.backup = b.exchanged = None
        if written:
            # Written while swapped: the training weights came back whole, but the mean's
            # high half (bfloat16) or all of it (float32) came from what was written.
            if b.mode == "uniform":
                History.recompute(b)
                what = "the running mean was rebuilt from the stored snapshots (a refresh)"
            else:
                what = "the EMA now holds what was written into them (its low half for bfloat16)"
            warnings.warn(
                f"the parameters were written while the average was swapped in: {what}. Write "
                "into the averaged parameters only after swap_to_average(backup='device'), "
                "whose swap keeps the history untouched",
                RuntimeWarning,
                stacklevel=4,
            )

    @torch.no_grad()
    def set_aside(self) -> list[tuple[Bucket, Tensor | None, Tensor | None]]:
        """Put the training weights back into swapped parameters, keeping what they held
        (the average, whatever ``last`` made it) for :meth:`restore`: ``(bucket, a copy of
        it, the backup buffer)`` per swapped bucket; ``(bucket, None, None)`` for a bucket
        swapped in place, which :meth:`restore` swaps in again (nothing to copy)."""
        self.reshard()
        swapped = self.swapped()
        for b in swapped:
            b.check_params()
        held = [(b, None, None) if b.backup is None else (b, torch.empty(b.D, dtype=b.dtype, device=b.backup.device), b.backup)
                for b in swapped]
        for b, average, backup in held:
            if backup is None:
                self._unswap(b)
                continue
            torch._foreach_copy_(b.views(average), b.params)
            torch._foreach_copy_(b.params, b.views(backup))
            b.backup = None
        return held

    @torch.no_grad()
    def restore(self, held: list[tuple[Bucket, Tensor | None, Tensor | None]]) -> None:
        """Undo :meth:`set_aside`: the parameters' values now become the backup, and the
        copy set aside goes back into the parameters bit for bit (a bucket swapped in
        place swaps the full average in again)."""
        self.reshard()
        for b, _, _ in held:
            b.check_params()
        # A backup that was the newest ring slot serves again only if it still holds what the
        # parameters hold now (the block may have changed them): the ring is never written.
        plans = [
            self._backup_for(b, average is None, None) if average is None or in_ring(b, backup) else backup
            for b, average, backup in held
        ]
        for (b, average, _), plan in zip(held, plans):
            if average is None:
                self._swap_bucket(b, b.count(), None, None, plan)
                continue
            torch._foreach_copy_(b.views(plan), b.params)
            torch._foreach_copy_(b.params, b.views(average))
            b.backup = plan

    def reshard(self) -> None:
        """Make FSDP2 modules read their shards again before a swap writes them (see
        :func:`lawa_optim.distributed.reshard_fsdp`)."""
        sharded = [p for b in self.buckets if b.sharded for p in b.sources]
        if sharded:
            reshard_fsdp(sharded)

    def before_step(self) -> None:
        """Make the optimizer step that follows wait for snapshots still copying off the
        device (pinned storage); nothing for other storages."""
        for b in self.buckets:
            if b.offload is not None:
                b.offload.before_step()

    def memory(self) -> Memory:
        """Bytes held by every bucket, by kind."""
        return sum((b.memory() for b in self.buckets), Memory())
