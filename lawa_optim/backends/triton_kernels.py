"""Triton kernels of the LAWA history (Kaddour 2022, arXiv:2209.14981).

Every kernel is one launch over a whole bucket. Program ``p`` owns row ``p`` of the
block table built by :func:`lawa_optim.backends.triton.block_table`: the byte address
of a chunk of one parameter, the chunk's element offset in the flat buffers and its
element count, which the program walks ``BLOCK`` lanes at a time. ``recompute_kernel``
reads no parameter and walks the flat buffers directly.

All arithmetic is float32. Conversions to and from bfloat16 work on the bit pattern,
because Triton's interpreter truncates a float32 -> bfloat16 cast where torch and the
GPU round to nearest even; on the GPU the explicit rounding gives the same bits as the
hardware cast, so every backend agrees bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: The Triton dtype of each parameter or history dtype the kernels take.
TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}



@triton.jit
def _chunk(table, PDTYPE: tl.constexpr):
    """This program's chunk: typed parameter pointer, flat offset, element count."""
    row = table + tl.program_id(0).to(tl.int64) * 3
    src = tl.load(row).to(tl.pointer_type(PDTYPE))
    return src, tl.load(row + 1), tl.load(row + 2)


@triton.jit
def _to_f32(x):
    """``x`` widened to float32 exactly (bfloat16: its 16 bits become the high half)."""
    if x.dtype == tl.bfloat16:
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return x.to(tl.float32)


@triton.jit
def _from_f32(x, DTYPE: tl.constexpr):
    """float32 ``x`` rounded to nearest even in ``DTYPE``."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        # Adding 0x7FFF plus the kept lowest bit, then dropping the low 16 bits, is
        # round-half-to-even; a carry into the exponent correctly gives the next
        # binade or infinity. A NaN whose payload sits in the low 16 bits would round
        # to infinity, so every NaN becomes 0x7FC0, the quiet NaN torch writes on the CPU.
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(DTYPE)


@triton.jit
def push_kernel(table, ring, total, pushes, D, K, PDTYPE: tl.constexpr, HDTYPE: tl.constexpr,
                BLOCK: tl.constexpr):
    """Write slot ``pushes % K`` from the parameters; ``total += new - old``."""
    src, off, cnt = _chunk(table, PDTYPE)
    n = tl.load(pushes)
    slot = ring + (n % K) * D + off
    # While the ring fills (n < K) the overwritten slot counts as zero: read none of
    # it. A bound, not `mask & full`: the interpreter's `&` of two int1 tensors
    # yields int8, which it then rejects as a load mask.
    old_cnt = tl.where(n >= K, cnt, 0)
    for start in range(0, cnt, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        mask = idx < cnt
        p = tl.load(src + idx, mask=mask)
        if PDTYPE == HDTYPE:
            new = p
        else:
            new = _from_f32(_to_f32(p), HDTYPE)
        old = tl.load(slot + idx, mask=idx < old_cnt, other=0.0)
        tl.store(slot + idx, new, mask=mask)
        t = tl.load(total + off + idx, mask=mask)
        tl.store(total + off + idx, t + (_to_f32(new) - _to_f32(old)), mask=mask)


@triton.jit
def ema_kernel(table, total, pushes, decay, alpha, PDTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """``total = param`` for the first update, else ``decay * total + alpha * param``."""
    src, off, cnt = _chunk(table, PDTYPE)
    first = tl.load(pushes) == 0
    for start in range(0, cnt, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        mask = idx < cnt
        p = _to_f32(tl.load(src + idx, mask=mask))
        t = tl.load(total + off + idx, mask=mask)
        # torch rounds decay * total, then adds alpha * param with one fused
        # multiply-add (its CPU and CUDA add-with-alpha both do), so fuse the same way.
        t = tl.where(first, p, tl.fma(p, alpha, t * decay))
        tl.store(total + off + idx, t, mask=mask)


@triton.jit
def swap_in_kernel(table, ring, total, backup, pushes, D, K, last, PDTYPE: tl.constexpr,
                   MODE: tl.constexpr, BLOCK: tl.constexpr):
    """``backup = param``; ``param = avg``. MODE 0: avg = total (EMA); 1: total / min(n, K);
    2: the ``last`` newest slots summed newest first from zero, divided by ``last``."""
    src, off, cnt = _chunk(table, PDTYPE)
    n = tl.load(pushes)
    for start in range(0, cnt, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        mask = idx < cnt
        tl.store(backup + off + idx, tl.load(src + idx, mask=mask), mask=mask)
        zero = tl.zeros([BLOCK], dtype=tl.float32)
        if MODE == 0:
            avg = tl.load(total + off + idx, mask=mask)
        elif MODE == 1:
            # div_rn: plain `/` may lower to an approximate division on the GPU.
            avg = tl.math.div_rn(tl.load(total + off + idx, mask=mask), zero + tl.minimum(n, K))
        else:
            acc = zero
            for i in range(0, last):
                row = ring + ((n - 1 - i) % K) * D + off
                acc += _to_f32(tl.load(row + idx, mask=mask))
            avg = tl.math.div_rn(acc, zero + last)
        tl.store(src + idx, _from_f32(avg, PDTYPE), mask=mask)


@triton.jit
def swap_back_kernel(table, backup, PDTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """``param = backup``, bit for bit."""
    src, off, cnt = _chunk(table, PDTYPE)
    for start in range(0, cnt, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        mask = idx < cnt
        tl.store(src + idx, tl.load(backup + off + idx, mask=mask), mask=mask)


@triton.jit
def recompute_kernel(ring, total, pushes, D, K, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """``total = 0 + ring[0] + ... + ring[min(n, K) - 1]`` in slot order, over all of
    ``total`` (padding included, as the reference zeroes it): no table, program ``p``
    takes elements ``[p * CHUNK, (p + 1) * CHUNK)``."""
    off = tl.program_id(0).to(tl.int64) * CHUNK
    cnt = tl.minimum(D - off, CHUNK)
    filled = tl.minimum(tl.load(pushes), K)
    for start in range(0, cnt, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        mask = idx < cnt
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        row = ring + off
        for s in range(0, filled):
            acc += _to_f32(tl.load(row + idx, mask=mask))
            row += D  # slot s: a 64-bit pointer step, as s * D may exceed 2**31
        tl.store(total + off + idx, acc, mask=mask)


#: Whether ``triton.jit`` built the kernels above for its CPU interpreter
#: (TRITON_INTERPRET=1 when this module was imported; it cannot change afterwards).
INTERPRET = not isinstance(push_kernel, triton.runtime.JITFunction)
