"""The Triton backend beyond the kernel contract (which test_ops.py checks on every
backend): the block table, the casts on every kind of bit pattern, launches and table
reuse, the wrapper, and what a GPU would run.

LAWA (Kaddour 2022, arXiv:2209.14981) keeps the k latest snapshots. Without a GPU the
kernels run on CPU tensors in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), one Python call per program, so sizes stay small; on a GPU the
same tests run the compiled kernels. Every comparison is on bit patterns. What a GPU
would run is also compiled here ahead of time and its PTX checked.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import COMBOS, DEVICE, assert_same_bits, backend_skip_reason, bits, make_params, probe, rounded, set_values, swap_in, twins

from lawa_optim import LAWA, ops
from lawa_optim.backends import triton as tb
from lawa_optim.history import ALIGN, Bucket

needs_triton = pytest.mark.skipif(
    backend_skip_reason("triton") is not None, reason=f"triton backend: {backend_skip_reason('triton')}"
)


# -- block table (no kernels) ----------------------------------------------------


def expand(table: torch.Tensor, element_size: int) -> dict[int, int]:
    """Element address -> flat index for every element the table covers."""
    out = {}
    for addr, flat, count in table.tolist():
        for e in range(count):
            assert addr + e * element_size not in out
            out[addr + e * element_size] = flat + e
    return out


def test_block_table_covers_each_element_once():
    numels, ptrs, chunk, esize = [0, 1, 5, 8, 9, 17], [1000, 2000, 3000, 4000, 5000, 6000], 8, 2
    offsets = [0, 64, 128, 192, 256, 320]
    table = tb.block_table(ptrs, numels, offsets, esize, chunk=chunk)
    assert table.dtype == torch.int64
    assert table[:, 2].tolist() == [1, 5, 8, 8, 1, 8, 8, 1]  # the empty parameter has no row
    expected = {p + e * esize: o + e for p, n, o in zip(ptrs, numels, offsets) for e in range(n)}
    assert expand(table, esize) == expected


def test_block_table_offsets_are_int64_beyond_2_31():
    # A bucket of 2**31 + 5 and 2**33 bfloat16 elements (20 GiB), indexed without allocating it.
    numels = [3, 2**31 + 5, 2**33]
    offsets = [0, ALIGN, ALIGN + 2**31 + 64]
    ptrs = [2**40, 2**41, 2**42]
    table = tb.block_table(ptrs, numels, offsets, 2)
    rows_of = [-(-n // tb.CHUNK) for n in numels]
    assert table.shape == (sum(rows_of), 3)
    last_of_second = table[rows_of[0] + rows_of[1] - 1].tolist()
    start = (rows_of[1] - 1) * tb.CHUNK
    assert last_of_second == [2**41 + 2 * start, ALIGN + start, 2**31 + 5 - start]
    last = table[-1].tolist()
    start = 2**33 - tb.CHUNK
    assert last == [2**42 + 2 * start, offsets[2] + start, tb.CHUNK]
    assert table[:, 2].sum().item() == sum(numels)
    # The kernel's ring address for the last element of the bucket in slot 5 of 6, as
    # it computes it: int64 counter % k, times D, plus the row's offset and lane.
    D, n, k = offsets[2] + 2**33, torch.tensor([11]), 6
    lane = tb.CHUNK - 1
    assert ((n % k) * D + table[-1, 1] + lane).item() == 5 * D + offsets[2] + 2**33 - 1


def test_block_table_refuses_a_bad_chunk():
    with pytest.raises(ValueError, match="chunk must be a positive number of elements, got 0"):
        tb.block_table([0], [1], [0], 4, chunk=0)


@needs_triton
def test_unavailable_names_the_reason():
    def why(device, **kwargs):
        return ops.unavailable("triton", probe(device, **kwargs))

    assert all(why(DEVICE.type, dtype=p, history_dtype=h) is None for p, h in COMBOS)
    assert "float64 runs on the torch backend" in why(DEVICE.type, dtype=torch.float64)
    assert "history dtype is torch.float64" in why(DEVICE.type, history_dtype=torch.float64)
    assert "need both on one device" in why("cpu", param_device="cuda")
    other = "cuda" if DEVICE.type == "cpu" else "cpu"
    assert why(other) is not None


# -- what the contract matrix (test_ops.py) does not cover ----------------------------


@needs_triton
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's overflow to inf in the interpreter
@pytest.mark.parametrize("hdtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_casts_round_to_nearest_even_like_torch(hdtype):
    """Ties, carries into the exponent, overflow to inf, subnormals, signed zeros, NaN; and
    the swap's rounding of an average (ties away from zero for bfloat16)."""
    g = torch.Generator().manual_seed(2)
    random_bits = torch.randint(-(2**31), 2**31, (20000,), generator=g, dtype=torch.int64)
    special = [
        0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 1, 0x00008000,
        0x3F808000, 0x3F818000, 0x3F80FFFF, 0x7F7FFFFF, 0x7F7F8000, 0x477FF000, 0x477FEFFF,
        0x33000000, 0x33000001, 0x387FE000, 0xB3800000,
    ]
    special = torch.tensor([b - 2**32 if b >= 2**31 else b for b in special], dtype=torch.int64)
    x = torch.cat([random_bits, special]).to(torch.int32).view(torch.float32).to(DEVICE)
    tri = Bucket([x], 1, "uniform", hdtype, "device", "triton")
    ops.push(tri)
    stored, expected = tri.ring[0, : x.numel()], x.to(hdtype)
    nan = expected.isnan()
    assert torch.equal(stored.isnan(), nan)
    assert torch.equal(bits(stored)[~nan], bits(expected)[~nan])
    # The way back: swap_in rounds the float32 average into a parameter of this dtype
    # (bfloat16: to nearest with ties away from zero, the contract's round).
    p = torch.zeros(x.numel(), dtype=hdtype, device=DEVICE)
    tri_p = Bucket([p], 1, "ema", None, "device", "triton")
    tri_p.total[: x.numel()] = x
    tri_p.pushes.fill_(1)
    swap_in(tri_p, None)
    expected = rounded(x, hdtype)
    assert torch.equal(p.isnan(), nan)
    assert torch.equal(bits(p)[~nan], bits(expected)[~nan])


class CountingKernel:
    """Wraps a Triton kernel and counts its launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@needs_triton
def test_one_launch_per_push_and_a_table_rebuilt_only_when_a_parameter_moves(monkeypatch):
    """Each push is one launch over the whole bucket and reuses the block table; a
    parameter whose storage moved gets a new table, and the pushes still leave the
    reference's ring and sum."""
    tri, ref = twins(make_params(DEVICE, torch.float32, seed=4), 2, "uniform", None, "triton")
    counter = CountingKernel(tb._k.push_kernel)
    monkeypatch.setattr(tb._k, "push_kernel", counter)
    set_values((tri, ref), seed=0)
    ops.push(ref)
    ops.push(tri)
    table = tri.cache["triton"][0]
    set_values((tri, ref), seed=1)
    ops.push(ref)
    ops.push(tri)
    assert tri.cache["triton"][0] is table  # built once, not per snapshot
    assert counter.launches == 2
    assert table.shape == (sum(-(-n // tb.CHUNK) for n in tri.numels), 3)
    for a, b in zip(tri.params, ref.params):
        fresh = (a * 2).contiguous(memory_format=torch.channels_last) if a.dim() == 4 else a * 2
        a.data, b.data = fresh, fresh.clone()
    for b in (ref, tri):
        b.check_params()
        ops.push(b)
    assert tri.cache["triton"][0] is not table and counter.launches == 3
    assert_same_bits(ref.ring, tri.ring, "ring")
    assert_same_bits(ref.total, tri.total, "sum")


class RecordingKernel:
    """Wraps a Triton kernel and records the ``ALIGNED_ALL`` of each launch."""

    def __init__(self, kernel):
        self.kernel, self.aligned = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **constexprs):
            self.aligned.append(constexprs["ALIGNED_ALL"])
            return self.kernel[grid](*args, **constexprs)

        return launch


@needs_triton
@pytest.mark.parametrize("hdtype", [torch.float32, torch.int8], ids=["float32", "int8"])
def test_alignment_is_declared_only_where_the_host_found_every_parameter_aligned(monkeypatch, hdtype):
    """A bucket whose parameters all start on a 16-byte boundary launches the kernels that
    declare every row aligned, and caches that decision with its table; once a parameter
    is moved to a misaligned view, the next snapshot builds a new table, launches the
    per-row variant, and the ring and the sum stay the reference's bit for bit, as does
    the swap. (The interpreter ignores alignment declarations: what a GPU runs with them
    is checked in the PTX below.)"""
    g = torch.Generator().manual_seed(6)
    params = [torch.randn(n, generator=g).to(DEVICE) for n in (3, 70, tb.CHUNK + 9)]
    tri, ref = twins(params, 3, "uniform", hdtype, "triton")
    int8 = hdtype == torch.int8
    kernel, key = ("push_int8_kernel", "triton_int8") if int8 else ("push_kernel", "triton")
    recorder = RecordingKernel(getattr(tb._k, kernel))
    monkeypatch.setattr(tb._k, kernel, recorder)

    def snapshot(seed):
        set_values((tri, ref), seed=seed)
        for b in (ref, tri):
            b.check_params()
            ops.push(b)
        assert_same_bits(ref.ring, tri.ring, "ring")
        assert_same_bits(ref.total, tri.total, "sum")
        if int8:
            assert_same_bits(ref.scales, tri.scales, "scales")

    snapshot(0)
    snapshot(1)
    assert recorder.aligned == [True, True] and tri.cache[key][1] is True
    storage = torch.randn(70 + 1, generator=g).to(DEVICE)
    tri.params[1].data, ref.params[1].data = storage[1:], storage.clone()[1:]
    assert tri.params[1].data_ptr() % 16 != 0
    snapshot(2)
    assert recorder.aligned == [True, True, False] and tri.cache[key][1] is False
    for b in (ref, tri):
        swap_in(b, None)
    for a, b in zip(ref.params, tri.params):
        assert_same_bits(a, b, "swapped-in weights")


# -- through the wrapper -----------------------------------------------------------


@needs_triton
def test_wrapper_runs_and_reports_triton():
    def run(backend):
        torch.manual_seed(5)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(64, 2))
        model = model.to(DEVICE, memory_format=torch.channels_last)
        opt = LAWA(torch.optim.SGD(model.parameters(), lr=0.1), k=2, backend=backend)
        for _ in range(3):
            x = torch.randn(2, 3, 6, 6, device=DEVICE).contiguous(memory_format=torch.channels_last)
            model(x).sum().backward()
            opt.step()
            opt.zero_grad()
            opt.snapshot()
        trained = [p.detach().clone() for p in model.parameters()]
        with opt.averaged():
            averaged = [p.detach().clone() for p in model.parameters()]
        for p, t in zip(model.parameters(), trained):
            assert_same_bits(p, t)
        return opt.backend, averaged

    name, tri = run("triton")
    assert name == "triton"
    _, ref = run("torch")
    for a, b in zip(ref, tri):
        assert_same_bits(a, b)


# -- what a GPU would run, compiled ahead of time without one ---------------------

# Run in a child process: this one set TRITON_INTERPRET=1 before importing the kernels.
COMPILE_PTX = r"""
import json, re, sys
from lawa_optim.backends import triton as tb
out = {}
for arch in (80, 90):
    for name, ptx in tb.compile_ptx(arch).items():
        out[f"{arch}:{name}"] = {
            "ld_v4": len(re.findall(r"\bld\.global(?:\.\w+)*\.v4\.", ptx)),
            "st_v4": len(re.findall(r"\bst\.global(?:\.\w+)*\.v4\.", ptx)),
            "ld": len(re.findall(r"\bld\.global\b", ptx)),
            "st": len(re.findall(r"\bst\.global\b", ptx)),
            # unpredicated and narrower than 128 bits: not a masked tail's, not a vector
            "ld_bare": len(re.findall(r"^\s*ld\.global(?![^\s]*\.v4\.)", ptx, re.M)),
            "st_bare": len(re.findall(r"^\s*st\.global(?![^\s]*\.v4\.)", ptx, re.M)),
            "ops": sorted(set(re.findall(r"\b(?:div|fma|cvt)(?:\.\w+)+", ptx))),
        }
json.dump(out, sys.stdout)
"""


@pytest.fixture(scope="module")
def compiled():
    """Facts about the PTX of every kernel variant for sm_80 and sm_90."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton 3.9's default, stated to silence its warning
    run = subprocess.run(
        [sys.executable, "-c", COMPILE_PTX], env=env, cwd=Path(__file__).parents[1],
        capture_output=True, text=True,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout)


def vectors(*dtypes: str) -> int:
    """128-bit accesses one thread makes to move its 8 elements of each stream."""
    return sum(8 * (4 if d == "float32" else 2) // 16 for d in dtypes)


def vectors16(*dtypes: str) -> int:
    """128-bit accesses one thread makes to move its 16 elements of each stream (the
    8-bit history's kernels)."""
    return sum({"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}[d] for d in dtypes)


def loop_vectors(name: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """(loads, stores) of 128 bits in one fully vectorized loop of a kernel variant, and
    the parameter's share of them."""
    op, *dtypes = name.split(":")
    if op == "push_int8":  # parameter and anchor in; the anchor (first push, later) and the codes out
        p = dtypes[0]
        return (vectors16(p, "float32"), vectors16("float32", "float32", "int8")), (vectors16(p), 0)
    if name.startswith("swap_in:int8"):  # parameter, anchor and one delta's codes in; backup and parameter out
        p = dtypes[1]
        return (vectors16(p, "float32", "int8"), vectors16(p, p)), (vectors16(p), vectors16(p))
    if op == "swap_in":
        mode, p, *h = dtypes
        avg = ["float32"] if mode in ("ema", "mean") else h  # total, or the ring's slots
        # the float64 sum where a sum is not finite reads the slots too (no such fallback
        # in the weighted sum)
        wide = vectors(*h) if mode in ("mean", "last") else 0
        return (vectors(p, *avg) + wide, vectors(p, p)), (vectors(p), vectors(p))
    p = dtypes[-1] if op == "exchange" else dtypes[0]
    if op == "push":
        # parameter, old slot, mean, the other slots at a refresh, and the slots again
        # where the refresh's sum is not finite (its float64 mean)
        h = dtypes[1]
        return (vectors(p, h, "float32", h) + vectors(h), vectors(h, "float32")), (vectors(p), 0)
    if op == "exchange":  # parameter and mean, both read and written
        return (vectors(p, "float32"), vectors(p, "float32")), (vectors(p), vectors(p))
    if op == "ema":
        return (vectors(p, "float32"), vectors("float32")), (vectors(p), 0)
    if op == "phema":  # compiled for two widths: the parameter once, each width's row
        return (vectors(p, "float32", "float32"), 2 * vectors("float32")), (vectors(p), 0)
    assert op == "swap_back"
    return (vectors(p), vectors(p)), (0, vectors(p))


#: Variants for which the compiler adds a version of the loop for a sum over no slots,
#: which only moves the parameter into the backup and writes it (vectorized as well).
UNSWITCHED = {"swap_in:weighted:float16:float32"}


def expected_vectors(name: str) -> tuple[int, int]:
    """(loads, stores) of 128 bits in a kernel variant. With every parameter aligned
    (``ALIGNED_ALL``) the one loop is fully vectorized; the variant that branches per row
    (``PER_ROW``) has that loop and a misaligned parameter's, where every stream but the
    parameter's is vectorized."""
    (loads, stores), (p_loads, p_stores) = loop_vectors(name.removesuffix(tb.PER_ROW))
    if name.endswith(tb.PER_ROW):
        return 2 * loads - p_loads, 2 * stores - p_stores
    if name in UNSWITCHED:
        return loads + p_loads, stores + 2 * p_stores
    return loads, stores


def scalar_reads(name: str) -> int:
    """Unpredicated loads narrower than 128 bits in a variant with every parameter aligned:
    the table row, the snapshot counter where the kernel uses it, and the small float32
    arguments, read once in the loop and once in its masked tail."""
    op, *dtypes = name.split(":")
    counter = op in ("push", "ema", "push_int8") or (op == "swap_in" and dtypes[0] != "ema")
    small = {"phema": 2 * 2, "swap_in:weighted": 2,
             # the anchor's and a delta's coefficient twice, a delta's scale in the loop
             # (the tail's is masked)
             "swap_in:int8": 5}
    extra = next((n for prefix, n in small.items() if name.startswith(prefix)), 0)
    return (4 if "int8" in name else 3) + counter + extra


def test_compile_ptx_names_every_variant(compiled):
    names = {k.split(":", 1)[1] for k in compiled}
    d = ("float32", "bfloat16", "float16")
    table_walkers = (
        {f"push:{p}:{h}" for p in d for h in d} | {f"ema:{p}" for p in d} | {f"phema:{p}" for p in d}
        | {f"swap_in:ema:{p}" for p in d}
        | {f"swap_in:{m}:{p}:{h}" for m in ("mean", "last", "weighted") for p in d for h in d}
        | {f"swap_back:{p}" for p in d}
        | {f"push_int8:{p}" for p in d} | {f"swap_in:int8:{p}" for p in d}
        | {f"exchange:{way}:{p}" for way in ("in", "back") for p in ("float32", "bfloat16")}
    )
    assert tb.PER_ROW == ":per_row"
    expected = table_walkers | {n + ":per_row" for n in table_walkers} | {f"recompute:{h}" for h in d}
    assert names == expected
    assert {k.split(":", 1)[0] for k in compiled} == {"80", "90"}


def test_every_access_of_an_aligned_parameter_is_128_bit(compiled):
    """sm_80 and sm_90: the counts of ld/st.global.v4 are exactly those of fully vectorized
    loops, so a stream that falls back to 32- or 16-bit accesses fails this. Where the host
    has checked that every parameter is aligned that loop is the only one, and its only
    narrow accesses are its masked tail's and the reads of scalars: no parameter is read
    or written one element at a time. The recompute reads no parameter: one vector load
    of a slot per step (and one in the float64 loop that runs where a sum is not finite),
    and every global access but the load of the snapshot counter is 128-bit (how often
    the compiler repeats the store of the sum in its loop versions is its own affair)."""
    for key, facts in compiled.items():
        name = key.split(":", 1)[1]
        if name.startswith("recompute"):
            # the slots, and again where their sum is not finite (the float64 mean)
            assert facts["ld_v4"] == 2 * vectors(name.split(":")[1]) and facts["ld"] == facts["ld_v4"] + 1, key
            assert facts["st"] == facts["st_v4"] > 0, key
            continue
        assert (facts["ld_v4"], facts["st_v4"]) == expected_vectors(name), key
        if name.endswith(tb.PER_ROW):  # the misaligned loop moves the parameter one element at a time
            assert facts["ld_bare"] + facts["st_bare"] > scalar_reads(name.removesuffix(tb.PER_ROW)), key
        else:
            assert (facts["ld_bare"], facts["st_bare"]) == (scalar_reads(name), 0), key


def test_compiled_arithmetic_is_the_contract(compiled):
    """IEEE division (the running mean's step, last=j's mean), torch's fused multiply-add
    in the EMA and none in the weighted swap-in and the power-function EMAs, and on the
    GPU the hardware's round-to-nearest-even casts (the instruction torch's CUDA cast
    uses), not the interpreter's hand-written rounding; the exchange only moves bits."""
    for key, facts in compiled.items():
        ops = facts["ops"]
        assert not any(o.startswith(("div.approx", "div.full")) for o in ops), key
        name = key.split(":", 1)[1]
        if name.startswith(("swap_in:last", "push", "recompute")):
            assert "div.rn.f32" in ops, key
        if name.startswith("exchange"):
            assert not any(o.startswith(("div", "fma", "cvt.rn", "cvt.rz")) for o in ops), key
        if name.startswith("ema"):
            assert "fma.rn.f32" in ops, key
        if name.startswith(("swap_in:weighted", "phema", "push_int8", "swap_in:int8")):
            # Each product rounds before it is added: Triton would fuse them by default.
            assert not any(o.startswith("fma") for o in ops), key
        if name.startswith("push_int8"):  # the scale and its inverse
            assert "div.rn.f32" in ops, key
    for name, cvt in [("push:float32:bfloat16", "cvt.rn.bf16"), ("push:float32:float16", "cvt.rn.f16"),
                      ("swap_in:mean:bfloat16:float32", "cvt.rn.bf16")]:
        for arch in (80, 90):
            assert any(o.startswith(cvt) for o in compiled[f"{arch}:{name}"]["ops"]), (arch, name)
