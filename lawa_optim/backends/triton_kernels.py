"""Triton kernels of the LAWA history (Kaddour 2022, arXiv:2209.14981).

Every kernel is one launch over a whole bucket. Program ``p`` owns row ``p`` of the
block table built by :func:`lawa_optim.backends.triton.block_table`: the byte address
of a chunk of one parameter, the chunk's element offset in the flat buffers (a
multiple of 64) and its element count. ``recompute_kernel`` reads no parameter and
walks the flat buffers directly.

128-bit accesses need the compiler to know alignment, and the table hides it. Every
kernel that reads the table takes ``ALIGNED_ALL``: the host sets it when every row's
address is a multiple of 16 bytes (the common case), and the kernel then casts each
address to a pointer it declares 16-byte aligned (``tl.multiple_of`` after the cast)
and compiles that one loop only. Otherwise each program branches on its own row, so
one misaligned view leaves the other rows vectorized; only the aligned branch makes
the declaration. Either way a program walks its chunk as an unmasked loop over whole
``BLOCK``s plus one masked tail: a mask whose bound comes from the table would make
every access scalar.

All arithmetic is float32, but for the float64 ``wide`` sum of a swap whose float32 sum
is not finite. On a GPU the casts are the hardware's (``cvt.rn``), the instruction
torch's CUDA cast and the CUDA backend use, so every backend writes the same bits, NaN
included (0x7FFF for bfloat16 and float16). Triton's interpreter
truncates a float32 -> bfloat16 cast where torch rounds to nearest even, so there
the rounding is done by hand on the bit pattern, with torch's CPU NaN (0x7FC0).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: The Triton dtype of each parameter or history dtype the kernels take.
TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _row(table):
    """This program's chunk: parameter address (int64 bytes), flat offset, count."""
    row = table + tl.program_id(0).to(tl.int64) * 3
    return tl.load(row), tl.multiple_of(tl.load(row + 1), 64), tl.load(row + 2)


#: Whether ``triton.jit`` built the kernels for its CPU interpreter (TRITON_INTERPRET=1
#: when this module was imported; it cannot change afterwards).
INTERPRET = not isinstance(_row, triton.runtime.JITFunction)
_ROUND_BY_HAND = tl.constexpr(INTERPRET)


@triton.jit
def _param(addr, ALIGNED: tl.constexpr, PDTYPE: tl.constexpr):
    """The typed parameter pointer; declared 16-byte aligned only where it is."""
    if ALIGNED:
        return tl.multiple_of(addr.to(tl.pointer_type(PDTYPE)), 16)
    return addr.to(tl.pointer_type(PDTYPE))


@triton.jit
def _to_f32(x):
    """``x`` widened to float32 (exact)."""
    return x.to(tl.float32)


@triton.jit
def _from_f32(x, DTYPE: tl.constexpr):
    """float32 ``x`` rounded to nearest even in ``DTYPE``."""
    if _ROUND_BY_HAND and DTYPE == tl.bfloat16:
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
def _round_avg(x, DTYPE: tl.constexpr):
    """``round`` of :mod:`lawa_optim.ops`: how a swap writes the float32 average ``x`` into
    a parameter of ``DTYPE``. bfloat16 rounds to nearest with ties away from zero on the
    bit pattern (which the in-place swap can undo), a NaN as :func:`_from_f32` makes it."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        half = ((bits + 0x8000) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(x != x, _from_f32(x, DTYPE), half)
    return _from_f32(x, DTYPE)


#: The largest finite float32: ``|x| <= FLT_MAX`` is False for infinities and NaN alike.
FLT_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def _finite(x):
    return tl.abs(x) <= FLT_MAX


@triton.jit
def _csum_add(s, c, x):
    """One step of ``csum`` (:mod:`lawa_optim.ops`, Neumaier's compensated sum): ``s + x``,
    and the rounding error of that addition added to ``c``."""
    t = s + x
    c += tl.where(tl.abs(s) >= tl.abs(x), (s - t) + x, (x - t) + s)
    return t, c


@triton.jit
def _csum_result(s, c):
    return tl.where(_finite(s), s + c, s)


@triton.jit
def _wide_where(avg, total, ring, off, idx, mask, n, D, K, count, NEWEST_FIRST: tl.constexpr):
    """``avg``, except where ``total`` is not finite: there ``wide`` of :mod:`lawa_optim.ops`
    over the ``count`` slots (slot order, or newest first), summed in float64. The loop
    runs only for blocks that hold such an element."""
    bad = ~_finite(total)
    if tl.max(bad.to(tl.int32), axis=0) > 0:
        w = tl.zeros(idx.shape, dtype=tl.float64)
        row = ring + off
        for i in range(0, count):
            if NEWEST_FIRST:
                x = tl.load(ring + ((n - 1 - i) % K) * D + off + idx, mask=mask)
            else:
                x = tl.load(row + idx, mask=mask)
                row += D  # a 64-bit pointer step: i * D may exceed 2**31
            w += _to_f32(x).to(tl.float64)
        wide = w / (tl.zeros(idx.shape, tl.float64) + count)  # div.rn.f64: float64 has no approximate one
        avg = tl.where(bad, wide.to(tl.float32), avg)
    return avg


# -- push ---------------------------------------------------------------------------


@triton.jit
def _push_block(src, ring, slot, total, idx, cnt, s, full, refresh, filled, D,
                HDTYPE: tl.constexpr, MASKED: tl.constexpr):
    mask = idx < cnt if MASKED else None
    new = tl.load(src + idx, mask=mask)
    if new.dtype != HDTYPE:  # a same-dtype snapshot is a copy of the bits, NaN payloads included
        new = _from_f32(_to_f32(new), HDTYPE)
    count = tl.zeros(idx.shape, tl.float32) + filled
    if refresh:
        # The mean of the filled slots in slot order, as recompute leaves it; the slot
        # just written contributes the value in registers.
        acc = tl.zeros(idx.shape, dtype=tl.float32)
        comp = tl.zeros(idx.shape, dtype=tl.float32)
        row = ring
        for j in range(0, filled):
            if j == s:
                x = _to_f32(new)
            else:
                x = _to_f32(tl.load(row + idx, mask=mask))
            acc, comp = _csum_add(acc, comp, x)
            row += D  # a 64-bit pointer step: j * D may exceed 2**31
        acc = _csum_result(acc, comp)
        t = tl.math.div_rn(acc, count)
        bad = ~_finite(acc)
        if tl.max(bad.to(tl.int32), axis=0) > 0:  # wide of the same slots, the new one in registers
            w = tl.zeros(idx.shape, dtype=tl.float64)
            row = ring
            for j in range(0, filled):
                if j == s:
                    x = _to_f32(new)
                else:
                    x = _to_f32(tl.load(row + idx, mask=mask))
                w += x.to(tl.float64)
                row += D
            t = tl.where(bad, (w / (tl.zeros(idx.shape, tl.float64) + filled)).to(tl.float32), t)
    else:
        # While the ring fills (n < K) the mean moves (new - mean) / (n + 1), on a full
        # ring (new - old) / K: both are (new - old) / filled with old = the mean while
        # filling. Selected, not masked: a scalar load mask is a vector mask on the GPU
        # but the interpreter rejects it, and the ring is read in the first K - 1 pushes
        # for nothing. div_rn: plain `/` may lower to an approximate division on the GPU.
        mean = tl.load(total + idx, mask=mask)
        old = tl.where(full, _to_f32(tl.load(slot + idx, mask=mask)), mean)
        t = mean + tl.math.div_rn(_to_f32(new) - old, count)
    tl.store(slot + idx, new, mask=mask)
    tl.store(total + idx, t, mask=mask)


@triton.jit
def _push_chunk(addr, off, cnt, ring, total, n, D, K, R, ALIGNED: tl.constexpr,
                PDTYPE: tl.constexpr, HDTYPE: tl.constexpr, BLOCK: tl.constexpr):
    src = _param(addr, ALIGNED, PDTYPE)
    s = n % K
    slot = ring + s * D + off
    full = n >= K
    refresh = (n + 1) % R == 0
    filled = tl.minimum(n + 1, K)
    whole = cnt - cnt % BLOCK
    for start in range(0, whole, BLOCK):
        _push_block(src, ring + off, slot, total + off, start + tl.arange(0, BLOCK), cnt, s, full,
                    refresh, filled, D, HDTYPE, False)
    if whole < cnt:
        _push_block(src, ring + off, slot, total + off, whole + tl.arange(0, BLOCK), cnt, s, full,
                    refresh, filled, D, HDTYPE, True)


@triton.jit
def push_kernel(table, ring, total, pushes, D, K, R, PDTYPE: tl.constexpr, HDTYPE: tl.constexpr,
                BLOCK: tl.constexpr, ALIGNED_ALL: tl.constexpr):
    """With ``n = pushes``: write slot ``n % K`` from the parameters; the running mean
    ``total += (new - old) / K`` (``(new - total) / (n + 1)`` while the ring fills), or,
    when ``(n + 1) % R == 0``, ``total`` = the mean of the ``min(n + 1, K)`` filled slots."""
    addr, off, cnt = _row(table)
    n = tl.load(pushes)
    if ALIGNED_ALL or addr % 16 == 0:
        _push_chunk(addr, off, cnt, ring, total, n, D, K, R, True, PDTYPE, HDTYPE, BLOCK)
    else:
        _push_chunk(addr, off, cnt, ring, total, n, D, K, R, False, PDTYPE, HDTYPE, BLOCK)


# -- EMA ----------------------------------------------------------------------------


@triton.jit
def _ema_block(src, total, idx, cnt, first, decay, alpha, MASKED: tl.constexpr):
    mask = idx < cnt if MASKED else None
    p = _to_f32(tl.load(src + idx, mask=mask))
    t = tl.load(total + idx, mask=mask)
    # torch rounds decay * total, then adds alpha * param with one fused multiply-add
    # (its CPU and CUDA add-with-alpha both do), so fuse the same way.
    tl.store(total + idx, tl.where(first, p, tl.fma(p, alpha, t * decay)), mask=mask)


@triton.jit
def _ema_chunk(addr, off, cnt, total, first, decay, alpha, ALIGNED: tl.constexpr,
               PDTYPE: tl.constexpr, BLOCK: tl.constexpr):
    src = _param(addr, ALIGNED, PDTYPE)
    whole = cnt - cnt % BLOCK
    for start in range(0, whole, BLOCK):
        _ema_block(src, total + off, start + tl.arange(0, BLOCK), cnt, first, decay, alpha, False)
    if whole < cnt:
        _ema_block(src, total + off, whole + tl.arange(0, BLOCK), cnt, first, decay, alpha, True)


@triton.jit
def ema_kernel(table, total, pushes, decay, alpha, PDTYPE: tl.constexpr, BLOCK: tl.constexpr,
               ALIGNED_ALL: tl.constexpr):
    """``total = param`` for the first update, else ``decay * total + alpha * param``."""
    addr, off, cnt = _row(table)
    first = tl.load(pushes) == 0
    if ALIGNED_ALL or addr % 16 == 0:
        _ema_chunk(addr, off, cnt, total, first, decay, alpha, True, PDTYPE, BLOCK)
    else:
        _ema_chunk(addr, off, cnt, total, first, decay, alpha, False, PDTYPE, BLOCK)


# -- power-function EMAs (mode="phema") ---------------------------------------------


@triton.jit
def _phema_block(src, emas, alphas, idx, cnt, D, E: tl.constexpr, MASKED: tl.constexpr):
    mask = idx < cnt if MASKED else None
    p = _to_f32(tl.load(src + idx, mask=mask))  # read once for every width
    row = emas
    # Unrolled (E is a compile-time constant, the few widths of one LAWA): the rows' loads
    # are independent and issue together.
    for e in tl.static_range(E):
        a = tl.load(alphas + e)
        m = tl.load(row + idx, mask=mask)
        # Launched with enable_fp_fusion=False: the product and the sum round separately.
        tl.store(row + idx, tl.where(a == 1.0, p, m + a * (p - m)), mask=mask)
        row += D  # a 64-bit pointer step: e * D may exceed 2**31


@triton.jit
def _phema_chunk(addr, off, cnt, emas, alphas, D, E: tl.constexpr, ALIGNED: tl.constexpr,
                 PDTYPE: tl.constexpr, BLOCK: tl.constexpr):
    src = _param(addr, ALIGNED, PDTYPE)
    whole = cnt - cnt % BLOCK
    for start in range(0, whole, BLOCK):
        _phema_block(src, emas + off, alphas, start + tl.arange(0, BLOCK), cnt, D, E, False)
    if whole < cnt:
        _phema_block(src, emas + off, alphas, whole + tl.arange(0, BLOCK), cnt, D, E, True)


@triton.jit
def phema_kernel(table, emas, alphas, D, E: tl.constexpr, PDTYPE: tl.constexpr, BLOCK: tl.constexpr,
                 ALIGNED_ALL: tl.constexpr):
    """For each of the ``E`` rows of ``emas``: ``ema = param`` where ``alphas[e] == 1``,
    else ``ema + alphas[e] * (param - ema)``."""
    addr, off, cnt = _row(table)
    if ALIGNED_ALL or addr % 16 == 0:
        _phema_chunk(addr, off, cnt, emas, alphas, D, E, True, PDTYPE, BLOCK)
    else:
        _phema_chunk(addr, off, cnt, emas, alphas, D, E, False, PDTYPE, BLOCK)


# -- swap-in ------------------------------------------------------------------------


@triton.jit
def _swap_in_block(src, ring, off, total, backup, weights, idx, cnt, n, D, K, last, PDTYPE: tl.constexpr,
                   MODE: tl.constexpr, MASKED: tl.constexpr):
    mask = idx < cnt if MASKED else None
    p = tl.load(src + idx, mask=mask)
    tl.store(backup + idx, p, mask=mask)
    if MODE == 0:
        avg = tl.load(total + idx, mask=mask)
    elif MODE == 1:
        avg = tl.load(total + idx, mask=mask)
        avg = _wide_where(avg, avg, ring, off, idx, mask, n, D, K, tl.minimum(n, K), False)
    elif MODE == 3:
        # Neumaier's compensated sum of the products, newest first; launched with
        # enable_fp_fusion=False so that no product and sum fuse into one rounding.
        s = tl.zeros(idx.shape, dtype=tl.float32)
        c = tl.zeros(idx.shape, dtype=tl.float32)
        for j in range(0, last):
            slot = (n - 1 - j) % K
            y = tl.load(weights + j) * _to_f32(tl.load(ring + slot * D + off + idx, mask=mask))
            t = s + y
            c += tl.where(tl.abs(s) >= tl.abs(y), (s - t) + y, (y - t) + s)
            s = t
        avg = s + c
    else:
        acc = tl.zeros(idx.shape, dtype=tl.float32)
        comp = tl.zeros(idx.shape, dtype=tl.float32)
        for i in range(0, last):
            x = _to_f32(tl.load(ring + ((n - 1 - i) % K) * D + off + idx, mask=mask))
            acc, comp = _csum_add(acc, comp, x)
        acc = _csum_result(acc, comp)
        # div_rn: plain `/` may lower to an approximate division on the GPU.
        avg = tl.math.div_rn(acc, tl.zeros(idx.shape, tl.float32) + last)
        avg = _wide_where(avg, acc, ring, off, idx, mask, n, D, K, last, True)
    tl.store(src + idx, _round_avg(avg, PDTYPE), mask=mask)


@triton.jit
def _swap_in_chunk(addr, off, cnt, ring, total, backup, weights, n, D, K, last, ALIGNED: tl.constexpr,
                   PDTYPE: tl.constexpr, MODE: tl.constexpr, BLOCK: tl.constexpr):
    src = _param(addr, ALIGNED, PDTYPE)
    whole = cnt - cnt % BLOCK
    for start in range(0, whole, BLOCK):
        _swap_in_block(src, ring, off, total + off, backup + off, weights, start + tl.arange(0, BLOCK), cnt,
                       n, D, K, last, PDTYPE, MODE, False)
    if whole < cnt:
        _swap_in_block(src, ring, off, total + off, backup + off, weights, whole + tl.arange(0, BLOCK), cnt,
                       n, D, K, last, PDTYPE, MODE, True)


@triton.jit
def swap_in_kernel(table, ring, total, backup, weights, pushes, D, K, last, PDTYPE: tl.constexpr,
                   MODE: tl.constexpr, BLOCK: tl.constexpr, ALIGNED_ALL: tl.constexpr):
    """``backup = param``; ``param = round(avg)``. MODE 0: avg = total (EMA); 1: total (the mean);
    2: csum of the ``last`` newest slots, newest first, divided by ``last``; in modes 1 and
    2 ``wide`` of the same slots where that sum is not finite; 3: the ``last`` newest
    slots weighted by the float32 ``weights`` (newest first), summed with Neumaier's
    compensation."""
    addr, off, cnt = _row(table)
    n = tl.load(pushes)
    if ALIGNED_ALL or addr % 16 == 0:
        _swap_in_chunk(addr, off, cnt, ring, total, backup, weights, n, D, K, last, True, PDTYPE, MODE, BLOCK)
    else:
        _swap_in_chunk(addr, off, cnt, ring, total, backup, weights, n, D, K, last, False, PDTYPE, MODE, BLOCK)


# -- swap-back ----------------------------------------------------------------------


@triton.jit
def _swap_back_chunk(addr, off, cnt, backup, ALIGNED: tl.constexpr, PDTYPE: tl.constexpr,
                     BLOCK: tl.constexpr):
    src = _param(addr, ALIGNED, PDTYPE)
    whole = cnt - cnt % BLOCK
    for start in range(0, whole, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        tl.store(src + idx, tl.load(backup + off + idx))
    if whole < cnt:
        idx = whole + tl.arange(0, BLOCK)
        tl.store(src + idx, tl.load(backup + off + idx, mask=idx < cnt), mask=idx < cnt)


@triton.jit
def swap_back_kernel(table, backup, PDTYPE: tl.constexpr, BLOCK: tl.constexpr, ALIGNED_ALL: tl.constexpr):
    """``param = backup``, bit for bit."""
    addr, off, cnt = _row(table)
    if ALIGNED_ALL or addr % 16 == 0:
        _swap_back_chunk(addr, off, cnt, backup, True, PDTYPE, BLOCK)
    else:
        _swap_back_chunk(addr, off, cnt, backup, False, PDTYPE, BLOCK)


# -- recompute ----------------------------------------------------------------------


@triton.jit
def recompute_kernel(ring, total, pushes, D, K, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """``total = csum(ring[0], ..., ring[c - 1]) / c`` in slot order with ``c = min(n, K)``
    (``wide`` of the same slots where the sum is not finite; 0 when ``c = 0``), over all
    of ``total`` (padding included, as the reference zeroes it): no table, program ``p``
    takes elements ``[p * CHUNK, (p + 1) * CHUNK)``."""
    off = tl.program_id(0).to(tl.int64) * CHUNK
    cnt = tl.minimum(D - off, CHUNK)
    filled = tl.minimum(tl.load(pushes), K)
    for start in range(0, cnt, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        mask = idx < cnt
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        comp = tl.zeros([BLOCK], dtype=tl.float32)
        row = ring + off
        for s in range(0, filled):
            acc, comp = _csum_add(acc, comp, _to_f32(tl.load(row + idx, mask=mask)))
            row += D  # slot s: a 64-bit pointer step, as s * D may exceed 2**31
        acc = _csum_result(acc, comp)
        mean = tl.math.div_rn(acc, tl.zeros([BLOCK], tl.float32) + tl.maximum(filled, 1))
        mean = _wide_where(mean, acc, ring, off, idx, mask, 0, D, K, filled, False)
        tl.store(total + off + idx, mean, mask=mask)


# -- the in-place swap --------------------------------------------------------------


@triton.jit
def _exchange_block(src, total, idx, cnt, PDTYPE: tl.constexpr, BACK: tl.constexpr, MASKED: tl.constexpr):
    mask = idx < cnt if MASKED else None
    word = tl.load(total + idx, mask=mask).to(tl.uint32, bitcast=True)
    if PDTYPE == tl.float32:  # a plain exchange, its own inverse
        tl.store(total + idx, tl.load(src + idx, mask=mask), mask=mask)
        tl.store(src + idx, word.to(tl.float32, bitcast=True), mask=mask)
    else:
        param = tl.load(src + idx, mask=mask).to(tl.uint16, bitcast=True).to(tl.uint32)
        low = word & 0xFFFF
        if BACK:
            shown = word >> 16
            kept = (((param - (low >> 15)) & 0xFFFF) << 16) | low
        else:
            shown = (word + 0x8000) >> 16
            kept = (param << 16) | low
        tl.store(total + idx, kept.to(tl.float32, bitcast=True), mask=mask)
        tl.store(src + idx, shown.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)


@triton.jit
def _exchange_chunk(addr, off, cnt, total, ALIGNED: tl.constexpr, PDTYPE: tl.constexpr, BACK: tl.constexpr,
                    BLOCK: tl.constexpr):
    src = _param(addr, ALIGNED, PDTYPE)
    whole = cnt - cnt % BLOCK
    for start in range(0, whole, BLOCK):
        _exchange_block(src, total + off, start + tl.arange(0, BLOCK), cnt, PDTYPE, BACK, False)
    if whole < cnt:
        _exchange_block(src, total + off, whole + tl.arange(0, BLOCK), cnt, PDTYPE, BACK, True)


@triton.jit
def exchange_kernel(table, total, PDTYPE: tl.constexpr, BACK: tl.constexpr, BLOCK: tl.constexpr,
                    ALIGNED_ALL: tl.constexpr):
    """The in-place swap of :mod:`lawa_optim.ops` between float32 or bfloat16 parameters
    and the running mean: float32 trade places; bfloat16 get ``round(mean)`` and the
    mean's word keeps ``(bits(param) << 16) | low16(mean)``; ``BACK`` undoes it."""
    addr, off, cnt = _row(table)
    if ALIGNED_ALL or addr % 16 == 0:
        _exchange_chunk(addr, off, cnt, total, True, PDTYPE, BACK, BLOCK)
    else:
        _exchange_chunk(addr, off, cnt, total, False, PDTYPE, BACK, BLOCK)


# -- the 8-bit history (lawa_optim.ops: push_int8, swap_in_int8) --------------------
# Rows of the int8 table have a fourth column, the index of the row's first quantisation
# block; rows start on block boundaries. A program walks its row in tiles of
# (TILE, QBLOCK): one quantisation block per tile row, its reductions along axis 1.
# Launched with enable_fp_fusion=False: the contract rounds every product on its own.

#: 1.5 * 2**23: (x + RINT) - RINT rounds |x| <= 2**22 to the nearest integer, ties to even.
RINT = tl.constexpr(12582912.0)


@triton.jit
def _row_int8(table):
    """This program's chunk: parameter address, flat offset, count, first block."""
    row = table + tl.program_id(0).to(tl.int64) * 4
    return tl.load(row), tl.multiple_of(tl.load(row + 1), 64), tl.load(row + 2), tl.load(row + 3)


@triton.jit
def _push_int8_tile(src, anchor, codes, scales, start, cnt, first, TILE: tl.constexpr,
                    QBLOCK: tl.constexpr, MASKED: tl.constexpr):
    rows = tl.arange(0, TILE)
    idx = start + rows[:, None] * QBLOCK + tl.arange(0, QBLOCK)[None, :]
    if MASKED:  # outside the chunk: d = 0, which moves no scale
        mask = idx < cnt
        w = _to_f32(tl.load(src + idx, mask=mask, other=0.0))
        a = tl.load(anchor + idx, mask=mask, other=0.0)
    else:
        mask = None
        w = _to_f32(tl.load(src + idx))
        a = tl.load(anchor + idx)
    if first:
        tl.store(anchor + idx, w, mask=mask)
    else:
        d = w - a
        # max |d| on the bits: a NaN or an infinity is above every finite value.
        top = tl.max(d.to(tl.int32, bitcast=True) & 0x7FFFFFFF, axis=1)
        bad = top >= 0x7F800000
        m = top.to(tl.float32, bitcast=True)
        live = (~bad) & (m >= 2.0**-120)
        m = tl.where(live, m, 1.0)
        scale = tl.where(live, tl.math.div_rn(m, tl.zeros_like(m) + 127.0), tl.where(bad, float("nan"), 0.0))
        inv = tl.math.div_rn(tl.zeros_like(m) + 127.0, m)
        q = (d * inv[:, None] + RINT) - RINT
        q = tl.where(live[:, None], q, 0.0)
        a = tl.where(bad[:, None], w, tl.where(live[:, None], a + q * scale[:, None], a))
        tl.store(codes + idx, q.to(tl.int8), mask=mask)
        tl.store(anchor + idx, a, mask=mask)
        blk = start // QBLOCK + rows
        tl.store(scales + blk, scale, mask=(blk * QBLOCK < cnt) if MASKED else None)


@triton.jit
def _push_int8_chunk(addr, off, cnt, blk0, ring, scales, anchor, n, D, NB, K, ALIGNED: tl.constexpr,
                     PDTYPE: tl.constexpr, TILE: tl.constexpr, QBLOCK: tl.constexpr):
    src = _param(addr, ALIGNED, PDTYPE)
    first = (n == 0) | (K == 1)
    s = tl.where(first, 0, (n - 1) % tl.maximum(K - 1, 1))
    codes = ring + s * D + off
    sc = scales + s * NB + blk0
    whole = cnt - cnt % (TILE * QBLOCK)
    for start in range(0, whole, TILE * QBLOCK):
        _push_int8_tile(src, anchor + off, codes, sc, start, cnt, first, TILE, QBLOCK, False)
    if whole < cnt:
        _push_int8_tile(src, anchor + off, codes, sc, whole, cnt, first, TILE, QBLOCK, True)


@triton.jit
def push_int8_kernel(table, ring, scales, anchor, pushes, D, NB, K, PDTYPE: tl.constexpr,
                     TILE: tl.constexpr, QBLOCK: tl.constexpr, ALIGNED_ALL: tl.constexpr):
    """Push ``n = pushes`` of an 8-bit history: ``anchor = param`` when ``n == 0`` or
    ``K == 1``; else the delta ``param - anchor`` per block into slot ``(n - 1) % (K - 1)``
    (codes and scale) and ``anchor`` moved by the dequantised delta (a block with a
    non-finite delta: scale NaN, codes 0, ``anchor = param``)."""
    addr, off, cnt, blk0 = _row_int8(table)
    n = tl.load(pushes)
    if ALIGNED_ALL or addr % 16 == 0:
        _push_int8_chunk(addr, off, cnt, blk0, ring, scales, anchor, n, D, NB, K, True, PDTYPE, TILE, QBLOCK)
    else:
        _push_int8_chunk(addr, off, cnt, blk0, ring, scales, anchor, n, D, NB, K, False, PDTYPE, TILE, QBLOCK)


@triton.jit
def _swap_int8_tile(src, anchor, backup, ring, scales, coef, start, cnt, n, D, NB, K, m, PDTYPE: tl.constexpr,
                    TILE: tl.constexpr, QBLOCK: tl.constexpr, MASKED: tl.constexpr):
    rows = tl.arange(0, TILE)
    idx = start + rows[:, None] * QBLOCK + tl.arange(0, QBLOCK)[None, :]
    mask = idx < cnt if MASKED else None
    p = tl.load(src + idx, mask=mask)
    tl.store(backup + idx, value=p, mask=mask)
    s = tl.zeros((TILE, QBLOCK), dtype=tl.float32)
    c = tl.zeros((TILE, QBLOCK), dtype=tl.float32)
    s, c = _csum_add(s, c, tl.load(coef) * tl.load(anchor + idx, mask=mask))
    blk = start // QBLOCK + rows
    for j in range(1, m):
        slot = (n - 1 - j) % (K - 1)
        code = tl.load(ring + slot * D + idx, mask=mask).to(tl.float32)
        scale = tl.load(scales + slot * NB + blk, mask=(blk * QBLOCK < cnt) if MASKED else None)
        s, c = _csum_add(s, c, tl.load(coef + j) * (code * scale[:, None]))
    tl.store(src + idx, _from_f32(s + c, PDTYPE), mask=mask)


@triton.jit
def _swap_int8_chunk(addr, off, cnt, blk0, ring, scales, anchor, backup, coef, n, D, NB, K, m,
                     ALIGNED: tl.constexpr, PDTYPE: tl.constexpr, TILE: tl.constexpr, QBLOCK: tl.constexpr):
    src = _param(addr, ALIGNED, PDTYPE)
    whole = cnt - cnt % (TILE * QBLOCK)
    for start in range(0, whole, TILE * QBLOCK):
        _swap_int8_tile(src, anchor + off, backup + off, ring + off, scales + blk0, coef, start, cnt, n, D, NB, K, m,
                        PDTYPE, TILE, QBLOCK, False)
    if whole < cnt:
        _swap_int8_tile(src, anchor + off, backup + off, ring + off, scales + blk0, coef, whole, cnt, n, D, NB, K, m,
                        PDTYPE, TILE, QBLOCK, True)


@triton.jit
def swap_int8_kernel(table, ring, scales, anchor, backup, coef, pushes, D, NB, K, m, PDTYPE: tl.constexpr,
                     TILE: tl.constexpr, QBLOCK: tl.constexpr, ALIGNED_ALL: tl.constexpr):
    """``backup = param``; ``param`` = Neumaier's sum of ``coef[0] * anchor`` and
    ``coef[j] * code * scale`` of the ``j``-th newest delta, ``j = 1 .. m - 1``."""
    addr, off, cnt, blk0 = _row_int8(table)
    n = tl.load(pushes)
    if ALIGNED_ALL or addr % 16 == 0:
        _swap_int8_chunk(addr, off, cnt, blk0, ring, scales, anchor, backup, coef, n, D, NB, K, m, True, PDTYPE,
                         TILE, QBLOCK)
    else:
        _swap_int8_chunk(addr, off, cnt, blk0, ring, scales, anchor, backup, coef, n, D, NB, K, m, False, PDTYPE,
                         TILE, QBLOCK)
