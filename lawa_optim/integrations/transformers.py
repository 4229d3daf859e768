"""LAWA in a Hugging Face ``Trainer`` with one line (Kaddour 2022, arXiv:2209.14981).

``lawa = use_lawa(trainer, k=6)`` after building a ``transformers.Trainer`` (or any
subclass, such as TRL's ``SFTTrainer``) and before ``trainer.train()``.
"""

from __future__ import annotations

import functools
from typing import Any

import transformers

from lawa_optim import LAWA
from lawa_optim.integrations._common import check_lawa_arguments, record_names


class _EpochSnapshots(transformers.TrainerCallback):
    """A snapshot at the optimizer step that completes an epoch."""

    def __init__(self, lawa: LAWA) -> None:
        self.lawa = lawa

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # ``state.epoch`` is ``epoch + (step + 1) / steps_in_epoch``: a whole number exactly
        # at the epoch's last step. Acting here, not in on_epoch_end, puts the snapshot
        # before the evaluation and the checkpoint of that step.
        if self.lawa.every is None and state.epoch is not None and float(state.epoch).is_integer():
            self.lawa.snapshot()


def use_lawa(trainer: transformers.Trainer, k: int = 6, **lawa_kwargs: Any) -> LAWA:
    """Make ``trainer`` step a :class:`~lawa_optim.LAWA` and evaluate its average.

    Example::

        trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val)
        lawa = use_lawa(trainer, k=6)
        trainer.train()                          # or train(resume_from_checkpoint=...)
        export_average(trainer.model, lawa)      # the averaged weights

    What it does:

    * now: builds the trainer's optimizer (``trainer.create_optimizer()``, unless one was
      passed to the trainer) and wraps it in ``LAWA(optimizer, k, **lawa_kwargs)``, so it
      exists before ``train()`` loads a checkpoint's ``optimizer.pt``, and resuming
      restores the history bit for bit. The returned LAWA is the one the trainer steps
      (accelerate wraps it: ``trainer.optimizer.optimizer``). Saved optimizer states carry
      the parameters' names, so :func:`lawa_optim.export_average` maps a checkpoint
      right although the Trainer's two param groups are not in ``model.parameters()`` order.
    * a snapshot at the optimizer step that completes each epoch, before that step's
      evaluation and checkpoint; with ``every=N`` the LAWA snapshots every N optimizer
      steps instead (the choice for runs of one long epoch).
    * ``trainer.evaluate()`` evaluates the average once there is a snapshot (nested calls,
      as with a dict of eval datasets, swap once) and the training weights before.
    * checkpoints always hold the training weights: a checkpoint saved while the average
      is swapped in (by a callback during evaluation) swaps it out for the save.

    Not supported (refused): DeepSpeed and FSDP (the optimizer is built after sharding),
    and ``model_init`` (each ``train()`` builds a new model and optimizer).
    """
    if not isinstance(trainer, transformers.Trainer):
        raise TypeError(f"trainer must be a transformers.Trainer, got {type(trainer).__name__}")
    if isinstance(getattr(trainer, "optimizer", None), LAWA) or hasattr(trainer, "_lawa"):
        raise RuntimeError(
            "this trainer already steps a LAWA (given to it, or from an earlier use_lawa): call "
            "use_lawa once, on a trainer built with a plain optimizer or none"
        )
    for flag, what in (
        ("is_deepspeed_enabled", "DeepSpeed"),
        ("is_fsdp_enabled", "FSDP"),
        ("is_fsdp_xla_enabled", "FSDP on XLA"),
    ):
        if getattr(trainer, flag, False):
            raise ValueError(f"use_lawa does not support {what} trainers: the optimizer is built after sharding")
    if trainer.model_init is not None:
        raise ValueError(
            "use_lawa does not support model_init: each train() builds a new model and optimizer"
        )
    check_lawa_arguments(k, lawa_kwargs)
    created = trainer.optimizer is None
    optimizer = trainer.create_optimizer() if created else trainer.optimizer
    try:
        lawa = LAWA(optimizer, k, **lawa_kwargs)
    except BaseException:
        if created:  # leave the trainer as it was: it builds its optimizer in train()
            trainer.optimizer = None
        raise
    record_names(lawa, trainer.model)
    trainer.optimizer = lawa
    trainer._lawa = lawa
    trainer.add_callback(_EpochSnapshots(lawa))

    evaluate = trainer.evaluate

    @functools.wraps(evaluate)
    def evaluate_average(*args: Any, **kwargs: Any) -> dict[str, float]:
        if lawa.is_swapped or lawa.num_snapshots == 0:
            return evaluate(*args, **kwargs)
        with lawa.averaged():
            return evaluate(*args, **kwargs)

    save_checkpoint = trainer._save_checkpoint

    @functools.wraps(save_checkpoint)
    def save_training_weights(*args: Any, **kwargs: Any) -> None:
        with lawa.training_weights():
            return save_checkpoint(*args, **kwargs)

    trainer.evaluate = evaluate_average
    trainer._save_checkpoint = save_training_weights
    return lawa
