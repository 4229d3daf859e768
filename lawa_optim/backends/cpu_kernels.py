"""The CPU fast path of the torch backend: every operation of the history fused in C.

LAWA (Kaddour 2022, arXiv:2209.14981) updates its history with ``slot = new;
total += (new - old) / k`` (the running mean). In plain torch that takes several passes
over memory; ``csrc/cpu_kernels.c`` does it in one (20 bytes per float32 element: the
parameter read, the slot and the mean read and written), and folds
the exact refresh of the mean into the push that completes a pass over the ring,
reading the other slots block by block in the same pass, so the guarantee of
:mod:`lawa_optim.history` holds as it does for the plain code: at most
``refresh_every`` pushes after a value (NaN and inf included) has left the window, it
no longer affects the mean. The EMA update, the swap-in (mean, EMA, ``last=j``,
weighted), the swap-back and the in-place exchange are fused the same way.

Every result is bit for bit what the plain torch code of
:mod:`lawa_optim.backends.reference` leaves, as :mod:`lawa_optim.ops` specifies, for
the 9 pairs of float32/bfloat16/float16 parameters and history, except the bits of a
NaN (still a NaN): torch itself widens a float16 NaN to different bits in its vector
and scalar loops. The EMA rounds its product and then adds with one fused
multiply-add, as torch's CPU add-with-alpha does; where the torch build at hand does
not (``ATEN_CPU_CAPABILITY=default``), the kernel rounds twice to match it.

The library is compiled with the system C compiler (``$CC``) at first use, in about
2 s, into the build cache of :mod:`lawa_optim.backends.native`, which verifies it
before loading it, so CI needs no build step and a damaged cache cannot crash a
process. Without a compiler, or with ``LAWA_OPTIM_CPU_KERNELS=0``, the torch backend
runs its plain code instead, after one warning saying why.
"""

from __future__ import annotations

import ctypes
import os
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lawa_optim.backends import native
from lawa_optim.ops import QBLOCK

if TYPE_CHECKING:
    from lawa_optim.history import Bucket

#: Dtype codes of the C entry points.
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
#: Elements per row of the work table (256 KiB of float32): GPT-2's 38.6M-element token
#: embedding splits into 590 rows that the threads share, and the whole 124M-element
#: model needs ~1,950 rows, a table built in about a millisecond.
ROW = 1 << 16
#: No -ffast-math and no contraction: the sums must round exactly as torch's do.
#: -march=native uses the CPU's widest vectors; the cache key holds the CPU's flags, so a
#: shared home directory never loads a build for another CPU.
CFLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-fast-math", "-fopenmp", "-fPIC", "-shared")
SOURCE = "cpu_kernels.c"

_p, _i64, _int, _f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
#: The entry points and their argument types (see the comments in the C source).
SIGNATURES = {
    "lawa_cpu_push": [_p, _i64, _int, _int, _p, _i64, _i64, _i64, _i64, _p, _int],
    "lawa_cpu_ema": [_p, _i64, _int, _p, _int, _f64, _int, _int],
    "lawa_cpu_swap_in": [_p, _i64, _int, _int, _p, _p, _p, _i64, _i64, _i64, _int, _i64, _int],
    "lawa_cpu_swap_weighted": [_p, _i64, _int, _int, _p, _p, _i64, _i64, _i64, _p, _i64, _int],
    "lawa_cpu_swap_back": [_p, _i64, _int, _p, _int],
    "lawa_cpu_push_int8": [_p, _i64, _int, _p, _p, _i64, _i64, _i64, _i64, _p, _int],
    "lawa_cpu_swap_int8": [_p, _i64, _int, _p, _p, _p, _p, _i64, _i64, _i64, _i64, _p, _i64, _int],
    "lawa_cpu_exchange": [_p, _i64, _int, _p, _int, _int],
    "lawa_cpu_all_finite": [_p, _i64],
    "lawa_cpu_phema": [_p, _i64, _int, _p, _i64, _i64, _p, _int],
}
#: Modes of lawa_cpu_swap_in.
SWAP_EMA, SWAP_MEAN, SWAP_LAST = 0, 1, 2

#: Set to False to run the plain torch code (benchmarks compare the two).
enabled = os.environ.get("LAWA_OPTIM_CPU_KERNELS", "1") != "0"

_lib: ctypes.CDLL | None = None
_error: str | None = None
_UNKNOWN = object()
_ema_rounding: bool | None | object = _UNKNOWN


def library() -> ctypes.CDLL | None:
    """The compiled kernels, building them on first call; ``None`` (after one warning)
    when they cannot be built."""
    global _lib, _error
    if _lib is None and _error is None:
        try:
            lib = native.load_c_library(native.source_dir() / SOURCE, CFLAGS, tuple(SIGNATURES))
        except native.BuildError as exc:
            _error = str(exc)
            warnings.warn(
                f"the fused CPU kernels of lawa_optim could not be built ({_error}); "
                "the torch backend runs its plain code instead (same results, slower)",
                stacklevel=2,
            )
        else:
            for name, argtypes in SIGNATURES.items():
                fn = getattr(lib, name)
                fn.restype, fn.argtypes = ctypes.c_int, argtypes
            _lib = lib
    return _lib


def ema_rounding() -> bool | None:
    """Whether torch's CPU add-with-alpha rounds ``a + alpha * b`` once (a fused
    multiply-add: ``True``) or twice (``False``), probed once on values where the two
    differ, in its vector loop and its scalar tail alike; ``None`` when it mixes both,
    which no kernel could match (the EMA then runs the plain torch code)."""
    global _ema_rounding
    if _ema_rounding is _UNKNOWN:
        # (1 + 2**-12) ** 2 - 1 = 2**-11 + 2**-24: exact only when the product is not
        # rounded to float32 first. 67 elements: whole vectors and a tail at any width.
        one = 1.0 + 2.0**-12
        t = torch.full((67,), -1.0)
        torch._foreach_add_([t], [torch.full((67,), one)], alpha=one)
        once, twice = bool((t == 2.0**-11 + 2.0**-24).all()), bool((t == 2.0**-11).all())
        _ema_rounding = True if once else False if twice else None
    return _ema_rounding


def runs(b: "Bucket", op: str = "push") -> bool:
    """Whether the fused kernel of ``op`` (``"push"``, ``"ema"``, ``"swap"``, ``"phema"``) can run
    ``b``: history and sum on the CPU (and, for swaps, the parameters too),
    float32/bfloat16/float16 parameters and history, a compiled library and, for the
    EMA, a torch whose rounding it can match (:func:`ema_rounding`)."""
    return (
        enabled
        and b.device.type == "cpu"
        and (op != "swap" or b.param_device.type == "cpu")
        and b.dtype in DTYPE_CODES
        and (b.history_dtype in DTYPE_CODES or b.history_dtype == torch.int8)
        and library() is not None
        and (op != "ema" or ema_rounding() is not None)
    )


def rows(b: "Bucket", sources: Sequence[Tensor]) -> Tensor:
    """The work table for ``sources`` (one dense CPU tensor per parameter of ``b``):
    ``(address, flat offset, count)`` per row of at most ``ROW`` elements."""
    table = []
    for src, off, n in zip(sources, b.offsets, b.numels):
        addr, size = src.data_ptr(), src.element_size()
        table.extend((addr + lo * size, off + lo, min(ROW, n - lo)) for lo in range(0, n, ROW))
    return torch.tensor(table, dtype=torch.int64).reshape(-1, 3)


def rows_int8(b: "Bucket", sources: Sequence[Tensor]) -> Tensor:
    """:func:`rows` with a fourth column for an 8-bit history: the index of the row's first
    quantisation block (rows start on block boundaries: whole blocks, about ``ROW``)."""
    step = max(QBLOCK, ROW - ROW % QBLOCK)
    table = []
    for src, off, n, base in zip(sources, b.offsets, b.numels, b.block_bases):
        addr, size = src.data_ptr(), src.element_size()
        table.extend(
            (addr + lo * size, off + lo, min(step, n - lo), base + lo // QBLOCK) for lo in range(0, n, step)
        )
    return torch.tensor(table, dtype=torch.int64).reshape(-1, 4)


def _table(b: "Bucket", sources: Sequence[Tensor], build=rows) -> Tensor:
    # Rebuilt only when a source moves (~1 ms for 148 tensors, 124M elements).
    ptrs = [t.data_ptr() for t in sources]
    key = "cpu" if build is rows else "cpu_int8"
    cached = b.cache.get(key)
    if cached is None or cached[0] != ptrs:
        cached = b.cache[key] = (ptrs, build(b, sources))
    return cached[1]


def _threads(table: Tensor) -> int:
    # No more threads than rows: a team of idle threads costs a wake-up each, and on a
    # busy machine a push of 64 elements then waits 2-6 ms for a descheduled one.
    return min(torch.get_num_threads(), table.shape[0])


def _check(rc: int, op: str, b: "Bucket") -> None:
    if rc != 0:
        raise RuntimeError(
            f"the fused CPU {op} failed with code {rc} (dtypes {b.dtype}, {b.history_dtype}, "
            f"k={b.k}, {int(b.pushes.item())} pushes)"
        )


def push(b: "Bucket", n: int, sources: Sequence[Tensor]) -> None:
    """Push number ``n`` of ``sources`` (CPU tensors of ``b.dtype``, one per parameter,
    dense) into ``b``, refreshing the mean when ``n + 1`` is a multiple of
    ``b.refresh_every``; call only when :func:`runs` says it can."""
    table = _table(b, sources)
    _check(_lib.lawa_cpu_push(
        table.data_ptr(), table.shape[0], DTYPE_CODES[b.dtype], DTYPE_CODES[b.history_dtype],
        b.ring.data_ptr(), b.D, b.k, n, b.refresh_every, b.total.data_ptr(), _threads(table),
    ), "push", b)


def ema_update(b: "Bucket", n: int, decay: float, sources: Sequence[Tensor]) -> None:
    """EMA update number ``n`` of ``b.total`` with ``sources``: a copy when ``n == 0``."""
    table = _table(b, sources)
    _check(_lib.lawa_cpu_ema(
        table.data_ptr(), table.shape[0], DTYPE_CODES[b.dtype], b.total.data_ptr(), int(n == 0),
        decay, int(ema_rounding()), _threads(table),
    ), "EMA update", b)


def phema_update(b: "Bucket", alphas: Tensor, sources: Sequence[Tensor]) -> None:
    """Fold ``sources`` into every power-function EMA of ``b.emas`` (``alphas``: float32,
    on the CPU, one per row)."""
    table = _table(b, sources)
    alphas = alphas.contiguous()
    _check(_lib.lawa_cpu_phema(
        table.data_ptr(), table.shape[0], DTYPE_CODES[b.dtype], b.emas.data_ptr(), b.D, b.emas.shape[0],
        alphas.data_ptr(), _threads(table),
    ), "power-function EMA update", b)


def swap_in(b: "Bucket", n: int, last: int | None) -> None:
    """Back up ``b.params`` into ``b.backup`` and write the average after ``n`` pushes
    into them (of the ``last`` newest snapshots when given; ignored in EMA mode)."""
    table = _table(b, b.params)
    if b.mode != "uniform":  # the EMA, or in phema mode the first width's (total is emas[0])
        mode, count = SWAP_EMA, 0
    elif last is None:
        mode, count = SWAP_MEAN, min(n, b.k)
    else:
        mode, count = SWAP_LAST, last
    _check(_lib.lawa_cpu_swap_in(
        table.data_ptr(), table.shape[0], DTYPE_CODES[b.dtype], DTYPE_CODES[b.history_dtype],
        b.backup.data_ptr(), b.total.data_ptr(), None if b.ring is None else b.ring.data_ptr(),
        b.D, b.k, n, mode, count, _threads(table),
    ), "swap-in", b)


def swap_weighted(b: "Bucket", n: int, weights: Tensor) -> None:
    """Back up ``b.params`` into ``b.backup`` and write into them the weighted sum of the
    ``len(weights)`` newest snapshots after ``n`` pushes (``weights``: float32, on the CPU,
    newest first)."""
    table = _table(b, b.params)
    weights = weights.contiguous()
    _check(_lib.lawa_cpu_swap_weighted(
        table.data_ptr(), table.shape[0], DTYPE_CODES[b.dtype], DTYPE_CODES[b.history_dtype],
        b.backup.data_ptr(), b.ring.data_ptr(), b.D, b.k, n, weights.data_ptr(), weights.numel(),
        _threads(table),
    ), "weighted swap-in", b)


def push_int8(b: "Bucket", n: int, sources: Sequence[Tensor]) -> None:
    """Push number ``n`` of ``sources`` into the 8-bit history ``b`` (see :func:`push`)."""
    table = _table(b, sources, rows_int8)
    _check(_lib.lawa_cpu_push_int8(
        table.data_ptr(), table.shape[0], DTYPE_CODES[b.dtype], b.ring.data_ptr(), b.scales.data_ptr(),
        b.D, b.blocks, b.k, n, b.total.data_ptr(), _threads(table),
    ), "8-bit push", b)


def swap_in_int8(b: "Bucket", n: int, coefficients: Tensor) -> None:
    """Back up ``b.params`` into ``b.backup`` and write into them the swap-in of the 8-bit
    history ``b`` after ``n`` pushes with ``coefficients`` (float32, on the CPU)."""
    table = _table(b, b.params, rows_int8)
    coefficients = coefficients.contiguous()
    _check(_lib.lawa_cpu_swap_int8(
        table.data_ptr(), table.shape[0], DTYPE_CODES[b.dtype], b.backup.data_ptr(), b.total.data_ptr(),
        b.ring.data_ptr(), b.scales.data_ptr(), b.D, b.blocks, b.k, n, coefficients.data_ptr(),
        coefficients.numel(), _threads(table),
    ), "8-bit swap-in", b)


def swap_back(b: "Bucket") -> None:
    """Copy ``b.backup`` back into ``b.params``."""
    table = _table(b, b.params)
    _check(_lib.lawa_cpu_swap_back(
        table.data_ptr(), table.shape[0], DTYPE_CODES[b.dtype], b.backup.data_ptr(), _threads(table),
    ), "swap-back", b)


def exchange(b: "Bucket", back: bool) -> None:
    """The in-place swap of :mod:`lawa_optim.ops` between ``b.params`` (float32 or
    bfloat16) and the running mean in ``b.total``: swap-in, or swap-back with ``back``."""
    table = _table(b, b.params)
    _check(_lib.lawa_cpu_exchange(
        table.data_ptr(), table.shape[0], DTYPE_CODES[b.dtype], b.total.data_ptr(), int(back),
        _threads(table),
    ), "exchange", b)


def all_finite(t: Tensor) -> bool | None:
    """Whether every element of the contiguous float32 CPU tensor ``t`` is finite, in one
    read that allocates nothing; ``None`` when the kernels are not available."""
    if not enabled or t.dtype != torch.float32 or t.device.type != "cpu" or library() is None:
        return None
    return bool(_lib.lawa_cpu_all_finite(t.data_ptr(), t.numel()))
