"""Shared fixtures and the one builder of the kernel tests.

Without a GPU the Triton kernels run on CPU tensors in Triton's interpreter, which
must be switched on before triton is first imported.

The builder (:func:`make_params`) lays out the parameters that exercise every path of
every backend in one bucket: empty parameters first, last and in a row (the CUDA
segment search must step over them), 1 element, odd sizes, exactly ``ALIGN``, a 2-D
weight, a parameter spanning several Triton table rows and CUDA tiles, dense views that
start off a 16-byte boundary (the scalar paths, beside aligned parameters that stay
vectorized) and a ``channels_last`` conv weight. The :func:`runner` fixture shrinks
the torch backend's chunks and the fused CPU kernels' work rows, so the same bucket
spans several of those too.
"""

import os
from collections.abc import Iterator
from types import SimpleNamespace

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from lawa_optim import ops  # noqa: E402
from lawa_optim.backends import cpu_kernels, reference  # noqa: E402
from lawa_optim.backends import triton as tb  # noqa: E402
from lawa_optim.history import ALIGN, Bucket, history_device  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = ("torch", "triton", "cuda")
#: How a bucket's kernels can run: the torch backend's plain code and its fused C
#: kernels (CPU only), Triton, CUDA.
RUNNERS = ("torch-plain", "torch-fused", "triton", "cuda")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: The (parameter, history) dtype pairs of the fused backends.
COMBOS = [(p, h) for p in DTYPES for h in DTYPES]
#: Elements per chunk of the torch backend's scratch under the runner fixture: two
#: ALIGN slices, so a chunk holds two small parameters, one, or part of a big one.
SMALL_CHUNK = 2 * ALIGN
#: Elements per work row of the fused CPU kernels under the runner fixture: odd, so
#: rows start unaligned, and above two of the kernels' 2048-element blocks.
SMALL_ROW = 4099
#: Full Triton table rows in the largest parameter of the builder (a 5-element row
#: follows). On the CPU one: the interpreter pays per block, and torch runs an operation
#: on more than 32,768 elements on several threads, which on a busy machine wait for
#: each other (seconds per test).
ROWS = 3 if DEVICE.type == "cuda" else 1
_INTS = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


def probe(device=DEVICE, param_device=None, dtype=torch.float32, history_dtype=None) -> SimpleNamespace:
    """What backend selection reads of a bucket."""
    return SimpleNamespace(
        device=torch.device(device),
        param_device=torch.device(param_device or device),
        dtype=dtype,
        history_dtype=history_dtype or dtype,
    )


def backend_skip_reason(name: str, dtype: torch.dtype = torch.float32, history_dtype=None) -> str | None:
    """Why ``name`` cannot run tensors of these dtypes on DEVICE here, or None."""
    return ops.unavailable(name, probe(history_device(DEVICE, "device"), DEVICE, dtype, history_dtype))


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    """Every backend that can run on DEVICE; the others are skipped with the reason."""
    reason = backend_skip_reason(request.param)
    if reason is not None:
        pytest.skip(f"backend {request.param!r} unavailable: {reason}")
    return request.param


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread for the test, the count before it restored after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=RUNNERS)
def runner(request, monkeypatch) -> str:
    """The backend name to ask for, with the fused CPU kernels switched on or off for
    the torch backend, and its chunks and rows small (see the module docstring)."""
    name = request.param.split("-")[0]
    reason = backend_skip_reason(name)
    if reason is not None:
        pytest.skip(f"backend {name!r} unavailable: {reason}")
    if request.param == "torch-fused" and (DEVICE.type != "cpu" or cpu_kernels.library() is None):
        pytest.skip("the fused CPU kernels run CPU buckets only, and need a C compiler")
    monkeypatch.setattr(cpu_kernels, "enabled", request.param != "torch-plain")
    monkeypatch.setattr(reference, "CHUNK", SMALL_CHUNK)
    monkeypatch.setattr(cpu_kernels, "ROW", SMALL_ROW)
    return name


def dtype_id(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


def bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bit pattern, so that -0.0 != 0.0 and NaNs compare by payload."""
    return t.detach().contiguous().view(_INTS[t.element_size()])


def assert_same_bits(a: torch.Tensor, b: torch.Tensor, what: str = "", any_nan: bool = False) -> None:
    """Equal bit patterns; with ``any_nan`` two NaNs match whatever their payloads (torch
    widens a float16 NaN to different bits in its vector and scalar loops)."""
    assert a.shape == b.shape and a.dtype == b.dtype, f"{what}: {a.shape} {a.dtype} vs {b.shape} {b.dtype}"
    same = bits(a) == bits(b)
    if any_nan:
        same |= a.isnan() & b.isnan()
    if not bool(same.all()):
        where = (~same).nonzero()[0].tolist()
        raise AssertionError(f"{what}: {int((~same).sum())} elements differ, first at {where}: "
                             f"{a[tuple(where)].item()!r} vs {b[tuple(where)].item()!r}")


def make_params(device: torch.device, dtype: torch.dtype, seed: int = 0, rows: int = ROWS) -> list[torch.Tensor]:
    """The layouts of the module docstring; ``rows`` full Triton table rows and a tail in
    the largest parameter. The same seed gives the same values and layouts."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    def empty():
        return torch.empty(0, device=device, dtype=dtype)

    # One storage, two dense views off a 16-byte boundary: 1 and 41 elements in.
    storage = rand(1 + 37 + 3 + 1000)
    return [
        empty(),
        rand(1),
        rand(3),
        empty(),
        empty(),
        rand(ALIGN - 1),
        rand(ALIGN),
        storage[1:1 + 37],
        rand(5, 13),
        rand(rows * tb.CHUNK + 5),
        empty(),
        storage[1 + 37 + 3:],
        rand(4, 3, 3, 3).contiguous(memory_format=torch.channels_last),
        empty(),
    ]


def many_params(device: torch.device, dtype: torch.dtype, count: int = 64, seed: int = 0) -> list[torch.Tensor]:
    """``count`` parameters of 1 to 7 elements: one table row each for the fused kernels."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 8, (count,), generator=g).tolist()
    return [torch.randn(n, generator=g).to(device, dtype) for n in sizes]


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
    """``ops.swap_in`` with a fresh backup, as the history allocates it."""
    b.backup = torch.empty(b.D, dtype=b.dtype, device=b.device)
    ops.swap_in(b, last)
