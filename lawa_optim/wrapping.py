"""The plumbing every optimizer wrapper of this package shares (LAWA, TWA).

In the manner of timm's Lookahead, a wrapper is a ``torch.optim.Optimizer`` that
shares ``param_groups``, ``state`` and ``defaults`` with the optimizer it wraps, so LR
schedulers and gradient scalers act on the real optimizer. Unlike timm's, it sets up
the hook tables ``Optimizer.__init__`` would, so step and state-dict hooks work, and it
reads the shared attributes through properties, because the wrapped optimizer's
``load_state_dict`` rebinds them.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from torch.optim import Optimizer


class WrappedOptimizer(Optimizer):
    """Base class: an optimizer that shares its state with ``optimizer``."""

    def __init__(self, optimizer: Optimizer) -> None:  # no Optimizer.__init__: nothing to own
        self._inner = optimizer
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._warned_capturable_if_run_uncaptured = True
        self._patch_step_function()

    # The wrapper's own code reads `_inner`, never `optimizer`: Lightning's
    # LightningOptimizer copies the wrapper's __dict__ and takes on its class, but its own
    # `optimizer` property (which returns the wrapper) comes first, so a method running on
    # it would find the wrapper where it expects the wrapped optimizer.
    @property
    def optimizer(self) -> Optimizer:
        """The wrapped optimizer."""
        return self._inner

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self._inner.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self._inner.param_groups = value

    @property
    def state(self) -> Any:
        return self._inner.state

    @state.setter
    def state(self, value: Any) -> None:
        self._inner.state = value

    @property
    def defaults(self) -> dict[str, Any]:
        return self._inner.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self._inner.defaults = value

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__.copy()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients through the wrapped optimizer."""
        self._inner.zero_grad(set_to_none=set_to_none)

    def _repr(self, head: str) -> str:
        inner = "\n".join("  " + line for line in repr(self._inner).splitlines())
        return f"{head} wrapping\n{inner}"
