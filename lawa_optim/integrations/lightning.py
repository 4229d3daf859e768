"""LAWA in PyTorch Lightning with one callback (Kaddour 2022, arXiv:2209.14981).

``pl.Trainer(callbacks=[LAWACallback(k=6)])`` with an unchanged LightningModule.
Works with ``lightning.pytorch`` and ``pytorch_lightning`` (the callback is an instance
of both frameworks' ``Callback`` where both are installed).
"""

from __future__ import annotations

import warnings
from typing import Any

from lawa_optim import LAWA
from lawa_optim.integrations._common import check_lawa_arguments, record_names

_bases = []
try:
    import lightning.pytorch as _lightning

    _bases.append(_lightning.Callback)
except ImportError:
    pass
try:
    import pytorch_lightning as _pytorch_lightning

    _bases.append(_pytorch_lightning.Callback)
except ImportError:
    pass
if not _bases:
    raise ImportError(
        "lawa_optim.integrations.lightning needs Lightning: pip install pytorch-lightning (or lightning)"
    )


class LAWACallback(*_bases):
    r"""Wrap the LightningModule's optimizer in a :class:`~lawa_optim.LAWA` and validate on
    the average.

    Example::

        lawa_cb = LAWACallback(k=6)
        trainer = pl.Trainer(max_epochs=30, callbacks=[lawa_cb])
        trainer.fit(module)                      # configure_optimizers returns a plain optimizer
        average = export_average(module, lawa_cb.lawa)

    What it does, at which hook:

    * ``on_fit_start``: wraps the one optimizer ``configure_optimizers`` returned in
      ``LAWA(optimizer, k, **lawa_kwargs)`` (exposed as :attr:`lawa`); Lightning then
      loads a checkpoint's optimizer state into it, history included, so
      ``trainer.fit(ckpt_path=...)`` continues bit for bit.
    * ``on_train_batch_end`` of an epoch's last batch: a snapshot, before that epoch's
      validation (``on_train_epoch_end`` would come after it). With ``every=N`` the
      LAWA snapshots every N optimizer steps instead.
    * ``on_validation_start`` / ``on_validation_end``: the average is swapped in for
      validation during ``fit`` once there is a snapshot, never in the sanity check.
    * ``on_save_checkpoint``: a checkpoint saved while the average is swapped in gets the
      training weights and an unswapped history, so checkpoints always hold the
      training weights.
    * ``on_train_end``: the model holds the training weights, or the average with
      ``leave_average=True`` (the LAWA then stays swapped: ``callback.lawa.swap_back()``
      restores the training weights).

    Args:
        k: number of latest snapshots averaged (default 6, the paper's choice).
        leave_average: leave the average in the model after ``fit`` (default ``False``).
        **lawa_kwargs: passed to :class:`~lawa_optim.LAWA` (``every``, ``start``,
            ``mode``, ``storage``, ``history_dtype``, ...); checked here.
    """

    def __init__(self, k: int = 6, *, leave_average: bool = False, **lawa_kwargs: Any) -> None:
        if not isinstance(leave_average, bool):
            raise TypeError(f"leave_average must be a bool, got {leave_average!r}")
        check_lawa_arguments(k, lawa_kwargs)
        self.k = k
        self.leave_average = leave_average
        self.lawa_kwargs = lawa_kwargs
        #: The LAWA the trainer steps; ``None`` until ``fit`` starts.
        self.lawa: LAWA | None = None
        self._swapped = False  # whether the swap in place now is this callback's

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        mine = [cb for cb in trainer.callbacks if isinstance(cb, LAWACallback)]
        if len(mine) > 1:
            # Checked by the first of them, before it wraps: the second would find a LAWA.
            raise ValueError(
                f"the Trainer has {len(mine)} LAWACallbacks; each would wrap the one optimizer "
                "in a LAWA of its own: pass one LAWACallback in Trainer(callbacks=...)"
            )
        optimizers = trainer.strategy.optimizers
        if len(optimizers) != 1:
            raise ValueError(
                f"LAWACallback wraps exactly one optimizer; configure_optimizers returned {len(optimizers)}"
            )
        if isinstance(optimizers[0], LAWA):
            raise TypeError(
                "configure_optimizers already returns a LAWA: return the plain optimizer and let "
                "LAWACallback wrap it, or drop the callback"
            )
        lawa = LAWA(optimizers[0], self.k, **self.lawa_kwargs)
        record_names(lawa, pl_module)
        trainer.strategy.optimizers = [lawa]  # the setter also rebuilds self.optimizers() wrappers
        self.lawa, self._swapped = lawa, False

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.lawa is None or self.lawa.every is not None:
            return
        last = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch or batch_idx + 1 == trainer.num_training_batches
        if last:
            self.lawa.snapshot()

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        lawa = self.lawa
        if lawa is None or trainer.sanity_checking or trainer.state.fn != "fit" or lawa.is_swapped:
            return
        if lawa.num_snapshots > 0:
            lawa.swap_to_average()
            self._swapped = True

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        self._swap_back()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._swap_back()

    def _swap_back(self) -> None:
        if self._swapped:
            self._swapped = False
            self.lawa.swap_back()

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        lawa = self.lawa
        if lawa is None or not lawa.is_swapped:
            return
        # The dumped weights are views of the parameters: take copies while they hold the
        # training weights, and the history saved while not swapped.
        averaged = {id(p) for g in lawa.param_groups for p in g["params"]}
        state = checkpoint.get("state_dict", {})
        with lawa.training_weights():
            for name, p in pl_module.named_parameters(remove_duplicate=False):
                if id(p) in averaged and name in state:
                    state[name] = p.detach().clone()
            saved = checkpoint.get("optimizer_states")
            if saved:  # on_fit_start made the one optimizer the LAWA
                saved[0] = lawa.state_dict()

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._swap_back()
        if not self.leave_average or self.lawa is None:
            return
        if self.lawa.num_snapshots == 0:
            warnings.warn(
                "LAWACallback(leave_average=True): no snapshot was taken, so the model keeps "
                "the training weights",
                stacklevel=2,
            )
            return
        self.lawa.swap_to_average()
