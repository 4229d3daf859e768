"""Shared builders of the fused-kernel tests: parameter layouts that exercise every
path of the Triton and CUDA kernels, and a twin bucket on the pure-torch reference
that receives exactly the same snapshots.

The layouts: 1 element, odd sizes, exactly ALIGN, a 2-D weight, parameters spanning
several Triton table rows and CUDA tiles, empty parameters between others (the CUDA
segment search must step over them), a channels_last conv weight, and dense views
that start off a 16-byte boundary (the scalar paths, beside aligned parameters that
stay vectorized).
"""

from __future__ import annotations

import torch

from lawa_optim import ops
from lawa_optim.backends import triton as tb
from lawa_optim.history import ALIGN, Bucket

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
COMBOS = [(p, h) for p in DTYPES for h in DTYPES]
_BITS = {8: torch.int64, 4: torch.int32, 2: torch.int16}


def dtype_id(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


def bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bit pattern, so that -0.0 != 0.0 and NaNs compare by payload."""
    return t.detach().contiguous().view(_BITS[t.element_size()])


def assert_same_bits(a: torch.Tensor, b: torch.Tensor, what: str = "") -> None:
    assert a.shape == b.shape and a.dtype == b.dtype, what
    same = bits(a) == bits(b)
    if not bool(same.all()):
        where = (~same).nonzero()[0].tolist()
        raise AssertionError(f"{what}: {int((~same).sum())} elements differ, first at {where}: "
                             f"{a[tuple(where)].item()!r} vs {b[tuple(where)].item()!r}")


def make_params(device: torch.device, dtype: torch.dtype, seed: int = 0, rows: int = 2) -> list[torch.Tensor]:
    """The layouts of the module docstring; ``rows`` Triton table rows (and 2 * rows CUDA
    tiles) in the largest parameter. The same seed gives the same values and layouts."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    # One storage, two dense views off a 16-byte boundary: 1 and 3 elements in.
    storage = rand(1 + 37 + 3 + 1000)
    return [
        rand(1),
        rand(3),
        torch.empty(0, device=device, dtype=dtype),
        rand(ALIGN - 1),
        rand(ALIGN),
        storage[1:1 + 37],
        rand(5, 13),
        rand(rows * tb.CHUNK + 5),
        torch.empty(0, device=device, dtype=dtype),
        storage[1 + 37 + 3:],
        rand(4, 3, 3, 3).contiguous(memory_format=torch.channels_last),
    ]


def clone_params(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies with the same layout, including the offset of views into a storage."""
    out = []
    for p in params:
        if p._base is None:
            out.append(p.detach().clone())  # keeps channels_last
        else:
            out.append(p._base.detach().clone().as_strided(p.shape, p.stride(), p.storage_offset()))
    return out


def twins(params: list[torch.Tensor], k: int, mode: str, hdtype: torch.dtype | None, backend: str,
          refresh_every: int | None = None) -> tuple[Bucket, Bucket]:
    """A bucket of ``backend`` over ``params`` and a reference bucket over copies."""
    fused = Bucket(params, k, mode, hdtype, "device", backend, refresh_every)
    ref = Bucket(clone_params(params), k, mode, hdtype, "device", "torch", refresh_every)
    assert fused.backend == backend
    return fused, ref


def set_values(pair: tuple[Bucket, Bucket], seed: int, scale: float = 3.0) -> None:
    """The same fresh values in both buckets' parameters."""
    g = torch.Generator().manual_seed(seed)
    for a, b in zip(*(x.params for x in pair)):
        r = (torch.randn(a.shape, generator=g) * scale).to(a.device, a.dtype)
        a.copy_(r)
        b.copy_(r)


def swap_in(b: Bucket, last: int | None) -> None:
    b.backup = torch.empty(b.D, dtype=b.dtype, device=b.device)
    ops.swap_in(b, last)


def assert_params_match(fused: Bucket, ref: Bucket, what: str) -> None:
    for i, (a, b) in enumerate(zip(fused.params, ref.params)):
        assert a.stride() == b.stride()
        assert_same_bits(a, b, f"{what}, parameter {i}")


def check_uniform(fused: Bucket, ref: Bucket, pushes: int, seed: int = 0, fill=set_values) -> None:
    """``pushes`` snapshots into both buckets (values from ``fill(pair, seed)``), ring and
    sum compared after each; then every swap the fill allows (the mean, and
    ``last = 1 .. min(n, k)``), each compared and swapped back bit for bit, on a partly
    filled ring (after 2 pushes) and at the end."""
    def swaps(n: int) -> None:
        originals = [p.clone() for p in fused.params]
        for last in (None, *range(1, min(n, fused.k) + 1)):
            for b in (fused, ref):
                swap_in(b, last)
            assert_params_match(fused, ref, f"swap_in(last={last}) after {n} pushes")
            for i in range(len(fused.params)):
                assert_same_bits(fused.view(fused.backup, i), originals[i], f"backup of parameter {i}")
            for b in (fused, ref):
                ops.swap_back(b)
            for i, (p, o) in enumerate(zip(fused.params, originals)):
                assert_same_bits(p, o, f"swap_back, parameter {i}")

    for n in range(1, pushes + 1):
        fill((fused, ref), seed + n)
        ops.push(fused)
        ops.push(ref)
        assert_same_bits(fused.ring, ref.ring, f"ring after push {n}")
        assert_same_bits(fused.total, ref.total, f"sum after push {n}")
        if n == 2:
            swaps(n)
    swaps(pushes)
    fused.total.fill_(123.0)  # garbage the recompute must wipe
    ops.recompute(fused)
    ops.recompute(ref)
    assert_same_bits(fused.total, ref.total, "recompute")


def check_ema(fused: Bucket, ref: Bucket, decay: float, updates: int = 3, seed: int = 10,
              fill=set_values) -> None:
    """EMA updates (the first copies, the others fold in) and a swap, bit for bit."""
    for n in range(updates):
        fill((fused, ref), seed + n)
        ops.ema_update(fused, decay)
        ops.ema_update(ref, decay)
        assert_same_bits(fused.total, ref.total, f"EMA after update {n + 1}")
    originals = [p.clone() for p in fused.params]
    for b in (fused, ref):
        swap_in(b, None)
    assert_params_match(fused, ref, "EMA swap_in")
    ops.swap_back(fused)
    for i, (p, o) in enumerate(zip(fused.params, originals)):
        assert_same_bits(p, o, f"EMA swap_back, parameter {i}")
