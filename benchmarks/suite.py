"""The operations of the LAWA history (Kaddour 2022, arXiv:2209.14981) set up for timing.

:func:`prepare` builds a full ring (k snapshots taken) over a workload's parameters;
:func:`operations` returns, for each operation, the call through ``lawa_optim.ops``,
its baselines on the same tensors (:mod:`benchmarks.baselines`) and the bytes the
operation must move at least, which is what GB/s and the roofline are computed from.

A snapshot is timed as k snapshots in a row: the push that completes a pass over the
ring may also refresh the running mean exactly from the ring, so the cost of a snapshot
is its cost amortised over k consecutive ones. Its baselines run k pushes in a row too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from types import SimpleNamespace

import torch

from benchmarks.baselines import BASELINES, Lists
from benchmarks.baselines import roofline as plain_copy
from benchmarks.workloads import Workload
from lawa_optim import ops
from lawa_optim.backends import cpu_kernels
from lawa_optim.history import Bucket, history_device

OPS = ("snapshot", "ema", "swap_in", "swap_back", "recompute")
DECAY = 0.9


@dataclass
class Op:
    """One operation: the LAWA call and its baselines (name -> call), each running the
    operation ``calls`` times in a row, and the bytes one operation moves."""

    lawa: Callable[[], None]
    baselines: dict[str, Callable[[], None]]
    nbytes: int
    calls: int


@dataclass
class Setup:
    """A full ring and an EMA history over one workload, with one backend."""

    workload: Workload
    backend: str
    k: int
    uniform: Bucket
    ema: Bucket
    lists: Lists = field(repr=False)
    ema_lists: Lists = field(repr=False)


def prepare(w: Workload, backend: str, k: int) -> Setup:
    """Buckets over ``w.params`` (history in their dtype) with ``k`` snapshots taken and a
    backup allocated.

    Holds about ``(4k + 20)`` bytes per float32 element beside the parameters."""
    uni = Bucket(w.params, k, "uniform", None, "device", backend)
    ema = Bucket(w.params, k, "ema", None, "device", backend)
    for _ in range(k):
        ops.push(uni)
    ops.ema_update(ema, DECAY)
    uni.backup = torch.empty(uni.D, dtype=uni.dtype, device=uni.device)
    avg = torch.empty(uni.D, dtype=uni.dtype, device=uni.device)
    return Setup(w, backend, k, uni, ema, Lists.of(uni, avg), Lists.of(ema, avg))


def nbytes(op: str, numel: int, param: torch.dtype, history: torch.dtype, k: int) -> int:
    """Bytes ``op`` must read and write over ``numel`` elements with a full ring."""
    p, h = param.itemsize, history.itemsize
    a = 8 if param == torch.float64 else 4
    per_element = {
        "snapshot": p + 2 * h + 2 * a,  # read param and old slot, write slot, update sum
        "ema": p + 2 * a,
        "swap_in": 3 * p + a,  # back up the param, read the sum, write the param
        "swap_back": 2 * p,
        "recompute": k * h + a,
    }[op]
    return per_element * numel


def operations(s: Setup, names: tuple[str, ...] = OPS) -> dict[str, Op]:
    """The calls to time for each operation in ``names``."""
    uni, ema, k = s.uniform, s.ema, s.k
    # name -> (LAWA call, the lists its baselines work on, their argument at call i of a row)
    table = {
        "snapshot": (partial(ops.push, uni), s.lists, lambda i: k + i),  # push numbers k .. 2k-1
        "ema": (partial(ops.ema_update, ema, DECAY), s.ema_lists, lambda i: DECAY),
        "swap_in": (partial(ops.swap_in, uni, None), s.lists, lambda i: k),
        "swap_back": (partial(ops.swap_back, uni), s.lists, lambda i: k),
        "recompute": (partial(ops.recompute, uni), s.lists, lambda i: k),
    }
    out = {}
    for name in names:
        lawa, lists, arg = table[name]
        n = k if name == "snapshot" else 1
        baselines = {b: in_a_row(lambda i, fn=fn: fn(lists, arg(i)), n) for b, fn in BASELINES[name].items()}
        out[name] = Op(in_a_row(lambda i, fn=lawa: fn(), n), baselines,
                       nbytes(name, s.workload.numel, uni.dtype, uni.history_dtype, k), n)
    return out


def roofline(op: Op, dst: torch.Tensor, src: torch.Tensor) -> Callable[[], None]:
    """The copy roofline of ``op``: ``op.calls`` plain copies in a row of half the bytes it
    moves (each read once and written once) from ``src`` into ``dst``, which hold at least
    that many."""
    half = op.nbytes // 2 // src.element_size()
    d, s = dst[:half], src[:half]
    return in_a_row(lambda i: plain_copy(d, s), op.calls)


def in_a_row(fn: Callable[[int], None], n: int) -> Callable[[], None]:
    """A call that runs ``fn(0)``, ..., ``fn(n - 1)``."""
    def call() -> None:
        for i in range(n):
            fn(i)
    return call


def plain(fn: Callable[[], None]) -> Callable[[], None]:
    """``fn`` with the C kernels of the CPU switched off: the torch backend's plain code."""
    def call() -> None:
        prior, cpu_kernels.enabled = cpu_kernels.enabled, False
        try:
            fn()
        finally:
            cpu_kernels.enabled = prior
    return call


def backends_here(device: torch.device, dtype: torch.dtype) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Backends that can run ``dtype`` on ``device``, each with the implementations to
    time, and why each other fused backend cannot. On the CPU the torch backend runs with
    its C kernels (``fused-c``, the default) and, for comparison, without them (``plain``,
    ``LAWA_OPTIM_CPU_KERNELS=0``), for every operation: which operations the C kernels
    cover is theirs to decide, the two rows show it."""
    probe = SimpleNamespace(device=history_device(device, "device"), param_device=device,
                            dtype=dtype, history_dtype=dtype)
    if device.type == "cpu":
        # Triton on the CPU runs in its interpreter: a correctness tool, not a speed one.
        return {"torch": (["fused-c"] if cpu_kernels.runs(probe) else []) + ["plain"]}, {}
    why = {name: ops.unavailable(name, probe) for name in ("cuda", "triton", "torch")}
    return ({name: [name] for name, reason in why.items() if reason is None},
            {name: reason for name, reason in why.items() if reason is not None})
