"""lawa_optim: Latest Weight Averaging (Kaddour 2022) for any torch.optim optimizer.

``LAWA(optimizer, k)`` keeps the average of the k latest weight snapshots in a flat
ring buffer updated in O(1) per snapshot; ``update_bn`` refreshes BatchNorm
statistics for the averaged weights; ``TWA`` trains the averaging coefficients in the
span of the stored snapshots; ``check_in_sync`` checks that DDP ranks snapshot and
swap together; ``export_average`` returns the averaged weights as a fresh state dict,
from a live ``LAWA`` or a checkpoint; ``profiles`` builds coefficients for ``weights=``
(any weighting of the stored snapshots, chosen after training); ``history_bytes`` tells
what a history will cost in memory before anything is allocated (``LAWA.memory()``
what it holds); ``LAWA(mode="phema")`` keeps power-function EMAs and synthesises any
width after training from its ring (``posthoc``; the EDM2 math in ``phema``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lawa_optim import phema, posthoc, profiles
    from lawa_optim.bn import update_bn
    from lawa_optim.distributed import check_in_sync
    from lawa_optim.export import export_average
    from lawa_optim.memory import Memory, history_bytes
    from lawa_optim.twa import TWA
    from lawa_optim.wrapper import LAWA

__all__ = ["LAWA", "TWA", "Memory", "check_in_sync", "export_average", "history_bytes", "phema", "posthoc", "profiles",
           "update_bn"]
__version__ = "0.3.0"

#: Public name -> the submodule that defines it. Imported on first use (PEP 562), so that
#: the commands under ``lawa_optim`` (``python -m lawa_optim.demo``) and the argument
#: checks in ``lawa_optim._cli`` answer before torch is imported.
_SOURCES = {"LAWA": "wrapper", "TWA": "twa", "Memory": "memory", "check_in_sync": "distributed",
            "export_average": "export", "history_bytes": "memory", "phema": "phema", "posthoc": "posthoc",
            "profiles": "profiles", "update_bn": "bn"}


def __getattr__(name: str) -> object:
    if name not in _SOURCES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = importlib.import_module(f"{__name__}.{_SOURCES[name]}")
    if name != _SOURCES[name]:  # a name defined in the module, not the module itself
        value = getattr(value, name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
