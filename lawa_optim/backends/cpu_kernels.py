"""The CPU fast path of the torch backend: a fused ring push in C, loaded through ctypes.

LAWA (Kaddour 2022, arXiv:2209.14981) updates its history with ``slot = new;
total += new - old``. In plain torch that takes five passes over memory (48 bytes per
float32 element); ``csrc/cpu_push.c`` does it in one (20 bytes), bit for bit as
:mod:`lawa_optim.ops` specifies. It is compiled with the system C compiler at first
use (under a second) into a per-user cache keyed by the source, the flags and the CPU,
so CI needs no build step. Without a compiler, or with ``LAWA_OPTIM_CPU_KERNELS=0``,
the torch backend runs its plain code instead, after one warning saying why.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lawa_optim.backends import native

if TYPE_CHECKING:
    from lawa_optim.history import Bucket

#: Dtype codes of the C entry point.
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
#: Elements per row of the work table (256 KiB of float32): GPT-2's 38.6M-element token
#: embedding splits into 590 rows that the threads share, and the whole 124M-element
#: model needs ~1,950 rows, a table built in about a millisecond.
ROW = 1 << 16
#: No -ffast-math and no contraction: the sums must round exactly as torch's do.
#: -march=native vectorises the float16 conversions (F16C) where the CPU has them; the
#: cache key holds the CPU's flags, so a shared home directory never loads a foreign build.
CFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-fast-math", "-fopenmp", "-fPIC", "-shared"]

#: Set to False to run the plain torch code (benchmarks compare the two).
enabled = os.environ.get("LAWA_OPTIM_CPU_KERNELS", "1") != "0"

_lib: ctypes.CDLL | None = None
_error: str | None = None


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


def _build() -> ctypes.CDLL:
    src = native.source_dir() / "cpu_push.c"
    cc = os.environ.get("CC", "cc")
    key = hashlib.sha256(
        "\0".join([src.read_text(), cc, *CFLAGS, platform.machine(), _cpu_id()]).encode()
    ).hexdigest()[:16]
    cache = native.cache_root()
    lib = cache / f"cpu_push_{key}.so"
    if not lib.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        # Build under a private name and rename: processes building at once never load
        # a half-written library.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        try:
            subprocess.run([cc, *CFLAGS, str(src), "-o", tmp], check=True, capture_output=True, text=True)
            os.replace(tmp, lib)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    dll = ctypes.CDLL(str(lib))
    fn = dll.lawa_cpu_push
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_int,
                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    return dll


def library() -> ctypes.CDLL | None:
    """The compiled kernel, building it on first call; ``None`` (after one warning) when
    it cannot be built."""
    global _lib, _error
    if _lib is None and _error is None:
        try:
            _lib = _build()
        except (OSError, subprocess.CalledProcessError) as exc:
            detail = getattr(exc, "stderr", None) or str(exc)
            _error = f"{type(exc).__name__}: {detail.strip()[-500:]}"
            warnings.warn(
                f"the fused CPU push of lawa_optim could not be built ({_error}); "
                "the torch backend runs its plain code instead (same results, slower)",
                stacklevel=2,
            )
    return _lib


def runs(b: "Bucket") -> bool:
    """Whether the fused push can run ``b``: history and sum on the CPU, float32/bfloat16/
    float16 parameters and history, and a compiled kernel."""
    return (
        enabled
        and b.device.type == "cpu"
        and b.dtype in DTYPE_CODES
        and b.history_dtype in DTYPE_CODES
        and library() is not None
    )


def rows(b: "Bucket", sources: Sequence[Tensor]) -> Tensor:
    """The work table for copying ``sources`` (one CPU tensor per parameter, in memory
    order) into ``b``'s flat slots: ``(address, flat offset, count)`` per row."""
    table = []
    for src, off, n in zip(sources, b.offsets, b.numels):
        addr, size = src.data_ptr(), src.element_size()
        table.extend((addr + lo * size, off + lo, min(ROW, n - lo)) for lo in range(0, n, ROW))
    return torch.tensor(table, dtype=torch.int64).reshape(-1, 3)


def push(b: "Bucket", n: int, sources: Sequence[Tensor]) -> None:
    """Snapshot number ``n`` of ``sources`` (CPU tensors of ``b.dtype``, one per parameter,
    dense) into ``b`` with the fused loop; call only when :func:`runs` says it can."""
    # The table is rebuilt only when a source moves (~1 ms for 148 tensors, 124M elements).
    ptrs = [t.data_ptr() for t in sources]
    cached = b.cache.get("cpu")
    if cached is None or cached[0] != ptrs:
        cached = b.cache["cpu"] = (ptrs, rows(b, sources))
    table = cached[1]
    rc = _lib.lawa_cpu_push(
        table.data_ptr(), table.shape[0], DTYPE_CODES[b.dtype], DTYPE_CODES[b.history_dtype],
        b.ring[n % b.k].data_ptr(), b.total.data_ptr(), int(n >= b.k), torch.get_num_threads(),
    )
    if rc != 0:
        raise RuntimeError(f"lawa_cpu_push failed with code {rc} for dtypes {b.dtype}, {b.history_dtype}")
