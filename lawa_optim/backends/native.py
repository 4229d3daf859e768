"""Where the native sources of the fused backends are, and where their builds go.

Shared by the CUDA extension (:mod:`lawa_optim.backends.cuda`) and the CPU push
(:mod:`lawa_optim.backends.cpu_kernels`), both compiled on first use.
"""

from __future__ import annotations

import os
from pathlib import Path

#: Environment variable overriding the root of the build cache.
BUILD_DIR_ENV = "LAWA_OPTIM_BUILD_DIR"


def source_dir() -> Path:
    """The C/CUDA sources: shipped inside the package, or ``csrc/`` of a source checkout."""
    package = Path(__file__).resolve().parents[1]
    shipped = package / "csrc"
    return shipped if shipped.is_dir() else package.parent / "csrc"


def cache_root() -> Path:
    """Root of the build cache: ``$LAWA_OPTIM_BUILD_DIR``, else ``$XDG_CACHE_HOME/lawa_optim``
    (``~/.cache/lawa_optim``)."""
    root = os.environ.get(BUILD_DIR_ENV)
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lawa_optim"
