"""A minimal Lookahead optimizer, the baseline of the LAWA paper's Appendix B.

Lookahead (Zhang et al., "Lookahead Optimizer: k steps forward, 1 step back",
NeurIPS 2019) lets an inner optimizer take ``k`` steps with "fast" weights, then
moves "slow" weights ``alpha`` of the way towards them and restarts the fast weights
there. Kaddour 2022 (arXiv:2209.14981, Appendix B) compares LAWA with Lookahead at
``alpha = 0.8, k = 5``; torch has no Lookahead built in, so this one serves the
comparison in ``examples/lawa_experiment.py``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.optim import Optimizer


class Lookahead:
    """Wrap ``optimizer``: every ``k`` steps, ``slow += alpha * (fast - slow); fast = slow``."""

    def __init__(self, optimizer: Optimizer, k: int = 5, alpha: float = 0.8) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
        self.optimizer = optimizer
        self.k = k
        self.alpha = alpha
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.slow = [p.detach().clone() for p in self.params]
        self.steps = 0

    def zero_grad(self) -> None:
        """Zero the gradients through the inner optimizer."""
        self.optimizer.zero_grad()

    @torch.no_grad()
    def step(self) -> None:
        """One fast step; every ``k``-th one also updates the slow weights."""
        self.optimizer.step()
        self.steps += 1
        if self.steps % self.k == 0:
            fast = [p.detach() for p in self.params]
            torch._foreach_lerp_(self.slow, fast, self.alpha)
            torch._foreach_copy_(fast, self.slow)

    @contextlib.contextmanager
    def slow_weights(self) -> Iterator[None]:
        """Hold the slow weights in the parameters inside (to evaluate them)."""
        fast = [p.detach() for p in self.params]
        backup = [f.clone() for f in fast]
        with torch.no_grad():
            torch._foreach_copy_(fast, self.slow)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(fast, backup)
