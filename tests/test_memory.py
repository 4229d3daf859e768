"""Memory accounting: ``LAWA.memory()`` against the buffers actually allocated, and
``history_bytes`` (computed from shapes, meta tensors included) against ``memory()``."""

import pytest
import torch
from torch import nn

from conftest import offloaded

from lawa_optim import LAWA, Memory, history_bytes
from lawa_optim.history import ALIGN


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 20), nn.Conv2d(3, 5, 3), nn.Linear(20, 3, bias=False))


def _padded(model: nn.Module) -> int:
    return sum(-(-p.numel() // ALIGN) * ALIGN for p in model.parameters())


def _allocated(opt: LAWA) -> int:
    """Bytes of every tensor the history holds, read off the tensors themselves."""
    held = []
    for b in opt._history.buckets:
        held += [b.ring, b.total, b.pushes, b.backup]
        if b.offload is not None:
            held.append(b.offload.staging)
    return sum(t.untyped_storage().nbytes() for t in held if t is not None)


@pytest.mark.parametrize("mode", ["uniform", "ema"])
@pytest.mark.parametrize("hdtype", [None, torch.bfloat16, torch.float16])
def test_memory_counts_every_buffer_held(mode, hdtype):
    model = _model()
    opt = LAWA(torch.optim.SGD(model.parameters(), lr=0.1), k=6, mode=mode, history_dtype=hdtype)
    n = sum(p.numel() for p in model.parameters())
    assert opt.memory() == Memory(parameters=n)  # nothing before the first snapshot
    opt.snapshot()
    D, slot = _padded(model), (hdtype or torch.float32).itemsize
    ring = 6 * D * slot if mode == "uniform" else 0
    expected = Memory(parameters=n, history=ring + 8, sum=4 * D)
    assert opt.memory() == expected
    assert opt.memory().total == _allocated(opt)
    for _ in range(20):
        opt.snapshot()  # no allocation per snapshot
    assert opt.memory() == expected
    with opt.averaged():  # in place: the weights trade places with the running mean
        assert opt.memory() == expected
    kinds = [{"backup": "device"}, {"backup": "cpu"}] + ([{"last": 1}, {"weights": [1.0]}] if mode == "uniform" else [])
    for kwargs in kinds:
        # Right after a snapshot of float32 history the newest slot is the backup of last=
        # and weights=: nothing allocated.
        backup = 0 if hdtype is None and "backup" not in kwargs else 4 * D
        with opt.averaged(**kwargs):
            assert opt.memory() == Memory(parameters=n, history=ring + 8, sum=4 * D, backup=backup), kwargs
            if backup:
                assert opt.memory().total == _allocated(opt)
    assert opt.memory() == expected
    assert opt.memory().per_parameter == pytest.approx((ring + 8 + 4 * D) / n)


@pytest.mark.parametrize("mode", ["uniform", "ema"])
@pytest.mark.parametrize("hdtype", [None, torch.bfloat16])
def test_history_bytes_of_a_meta_model_equals_what_a_lawa_holds(mode, hdtype):
    model = _model().to(torch.float64)
    model[1].to(torch.bfloat16)  # two buckets: float64 and bfloat16 parameters
    with torch.device("meta"):
        meta = _model().to(torch.float64)
        meta[1].to(torch.bfloat16)
    opt = LAWA(torch.optim.SGD(model.parameters(), lr=0.1), k=4, mode=mode, history_dtype=hdtype)
    opt.snapshot()
    predicted = history_bytes(meta, 4, history_dtype=hdtype, mode=mode)
    assert predicted == opt.memory()
    with opt.averaged():
        assert history_bytes(meta, 4, history_dtype=hdtype, mode=mode, swapped=True) == opt.memory()
    half = _model().half()
    wider = hdtype or torch.float32  # a float16 history's newest slot would be the backup
    opt = LAWA(torch.optim.SGD(half.parameters(), lr=0.1), k=4, mode=mode, history_dtype=wider)
    opt.snapshot()
    with opt.averaged():  # float16 parameters keep a backup
        assert history_bytes(half, 4, history_dtype=wider, mode=mode, swapped=True) == opt.memory()
        assert opt.memory().backup > 0
    assert len(opt._history.buckets) == 1


def test_history_bytes_takes_what_an_optimizer_takes():
    model = _model()
    whole = history_bytes(model, 6)
    params = list(model.parameters())
    assert history_bytes(params, 6) == whole
    assert history_bytes(iter(params), 6) == whole
    assert history_bytes(model.named_parameters(), 6) == whole
    assert history_bytes([{"params": params[:2]}, {"params": params[2:]}], 6) == whole
    assert history_bytes(params + params[:1], 6) == whole  # a tensor listed twice counts once
    assert history_bytes(params[0], 6).parameters == params[0].numel()


def test_memory_counts_parameters_not_yet_in_the_history():
    a, b = nn.Parameter(torch.randn(100)), nn.Parameter(torch.randn(7))
    opt = LAWA(torch.optim.SGD([a], lr=0.1), k=2)
    opt.snapshot()
    opt.add_param_group({"params": [b]})
    held = opt.memory()
    assert held.parameters == 107 and held.sum == 4 * 2 * ALIGN  # b has no buffers yet
    opt.snapshot()
    assert opt.memory().sum == 4 * 3 * ALIGN


def test_pinned_staging_is_counted():
    model = _model()
    opt = LAWA(torch.optim.SGD(model.parameters(), lr=0.1), k=3)
    opt.snapshot()
    offloaded(opt._history)  # the staging buffer a GPU model with storage="pinned" gets
    D = _padded(model)
    assert opt.memory().staging == 4 * D
    assert opt.memory().total == _allocated(opt)


def test_repr_shows_memory_in_one_line():
    opt = LAWA(torch.optim.SGD(_model().parameters(), lr=0.1), k=6)
    opt.snapshot()
    head = repr(opt).splitlines()[0]
    assert "memory: " in head and f"{opt.memory().per_parameter:.2f} B/param" in head
    assert str(opt.memory()).count("\n") == 0
    assert "history 10.75 KB" in str(Memory(parameters=1, history=10750))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"k": 0}, ValueError, "k must be a positive int, got 0"),
        ({"k": 2.0}, ValueError, "k must be a positive int"),
        ({"history_dtype": torch.int32}, ValueError, "history_dtype must be None or one of"),
        ({"mode": "mean"}, ValueError, "mode must be one of"),
        ({"storage": "disk"}, ValueError, "storage must be one of"),
        ({"swapped": 1}, TypeError, "swapped must be a bool"),
    ],
)
def test_history_bytes_refuses_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        history_bytes(_model(), **{"k": 6, **kwargs})


@pytest.mark.parametrize(
    "params, match",
    [
        ("weights", "params must be an nn.Module or an iterable"),
        (3, "params must be an nn.Module or an iterable"),
        ([1.0], "params: expected tensors, got float"),
        ([torch.zeros(3, dtype=torch.int64)], "parameter 0 has dtype torch.int64"),
    ],
)
def test_history_bytes_refuses_what_is_not_parameters(params, match):
    with pytest.raises(TypeError, match=match):
        history_bytes(params, 6)
