"""The sizes of ``examples/lawa_experiment.py``'s runs (and of the commands that reuse
its seeds), without torch: the commands check their arguments against them before
torch is loaded."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Config:
    """Sizes of one experiment (the full one, or the fast one the tests run)."""

    seeds: int
    epochs: int  # the long runs
    short: int  # the equal-compute baseline: cosine over this many epochs
    train: int
    holdout: int  # TWA-v fits on these
    val: int
    bn: int  # training images per BatchNorm refresh
    batch: int
    twa_starts: tuple[int, ...]
    twa_epochs: int


FULL = Config(seeds=20, epochs=30, short=15, train=10_000, holdout=2_000, val=2_000, bn=1_000, batch=128,
              twa_starts=(10, 20), twa_epochs=2)
#: The smoke run the tests use (on a tiny IDX file of 200 images).
FAST = Config(seeds=2, epochs=4, short=2, train=128, holdout=32, val=32, bn=32, batch=32,
              twa_starts=(2,), twa_epochs=1)
