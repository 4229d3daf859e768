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
version): the optimizer is the same, only the batches differ.

With ``torch.optim.SGD`` the weights stay in the span: the projected gradient is in
it, weight decay adds ``wd * theta`` (in it when ``theta`` is), and momentum,
dampening and Nesterov only form linear combinations of such vectors. Optimizers
whose update is not linear in the gradient (Adam, RMSprop, ...) rescale each
coordinate and would leave the span, so they are refused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lawa_optim.history import Bucket, accumulation_dtype
from lawa_optim.wrapper import LAWA
from lawa_optim.wrapping import WrappedOptimizer

#: Directions whose singular value is below this fraction of the largest one are
#: dropped from the basis: the float64 Gram matrix resolves eigenvalues down to about
#: 1e-16 of the largest, so singular values down to 1e-6 (eigenvalues 1e-12) are
#: recovered to about 1e-4 relative, and the second pass makes them orthonormal.
RANK_RTOL = 1e-6


def _newest_slots(pushes: int, k: int, n: int) -> list[int]:
    """Ring rows of the ``n`` newest snapshots, newest first."""
    return [(pushes - 1 - i) % k for i in range(n)]


class TWA(WrappedOptimizer):
    r"""Train the weights inside the span of the snapshots held by ``history``.

    Example::

        lawa = LAWA(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), k=6)
        ...                                 # train, lawa.snapshot() at each epoch end
        twa = TWA(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), history=lawa)
        for epoch in range(2):              # the model starts at the average
            for x, y in loader:             # training batches: TWA-t; held-out: TWA-v
                loss_fn(model(x), y).backward()
                twa.step()
                twa.zero_grad()

    Args:
        optimizer: a ``torch.optim.SGD`` over exactly the parameters of ``history``
            (momentum, Nesterov, dampening and weight decay are fine); its
            ``param_groups``, ``state`` and ``defaults`` are shared, not copied.
        history: a uniform-mode :class:`~lawa_optim.LAWA` holding at least one
            snapshot. It is only read: its ring, counters and weights are untouched,
            and it is not stepped.
        last: use only the ``last`` newest snapshots (default: all that
            ``history`` holds).

    Creating a TWA writes the mean of the chosen snapshots into the parameters
    (overwriting the live weights; save them first to keep them). Each :meth:`step`
    replaces every gradient by its projection onto the span of the snapshots, then
    runs the wrapped optimizer's step; a parameter without a gradient counts as a zero
    gradient (its projected gradient is generally not zero, so it is created).
    Memory: the orthonormal basis (r x D with r <= n the rank of the snapshots, in
    float32 for float32/16-bit parameters) and one D-element gradient buffer; building
    the basis holds r x D float64 values per bucket for a moment.
    """

    def __init__(self, optimizer: Optimizer, history: LAWA, *, last: int | None = None) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not isinstance(optimizer, torch.optim.SGD):
            raise TypeError(
                f"optimizer must be a torch.optim.SGD (with any momentum, dampening, nesterov or "
                f"weight_decay), got {type(optimizer).__name__}: TWA keeps the weights in the span "
                "of the snapshots by projecting the gradient, which only works when the update is "
                "linear in the gradient; adaptive optimizers such as Adam rescale each coordinate"
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
        if last is not None and (isinstance(last, bool) or not isinstance(last, int) or not 1 <= last <= count):
            raise ValueError(f"last must be None or an int in [1, {count}] (the snapshots history holds), got {last!r}")
        if any(b.sharded for b in buckets):
            raise ValueError(
                "history holds sharded (DTensor, e.g. FSDP2) parameters; TWA projects onto the span "
                "of whole snapshots and supports unsharded parameters only"
            )
        hist_ids = {id(p) for b in buckets for p in b.sources}
        opt_params = [p for g in optimizer.param_groups for p in g["params"]]
        opt_ids = {id(p) for p in opt_params}
        missing = len(hist_ids - opt_ids)
        if missing:
            raise ValueError(
                f"{missing} parameter(s) of history are not in optimizer; TWA needs an optimizer over "
                "exactly the parameters of history"
            )
        extra = len(opt_ids - hist_ids)
        if extra:
            raise ValueError(
                f"optimizer has {extra} parameter(s) that history does not hold; they would leave the "
                "span, so TWA needs an optimizer over exactly the parameters of history"
            )

        super().__init__(optimizer)
        self.num_snapshots = count if last is None else last
        self._buckets: list[Bucket] = buckets
        self._slots = [_newest_slots(int(b.pushes.item()), b.k, self.num_snapshots) for b in buckets]
        self._basis, self._coef = self._orthonormalise()
        self._grads = [
            torch.zeros(b.D, dtype=accumulation_dtype(b.dtype), device=b.param_device) for b in buckets
        ]
        self._start_at_mean()

    def __repr__(self) -> str:
        return self._repr(f"TWA(snapshots={self.num_snapshots}, rank={self.rank})")

    @property
    def rank(self) -> int:
        """Dimension r of the span (the number of orthonormal basis vectors)."""
        return self._coef.shape[0]

    # -- set-up -------------------------------------------------------------------
    def _snapshots(self, j: int) -> Tensor:
        """Bucket ``j``'s chosen snapshots as an (n, D) float64 matrix on the parameters' device."""
        b = self._buckets[j]
        return b.ring[self._slots[j]].to(device=b.param_device, dtype=torch.float64)

    @torch.no_grad()
    def _orthonormalise(self) -> tuple[list[Tensor], Tensor]:
        """Orthonormal basis of the span of the snapshots, joint over all buckets.

        Two passes of the eigen-decomposition of the Gram matrix (SVQB; the second pass
        removes the loss of orthogonality of the first, as in CholeskyQR2), in float64,
        dropping directions below ``RANK_RTOL``. Returns the basis per bucket (r, D_b)
        and ``C`` (r, n) with ``basis = C @ snapshots``.
        """
        n = self.num_snapshots
        dev = self._buckets[0].param_device
        coef = torch.eye(n, dtype=torch.float64, device=dev)
        for first in (True, False):
            gram = torch.zeros(coef.shape[0], coef.shape[0], dtype=torch.float64, device=dev)
            for j in range(len(self._buckets)):
                q = coef.to(self._buckets[j].param_device) @ self._snapshots(j)
                gram += (q @ q.T).to(dev)
            vals, vecs = torch.linalg.eigh(gram)
            if first:
                keep = vals > RANK_RTOL**2 * vals.max()
                vals, vecs = vals[keep], vecs[:, keep]
            coef = (vecs / vals.sqrt()).T @ coef
        basis = []
        for j, b in enumerate(self._buckets):
            q = coef.to(b.param_device) @ self._snapshots(j)
            basis.append(q.to(accumulation_dtype(b.dtype)))
        return basis, coef

    @torch.no_grad()
    def _start_at_mean(self) -> None:
        """Write the mean of the chosen snapshots into the parameters."""
        for j, b in enumerate(self._buckets):
            mean = self._snapshots(j).mean(0).to(b.dtype)
            torch._foreach_copy_(b.params, [b.view(mean, i) for i in range(len(b.params))])

    # -- training -------------------------------------------------------------------
    @torch.no_grad()
    def project_(self) -> None:
        """Replace every gradient by its orthogonal projection onto the span: per bucket
        one copy of the gradients into a flat buffer, then ``g <- P^T (P g)`` as two
        matrix products with the coefficients summed over buckets."""
        views = []
        for b, g in zip(self._buckets, self._grads):
            for p in b.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            views.append([b.view(g, i) for i in range(len(b.params))])
            torch._foreach_copy_(views[-1], [p.grad for p in b.params])
        dev = self._grads[0].device
        coords = sum((q @ g).to(device=dev, dtype=torch.float64) for q, g in zip(self._basis, self._grads))
        for b, q, g, v in zip(self._buckets, self._basis, self._grads, views):
            torch.mv(q.t(), coords.to(device=q.device, dtype=q.dtype), out=g)
            torch._foreach_copy_([p.grad for p in b.params], v)

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

    @torch.no_grad()
    def coefficients(self) -> Tensor:
        """The weights now as averaging coefficients over the chosen snapshots, newest
        first (float64, ``n`` values; all ``1/n`` right after creation): the weights
        equal ``sum_i c[i] * snapshot_i`` up to rounding. When the snapshots are linearly
        dependent, one of the coefficient vectors that give the weights."""
        dev = self._coef.device
        coords = torch.zeros(self.rank, dtype=torch.float64, device=dev)
        for b, q in zip(self._buckets, self._basis):
            flat = torch.zeros(b.D, dtype=q.dtype, device=q.device)
            torch._foreach_copy_([b.view(flat, i) for i in range(len(b.params))], b.params)
            coords += (q.double() @ flat.double()).to(dev)
        return self._coef.T @ coords
