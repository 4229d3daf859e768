"""Triton implementation of the entry points in :mod:`lawa_optim.ops`.

The LAWA history (Kaddour 2022, arXiv:2209.14981) snapshots every parameter of a
bucket at once. Here each entry point is a single kernel launch per bucket; those
that touch the parameters run over a block table, in the manner of apex's
``multi_tensor_apply``: one int64 row ``(chunk address in bytes, offset in the flat
buffers, element count)`` per chunk of at most :data:`CHUNK` elements of one
parameter. The table is built once per bucket and kept in ``bucket.cache["triton"]``,
which the history clears when a parameter's storage moves, with whether every row
starts on a 16-byte boundary: then the kernels compile with every parameter declared
16-byte aligned (128-bit accesses, one loop), else with a branch per row; no snapshot
loops over parameters in Python. Parameters are read linearly from ``data_ptr()`` in memory
order, which is exactly the order of their slice of the flat buffers, so
``channels_last`` weights need no special path.

The kernels (:mod:`lawa_optim.backends.triton_kernels`) read the snapshot counter
on the device and reproduce the reference backend bit for bit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

try:
    from lawa_optim.backends import triton_kernels as _k
except ImportError as exc:
    _k = None
    _IMPORT_ERROR = str(exc)

from lawa_optim.ops import QBLOCK

if TYPE_CHECKING:
    from lawa_optim.history import Bucket

#: Elements per table row: 16 steps of 1024 lanes. A row costs 24 bytes per 16,384
#: elements (under 0.04% of float32 weights), and a bucket of 8.6M elements
#: already gives every SM of a 132-SM GPU 4 programs.
CHUNK = 16 * 1024
#: Lanes a program processes per step: on a GPU, with 4 warps, 8 consecutive elements
#: per thread, i.e. two 16-byte accesses for float32. The interpreter pays per step, not
#: per element: 4096 lanes halve its time and still walk a full row in 4 steps.
BLOCK = 4096 if _k is not None and _k.INTERPRET else 1024


#: Compiler option of the weighted swap-in: a product and the sum it enters must round
#: separately, as the contract says (Triton fuses them into an FMA by default).
NO_FUSION = {"enable_fp_fusion": False}


def unavailable(bucket: "Bucket") -> str | None:
    """Why the Triton kernels cannot run ``bucket`` (reads only its device); the checks
    every fused backend shares (one device, dtypes) are in :func:`lawa_optim.ops.unavailable`."""
    if _k is None:
        return f"triton cannot be imported ({_IMPORT_ERROR})"
    device = bucket.device
    if _k.INTERPRET and device.type != "cpu":
        return f"TRITON_INTERPRET=1 runs the kernels on CPU tensors only, not on {device}"
    if not _k.INTERPRET and device.type != "cuda":
        return f"device {device} is not a CUDA device and TRITON_INTERPRET is not set"
    return None


def block_table(
    ptrs: Sequence[int], numels: Sequence[int], offsets: Sequence[int], element_size: int,
    chunk: int = CHUNK,
) -> Tensor:
    """The ``(rows, 3)`` int64 block table of parameters at addresses ``ptrs``.

    Row ``r`` covers elements ``[c, c + count)`` of one parameter ``i`` with
    ``c % chunk == 0``: ``(ptrs[i] + c * element_size, offsets[i] + c, count)``.
    Empty parameters get no row. All arithmetic is int64, so buckets beyond 2**31
    elements or bytes index correctly.
    """
    if chunk <= 0:
        raise ValueError(f"chunk must be a positive number of elements, got {chunk}")
    numel = torch.tensor(numels, dtype=torch.int64)
    rows_per_param = (numel + chunk - 1) // chunk
    param = torch.repeat_interleave(torch.arange(len(numels)), rows_per_param)
    first_row = torch.cumsum(rows_per_param, 0) - rows_per_param
    start = (torch.arange(param.numel()) - first_row[param]) * chunk
    address = torch.tensor(ptrs, dtype=torch.int64)[param] + start * element_size
    flat = torch.tensor(offsets, dtype=torch.int64)[param] + start
    count = torch.clamp(numel[param] - start, max=chunk)
    return torch.stack([address, flat, count], dim=1).reshape(-1, 3)


def _rows(b: "Bucket") -> Tensor:
    """The bucket's block table, on the CPU."""
    return block_table([p.data_ptr() for p in b.params], b.numels, b.offsets, b.params[0].element_size())


def _cached(b: "Bucket", key: str, table: Tensor) -> tuple[Tensor, bool]:
    """Cache ``table`` on the bucket's device with whether every row's address is a
    multiple of 16 bytes: the kernels' ``ALIGNED_ALL``, decided once per table. The
    bucket clears its cache when a parameter moves, so the decision follows the table."""
    entry = b.cache[key] = table.to(b.device), bool((table[:, 0] % 16 == 0).all())
    return entry


def _table(b: "Bucket") -> tuple[Tensor, bool]:
    """The block table (see :func:`block_table`) and whether every row is 16-byte aligned."""
    return b.cache.get("triton") or _cached(b, "triton", _rows(b))


def _launch(kernel, b: "Bucket", *args, **constexprs) -> None:
    table, aligned = _table(b)
    if table.shape[0]:  # a bucket of empty parameters has nothing to launch over
        # Triton launches on the current device's current stream: make that the bucket's.
        with _device(b.device):
            kernel[(table.shape[0],)](table, *args, PDTYPE=_k.TL_DTYPES[b.dtype], BLOCK=BLOCK,
                                      ALIGNED_ALL=aligned, **constexprs)


def _device(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _f32(x: float) -> float:
    """``x`` rounded to float32 as torch rounds a Scalar, so the kernel gets it exactly."""
    return torch.tensor(x, dtype=torch.float32).item()


def push(b: "Bucket") -> None:
    """Write the parameters into slot ``pushes % k``; move the running mean ``total`` by
    (new - old) / k, or rebuild it from the ring at a refresh (decided in the kernel
    from ``pushes``)."""
    _launch(_k.push_kernel, b, b.ring, b.total, b.pushes, b.D, b.k, b.refresh_every,
            HDTYPE=_k.TL_DTYPES[b.history_dtype])


def ema_update(b: "Bucket", decay: float) -> None:
    """Fold the parameters into the exponential average ``total``."""
    _launch(_k.ema_kernel, b, b.total, b.pushes, _f32(decay), _f32(1.0 - decay))


def phema_update(b: "Bucket", alphas: Tensor) -> None:
    """Fold the parameters into every power-function EMA of ``b.emas``, one launch."""
    _launch(_k.phema_kernel, b, b.emas, alphas, b.D, E=b.emas.shape[0], **NO_FUSION)


def exchanges(b: "Bucket") -> bool:
    """float32 and bfloat16 parameters over a floating-point history (``total`` is the
    running mean) swap their full average in place."""
    return b.dtype in (torch.float32, torch.bfloat16) and b.history_dtype.is_floating_point


def swap_in(b: "Bucket", last: int | None, weights: Tensor | None = None) -> None:
    """Copy the parameters into ``b.backup`` and write the average into them (with
    ``weights``: their weighted sum; a tensor argument, so no vector recompiles);
    without a backup, exchange the full average with the running mean in place."""
    if b.backup is None:
        _launch(_k.exchange_kernel, b, b.total, BACK=False)
        return
    if weights is not None:
        _launch(_k.swap_in_kernel, b, b.ring, b.total, b.backup, weights, b.pushes, b.D, b.k, weights.numel(),
                MODE=3, **NO_FUSION)
        return
    mode = 0 if b.mode != "uniform" else 1 if last is None else 2  # phema: total is emas[0]
    _launch(_k.swap_in_kernel, b, b.ring, b.total, b.backup, None, b.pushes, b.D, b.k, last or 0, MODE=mode)


#: Quantisation blocks per tile of the 8-bit kernels: 2048 elements on a GPU (16 per
#: thread of 4 warps: 128-bit accesses for the codes), 4096 in the interpreter.
TILE = BLOCK // QBLOCK * 2 if _k is not None and not _k.INTERPRET else BLOCK // QBLOCK


def _int8_table(b: "Bucket") -> tuple[Tensor, bool]:
    """The block table with a fourth column, the row's first quantisation block, and
    whether every row is 16-byte aligned."""
    cached = b.cache.get("triton_int8")
    if cached is not None:
        return cached
    rows = _rows(b)
    param = torch.repeat_interleave(torch.arange(len(b.params)), -(-torch.tensor(b.numels) // CHUNK))
    first = torch.tensor(b.block_bases, dtype=torch.int64)[param] + (rows[:, 1] - torch.tensor(b.offsets)[param]) // QBLOCK
    return _cached(b, "triton_int8", torch.cat([rows, first[:, None]], 1).contiguous())


def _launch_int8(kernel, b: "Bucket", *args) -> None:
    table, aligned = _int8_table(b)
    if table.shape[0]:
        with _device(b.device):
            kernel[(table.shape[0],)](table, *args, PDTYPE=_k.TL_DTYPES[b.dtype], TILE=TILE, QBLOCK=QBLOCK,
                                      ALIGNED_ALL=aligned, **NO_FUSION)


def push_int8(b: "Bucket") -> None:
    """Push of an 8-bit history: the next delta and the anchor (see :mod:`lawa_optim.ops`)."""
    _launch_int8(_k.push_int8_kernel, b, b.ring, b.scales, b.total, b.pushes, b.D, b.blocks, b.k)


def swap_in_int8(b: "Bucket", coefficients: Tensor) -> None:
    """Back up the parameters and write the 8-bit history's swap-in with ``coefficients``."""
    _launch_int8(_k.swap_int8_kernel, b, b.ring, b.scales, b.total, b.backup, coefficients, b.pushes, b.D,
                 b.blocks, b.k, coefficients.numel())


def swap_back(b: "Bucket") -> None:
    """Copy ``b.backup`` back into the parameters, or undo the in-place swap."""
    if b.backup is None:
        _launch(_k.exchange_kernel, b, b.total, BACK=True)
        return
    _launch(_k.swap_back_kernel, b, b.backup)


def recompute(b: "Bucket") -> None:
    """Recompute ``total`` from the filled ring slots, over the whole flat buffer."""
    grid = (-(-b.D // CHUNK),)  # D >= ALIGN: every bucket has a parameter
    with _device(b.device):
        _k.recompute_kernel[grid](b.ring, b.total, b.pushes, b.D, b.k, CHUNK=CHUNK, BLOCK=BLOCK)


# -- ahead-of-time compilation, to read what a GPU would run ------------------------

_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_SWAP_MODES = {"ema": 0, "mean": 1, "last": 2, "weighted": 3}


#: Suffix of the :func:`compile_ptx` keys of the variants for a bucket with a parameter
#: off a 16-byte boundary (``ALIGNED_ALL=False``: a branch per table row).
PER_ROW = ":per_row"


def _variants() -> dict[str, tuple]:
    """Every kernel specialisation the backend launches, as ``name: (kernel, args, constexprs)``
    with stand-in arguments that specialise like an aligned bucket's (16-byte aligned
    buffers, ``D`` a multiple of 64, a small ``k``); each kernel that reads the table
    comes twice: with every parameter 16-byte aligned, and (``name + PER_ROW``) without."""
    D, k = 64 * 1024, 6
    table, pushes = torch.zeros(3, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)
    total = torch.zeros(D, dtype=torch.float32)
    bufs = {dt: torch.zeros(64, dtype=dt) for dt in _NAMES}
    table4, codes, scales = torch.zeros(4, dtype=torch.int64), torch.zeros(64, dtype=torch.int8), total[:64]
    out: dict[str, tuple] = {}
    for p, pn in _NAMES.items():
        P = {"PDTYPE": _k.TL_DTYPES[p], "BLOCK": BLOCK}
        for h, hn in _NAMES.items():
            out[f"push:{pn}:{hn}"] = (_k.push_kernel, (table, bufs[h], total, pushes, D, k, k),
                                      {**P, "HDTYPE": _k.TL_DTYPES[h]})
        out[f"ema:{pn}"] = (_k.ema_kernel, (table, total, pushes, _f32(0.9), _f32(0.1)), P)
        out[f"swap_in:ema:{pn}"] = (_k.swap_in_kernel, (table, None, total, bufs[p], None, pushes, D, k, 0),
                                    {**P, "MODE": 0})
        for mode in ("mean", "last", "weighted"):
            for h, hn in _NAMES.items():
                weights = total if mode == "weighted" else None
                args = (table, bufs[h], total, bufs[p], weights, pushes, D, k, 0 if mode == "mean" else 3)
                extra = NO_FUSION if mode == "weighted" else {}
                out[f"swap_in:{mode}:{pn}:{hn}"] = (_k.swap_in_kernel, args,
                                                    {**P, "MODE": _SWAP_MODES[mode], **extra})
        Q = {"PDTYPE": _k.TL_DTYPES[p], "TILE": TILE, "QBLOCK": QBLOCK, **NO_FUSION}
        out[f"push_int8:{pn}"] = (_k.push_int8_kernel, (table4, codes, scales, total, pushes, D, D // QBLOCK, k), Q)
        out[f"swap_in:int8:{pn}"] = (_k.swap_int8_kernel, (table4, codes, scales, total, bufs[p], scales, pushes, D,
                                                           D // QBLOCK, k, 3), Q)
        out[f"phema:{pn}"] = (_k.phema_kernel, (table, total, total, D), {**P, "E": 2, **NO_FUSION})
        out[f"swap_back:{pn}"] = (_k.swap_back_kernel, (table, bufs[p]), P)
        if p != torch.float16:  # float16 parameters keep a backup
            for back in (False, True):
                out[f"exchange:{'back' if back else 'in'}:{pn}"] = (_k.exchange_kernel, (table, total),
                                                                    {**P, "BACK": back})
    for name, (kernel, args, constexprs) in list(out.items()):
        out[name] = (kernel, args, {**constexprs, "ALIGNED_ALL": True})
        out[name + PER_ROW] = (kernel, args, {**constexprs, "ALIGNED_ALL": False})
    for p, pn in _NAMES.items():  # reads no parameter: one variant
        out[f"recompute:{pn}"] = (_k.recompute_kernel, (bufs[p], total, pushes, D, k),
                                  {"CHUNK": CHUNK, "BLOCK": BLOCK})
    return out


def compile_ptx(arch: int = 90) -> dict[str, str]:
    """The PTX of every kernel variant the backend launches, compiled ahead of time for
    ``GPUTarget("cuda", arch, 32)`` with the specialisation a launch over aligned
    parameters gets; no GPU needed. Keys name the operation and the dtypes, e.g.
    ``"push:float32:bfloat16"`` (parameters, then history), ``"swap_in:last:bfloat16:float32"``,
    ``"recompute:bfloat16"`` (history), ``"push_int8:float32"`` and ``"swap_in:int8:float32"``
    (the 8-bit history; parameters). Those are the variants for a bucket whose
    parameters all start on a 16-byte boundary; the same key plus :data:`PER_ROW`
    (``"push:float32:bfloat16:per_row"``) is the variant for the other buckets, which
    decides per table row (every kernel but the recompute, which reads no parameter).

    Needs the compiled kernels, so a process where ``TRITON_INTERPRET=1`` was set
    when this backend was imported cannot run it.
    """
    return {name: asm["ptx"] for name, asm in compile_asm(arch).items()}


def compile_asm(arch: int = 90, names: Sequence[str] | None = None) -> dict[str, dict]:
    """What Triton makes of each kernel variant of :func:`compile_ptx` (or of ``names``
    only), by stage: ``"ptx"``, and ``"cubin"``, the machine code its own ``ptxas``
    assembled from that PTX for a launch on ``arch``, with the options a launch uses."""
    if _k is None:
        raise RuntimeError(f"triton cannot be imported ({_IMPORT_ERROR})")
    variants = _variants()
    unknown = [name for name in names or () if name not in variants]
    if unknown:
        raise ValueError(f"no kernel variant {unknown[0]!r}; the variants: {', '.join(sorted(variants))}")
    if _k.INTERPRET:
        raise RuntimeError(
            "compiling the kernels ahead of time needs Triton's compiler, but TRITON_INTERPRET=1 was set when "
            "lawa_optim's Triton kernels were imported; run it in a process without it"
        )
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    out = {}
    for name in variants if names is None else names:
        kernel, args, constexprs = variants[name]
        # The launcher's own binder (the same in Triton 3.6 and 3.9) turns the arguments into the
        # signature and the divisibility attributes a real launch compiles with.
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        bound, specialization, options = binder(*args, **constexprs)
        options, signature, consts, attrs = kernel._pack_args(backend, constexprs, bound, specialization, options)
        src = ASTSource(kernel, signature, consts, attrs)
        out[name] = triton.compile(src, target=target, options=options.__dict__).asm
    return out
