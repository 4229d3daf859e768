"""The flat ring-buffer history behind LAWA (Kaddour 2022, arXiv:2209.14981).

Parameters are grouped into buckets that share a device and a dtype. A bucket keeps

* ``ring``: ``(k, D)`` in the history dtype, one row ("slot") per snapshot;
* ``total``: ``(D,)`` running sum of the filled slots *as stored* (float32; float64
  for float64 parameters), or the exponential average itself in EMA mode;
* ``pushes``: a one-element int64 tensor beside the ring counting snapshots ever
  pushed. Slot ``s`` holds the snapshot number ``n`` with ``n % k == s``, the next
  push writes slot ``pushes % k`` and ``min(pushes, k)`` slots are filled. It lives on
  the device (not in a Python int) so kernels read it without a host sync.

The O(1) update ``total += new - old`` cancels catastrophically when magnitudes
change (two snapshots at 1e8 then two at 1.0 leave 0.0 for k = 2) and keeps a NaN
forever. So every ``refresh_every``-th push (default: every k-th, the one that
completes a pass over the ring) rebuilds ``total`` exactly from the ring instead, in
the same pass. The kernels decide that from ``pushes`` on the device, so compiled
and graph-captured snapshots refresh at the right push too. Hence the guarantee: at
most ``refresh_every`` snapshots after a value has left the window it no longer
affects the average, which is then the mean of the stored window up to float32
rounding of k terms.

Each parameter owns a slice of the flat buffers that starts on a multiple of
``ALIGN`` elements and holds its elements in the parameter's *memory* order, so a
snapshot of a ``channels_last`` weight is a plain linear copy for every backend.

The kernels themselves live in :mod:`lawa_optim.ops`; this module only lays out
memory and keeps the bookkeeping (which buckets exist, whether parameters moved).
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from lawa_optim import compiled, ops, weighting
from lawa_optim.distributed import is_sharded, local, reshard_fsdp
from lawa_optim.memory import Memory
from lawa_optim.offload import Offload

#: Slice alignment in elements: 128 bytes for 2-byte dtypes, 256 for float32.
ALIGN = 64

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


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
    """Dtype of the running sum for parameters of ``dtype``."""
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
        widths: int = 0,
    ) -> None:
        self.sources = list(params)
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
        self.ring = (
            torch.zeros(k, self.D, dtype=self.history_dtype, device=self.device, pin_memory=pin)
            if mode != "ema"
            else None
        )
        acc = accumulation_dtype(self.dtype)
        #: mode="phema": one power-function EMA per width (see :mod:`lawa_optim.posthoc`).
        self.emas = (
            torch.zeros(widths, self.D, dtype=acc, device=self.device, pin_memory=pin) if mode == "phema" else None
        )
        # In phema mode no running sum: total is the first width's EMA, what a plain swap writes.
        self.total = self.emas[0] if self.emas is not None else torch.zeros(
            self.D, dtype=acc, device=self.device, pin_memory=pin
        )
        #: mode="phema": EMA updates so far (the step t of EDM2's profiles), and each slot's
        #: (t, width index) or None while empty.
        self.steps = 0
        self.slots: list[tuple[int, int] | None] = [None] * k
        self.pushes = torch.zeros(1, dtype=torch.int64, device=self.device)
        self.backup: Tensor | None = None
        self.cache: dict = {}
        self._ptrs = [p.data_ptr() for p in self.params]
        self._dtypes = [self.dtype] * len(self.params)
        self._strides = [p.stride() for p in self.params]
        self.backend = ops.resolve(backend, self)
        # Weights on a GPU, ring in pinned host memory: snapshots copy asynchronously.
        self.offload = Offload(self) if pin and mode == "uniform" and self.param_device.type == "cuda" else None
        self.key = compiled.register(self)

    # A copy (deepcopy, pickle) gets its own key: with the original's, a compiled snapshot
    # of the copy would push the original's weights into the original's history. The
    # pointer tables are the original's addresses: the copy builds its own.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["key"], state["cache"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
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
        """Parameter ``i``'s history as a ``(k, *shape)`` view into the ring (or its slice
        of another ``(rows, D)`` buffer, ``emas``, as ``(rows, *shape)``)."""
        p, buf = self.params[i], self.ring if rows is None else rows
        return buf.as_strided(
            (buf.shape[0], *p.shape), (self.D, *p.stride()), buf.storage_offset() + self.offsets[i]
        )

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
        return Memory(
            parameters=sum(self.numels),
            history=_nbytes(self.ring) + _nbytes(self.pushes),
            sum=_nbytes(self.total if self.emas is None else self.emas),
            staging=self.offload.nbytes() if self.offload is not None else 0,
            backup=_nbytes(self.backup),
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
        try:
            ptrs = list(map(Tensor.data_ptr, self.params))
        except RuntimeError:  # a parameter made sparse has no storage: the loop names it
            ptrs = None
        if ptrs == self._ptrs and list(map(_dtype_of, self.params)) == self._dtypes:
            return
        for i, p in enumerate(self.params):
            fits = (
                p.layout == torch.strided
                and p.dtype == self.dtype
                and p.device == self.param_device
                and p.numel() == self.numels[i]
                and p.stride() == self._strides[i]
            )
            if not fits:
                raise RuntimeError(
                    f"parameter {i} of a LAWA bucket changed dtype, shape, layout or device since the "
                    f"history was built "
                    f"(was {self.dtype}, stride {self._strides[i]}, {self.numels[i]} elements on "
                    f"{self.param_device}; now {_describe(p)}); the history holds it as it was. "
                    "Convert the model back (e.g. `model.float()`), or build a new LAWA optimizer "
                    "after converting, moving or reshaping the model"
                )
        self._ptrs = ptrs
        self.cache.clear()


_dtype_of = operator.attrgetter("dtype")


def _nbytes(t: Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _describe(p: Tensor) -> str:
    layout = f"stride {p.stride()}" if p.layout == torch.strided else f"layout {p.layout}"
    return f"{p.dtype}, {layout}, {p.numel()} elements on {p.device}"


def history_device(param_device: torch.device, storage: str) -> torch.device:
    """Where the history of parameters on ``param_device`` lives."""
    return param_device if storage == "device" else torch.device("cpu")


def _bucket_params(params: Sequence[Tensor]) -> list[list[Tensor]]:
    groups: dict[tuple, list[Tensor]] = {}
    for p in params:
        groups.setdefault((p.device, p.dtype), []).append(p)
    return list(groups.values())


def check_param(p: Tensor, where: str) -> None:
    """Raise a clear error for a parameter the history cannot hold."""
    if not isinstance(p, Tensor):
        raise TypeError(f"{where}: expected a torch.Tensor, got {type(p).__name__}")
    if p.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{where} has dtype {p.dtype}; LAWA averages floating-point parameters only "
            f"(accepted: {', '.join(str(d) for d in FLOAT_DTYPES)})"
        )
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


def snapshot_bucket(b: Bucket, decay: float | None) -> None:
    """One bucket's snapshot: push into the ring (``decay=None``; nothing in EMA mode) or
    fold into the exponential average with ``decay``. The caller has run
    :meth:`Bucket.check_params`."""
    if decay is not None:
        ops.ema_update(b, decay)
    elif b.mode == "uniform":
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
        self.group_params: list[list[Tensor]] = []  # the parameters of each built group

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
        params = [p for g in new for p in g["params"]]
        buckets = [
            Bucket(
                ps, self.k, self.mode, self.history_dtype, self.storage, self.requested_backend,
                self.recompute_every, len(self.sigma_rels),
            )
            for ps in _bucket_params(params)
        ]
        self.group_generation.extend([len(self.generations)] * len(new))
        self.group_params.extend(list(g["params"]) for g in new)
        self.generations.append(buckets)

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
        for ps in _bucket_params(pending):
            probe = SimpleNamespace(
                device=history_device(ps[0].device, self.storage),
                param_device=ps[0].device,
                dtype=ps[0].dtype,
                history_dtype=self.history_dtype or ps[0].dtype,
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
    ) -> None:
        """Back up the weights and write the average into the parameters in place: the
        weighted sum of the newest snapshots with ``weights`` (checked by
        :func:`lawa_optim.weighting.parse`; a generation holding fewer snapshots takes
        :func:`lawa_optim.weighting.fit` of them), or with each bucket's own coefficients
        ``fitted`` (the buckets left out keep their weights). In phema mode without
        either, the live EMA of the first width.

        Every bucket is checked and every backup allocated before the first weight is
        written, so a refusal or an allocation failure leaves the training weights in place.
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
        backups = [torch.empty(b.D, dtype=b.dtype, device=b.device, pin_memory=b.pinned) for b, _ in held]
        for (b, n), backup in zip(held, backups):
            b.backup = backup
            if b in coefficients:
                ops.swap_in(b, None, coefficients[b])
            else:
                ops.swap_in(b, None if last is None else min(last, n))

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
        """Restore the backed-up training weights bit for bit and free the backups."""
        self.reshard()
        swapped = [b for b in self.buckets if b.backup is not None]
        for b in swapped:
            b.check_params()  # fused backends write through cached addresses
        for b in swapped:
            ops.swap_back(b)
            b.backup = None

    @torch.no_grad()
    def set_aside(self) -> list[tuple[Bucket, Tensor, Tensor]]:
        """Put the training weights back into swapped parameters, keeping a copy of what
        they held (the average, whatever ``last`` made it) for :meth:`restore`:
        ``(bucket, that copy, the backup buffer)`` per swapped bucket."""
        self.reshard()
        swapped = [b for b in self.buckets if b.backup is not None]
        for b in swapped:
            b.check_params()
        held = [(b, torch.empty_like(b.backup), b.backup) for b in swapped]
        for b, average, backup in held:
            torch._foreach_copy_(b.views(average), b.params)
            torch._foreach_copy_(b.params, b.views(backup))
            b.backup = None
        return held

    @torch.no_grad()
    def restore(self, held: list[tuple[Bucket, Tensor, Tensor]]) -> None:
        """Undo :meth:`set_aside`: the parameters' values now become the backup, and the
        copy set aside goes back into the parameters bit for bit."""
        self.reshard()
        for b, _, _ in held:
            b.check_params()
        for b, average, backup in held:
            torch._foreach_copy_(b.views(backup), b.params)
            torch._foreach_copy_(b.params, b.views(average))
            b.backup = backup

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
