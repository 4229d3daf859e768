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

Helpers shared by several test files live here too: bit-exact comparisons
(:func:`bits`, :func:`assert_same_bits`, :func:`assert_same`), the :func:`fingerprint` of
everything a refused call must leave as it was, :func:`roundtrip` through
``torch.save``, the ways to copy a model and its LAWA (:data:`COPIES`), the kernel
contract replayed on kept copies (:class:`Contract`) and the fake transfer of the pinned
history (:func:`offloaded`).
"""

import copy
import io
import os
import pickle
import threading
from collections.abc import Iterator
from types import SimpleNamespace

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from torch import nn  # noqa: E402

from lawa_optim import LAWA, ops  # noqa: E402
from lawa_optim.backends import cpu_kernels, reference  # noqa: E402
from lawa_optim.backends import triton as tb  # noqa: E402
from lawa_optim.history import ALIGN, Bucket, History, accumulation_dtype, history_device  # noqa: E402
from lawa_optim.offload import Offload  # noqa: E402

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


@pytest.fixture(params=["triton", "cuda"])
def fused(request) -> str:
    """A fused backend that runs on this machine's GPU."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    reason = backend_skip_reason(request.param)
    if reason is not None:
        pytest.skip(f"backend {request.param!r} unavailable: {reason}")
    return request.param


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


def assert_same(a, b, path: str = "") -> None:
    """``a`` and ``b`` equal all the way down: tensors bit for bit with the same dtype,
    shape and device (so -0.0 != 0.0, and a NaN equals itself: a backup's padding is
    uninitialised memory), dicts with the same keys, lists and tuples of the same type
    and length, anything else identical or ``==``. A difference is named by its path."""
    where = path or "the value"
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{where}: a tensor, then {type(b).__name__}"
        assert (a.dtype, a.shape, a.device) == (b.dtype, b.shape, b.device), (
            f"{where}: {a.dtype} {tuple(a.shape)} on {a.device}, then {b.dtype} {tuple(b.shape)} on {b.device}")
        assert torch.equal(bits(a), bits(b)), f"{where}: the values differ"
    elif isinstance(a, dict):
        assert isinstance(b, dict), f"{where}: a dict, then {type(b).__name__}"
        assert a.keys() == b.keys(), f"{where}: the keys differ: {sorted(map(str, a.keys() ^ b.keys()))}"
        for key in a:
            assert_same(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{where}: {type(a).__name__} of {len(a)}, then {b!r:.200}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a is b or a == b, f"{where}: {a!r:.200} vs {b!r:.200}"


def fingerprint(opt: LAWA | None = None, *, model: nn.Module | None = None) -> dict:
    """Copies of everything a refused call must leave as it was, for :func:`assert_same`.

    Of a LAWA ``opt``: the weights of its param groups and of its history; the history
    (the object itself, its buckets, the generation of each group and the parameters it
    was built with, every buffer of every bucket: ring, sum, snapshot counter, backup);
    its counters and settings; the wrapped optimizer's state, its param groups (the
    parameters by identity, every other entry by value) and its state_dict(). Of
    ``model``: its state_dict (buffers included) and its training flag."""
    out = {}
    if model is not None:
        out["model"] = {k: v.clone() for k, v in model.state_dict().items()}
        out["training"] = model.training
    if opt is not None:
        hist = opt._history
        out.update({
            "weights": [p.detach().clone() for g in opt.param_groups for p in g["params"]],
            "history weights": [[p.detach().clone() for p in b.params] for b in hist.buckets],
            "history": hist,
            "buckets": hist.buckets,
            "layout": ([len(gen) for gen in hist.generations], list(hist.group_generation),
                       [[id(p) for p in ps] for ps in hist.group_params]),
            "buffers": [
                [None if t is None else t.clone() for t in (b.ring, b.total, b.pushes, b.backup, b.scales)]
                for b in hist.buckets
            ],
            "phema": [(None if b.emas is None else b.emas.clone(), b.steps, list(b.slots)) for b in hist.buckets],
            "run": (opt.steps, opt.is_swapped, opt._run.started, opt.num_snapshots, opt.last_fit),
            "exchanged": [b.exchanged for b in hist.buckets],
            "settings": (opt.k, opt.mode, opt.every, opt.start, opt.decay, hist.history_dtype, hist.storage,
                         hist.requested_backend, hist.recompute_every, hist.sigma_rels, opt.max_fit_error),
            "state": {id(p): copy.deepcopy(dict(s)) for p, s in opt.state.items()},
            "params": [[id(p) for p in g["params"]] for g in opt.param_groups],
            "groups": [copy.deepcopy({k: v for k, v in g.items() if k != "params"}) for g in opt.param_groups],
            "inner": copy.deepcopy(opt.optimizer.state_dict()),
        })
    return out


def roundtrip(obj):
    """``obj`` through ``torch.save`` and ``torch.load(weights_only=True)``."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def copy_through_state_dicts(pair: tuple[nn.Module, LAWA]) -> tuple[nn.Module, LAWA]:
    """A model like ``pair``'s (other weights) and a LAWA built with the same settings
    over it, both loaded from ``pair``'s state dicts."""
    model, opt = pair
    model2 = copy.deepcopy(model)
    with torch.no_grad():
        for p in model2.parameters():
            p.add_(1.0)  # the weights must come from the state dict
    inner = opt.optimizer
    hist = opt._history
    phema = {"sigma_rels": opt.sigma_rels} if opt.mode == "phema" else {"decay": opt.decay}
    opt2 = LAWA(type(inner)(model2.parameters(), **inner.defaults), k=opt.k, every=opt.every, start=opt.start,
                mode=opt.mode, storage=hist.storage, history_dtype=hist.history_dtype,
                backend=hist.requested_backend, recompute_every=hist.recompute_every, **phema)
    model2.load_state_dict(model.state_dict())
    opt2.load_state_dict(opt.state_dict())
    return model2, opt2


#: Ways to copy a ``(model, LAWA)`` pair into an independent one.
COPIES = {
    "deepcopy": copy.deepcopy,
    "pickle": lambda pair: pickle.loads(pickle.dumps(pair)),
    "state_dict": copy_through_state_dicts,
}


def empty_first_group() -> tuple[LAWA, nn.Parameter]:
    """A LAWA built on one empty param group and snapshotted once, then given a group of
    one parameter snapshotted at 1.0 and 2.0 (k=3)."""
    p = nn.Parameter(torch.zeros(3))
    opt = LAWA(torch.optim.SGD([{"params": []}], lr=0.1), k=3)
    opt.snapshot()
    opt.add_param_group({"params": [p]})
    for v in (1.0, 2.0):
        p.data.fill_(v)
        opt.snapshot()
    return opt, p


# -- the pinned history without a GPU ------------------------------------------------------
#: Seconds any wait of the offload tests may last before it is reported as a failure.
TIMEOUT = 10.0


class Gate:
    """A fake CUDA event: ``synchronize`` blocks until the test opens the gate, and fails
    after ``TIMEOUT`` seconds if it never does."""

    def __init__(self, error: Exception | None = None) -> None:
        self.opened = threading.Event()
        self.error = error

    def synchronize(self) -> None:
        if not self.opened.wait(TIMEOUT):
            raise TimeoutError(f"the test did not open the gate within {TIMEOUT} s")
        if self.error is not None:
            raise self.error


class FakeTransfer:
    """Copies at once (the weights are read when the copy is issued, as the side stream
    does after waiting for the queued step) and hands out the current gate."""

    def __init__(self) -> None:
        self.gate = Gate()
        self.ordered: list[Gate] = []

    def copy(self, dst, src):
        torch._foreach_copy_(dst, src)
        return self.gate

    def order(self, done):
        self.ordered.append(done)


def offloaded(history_or_bucket: History | Bucket) -> FakeTransfer:
    """Give each bucket a fake-transfer offload (a GPU would give a CudaTransfer)."""
    buckets = history_or_bucket.buckets if isinstance(history_or_bucket, History) else [history_or_bucket]
    transfer = FakeTransfer()
    for b in buckets:
        b.offload = Offload(b, transfer, pin_memory=False)
    return transfer


# -- the kernel contract -------------------------------------------------------------------
class Contract:
    """The ``ops`` contract replayed on kept copies: ``snaps`` holds every snapshot pushed
    (cast to the history dtype with ``Tensor.to``), one tensor per parameter, and
    ``total`` the running mean of each parameter."""

    def __init__(self, params: list[torch.Tensor], k: int, hdtype: torch.dtype, refresh_every: int | None = None):
        self.k, self.refresh_every, self.hdtype = k, refresh_every or k, hdtype
        self.pdtype = params[0].dtype
        self.acc = accumulation_dtype(self.pdtype)
        self.snaps: list[list[torch.Tensor]] = []
        self.total = [torch.zeros_like(p, dtype=self.acc) for p in params]

    @property
    def n(self) -> int:
        return len(self.snaps)

    def slot(self, s: int) -> list[torch.Tensor] | None:
        """What slot ``s`` holds: the newest snapshot ``m`` with ``m % k == s``."""
        held = range(s, self.n, self.k)
        return self.snaps[held[-1]] if held else None

    def push(self, params: list[torch.Tensor]) -> None:
        old = self.slot(self.n % self.k)
        new = [p.detach().to(self.hdtype, copy=True) for p in params]
        self.snaps.append(new)
        if self.n % self.refresh_every == 0:  # push number n (from 1) refreshes the mean
            self.recompute()
            return
        for i, t in enumerate(self.total):
            if old is None:  # the ring fills: the mean moves 1/n of the way to the new value
                t += (new[i].to(self.acc) - t) / torch.full_like(t, float(self.n))
            else:
                t += (new[i].to(self.acc) - old[i].to(self.acc)) / torch.full_like(t, float(self.k))

    def recompute(self) -> None:
        """``total = csum(slot 0, slot 1, ...) / count`` over the filled slots, in slot
        order; the float64 mean of the same slots where that sum is not finite."""
        count = min(self.n, self.k)
        for i, t in enumerate(self.total):
            if count == 0:
                t.zero_()
                continue
            held = [self.slot(s)[i] for s in range(count)]
            t.copy_(self.mean(self.csum(held, t), held))

    def mean(self, acc: torch.Tensor, held: list[torch.Tensor]) -> torch.Tensor:
        """``acc / len(held)`` (IEEE division), the float64 mean of ``held`` rounded to the
        accumulation dtype where ``acc`` is not finite."""
        avg = acc / torch.full_like(acc, float(len(held)))
        return self.widened(avg, acc, held)

    def widened(self, avg: torch.Tensor, acc: torch.Tensor, held: list[torch.Tensor]) -> torch.Tensor:
        wide = torch.zeros_like(acc, dtype=torch.float64)
        for x in held:
            wide = wide + x.double()
        wide = (wide / torch.full_like(wide, float(len(held)))).to(self.acc)
        return torch.where(acc.isfinite(), avg, wide)

    def rounded(self, avg: torch.Tensor) -> torch.Tensor:
        return rounded(avg, self.pdtype)

    def exchanged(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """What the in-place swap leaves in ``total`` for training weights ``params``: the
        weights' bits (float32, float64), or ``(bits(w) << 16) | low16(bits(mean))``."""
        if self.pdtype != torch.bfloat16:
            return [p.to(self.acc) for p in params]
        out = []
        for p, t in zip(params, self.total):
            w = p.view(torch.int16).to(torch.int64) & 0xFFFF
            word = (w << 16) | (t.view(torch.int32).to(torch.int64) & 0xFFFF)
            out.append(torch.where(word >= 1 << 31, word - (1 << 32), word).to(torch.int32).view(torch.float32))
        return out

    def csum(self, slots: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        """Neumaier's compensated sum of ``slots`` in order, in the accumulation dtype."""
        s, c = torch.zeros_like(like), torch.zeros_like(like)
        for x in slots:
            x = x.to(self.acc)
            t = s + x
            big = s.abs() >= x.abs()
            c = c + (torch.where(big, s - t, x - t) + torch.where(big, x, s))
            s = t
        return torch.where(s.isfinite(), s + c, s)

    def average(self, last: int | None = None) -> list[torch.Tensor]:
        """What ``swap_in`` writes: ``total`` (the mean), or the compensated sum of the
        ``last`` newest snapshots (newest first) divided by ``last``; where that mean or
        sum is not finite, the same snapshots summed in float64 and divided there;
        rounded to the parameter dtype as :meth:`rounded` says."""
        out = []
        for i, t in enumerate(self.total):
            if last is None:
                held = [self.slot(s)[i] for s in range(min(self.n, self.k))]
                avg = self.widened(t, t, held)
            else:
                held = [snap[i] for snap in reversed(self.snaps[-last:])]
                avg = self.mean(self.csum(held, t), held)
            out.append(self.rounded(avg))
        return out

    def weighted(self, weights: list[float]) -> list[torch.Tensor]:
        """What ``swap_in`` with ``weights`` writes: the coefficients rounded to the
        accumulation dtype, each product rounded, the products added newest first with
        Neumaier's compensation, ``s + c`` rounded to the parameter dtype."""
        w = torch.tensor(weights, dtype=self.acc)
        out = []
        for i, t in enumerate(self.total):
            s, c = torch.zeros_like(t), torch.zeros_like(t)
            for j, snap in enumerate(reversed(self.snaps[-len(weights):])):
                y = snap[i].to(self.acc) * w[j]
                t_ = s + y
                big = s.abs() >= y.abs()
                c = c + torch.where(big, (s - t_) + y, (y - t_) + s)
                s = t_
            out.append(self.rounded(s + c))
        return out

    def window(self, last: int | None = None) -> list[torch.Tensor]:
        """The stored values an average is over, in float64: ``(count, *shape)`` each."""
        held = self.snaps[-min(self.n, self.k):]
        if last is not None:
            held = held[-last:]
        return [torch.stack([s[i].double() for s in held]) for i in range(len(self.total))]


def rounded(avg: torch.Tensor, pdtype: torch.dtype) -> torch.Tensor:
    """``avg`` written into a parameter of ``pdtype`` (the ``round`` of ``lawa_optim.ops``):
    ``Tensor.to``, but for bfloat16 round half away from zero on the bit pattern (a NaN as
    ``Tensor.to`` has it)."""
    if pdtype != torch.bfloat16 or avg.dtype != torch.float32:
        return avg.to(pdtype)
    u = avg.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    half = (u >> 16) + ((u >> 15) & 1)  # the kept half, plus one where the dropped half is >= 0x8000
    half = torch.where(half >= 0x8000, half - 0x10000, half).to(torch.int16).view(torch.bfloat16)
    return torch.where(avg.isnan(), avg.to(pdtype), half)


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


def swap_in(b: Bucket, last: int | None, weights: list[float] | None = None) -> None:
    """``ops.swap_in`` with a fresh backup, as the history allocates it (``weights``:
    coefficients in the accumulation dtype on the bucket's device)."""
    b.backup = torch.empty(b.D, dtype=b.dtype, device=b.device)
    if weights is None:
        ops.swap_in(b, last)
    else:
        ops.swap_in(b, None, torch.tensor(weights, dtype=b.total.dtype, device=b.device))
