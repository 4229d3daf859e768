"""BatchNorm statistics for averaged weights.

The LAWA paper recomputes BatchNorm running statistics for the averaged weights
before evaluating them; the running statistics are buffers, not parameters, so the
history does not average them.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def update_bn(loader: Iterable, model: nn.Module, device: torch.device | str | None = None) -> None:
    """Recompute the BatchNorm running statistics of ``model`` for the weights it holds now.

    Call it inside ``with opt.averaged():`` (after ``swap_to_average()``) to evaluate the
    average as the paper does. One pass over ``loader`` (batches, or tuples/lists whose
    first item is the input) in training mode with cumulative averaging; the model's
    mode and the layers' momenta are restored afterwards. The statistics are *not*
    restored by ``swap_back()``: save ``model.state_dict()`` first if the live weights'
    statistics must survive. Builds on :func:`torch.optim.swa_utils.update_bn`.
    """
    torch.optim.swa_utils.update_bn(loader, model, device)
