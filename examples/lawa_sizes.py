"""The sizes of ``examples/lawa_experiment.py``'s runs (and of the commands that reuse
its seeds), without torch: the commands check their arguments against them before
torch is loaded."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from lawa_optim._cli import int_at_least


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


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """``--fast`` (the :data:`FAST` sizes) and ``--jobs`` (seeds trained in parallel), as
    the commands that run the experiment's seeds take them."""
    parser.add_argument("--fast", action="store_true", help="tiny smoke run (2 seeds, 4 epochs, 128 training images)")
    parser.add_argument("--jobs", type=int_at_least(1), default=min(2, os.cpu_count() or 1),
                        help="seeds trained in parallel, one thread each (default: 2, or 1 on one core)")
