"""The fused kernels (Triton and CUDA) on a GPU against the pure-torch reference on the
same device, bit for bit, where the contract matrix (tests/test_ops.py, which runs them
too on a GPU) does not reach: NaN and infinity bit patterns through every dtype pair,
a bucket beyond 2**31 elements and a bucket on a device that is not the current one.
Skipped without a GPU.

The bucket beyond 2**31 elements needs about 27 GiB of GPU memory and is marked
``gpu_large`` (select it with ``-m gpu_large``, leave it out with ``-m "not gpu_large"``).
"""

import pytest
import torch
from conftest import COMBOS, assert_same_bits, backend_skip_reason, dtype_id, make_params, set_values, swap_in, twins

import lawa_optim
from lawa_optim import ops
from lawa_optim.history import Bucket

GPU = torch.cuda.is_available()
CUDA = torch.device("cuda")


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
    """EMA updates (the first copies, the others fold in) and a swap, bit for bit: torch's
    CUDA add-with-alpha rounds ``decay * total`` in its own multiply, then adds
    ``alpha * param`` with one fused multiply-add (nvcc contracts it), as the kernels do."""
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


# Bit patterns that every cast and sum must treat as torch's CUDA kernels do: quiet and
# signalling NaNs with payloads and either sign, infinities, -0.0 and the largest finite.
SPECIAL = {
    torch.float32: [0x7FC00000, 0xFFC00001, 0x7F800001, 0x7F800000, 0xFF800000, 0x80000000, 0x7F7FFFFF],
    torch.bfloat16: [0x7FC0, 0xFFC1, 0x7F81, 0x7F80, 0xFF80, 0x8000, 0x7F7F],
    torch.float16: [0x7E00, 0xFE01, 0x7C01, 0x7C00, 0xFC00, 0x8000, 0x7BFF],
}


def special_values(pair, seed):
    """Random values, then the special patterns in the first elements of every parameter,
    rotated by ``seed`` so that they enter the window and leave it."""
    set_values(pair, seed)
    for a, b in zip(*(x.params for x in pair)):
        pattern = SPECIAL[a.dtype]
        n = min(a.numel(), len(pattern))
        if n == 0:
            continue
        raw = [pattern[(seed + i) % len(pattern)] for i in range(n)]
        width = {4: torch.int32, 2: torch.int16}[a.element_size()]
        signed = [r - (1 << 8 * a.element_size()) if r >= 1 << (8 * a.element_size() - 1) else r for r in raw]
        values = torch.tensor(signed, dtype=width).view(a.dtype).to(a.device)
        for t in (a, b):  # the first elements in memory order (channels_last included)
            t.as_strided((n,), (1,), t.storage_offset()).copy_(values)


@pytest.mark.parametrize("pdtype,hdtype", COMBOS, ids=dtype_id)
def test_nan_and_infinity_bits_match_reference(fused, pdtype, hdtype):
    """Every backend on one GPU writes the same bits: NaN payloads kept by same-dtype
    copies, the hardware's canonical NaN (0x7FFF) from casts and arithmetic."""
    params = make_params(CUDA, pdtype, seed=6)
    check_uniform(*twins(params, 2, "uniform", hdtype, fused), pushes=5, fill=special_values)
    check_ema(*twins(make_params(CUDA, pdtype, seed=7), 2, "ema", None, fused), 0.75, fill=special_values)


@pytest.mark.gpu_large
def test_bucket_beyond_2_31_elements(fused):
    """A bfloat16 parameter of 2**31 + 2**16 + 3 elements between small ones, k = 2."""
    need = 32 * 2**30  # parameters 4.3 GB, ring 8.6, sum 8.6, backup 4.3, with headroom
    if torch.cuda.mem_get_info()[0] < need:
        pytest.skip(f"needs {need / 2**30:.0f} GiB of free GPU memory")
    check_windows_of_a_big_bucket(fused, CUDA, 2**31 + 2**16 + 3, around=2**31)


def check_windows_of_a_big_bucket(backend, device, big, around):
    """Windows of a bucket holding a bfloat16 parameter of ``big`` elements (its start, the
    elements around ``around``, its end, and the parameters before and after it, the last
    at a flat offset beyond ``around``) match the reference run on copies of the windows,
    through refreshes, an incremental update and swaps."""
    params = [torch.empty(n, dtype=torch.bfloat16, device=device) for n in (5, big, 0, 7)]
    windows = [(0, 0, 5), (1, 0, 4096), (1, around - 2048, around + 2048), (1, big - 4096, big), (3, 0, 7)]
    b = Bucket(params, 2, "uniform", None, "device", backend)
    ref = Bucket([torch.empty(hi - lo, dtype=torch.bfloat16, device=device) for _, lo, hi in windows],
                 2, "uniform", None, "device", "torch")
    assert b.offsets[3] > around

    def check(what):
        for j, (i, lo, hi) in enumerate(windows):
            at = slice(b.offsets[i] + lo, b.offsets[i] + hi)
            for s in range(2):
                assert_same_bits(b.ring[s, at], ref.view(ref.ring[s], j), f"{what}: slot {s}, window {j}")
            assert_same_bits(b.total[at], ref.view(ref.total, j), f"{what}: sum, window {j}")

    gen = torch.Generator(device=device).manual_seed(0)
    for n in range(1, 5):  # refreshes at pushes 2 and 4, an incremental update at 3
        for p in params:
            p.normal_(generator=gen)
        for rp, (i, lo, hi) in zip(ref.params, windows):
            rp.copy_(params[i][lo:hi])
        ops.push(b)
        ops.push(ref)
        check(f"push {n}")
    for last in (None, 1):
        kept = [params[i][lo:hi].clone() for i, lo, hi in windows]
        for x in (b, ref):
            swap_in(x, last)
        for j, (i, lo, hi) in enumerate(windows):
            assert_same_bits(params[i][lo:hi], ref.params[j], f"swap_in(last={last}), window {j}")
        for x in (b, ref):
            ops.swap_back(x)
            x.backup = None
        for j, (i, lo, hi) in enumerate(windows):
            assert_same_bits(params[i][lo:hi], kept[j], f"swap_back, window {j}")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_runs_on_the_buckets_device_while_another_is_current(fused):
    """A bucket on cuda:1 while cuda:0 is current: the kernels launch on cuda:1 and its
    current stream."""
    dev = torch.device("cuda:1")
    pair = twins(make_params(dev, torch.float32, seed=8), 3, "uniform", torch.bfloat16, fused)
    with torch.cuda.device(0):
        check_uniform(*pair, pushes=4)


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
def test_wrapper_picks_cuda_for_auto():
    if backend_skip_reason("cuda") is not None:
        pytest.skip(f"the CUDA extension is unavailable: {backend_skip_reason('cuda')}")
    model = torch.nn.Linear(4, 3).cuda()
    opt = lawa_optim.LAWA(torch.optim.SGD(model.parameters(), lr=0.1))
    opt.snapshot()
    assert opt.backend == "cuda"


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_8bit_swap_with_a_host_backup_equals_the_device_one(backend):
    """GPU parameters over an 8-bit history swapped with ``backup="cpu"``: the backup lives
    in host memory (a fused kernel cannot write it; the reference swaps), and the average
    and the restored weights are those of the swap with the backup beside them, bit for bit."""
    reason = backend_skip_reason(backend, torch.float32, torch.int8)
    if reason:
        pytest.skip(reason)
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, generator=g).to(CUDA)) for n in (300, 4097)]
    opt = lawa_optim.LAWA(torch.optim.SGD(params, lr=0.1), k=3, history_dtype=torch.int8, backend=backend)
    for _ in range(4):
        with torch.no_grad():
            torch._foreach_add_(params, [torch.randn(p.shape, generator=g).to(CUDA) for p in params])
        opt.snapshot()
    weights = [p.detach().clone() for p in params]
    with opt.averaged(backup="device"):
        on_device = [p.detach().clone() for p in params]
    with opt.averaged(backup="cpu"):
        assert all(b.backup.device.type == "cpu" for b in opt._history.buckets)
        for a, b in zip(params, on_device):
            assert_same_bits(a.detach(), b, "average with a host backup")
    for p, w in zip(params, weights):
        assert_same_bits(p.detach(), w, "weights after the swap with a host backup")
