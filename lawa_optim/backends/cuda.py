"""CUDA backend of the entry points in :mod:`lawa_optim.ops`: fused multi-tensor kernels.

LAWA (Kaddour 2022, "Stop Wasting My Time! Saving Days of ImageNet and BERT Training
with Latest Weight Averaging", arXiv:2209.14981) averages the k latest weight
snapshots; the kernels in ``csrc/`` update the ring buffer and the float32 running mean
of a whole bucket in one launch each, reading the snapshot counter on the device.

The extension is taken from ``lawa_optim._lawa_cuda`` when it was built ahead of time
(``LAWA_OPTIM_BUILD_CUDA=1 pip install --no-build-isolation .``), else compiled on first
use with :func:`torch.utils.cpp_extension.load` (ninja) for the architectures in
``TORCH_CUDA_ARCH_LIST`` or the current GPU's, under ``$LAWA_OPTIM_BUILD_DIR`` (default
``~/.cache/lawa_optim``). When that fails the reason is warned once and
:func:`unavailable` reports it, so ``backend="auto"`` falls back to Triton, then to the
pure-torch reference.
"""

from __future__ import annotations

import importlib
import os
import re
import tempfile
import time
import warnings
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lawa_optim.backends import native

if TYPE_CHECKING:
    from lawa_optim.history import Bucket

#: A build lock older than this (seconds) is taken for the leftover of a killed build.
LOCK_TIMEOUT_S = 300.0
#: Module name of the extension built ahead of time by setup.py.
PREBUILT = "lawa_optim._lawa_cuda"

_ext: ModuleType | None = None
_ext_error: str | None = None


def build_dir() -> Path:
    """Where the extension is built: one directory per torch, CUDA and architecture list,
    under :func:`lawa_optim.backends.native.cache_root`."""
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not archs:
        major, minor = torch.cuda.get_device_capability()
        archs = f"sm{major}{minor}"
    tag = f"torch{torch.__version__}-cuda{torch.version.cuda}-{archs}"
    return native.cache_root() / re.sub(r"[^0-9A-Za-z.+-]+", "_", tag)


def unlocked(directory: Path) -> Path:
    """``directory``, or a fresh one beside it when its build lock outlives ``LOCK_TIMEOUT_S``.

    ``torch.utils.cpp_extension`` waits forever on the ``lock`` file of a build
    directory, and a build killed mid-way leaves that file behind. A lock held by a
    live build is waited for until it is ``LOCK_TIMEOUT_S`` old.
    """
    lock = directory / "lock"
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return directory
        if age >= LOCK_TIMEOUT_S:
            break
        time.sleep(min(0.25, LOCK_TIMEOUT_S - age))
    directory.parent.mkdir(parents=True, exist_ok=True)
    fresh = Path(tempfile.mkdtemp(prefix=directory.name + "-", dir=directory.parent))
    warnings.warn(
        f"lawa_optim: the CUDA build lock {lock} is {age:.0f} s old (a build that was killed?); "
        f"building in {fresh} instead. Delete the lock to use the cache again.",
        RuntimeWarning,
        stacklevel=3,
    )
    return fresh


def _load() -> ModuleType:
    """The prebuilt extension, else the one compiled from the shipped sources."""
    try:
        return importlib.import_module(PREBUILT)
    except ImportError:
        pass
    from torch.utils import cpp_extension

    src = native.source_dir()
    kernels = sorted(src.glob("*.cu"))
    if not kernels or not (src / "bindings.cpp").is_file():
        raise FileNotFoundError(f"the CUDA sources (bindings.cpp and *.cu) are not in {src}")
    sources = [src / "bindings.cpp", *kernels]
    directory = build_dir()
    directory.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name="lawa_optim_cuda",
        sources=[str(s) for s in sources],
        extra_include_paths=[str(src)],
        extra_cflags=["-O3"],
        # No --use_fast_math: the running mean and the averages must round as IEEE float32.
        extra_cuda_cflags=["-O3", "-std=c++17"],
        build_directory=str(unlocked(directory)),
        verbose=False,
    )


def extension_error() -> str | None:
    """Why the extension cannot be used, or ``None``; builds it on the first call.

    A failed build is reported once as a warning and remembered, so that training goes
    on with another backend instead of failing or retrying the build.
    """
    global _ext, _ext_error
    if _ext is None and _ext_error is None:
        try:
            _ext = _load()
        except Exception as exc:  # any build or import failure means: use another backend
            detail = str(exc).strip().splitlines()
            _ext_error = (
                f"the CUDA extension could not be built or loaded "
                f"({type(exc).__name__}: {detail[0] if detail else 'no message'})"
            )
            warnings.warn(
                f"lawa_optim: {_ext_error}; falling back to the Triton or pure-torch backend",
                RuntimeWarning,
                stacklevel=2,
            )
    return _ext_error


def unavailable(bucket: "Bucket") -> str | None:
    """Why the CUDA kernels cannot run ``bucket`` (reads only its devices); the checks
    every fused backend shares (one device, dtypes) are in :func:`lawa_optim.ops.unavailable`."""
    if not torch.cuda.is_available():
        return "CUDA is not available (no GPU, or a CPU-only build of torch)"
    if bucket.device.type != "cuda":
        return f"the history is on {bucket.device}; the CUDA kernels need it on a CUDA device"
    error = extension_error()
    if error is None and bucket.history_dtype == torch.int8 and not hasattr(_ext, "push_int8"):
        return "the CUDA extension in use was built without the 8-bit kernels (csrc/lawa_int8.cu): rebuild it"
    return error


def _kernels() -> ModuleType:
    if _ext is None:
        raise RuntimeError(f"the CUDA backend is not loaded: {extension_error()}")
    return _ext


def _table(b: "Bucket") -> tuple[Tensor, int]:
    # The device-side pointer table; the bucket clears its cache when a parameter moves.
    table = b.cache.get("cuda")
    if table is None:
        table = b.cache["cuda"] = _kernels().make_table(b.params, b.offsets, b.D)
    return table


def push(b: "Bucket") -> None:
    """Write the weights into ring slot ``pushes % k``; update the running mean, or rebuild it
    from the ring at a refresh (decided in the kernel from ``pushes``)."""
    table, tiles = _table(b)
    _kernels().push(table, tiles, b.dtype, b.ring, b.total, b.pushes, b.refresh_every)


def ema_update(b: "Bucket", decay: float) -> None:
    """Fold the weights into the exponential average in ``total``."""
    table, tiles = _table(b)
    _kernels().ema_update(table, tiles, b.dtype, b.total, b.pushes, float(decay))


def phema_update(b: "Bucket", alphas: Tensor) -> None:
    """Fold the weights into every power-function EMA of ``b.emas`` in one launch."""
    table, tiles = _table(b)
    _kernels().phema_update(table, tiles, b.dtype, b.emas, alphas.contiguous())


def exchanges(b: "Bucket") -> bool:
    """float32 and bfloat16 parameters over a floating-point history (``total`` is the
    running mean) swap their full average in place."""
    return b.dtype in (torch.float32, torch.bfloat16) and b.history_dtype.is_floating_point


def swap_in(b: "Bucket", last: int | None, weights: Tensor | None = None) -> None:
    """Copy the weights into ``b.backup`` and write the average into them (with
    ``weights``: the weighted sum of the newest snapshots); without a backup, exchange
    the full average with the running mean in place."""
    table, tiles = _table(b)
    if b.backup is None:
        _kernels().exchange(table, tiles, b.dtype, b.total, False)
        return
    if weights is not None:
        _kernels().swap_weighted(table, tiles, b.backup, b.ring, weights.contiguous(), b.pushes)
        return
    # In phema mode total is emas[0]: the live EMA swaps in as EMA mode's average does.
    mode = "uniform" if b.mode == "uniform" else "ema"
    _kernels().swap_in(table, tiles, mode, b.backup, b.total, b.ring, b.pushes, last)


def swap_back(b: "Bucket") -> None:
    """Copy ``b.backup`` back into the weights, or undo the in-place swap."""
    table, tiles = _table(b)
    if b.backup is None:
        _kernels().exchange(table, tiles, b.dtype, b.total, True)
        return
    _kernels().swap_back(table, tiles, b.backup)


def _block_bases(b: "Bucket") -> Tensor:
    # One per table row (a row per parameter); the bucket's layout never changes.
    bases = b.cache.get("cuda_int8")
    if bases is None:
        bases = b.cache["cuda_int8"] = torch.tensor(b.block_bases, dtype=torch.int64, device=b.device)
    return bases


def push_int8(b: "Bucket") -> None:
    """Push of an 8-bit history: the next delta and the anchor (see :mod:`lawa_optim.ops`)."""
    table, tiles = _table(b)
    _kernels().push_int8(table, tiles, b.dtype, _block_bases(b), b.ring, b.scales, b.total, b.pushes)


def swap_in_int8(b: "Bucket", coefficients: Tensor) -> None:
    """Back up the parameters and write the 8-bit history's swap-in with ``coefficients``."""
    table, tiles = _table(b)
    _kernels().swap_int8(table, tiles, _block_bases(b), b.ring, b.scales, b.total, b.backup,
                         coefficients.contiguous(), b.pushes)


def recompute(b: "Bucket") -> None:
    """Recompute ``total`` from the filled ring slots, in slot order."""
    table, tiles = _table(b)
    _kernels().recompute(table, tiles, b.ring, b.total, b.pushes)
