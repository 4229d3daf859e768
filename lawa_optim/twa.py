"""TWA: train the averaging coefficients of the snapshots a LAWA optimizer holds.

Trainable Weight Averaging (Li et al., "Trainable Weight Averaging: Efficient
Training by Optimizing Historical Solutions", ICLR 2023; journal version
"Trainable Weight Averaging: Accelerating Training and Improving Generalization",
arXiv:2205.13104) replaces the fixed 1/k coefficients of a weight average by
trained ones: starting from the plain average of the stored solutions
``w_1..w_n``, training continues inside their linear span, each gradient replaced
by its orthogonal projection ``P^T (P g)`` with ``P`` (r x D) an orthonormal basis of
the span built from the solutions themselves (as in the authors' code, which
orthonormalises the raw solutions, not their differences). Fitting the
coefficients on training data is TWA-t; on held-out data, TWA-v (the journal
version): the optimizer is the same, only the batches differ. The journal version
also learns one coefficient vector per block of layers; ``blocks=`` does that here,
with one span (and one projection) per block.

The snapshots are the ones the history stores: rounded to ``history_dtype``, and for
the 8-bit history (``history_dtype=torch.int8``) rebuilt in float64 from its anchor and
dequantised deltas, as its swaps read them, so they differ from the exact weights by
that history's stated error (README, "An 8-bit history").

With ``torch.optim.SGD`` the weights stay in the span: the projected gradient is in
it, weight decay adds ``wd * theta`` (in it when ``theta`` is), and momentum,
dampening and Nesterov only form linear combinations of such vectors, provided the
momentum buffers start empty: buffers left over from training are not in the span,
so an optimizer that already has state is refused. Optimizers whose update is not
linear in the gradient (Adam, RMSprop, ...) rescale each coordinate and would leave
the span, so they are refused too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import MultiStepLR

from lawa_optim.backends.reference import stored_snapshots
from lawa_optim.history import Bucket, accumulation_dtype, is_int, parameter_owners
from lawa_optim.wrapper import LAWA
from lawa_optim.wrapping import WrappedOptimizer

#: Directions whose singular value is below this fraction of the largest one are
#: dropped from the basis: the float64 Gram matrix resolves eigenvalues down to about
#: 1e-16 of the largest, so singular values down to 1e-6 (eigenvalues 1e-12) are
#: recovered to about 1e-4 relative, and the second pass makes them orthonormal.
RANK_RTOL = 1e-6


@dataclass
class _Segment:
    """The parameters of one block that share one history bucket, laid out back to
    back in memory order (the ring's order) in a flat buffer of ``D`` elements."""

    bucket: Bucket
    index: list[int]  # positions in bucket.params
    offsets: list[int]  # start of each parameter in the segment's flat layout
    D: int
    block: int

    def view(self, flat: Tensor, j: int) -> Tensor:
        """Parameter ``j``'s slice of a flat ``(D,)`` buffer, shaped like the parameter."""
        p = self.bucket.params[self.index[j]]
        return flat.as_strided(p.shape, p.stride(), flat.storage_offset() + self.offsets[j])

    def params(self) -> list[Tensor]:
        return [self.bucket.params[i] for i in self.index]


class TWA(WrappedOptimizer):
    r"""Train the weights inside the span of the snapshots held by ``history``.

    Example::

        lawa = LAWA(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), k=6)
        ...                                 # train, lawa.snapshot() at each epoch end
        twa = TWA(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), history=lawa)
        sched = twa.paper_schedule(total_steps=2 * len(loader))   # optional
        for epoch in range(2):              # the model starts at the average
            for x, y in loader:             # training batches: TWA-t; held-out: TWA-v
                loss_fn(model(x), y).backward()
                twa.step()
                twa.zero_grad()
                sched.step()
        update_bn(loader, model)            # BatchNorm statistics for the new weights

    Args:
        optimizer: a fresh ``torch.optim.SGD`` over exactly the parameters of
            ``history`` (momentum, Nesterov, dampening and weight decay are fine); its
            ``param_groups``, ``state`` and ``defaults`` are shared, not copied. One
            that already has state (the momentum buffers of the training run) is
            refused rather than cleared, so the training optimizer can resume as it was.
            Each memory is listed once (SGD steps every entry, and a weight listed twice
            would move twice as far and leave the span); where ``history`` lists one
            twice, or two tensors on one memory, the first of them stands for it.
        history: a uniform-mode :class:`~lawa_optim.LAWA` holding at least one
            snapshot, with any ``history_dtype`` (the 8-bit one included) and unsharded
            parameters. It is only read: its ring, scales, counters and weights are
            untouched, and it is not stepped.
        last: use only the ``last`` newest snapshots (default: all that
            ``history`` holds). Chosen snapshots that hold a NaN or an infinity are
            refused (``ValueError``): a smaller ``last`` can leave them out.
        blocks: ``None`` (default): one coefficient per snapshot for the whole model
            (the ICLR version). Otherwise a sequence of parameter collections that
            partitions the parameters of ``history`` (each in exactly one block), for
            example ``[list(m.parameters()) for m in model.children()]``: every block
            gets coefficients of its own (the journal version's block-wise TWA), i.e.
            the weights move in the span of each block's slices of the snapshots.

    Creating a TWA writes the mean of the chosen snapshots into the parameters: their
    float64 mean rounded once to the parameters' dtype (overwriting the live weights;
    save them first to keep them). Each :meth:`step`
    replaces every gradient by its projection onto the span of the snapshots, then
    runs the wrapped optimizer's step; a parameter without a gradient counts as a zero
    gradient (its projected gradient is generally not zero, so it is created).
    BatchNorm running statistics are buffers, not parameters: TWA does not touch them,
    so recompute them with :func:`lawa_optim.update_bn` before evaluating the result,
    as the authors do after TWA.
    Memory: the orthonormal basis (r x D with r <= n the rank of the snapshots, per
    block, in float32 for float32/16-bit parameters) and one D-element gradient buffer;
    building the basis holds the n x D float64 snapshots of one block and bucket at a
    time (an 8-bit history's rebuilt into them, with one parameter's delta beside) and
    their r x D combination.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        history: LAWA,
        *,
        last: int | None = None,
        blocks: Sequence[Iterable[Tensor]] | None = None,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not isinstance(optimizer, torch.optim.SGD):
            raise TypeError(
                f"optimizer must be a torch.optim.SGD (with any momentum, dampening, nesterov or "
                f"weight_decay), got {type(optimizer).__name__}: TWA keeps the weights in the span "
                "of the snapshots by projecting the gradient, which only works when the update is "
                "linear in the gradient; adaptive optimizers such as Adam rescale each coordinate"
            )
        filled = sum(1 for s in optimizer.state.values() if s)
        if filled:
            raise ValueError(
                f"optimizer already has state for {filled} parameter(s) (momentum buffers of earlier "
                "steps, e.g. the training run's): they are not in the span of the snapshots and would "
                "carry the weights out of it; pass a fresh torch.optim.SGD over the same parameters"
            )
        if not isinstance(history, LAWA):
            raise TypeError(f"history must be a lawa_optim.LAWA, got {type(history).__name__}")
        if history.mode != "uniform":
            raise ValueError(f"history must be a LAWA with mode='uniform' (it keeps the snapshots), got mode={history.mode!r}")
        if history.is_swapped:
            raise RuntimeError("history holds the average in its parameters; call history.swap_back() first")
        buckets = history._history.buckets
        counts = history._history.counts()
        if not buckets or max(counts) == 0:
            raise RuntimeError("history holds no snapshot yet; call history.snapshot() at least once first")
        if len(set(counts)) != 1:
            raise RuntimeError(
                f"history's parameter groups hold different numbers of snapshots ({counts}): groups added "
                "with add_param_group after the first snapshot have no common span with the others"
            )
        count = counts[0]
        if last is not None and (not is_int(last) or not 1 <= last <= count):
            raise ValueError(f"last must be None or an int in [1, {count}] (the snapshots history holds), got {last!r}")
        if any(b.sharded for b in buckets):
            raise ValueError(
                "history holds sharded (DTensor, e.g. FSDP2) parameters; TWA projects onto the span "
                "of whole snapshots and supports unsharded parameters only"
            )
        for g, row in enumerate(parameter_owners(optimizer.param_groups)):
            for i, (h, j) in enumerate(row):
                if (h, j) != (g, i):
                    raise ValueError(
                        f"optimizer lists the memory of parameter {j} of param group {h} again, as "
                        f"parameter {i} of param group {g}: SGD steps every entry, so that memory would "
                        "move further than the rest of the weights and leave the span of the snapshots; "
                        "list each parameter once"
                    )
        hist_ids = {id(p) for b in buckets for p in b.sources}
        opt_ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
        # An alias in history stands for the parameter that owns its memory.
        sharing = history._history.sharing
        owners = [{"params": [sharing.groups[h][j] for h, j in row]} for row in sharing.owners]
        missing = _outside(owners, opt_ids)
        if missing:
            raise ValueError(
                f"{len(missing)} parameter(s) of history are not in optimizer (the first: {missing[0]}); "
                "TWA needs an optimizer over exactly the parameters of history"
            )
        extra = _outside(optimizer.param_groups, hist_ids)
        if extra:
            raise ValueError(
                f"optimizer has {len(extra)} parameter(s) that history does not hold (the first: {extra[0]}); "
                "they would leave the span, so TWA needs an optimizer over exactly the parameters of history"
            )

        super().__init__(optimizer)
        self.num_snapshots = count if last is None else last
        self._buckets: list[Bucket] = buckets
        self._segments = _segments(buckets, blocks, history._history.aliases())
        self.num_blocks = 1 + max(s.block for s in self._segments)
        self._scaled = False  # whether paper_schedule scaled the learning rate
        self._basis, self._coef = self._orthonormalise()
        self._grads = [torch.zeros(s.D, dtype=accumulation_dtype(s.bucket.dtype), device=s.bucket.param_device)
                       for s in self._segments]
        self._start_at_mean()

    def __repr__(self) -> str:
        return self._repr(f"TWA(snapshots={self.num_snapshots}, blocks={self.num_blocks}, rank={self.rank})")

    @property
    def rank(self) -> int:
        """Dimension of the trainable subspace: the rank of the snapshots, summed over blocks."""
        return sum(c.shape[0] for c in self._coef)

    # -- set-up -------------------------------------------------------------------
    def _snapshots(self, s: _Segment) -> Tensor:
        """Segment ``s``'s slices of the chosen stored snapshots as an (n, D_s) float64
        matrix (an 8-bit history's reconstructed ones); ``ValueError`` where one holds a
        NaN or an infinity, before anything is written."""
        b, n = s.bucket, self.num_snapshots
        rows = stored_snapshots(b, s.index, n, b.param_device)
        bad = [j for j in range(n) if not bool(rows[j].isfinite().all())]
        if bad:
            shape = next(tuple(b.params[i].shape) for i, lo in zip(s.index, s.offsets)
                         if not bool(rows[:, lo:lo + b.numels[i]].isfinite().all()))
            remedy = (f"last={bad[0]} chooses only the newer ones" if bad[0] else
                      "the newest holds one too: train on and snapshot finite weights")
            raise ValueError(
                f"snapshot(s) {bad} (0 the newest) of the {n} chosen hold a NaN or an infinity (in a "
                f"parameter of shape {shape}), whose span TWA cannot train in; an 8-bit history reads "
                f"as NaN, in a block restarted by a non-finite delta, in every snapshot before the "
                f"restart; {remedy}"
            )
        return rows

    @torch.no_grad()
    def _orthonormalise(self) -> tuple[list[Tensor], list[Tensor]]:
        """Orthonormal basis of the span of the snapshots, per block (joint over buckets).

        Two passes of the eigen-decomposition of the Gram matrix (SVQB; the second pass
        removes the loss of orthogonality of the first, as in CholeskyQR2), in float64,
        dropping directions below ``RANK_RTOL``. Returns the basis per segment (r_b, D_s)
        and per block ``C`` (r_b, n) with ``basis = C @ snapshots``.
        """
        n = self.num_snapshots
        dev = self._buckets[0].param_device
        coefs = []
        for block in range(self.num_blocks):
            segs = [s for s in self._segments if s.block == block]
            coef = torch.eye(n, dtype=torch.float64, device=dev)
            for first in (True, False):
                gram = torch.zeros(coef.shape[0], coef.shape[0], dtype=torch.float64, device=dev)
                for s in segs:
                    q = coef.to(s.bucket.param_device) @ self._snapshots(s)
                    gram += (q @ q.T).to(dev)
                vals, vecs = torch.linalg.eigh(gram)
                if first:
                    keep = vals > RANK_RTOL**2 * vals.max()
                    vals, vecs = vals[keep], vecs[:, keep]
                coef = (vecs / vals.sqrt()).T @ coef
            coefs.append(coef)
        basis = [
            (coefs[s.block].to(s.bucket.param_device) @ self._snapshots(s)).to(accumulation_dtype(s.bucket.dtype))
            for s in self._segments
        ]
        return basis, coefs

    @torch.no_grad()
    def _start_at_mean(self) -> None:
        """Write the mean of the chosen stored snapshots into the parameters: their
        float64 mean (for an 8-bit history, of the snapshots reconstructed from the
        anchor and the deltas), rounded once to the parameters' dtype. A swap to the same
        average (``swap_to_average(last=n)``) sums the anchor and the deltas in float32
        instead (:mod:`lawa_optim.ops`): the two agree within float32 rounding, not bit
        for bit."""
        for b in self._buckets:
            for i, p in enumerate(b.params):
                mean = stored_snapshots(b, [i], self.num_snapshots, b.param_device).mean(0)
                p.copy_(b.view(mean.to(b.dtype), i, base=b.offsets[i]))

    # -- training -------------------------------------------------------------------
    @torch.no_grad()
    def project_(self) -> None:
        """Replace every gradient by its orthogonal projection onto the span of its
        block: per segment one copy of the gradients into a flat buffer, then
        ``g <- P^T (P g)`` as two matrix products, the coordinates summed over the
        segments of a block."""
        views = []
        coords = [torch.zeros(c.shape[0], dtype=torch.float64, device=c.device) for c in self._coef]
        for s, q, g in zip(self._segments, self._basis, self._grads):
            params = s.params()
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            views.append([s.view(g, j) for j in range(len(params))])
            torch._foreach_copy_(views[-1], [p.grad for p in params])
            coords[s.block] += (q @ g).to(device=coords[s.block].device, dtype=torch.float64)
        for s, q, g, v in zip(self._segments, self._basis, self._grads, views):
            torch.mv(q.t(), coords[s.block].to(device=q.device, dtype=q.dtype), out=g)
            torch._foreach_copy_([p.grad for p in s.params()], v)

    def step(self, closure: Callable[[], float] | None = None) -> Any:
        """Project the gradients onto the span of the snapshots, then step the wrapped
        optimizer. ``closure`` (optional) recomputes the loss and gradients first."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.project_()
        self._inner.step()
        return loss

    def paper_schedule(self, total_steps: int, lr_scale: float = 1.0) -> MultiStepLR:
        """The TWA papers' learning-rate recipe for the TWA phase, as a scheduler.

        Multiplies every group's learning rate by ``lr_scale`` now and returns a
        ``MultiStepLR`` that divides it by 10 after 50 % and after 75 % of
        ``total_steps``; call its ``step()`` after every :meth:`step`. The authors'
        scripts (github.com/nblt/TWA, ``run.sh`` and ``train_twa.py``) train TWA with SGD
        at a larger learning rate than regular training (2 on CIFAR and 0.3 on ImageNet,
        where regular training starts at 0.1: ``lr_scale`` 20 and 3) and divide it by 10
        at epochs ``int(0.5 E)`` and ``int(0.75 E + 0.9)`` of ``E`` TWA epochs (5 and 8 of
        10 on CIFAR): the shape of their regular schedule (decays at epochs 100 and 150
        of 200) compressed into the TWA budget, here counted in steps. A second call
        raises ``RuntimeError``: the scale would compound.
        """
        if not is_int(total_steps) or total_steps < 4:
            raise ValueError(f"total_steps must be an int >= 4 (decays at 50% and 75% of it), got {total_steps!r}")
        if isinstance(lr_scale, bool) or not isinstance(lr_scale, (int, float)) or not lr_scale > 0:
            raise ValueError(f"lr_scale must be a number > 0, got {lr_scale!r}")
        if self._scaled:
            raise RuntimeError(
                "paper_schedule() was called already on this TWA: the learning rate is scaled "
                "once; keep the scheduler the first call returned"
            )
        for group in self.param_groups:
            group["lr"] *= lr_scale
        self._scaled = True
        return MultiStepLR(self, milestones=[total_steps // 2, (3 * total_steps) // 4], gamma=0.1)

    @torch.no_grad()
    def coefficients(self) -> Tensor:
        """The weights now as averaging coefficients over the chosen snapshots, newest
        first: a float64 ``(num_blocks, n)`` tensor (one row with the default
        ``blocks=None``; all ``1/n`` right after creation): each block's weights equal
        ``sum_i c[block, i] * snapshot_i`` restricted to the block, up to rounding. When
        the snapshots are linearly dependent, one of the coefficient vectors that give
        the weights."""
        dev = self._coef[0].device
        coords = [torch.zeros(c.shape[0], dtype=torch.float64, device=dev) for c in self._coef]
        for s, q in zip(self._segments, self._basis):
            flat = torch.zeros(s.D, dtype=q.dtype, device=q.device)
            params = s.params()
            torch._foreach_copy_([s.view(flat, j) for j in range(len(params))], params)
            coords[s.block] += (q.double() @ flat.double()).to(dev)
        return torch.stack([c.T @ x for c, x in zip(self._coef, coords)])


def _outside(param_groups: Sequence[dict], ids: set[int]) -> list[str]:
    """The parameters of ``param_groups`` whose ids are not in ``ids``, each described by
    its place and shape."""
    return [
        f"parameter {i} of param group {g}, of shape {tuple(p.shape)}"
        for g, group in enumerate(param_groups)
        for i, p in enumerate(group["params"])
        if id(p) not in ids
    ]


def _segments(
    buckets: list[Bucket], blocks: Sequence[Iterable[Tensor]] | None, aliases: Sequence[tuple[Tensor, Tensor]] = (),
) -> list[_Segment]:
    """Split the parameters of ``buckets`` into per-block, per-bucket segments (an alias
    in ``blocks`` stands for its owner)."""
    where = {id(p): (j, i) for j, b in enumerate(buckets) for i, p in enumerate(b.sources)}
    owner_of = {id(a): o for a, o in aliases}
    if blocks is None:
        groups = [[p for b in buckets for p in b.sources]]
    else:
        if isinstance(blocks, torch.Tensor) or not isinstance(blocks, Sequence):
            raise TypeError(f"blocks must be None or a sequence of parameter collections, got {type(blocks).__name__}")
        for k, g in enumerate(blocks):
            if isinstance(g, torch.Tensor) or not isinstance(g, Iterable):
                what = f"a Tensor of shape {tuple(g.shape)}" if isinstance(g, torch.Tensor) else f"{type(g).__name__} {g!r:.40}"
                raise TypeError(
                    f"each block must be a collection (list, tuple or other iterable) of parameters, "
                    f"got {what} as blocks[{k}]: write blocks=[[w1, b1], [w2]], not blocks=[w1, b1, w2]"
                )
        groups = [list(g) for g in blocks]
        seen: dict[int, int] = {}
        for k, g in enumerate(groups):
            if not g:
                raise ValueError(f"blocks[{k}] is empty; every block needs at least one parameter")
            g[:] = dict.fromkeys(owner_of.get(id(p), p) for p in g)  # one memory, once
            for p in g:
                if id(p) not in where:
                    raise ValueError(f"blocks[{k}] holds a tensor of shape {tuple(p.shape)} that is not a parameter of history")
                if id(p) in seen:
                    raise ValueError(f"a parameter of shape {tuple(p.shape)} is in blocks[{seen[id(p)]}] and blocks[{k}]; "
                                     "each parameter belongs to exactly one block")
                seen[id(p)] = k
        if len(seen) != len(where):
            raise ValueError(f"{len(where) - len(seen)} parameter(s) of history are in no block; blocks must cover them all")
    segments = []
    for k, g in enumerate(groups):
        per_bucket: dict[int, list[int]] = {}
        for p in g:
            j, i = where[id(p)]
            per_bucket.setdefault(j, []).append(i)
        for j in sorted(per_bucket):
            b, index = buckets[j], sorted(per_bucket[j])
            offsets, size = [], 0
            for i in index:
                offsets.append(size)
                size += b.numels[i]
            segments.append(_Segment(b, index, offsets, size, k))
    return segments
