"""LAWA: an optimizer wrapper that keeps the average of the k latest weight snapshots.

Latest Weight Averaging (Kaddour 2022, "Stop Wasting My Time! Saving Days of
ImageNet and BERT Training with Latest Weight Averaging", arXiv:2209.14981)
averages the k latest end-of-epoch checkpoints during training; the paper finds
k = 6 a good default and reports that averaging too many (k > 10-16) or too early
hurts. The wrapper shares ``param_groups``, ``state`` and ``defaults`` with the
optimizer it wraps (in the manner of Lookahead), so LR schedulers, gradient
scalers and hooks act on the real optimizer.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.optim import Optimizer

from lawa_optim import compiled, ops, posthoc, weighting
from lawa_optim.history import History, check_history_dtype, check_param, is_int, resolve_storage
from lawa_optim.memory import Memory
from lawa_optim.state import install, read_history, save_history, strip_lawa
from lawa_optim.names import match_names
from lawa_optim.state_check import MAX_COUNT, shown
from lawa_optim.wrapping import WrappedOptimizer

MODES = ("uniform", "ema", "phema")
STORAGES = ("device", "pinned", "cpu")
#: Where ``swap_to_average(backup=...)`` keeps a copy of the training weights.
BACKUPS = (None, "device", "cpu")


@dataclass
class _Run:
    """Everything of a LAWA that changes after construction, in one object held by
    reference: trainer frameworks wrap optimizers in objects that copy the wrapper's
    ``__dict__`` (Lightning's ``LightningOptimizer``), and a write through such a copy
    must reach the real LAWA, or its guards stop working and training weights are lost."""

    history: History
    steps: int = 0
    started: bool = True  # steps >= start, kept as a flag: see LAWA._count_step
    swapped: bool = False
    last_fit: posthoc.PostHocFit | None = None
    #: Held while a swap runs: a second one from another thread fails instead of backing
    #: up the average as the training weights.
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    # A lock cannot be copied or pickled; a copy gets its own.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.lock = threading.Lock()


class LAWA(WrappedOptimizer):
    r"""Wrap ``optimizer`` and keep the average of the ``k`` latest weight snapshots.

    Example::

        opt = LAWA(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), k=6)
        for epoch in range(epochs):
            for x, y in loader:
                loss_fn(model(x), y).backward()
                opt.step()
                opt.zero_grad()
            opt.snapshot()                  # end of epoch, as in the paper
            with opt.averaged():            # evaluate the average, then swap back
                evaluate(model)

    Args:
        optimizer: the ``torch.optim.Optimizer`` to wrap; its ``param_groups``,
            ``state`` and ``defaults`` are shared, not copied.
        k: number of latest snapshots averaged (default 6, the paper's choice).
        every: also snapshot automatically right after optimizer step ``t`` (counted
            from 1) whenever ``t >= start`` and ``t % every == 0``; ``None`` (default)
            snapshots only on explicit :meth:`snapshot` calls.
        start: no snapshot before optimizer step ``start`` (default 0); explicit
            :meth:`snapshot` calls before then do nothing, so early weights never
            enter the average.
        mode: ``"uniform"`` (default): the plain mean of the latest
            ``min(count, k)`` snapshots. ``"ema"``: ``avg = decay * avg + (1 - decay) *
            theta`` over snapshots, the first taken as is; it keeps no ring. The paper's
            Appendix C writes its exponential variant with the weight alpha = 0.9 on the
            *newest* snapshot, which is ``decay=0.1`` here. An EMA has no window: a
            non-finite snapshot stays in it for good. ``"phema"``: post-hoc
            power-function EMA (EDM2, Karras et al. 2024) from memory: one float32 EMA
            per width in ``sigma_rels``, updated after every optimizer step ``t``
            (counted from the first step at or after ``start``), each pushed into the
            ring at every snapshot, so the ring holds ``k`` snapshots spread over the
            widths (``k=6`` with two widths: 3 times); ``averaged(sigma_rel=s)``
            synthesises the EMA of width ``s`` from them (see :meth:`swap_to_average`).
        decay: EMA decay in [0, 1) (default 0.9); only with ``mode="ema"`` (refused with
            ``mode="phema"``).
        sigma_rels: ``mode="phema"`` only: the relative widths of the EMAs kept, each in
            ``(0, 0.2887]``, distinct (default ``(0.05, 0.10)``, EDM2's); ``k`` must hold
            at least one snapshot of each.
        max_fit_error: ``mode="phema"`` only: the largest relative profile error of a
            synthesised EMA (default :data:`lawa_optim.posthoc.MAX_FIT_ERROR`, 5 %);
            a request whose fit is worse is refused.
        storage: where the history lives: ``"device"`` (beside the parameters,
            default), ``"pinned"`` (page-locked host memory; needs CUDA, else ``"cpu"``
            with a warning) or ``"cpu"`` (pageable host memory).
        history_dtype: dtype of the stored snapshots (default: the parameters'
            dtype; ``torch.bfloat16`` halves the memory). The running mean is always
            float32 (float64 for float64 parameters) and averages the stored, rounded
            values, so the average is the mean of what is stored. ``torch.float16``
            holds magnitudes up to 65504: the first snapshot that stores an infinity
            for a finite weight warns. ``torch.int8``: an 8-bit history (uniform mode,
            float32/bfloat16/float16 parameters; about 9.1 bytes per parameter at
            k=6): int8 differences between consecutive snapshots, one float32 scale per
            block of 256 elements, against a float32 copy of the newest snapshot; see
            the guarantee below. Sharded (FSDP2) parameters keep 8 bits under
            ``Shard(0)``/``Replicate`` where their rows hold a multiple of 256 elements
            (blocks are chunks of rows, so checkpoints reshard to any world size, though
            not into an unsharded LAWA), the others a ring of their own dtype; other
            placements are refused (use ``torch.bfloat16``).
        backend: ``"auto"`` (default: the CUDA extension, then Triton on a GPU, else
            pure torch), ``"torch"``, ``"triton"`` or ``"cuda"``.
        recompute_every: rebuild the running mean from the ring every this many
            snapshots, in the same pass as the push that comes due; ``None`` (default):
            every ``k`` snapshots. See "Numerical guarantee" below. Not with
            ``mode="phema"``, which keeps no running mean.

    Numerical guarantee (README, "The numerical guarantee"; u = 2**-24, M the largest
    magnitude among the snapshots in the window and those that left it since the last
    refresh): with the defaults and ``k <= 151``, at most ``k`` snapshots after a value
    has left the window (a NaN or inf included) it no longer affects the average, which
    is then the mean of the stored window within 1e-5 of M. Exactly: right after a
    refresh within ``4u * M`` for any ``k`` up to 2**20 (compensated summation; so is
    ``last=j`` at any time), and each snapshot since the refresh adds at most
    ``(1 + 4/k) u * M`` (one rounding of the mean, two of its step; the n-th while the
    ring first fills ``(1 + 4/n) u * M``): under ``(k + 4 ln k + 7) u * M`` in all with
    the defaults; ``recompute_every=N``, ``N <= k``, bounds it by ``(N + 4 ln N + 7) u *
    M``. A window of finite values never averages to an infinity: where the float32
    mean is not finite, the swap averages the stored slots in float64. bfloat16 and
    float16 parameters get the float32 average rounded once to their dtype (to nearest;
    ties away from zero for bfloat16): within that bound plus half an ulp of their dtype
    (at most 2**-8 of the average for bfloat16, 2**-11 for float16).

    With ``history_dtype=torch.int8``, each stored snapshot differs from the weights it
    stored by at most (1/254 + 5u) of the largest change of its 256-element block since
    the previous stored snapshot plus one rounding of its magnitude (the first one is
    exact), and the average of c snapshots is within the mean of those errors plus
    ``(c + 4) u * M``: its error scales with how far the weights move between snapshots,
    not with their size.

    The history is allocated at the first :meth:`step` or :meth:`snapshot`:
    ``k * D`` elements of ``history_dtype`` plus ``D`` float32 (D: the number of
    parameter elements, each parameter padded to 64 elements; in phema mode ``D`` float32
    per width instead, the EMAs). Swapping the full average (or phema's live EMA) in
    allocates nothing for float32, bfloat16 and float64 parameters; a backup of the
    weights exists only while swapped with ``last=``, ``weights=``, ``sigma_rel=`` or
    ``backup=`` (none right after a snapshot into a history of the parameters' dtype,
    whose newest slot holds them), for float16 parameters, or where the mean is not
    finite. Parameters added with
    :meth:`add_param_group` join the history from the next snapshot on, with their own
    count: until they have ``k`` snapshots their average covers fewer, newer snapshots
    than the older parameters', and a swap leaves them untouched until their first one.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        k: int = 6,
        *,
        every: int | None = None,
        start: int = 0,
        mode: str = "uniform",
        decay: float | None = None,
        storage: str = "device",
        history_dtype: torch.dtype | None = None,
        backend: str = "auto",
        recompute_every: int | None = None,
        sigma_rels: Sequence[float] | None = None,
        max_fit_error: float | None = None,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if isinstance(optimizer, LAWA):
            raise TypeError("optimizer is already a LAWA; wrap the inner optimizer once")
        if not is_int(k) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        if every is not None and (not is_int(every) or every < 1):
            raise ValueError(f"every must be None or an int >= 1, got {every!r}")
        if not is_int(start) or start < 0:
            raise ValueError(f"start must be an int >= 0, got {start!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if decay is not None and (
            isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0
        ):
            raise ValueError(f"decay must be a float in [0, 1), got {decay!r}")
        sigma_rels, max_fit_error = _phema_settings(mode, k, decay, recompute_every, sigma_rels, max_fit_error)
        if storage not in STORAGES:
            raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
        check_history_dtype(history_dtype, mode)
        if history_dtype == torch.int8 and recompute_every is not None:
            raise ValueError(
                f"recompute_every={recompute_every!r} sets how often the running mean is rebuilt, but "
                "history_dtype=torch.int8 keeps no running mean (its anchor is a snapshot, exact at "
                "every push): leave recompute_every=None"
            )
        if backend not in ops.BACKENDS:
            raise ValueError(f"backend must be one of {ops.BACKENDS}, got {backend!r}")
        if recompute_every is not None and (not is_int(recompute_every) or not 1 <= recompute_every <= MAX_COUNT):
            raise ValueError(f"recompute_every must be None or an int in [1, 2**62], got {recompute_every!r}")
        for g, group in enumerate(optimizer.param_groups):
            for i, p in enumerate(group["params"]):
                check_param(p, f"parameter {i} of param group {g}", history_dtype)

        super().__init__(optimizer)
        self.every = every
        self.start = start
        self.mode = mode
        self.decay = 0.9 if decay is None else float(decay)
        self.max_fit_error = max_fit_error
        history = History(
            k, mode, history_dtype, resolve_storage(storage), backend, recompute_every, sigma_rels
        )
        self._run = _Run(history, started=start == 0)

    # -- properties -----------------------------------------------------------
    @property
    def _history(self) -> History:
        return self._run.history

    @property
    def k(self) -> int:
        """Number of latest snapshots averaged."""
        return self._history.k

    @property
    def num_snapshots(self) -> int:
        """Snapshots the average holds now: ``min(taken, k)`` in uniform mode, all taken
        in EMA mode (for the oldest parameters: those added later may hold fewer)."""
        return self._history.held()

    @property
    def sigma_rels(self) -> tuple[float, ...]:
        """The widths of the power-function EMAs kept (``mode="phema"``; empty otherwise)."""
        return self._history.sigma_rels

    @property
    def last_fit(self) -> posthoc.PostHocFit | None:
        """How the latest ``sigma_rel=`` average was synthesised (its coefficients and
        relative profile error), or ``None`` before the first."""
        return self._run.last_fit

    @property
    def is_swapped(self) -> bool:
        """Whether the parameters hold the average (between swap_to_average and swap_back)."""
        return self._run.swapped

    @property
    def steps(self) -> int:
        """Optimizer steps taken through this wrapper (steps that ``GradScaler`` skipped
        excluded); restored by :meth:`load_state_dict`."""
        return self._run.steps

    @property
    def backend(self) -> str:
        """The backend that runs the history (``"torch"``, ``"triton"``, ``"cuda"``;
        several joined by ``+`` when buckets differ)."""
        names = dict.fromkeys(self._history.backend_names(self.param_groups))
        return "+".join(names)

    def memory(self) -> Memory:
        """Bytes the history holds now, by buffer (history, sum, scales, staging, backup),
        and per parameter element; ``str()`` of it is one line. Nothing is held before the
        first :meth:`step` or :meth:`snapshot`: :func:`lawa_optim.history_bytes` tells the
        cost before anything is allocated."""
        held = self._history.memory()
        built = {id(p) for b in self._history.buckets for p in b.sources}
        pending = [p for g in self.param_groups for p in g["params"] if id(p) not in built]
        return held + Memory(parameters=sum(p.numel() for p in {id(p): p for p in pending}.values()))

    def __repr__(self) -> str:
        return self._repr(
            f"LAWA(k={self.k}, mode={self.mode!r}, every={self.every}, start={self.start}, "
            f"steps={self.steps}, swapped={self.is_swapped}) memory: {self.memory()}"
        )

    # -- training ---------------------------------------------------------------
    def _build(self) -> None:
        self._history.extend(self.param_groups)

    def _require_not_swapped(self, what: str) -> None:
        if self._run.swapped:
            raise RuntimeError(
                f"{what} while the average is swapped into the parameters; call swap_back() "
                "first (or leave the `with opt.averaged():` block)"
            )

    def step(self, closure: Callable[[], float] | None = None) -> Any:
        """Run the wrapped optimizer's step and snapshot when ``every`` says so."""
        self._require_not_swapped("step()")
        self._build()
        self._history.before_step()
        loss = self._inner.step() if closure is None else self._inner.step(closure)
        due = self._count_step()
        if self.mode == "phema" and self._run.started:
            self._update_emas()
        if due:
            self._push()
        return loss

    @torch.compiler.disable
    def _update_emas(self) -> None:
        # Eager: the coefficients of step t are computed on the host in float64.
        self._history.check_groups(self.param_groups)
        posthoc.update(self._history)

    # Kept out of compiled code: a step counter read there is a guard that recompiles at
    # every step (8 recompiles in 8 steps, then Dynamo gives up); this costs one graph
    # break in step(), which the wrapped optimizer's step() breaks anyway (pytorch #104053).
    @torch.compiler.disable
    def _count_step(self) -> bool:
        """Count an optimizer step; whether ``every`` asks for a snapshot after it."""
        run = self._run
        run.steps += 1
        run.started = run.steps >= self.start
        return self.every is not None and run.started and run.steps % self.every == 0

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group to the wrapped optimizer; its parameters join the history
        from the next snapshot on, with a count of their own."""
        params = param_group["params"]
        # A list, so that a generator (model.parameters()) is read once, by both checks.
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        for i, p in enumerate(params):
            # torch accepts (name, parameter) pairs, as named_parameters() yields them.
            tensor = p[1] if isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) else p
            check_param(tensor, f"parameter {i} of the added param group", self._history.history_dtype)
        self._inner.add_param_group({**param_group, "params": params})

    def snapshot(self) -> bool:
        """Push the current weights into the history: O(1) in k, one pass per bucket.

        Returns ``False`` (and records nothing) before optimizer step ``start``, and in
        ``mode="phema"`` before the first EMA update (the first step at or after
        ``start``): there is no EMA to store yet.
        """
        self._require_not_swapped("snapshot()")
        if not self._run.started:
            return False
        self._build()
        return self._push()

    def _push(self) -> bool:
        # Eager only: traced, the loop over every parameter would become a guard per parameter.
        if not torch.compiler.is_compiling():
            self._history.check_groups(self.param_groups)
        if self.mode == "phema":
            return posthoc.push(self._history)
        if self.mode == "ema":
            self._history.push_ema(self.decay)
        else:
            self._history.push()
        return True

    # -- swapping ---------------------------------------------------------------
    @contextlib.contextmanager
    def _swapping(self, what: str) -> Iterator[None]:
        """Hold the swap lock for ``what``, or raise ``RuntimeError`` when another thread
        holds it: two swaps at once would back up each other's writes."""
        lock = self._run.lock
        if not lock.acquire(blocking=False):
            raise RuntimeError(
                f"{what} while another thread is swapping the weights of this LAWA "
                "(swap_to_average, swap_back or training_weights); swaps are not safe to run "
                "concurrently: swap from one thread, or serialise the calls with a lock of your own"
            )
        try:
            yield
        finally:
            lock.release()

    def swap_to_average(
        self,
        last: int | None = None,
        *,
        weights: Sequence[float] | torch.Tensor | None = None,
        sigma_rel: float | None = None,
        backup: str | None = None,
    ) -> None:
        """Write the average into the parameters in place (``data_ptr`` unchanged).

        The full average (no ``last``, ``weights`` or ``sigma_rel``; in phema mode the
        live EMA) of float32, bfloat16 and float64 parameters allocates nothing: it trades places with the running mean (for
        bfloat16, the weight's 16 bits and the mean's low 16 bits share one word), so the
        history holds the training weights until :meth:`swap_back`. Anything else, an
        8-bit history (no running mean) and a mean that is not finite somewhere, copies the training weights into a backup
        of the parameters' size first, unless the newest ring slot holds them bit for bit
        (right after a snapshot into a history of their dtype), which then is the backup. ``backup="device"`` (beside the parameters) or
        ``"cpu"`` (host memory) asks for that copy always, leaving the history untouched
        while swapped (another thread may then snapshot-read it, or write into the
        averaged parameters); another value raises ``ValueError``.

        ``last=j`` (uniform mode, ``1 <= j <= num_snapshots``) averages only the ``j``
        newest snapshots: another type raises ``TypeError``, another value
        ``ValueError``.

        ``weights`` (uniform and phema modes) writes the weighted sum of the stored
        snapshots instead: one coefficient per snapshot, newest first (a sequence of floats or a
        1-D tensor, ``1 <= len(weights) <= num_snapshots``; :mod:`lawa_optim.profiles`
        builds the usual ones). They are used as given, so they must be finite and sum
        to 1 within 1e-6 (``ValueError`` otherwise, naming the sum); negative
        coefficients (extrapolation) are allowed. The sum is exact to the bound of
        ``last=j`` (see :mod:`lawa_optim.ops`), in one pass. Parameters added later with
        :meth:`add_param_group` that hold fewer snapshots than there are coefficients take
        the newest coefficients they hold, divided by their sum (``ValueError`` naming
        the param groups when that sum is within 1e-6 of 0). ``last`` and ``weights``
        together raise ``ValueError``.

        ``sigma_rel`` (``mode="phema"``) writes the power-function EMA of that relative
        width at the step of the newest snapshot, synthesised by EDM2's least-squares
        fit over the stored snapshots' profiles (:func:`lawa_optim.phema.fit`) and one
        weighted pass over the ring; :attr:`last_fit` tells the coefficients and the
        fit's relative profile error, a ``UserWarning`` says it when it exceeds
        :data:`lawa_optim.posthoc.WARN_FIT_ERROR`, and a fit worse than
        ``max_fit_error`` is refused with ``ValueError`` naming the error, the width asked
        for and the widths and steps stored. Parameters added later are fitted on their
        own clock. In phema mode with no argument, the live EMA of the first width
        (``sigma_rels[0]``) is written exactly, as it stands after the latest step.

        The training weights are kept and :meth:`swap_back` restores them bit for bit.
        A refused call changes nothing.
        """
        if last is not None and not is_int(last):
            raise TypeError(f"last must be None or an int, got {type(last).__name__} {last!r}")
        if sigma_rel is not None:
            sigma_rel = posthoc.check_width(sigma_rel)
            if last is not None or weights is not None:
                raise ValueError(
                    f"sigma_rel={sigma_rel!r} with last= or weights=; give one (sigma_rel= computes "
                    "its own weights)"
                )
        if backup is not None and (not isinstance(backup, str) or backup not in BACKUPS):
            raise ValueError(f"backup must be one of {BACKUPS}, got {backup!r}")
        if weights is not None:
            if last is not None:
                raise ValueError(
                    f"last={last!r} and weights= both given; give one (last=j is the uniform "
                    "weights profiles.window(j))"
                )
            weights = weighting.parse(weights)
        with self._swapping("swap_to_average()"):
            self._swap_in(last, weights, sigma_rel, backup)

    def _swap_in(
        self, last: int | None, weights: tuple[float, ...] | None, sigma_rel: float | None, backup: str | None
    ) -> None:
        self._require_not_swapped("swap_to_average()")
        if sigma_rel is not None and self.mode != "phema":
            raise RuntimeError(
                f"sigma_rel= needs mode='phema'; this LAWA has mode={self.mode!r}, which keeps no "
                "power-function EMAs to synthesise from"
            )
        live = self.mode == "phema" and last is None and weights is None and sigma_rel is None
        if live:
            if not any(b.steps for b in self._history.buckets):
                raise RuntimeError(
                    "swap_to_average() before the first EMA update: take an optimizer step first "
                    f"(EMAs are updated from optimizer step start={self.start} on)"
                )
        else:
            self._check_held(last, weights)
        fitted = None
        if sigma_rel is not None:
            fitted, fit = posthoc.fit(self._history, sigma_rel, self.max_fit_error)
        self._history.check_groups(self.param_groups)
        compiled.warn_if_frozen()
        self._history.swap_in(last, weights, fitted, backup)
        self._run.swapped = True
        if sigma_rel is not None:
            self._run.last_fit = fit
            if fit.error > posthoc.WARN_FIT_ERROR:
                warnings.warn(posthoc.describe(fit), UserWarning, stacklevel=3)

    def _check_held(self, last: int | None, weights: tuple[float, ...] | None) -> None:
        """The checks of a swap that reads the stored snapshots."""
        count = self.num_snapshots
        if count == 0:
            raise RuntimeError(
                "swap_to_average() before any snapshot: call opt.snapshot() first "
                f"(snapshots are skipped before optimizer step start={self.start})"
            )
        if last is not None:
            if self.mode != "uniform":
                raise RuntimeError(f"last= needs mode='uniform'; this LAWA has mode={self.mode!r}")
            if not 1 <= last <= count:
                raise ValueError(f"last must be in [1, {count}] (the snapshots held now), got {last!r}")
        if weights is not None:
            if self.mode == "ema":
                raise RuntimeError(
                    f"weights= needs mode='uniform' or 'phema'; this LAWA has mode={self.mode!r}, "
                    "which keeps no ring of snapshots to weight, only their running average"
                )
            weighting.check_length(weights, count)

    def swap_back(self) -> None:
        """Restore the training weights saved by :meth:`swap_to_average`, bit for bit."""
        with self._swapping("swap_back()"):
            if not self._run.swapped:
                raise RuntimeError("swap_back() without swap_to_average(): the weights are already the training weights")
            self._history.swap_back()
            self._run.swapped = False

    @contextlib.contextmanager
    def averaged(
        self,
        last: int | None = None,
        *,
        weights: Sequence[float] | torch.Tensor | None = None,
        sigma_rel: float | None = None,
        backup: str | None = None,
    ) -> Iterator["LAWA"]:
        """Context manager: the parameters hold the average inside (``last``,
        ``weights``, ``sigma_rel`` and ``backup`` as for :meth:`swap_to_average`), the
        training weights after, even when the body raises."""
        self.swap_to_average(last, weights=weights, sigma_rel=sigma_rel, backup=backup)
        try:
            yield self
        finally:
            self.swap_back()

    @contextlib.contextmanager
    def training_weights(self) -> Iterator["LAWA"]:
        """Context manager for saving while the average is swapped in: inside, the
        parameters hold the training weights and the LAWA is not swapped (so a checkpoint
        saved there holds the training weights and a history to resume from); after
        it, the parameters hold again exactly what they held before (an average swapped
        in with ``last=`` or ``weights=`` included; the full average swapped in place is
        swapped in again, so a snapshot taken inside shows) and the training weights are
        kept as before. Outside a swap it changes nothing.
        """
        run = self._run
        with self._swapping("training_weights()"):
            held = self._history.set_aside() if run.swapped else None
            run.swapped = False
        if held is None:
            yield self
            return
        try:
            yield self
        finally:
            if run.swapped:  # the block swapped an average in and left it there
                self.swap_back()
            with self._swapping("leaving training_weights()"):
                self._history.restore(held)
                run.swapped = True

    # -- checkpoints ------------------------------------------------------------
    @torch._disable_dynamo
    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict plus the history; reads only.

        Each parameter's history is a ``(k, *shape)`` view into the ring under
        ``state[i]["lawa_history"]`` and its slice of the running mean under
        ``"lawa_mean"`` (``"lawa_ema"`` in EMA mode; ``"lawa_backup"`` for the training
        weights while swapped); counters and settings are under
        ``param_groups[g]["lawa"]``. The tensors are views of the live history (new
        tensors for the mean and the training weights while the full average is swapped
        in place): save or copy them before the next snapshot. Saving changes nothing, and a run resumed
        from the dict continues bit for bit like the run that saved it.
        """
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        self._history.check_groups(self.param_groups)  # before torch's own KeyError
        sd = self._inner.state_dict()
        save_history(self, sd)
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, sd)
            if result is not None:
                sd = result
        return sd

    @torch._disable_dynamo
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict`: the wrapped optimizer, the history,
        the counters and the swap state.

        Everything is checked before anything changes: a dict that does not fit (another
        ``k``, mode, history dtype or parameter layout; a missing, mistyped or impossible
        counter; a tensor of another dtype, shape or layout: nothing is cast) raises
        ``ValueError`` naming the field and leaves this optimizer as it was (see
        :mod:`lawa_optim.state_check`), and so does a wrapped optimizer's part that the
        wrapped optimizer would not load as its own (:mod:`lawa_optim.optimizer_check`);
        anything but a dict raises ``TypeError``. Where both sides have parameter names,
        they are matched by name (:func:`lawa_optim.names.match_names`). Every tensor is
        copied, the wrapped optimizer's state included: editing the dict afterwards changes nothing here. ``every``,
        ``start``, ``decay`` and ``recompute_every`` keep the values given to the
        constructor."""
        self._require_not_swapped("load_state_dict()")
        if not isinstance(state_dict, Mapping):
            raise TypeError(
                f"state_dict must be a dict saved by LAWA.state_dict(), got {type(state_dict).__name__} "
                f"{shown(state_dict)}"
            )
        state_dict = dict(state_dict)
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        state_dict = match_names(self.param_groups, state_dict)
        loaded = read_history(self, state_dict)  # checks, allocates and copies; changes nothing
        self._inner.load_state_dict(strip_lawa(state_dict))
        install(self, loaded)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)


def _phema_settings(
    mode: str,
    k: int,
    decay: float | None,
    recompute_every: int | None,
    sigma_rels: Sequence[float] | None,
    max_fit_error: float | None,
) -> tuple[tuple[float, ...], float]:
    """The checked ``sigma_rels`` and ``max_fit_error`` of a LAWA of ``mode`` (empty and
    the default outside phema mode), refusing the settings that do not go with it."""
    if mode != "phema":
        for name, value in (("sigma_rels", sigma_rels), ("max_fit_error", max_fit_error)):
            if value is not None:
                raise ValueError(f"{name}= is for mode='phema'; this LAWA has mode={mode!r}")
        return (), posthoc.MAX_FIT_ERROR
    if decay is not None:
        raise ValueError(
            f"decay={decay!r} is for mode='ema'; mode='phema' keeps power-function EMAs whose "
            "decay follows from sigma_rels"
        )
    if recompute_every is not None:
        raise ValueError(
            f"recompute_every={recompute_every!r} is for mode='uniform'; mode='phema' keeps no "
            "running mean to recompute"
        )
    widths = posthoc.check_sigma_rels(posthoc.SIGMA_RELS if sigma_rels is None else sigma_rels)
    if k < len(widths):
        raise ValueError(
            f"k={k} cannot hold one snapshot of each of the {len(widths)} widths sigma_rels={widths}; "
            f"accepted: k >= {len(widths)} (a multiple of it keeps whole snapshots)"
        )
    if max_fit_error is None:
        return widths, posthoc.MAX_FIT_ERROR
    if isinstance(max_fit_error, bool) or not isinstance(max_fit_error, (int, float)) or not max_fit_error > 0:
        raise ValueError(f"max_fit_error must be a number > 0, got {max_fit_error!r}")
    return widths, float(max_fit_error)
