"""The flat history: layout and parameter changes (memory is in test_memory.py, the
running sum's bound in test_guarantee.py)."""

import pytest
import torch

from conftest import DEVICE, assert_same, fingerprint

from lawa_optim import LAWA, ops
from lawa_optim.history import ALIGN, Bucket, is_dense


def test_layout_aligns_every_parameter():
    params = [torch.randn(n) for n in (1, 63, 64, 65, 200)]
    b = Bucket(params, 2, "uniform", None, "device", "torch")
    assert all(o % ALIGN == 0 for o in b.offsets)
    assert b.offsets == [0, 64, 128, 192, 320]
    assert b.D == 320 + 256


def test_channels_last_is_stored_in_memory_order():
    w = torch.randn(4, 3, 2, 2).contiguous(memory_format=torch.channels_last)
    b = Bucket([w], 2, "uniform", None, "device", "torch")
    ops.push(b)
    # The slot holds the raw memory of the weight, so a linear copy kernel is correct.
    raw = w.as_strided((w.numel(),), (1,))
    assert torch.equal(b.ring[0, : w.numel()], raw)
    assert torch.equal(b.view(b.ring[0], 0), w)
    assert torch.equal(b.history_view(0)[0], w)


def test_is_dense():
    x = torch.randn(4, 6)
    assert is_dense(x) and is_dense(x.t()) and is_dense(torch.randn(1))
    assert not is_dense(x[:, :3]) and not is_dense(x[::2])
    assert is_dense(torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last))


def test_non_dense_parameter_is_refused():
    base = torch.randn(4, 6)
    p = torch.nn.Parameter(base[:, :3])
    with pytest.raises(ValueError, match="dense"):
        LAWA(torch.optim.SGD([p], lr=0.1))


def test_moved_parameter_storage_is_followed():
    p = torch.nn.Parameter(torch.zeros(5))
    opt = LAWA(torch.optim.SGD([p], lr=0.1), k=2)
    opt.snapshot()
    p.data = torch.full((5,), 2.0)  # new storage, same layout
    opt.snapshot()
    with opt.averaged():
        assert torch.equal(p.detach(), torch.ones(5))
    p.data = torch.zeros(6)
    before = fingerprint(opt)
    for call in (opt.snapshot, opt.swap_to_average, opt.snapshot):
        with pytest.raises(RuntimeError, match="changed dtype, shape, layout or device"):
            call()
        assert_same(before, fingerprint(opt))


@pytest.mark.parametrize("moved", ["before-swap-in", "before-swap-back"])
def test_moved_storage_receives_the_average_and_the_training_weights(runner, moved):
    """``p.data = p.data.clone()`` after the last snapshot (or while the average is
    swapped in): the swap writes the average into the new storage and swap_back the
    training weights, on every backend; the old storage is left as it was. The fused
    backends cache addresses, so the swaps must notice the move."""
    params = [torch.nn.Parameter(torch.zeros(s, device=DEVICE)) for s in [(5,), (3, 70), (2 * ALIGN + 1,)]]
    opt = LAWA(torch.optim.SGD(params, lr=0.1), k=3, backend=runner)
    with torch.no_grad():
        for value in (1.0, 3.0):
            for p in params:
                p.fill_(value)
            opt.snapshot()  # the average: 2.0
        for p in params:
            p.fill_(5.0)  # the training weights
    old = [p.data for p in params]
    if moved == "before-swap-in":
        for p in params:
            p.data = p.data.clone()
    opt.swap_to_average()
    assert all(torch.equal(p.detach(), torch.full_like(p, 2.0)) for p in params)
    if moved == "before-swap-back":
        for p in params:
            p.data = p.data.clone()
    opt.swap_back()
    assert all(torch.equal(p.detach(), torch.full_like(p, 5.0)) for p in params)
    kept = 5.0 if moved == "before-swap-in" else 2.0  # what the old storage held when it was left
    assert all(torch.equal(o, torch.full_like(o, kept)) for o in old)


def test_buckets_split_by_dtype():
    a = torch.nn.Parameter(torch.randn(3))
    h = torch.nn.Parameter(torch.randn(5, dtype=torch.bfloat16))
    d = torch.nn.Parameter(torch.randn(2, dtype=torch.float64))
    opt = LAWA(torch.optim.SGD([a, h, d], lr=0.1), k=2)
    opt.snapshot()
    buckets = opt._history.buckets
    assert [b.dtype for b in buckets] == [torch.float32, torch.bfloat16, torch.float64]
    assert buckets[2].total.dtype == torch.float64
    assert buckets[1].total.dtype == torch.float32


# -- the model changes after the history is built --------------------------------------------
CONVERSIONS = {
    "half": (lambda m: m.half(), "now torch.float16"),
    "double": (lambda m: m.double(), "now torch.float64"),
    "data-to-bfloat16": (lambda m: setattr(m.weight, "data", m.weight.data.to(torch.bfloat16)), "now torch.bfloat16"),
}


@pytest.mark.parametrize("name", CONVERSIONS)
def test_parameter_dtype_change_is_refused(backend, device, name):
    """model.half() after the first snapshot made the fused CPU push read float16 storage
    as float32 (a slot of 3667 for randn weights); the plain path cast silently."""
    convert, now = CONVERSIONS[name]
    model = torch.nn.Linear(6, 4).to(device)
    opt = LAWA(torch.optim.SGD(model.parameters(), lr=0.1), k=3, backend=backend)
    opt.snapshot()
    convert(model)
    before = fingerprint(opt)
    for call in (opt.snapshot, opt.swap_to_average, opt.state_dict):
        with pytest.raises(RuntimeError, match=f"since the history was built.*{now}.*Convert the model back"):
            call()
        assert_same(before, fingerprint(opt))
        assert not opt.is_swapped and opt.num_snapshots == 1


def test_dtype_change_at_the_same_address_is_refused():
    """A bfloat16 weight viewed as float16 keeps its data_ptr: the dtype is still checked."""
    p = torch.nn.Parameter(torch.randn(8).to(torch.bfloat16))
    opt = LAWA(torch.optim.SGD([p], lr=0.1), k=2)
    opt.snapshot()
    ptr = p.data_ptr()
    p.data = p.data.view(torch.float16)
    assert p.data_ptr() == ptr
    before = fingerprint(opt)
    for call in (opt.snapshot, opt.swap_to_average, opt.snapshot):
        with pytest.raises(RuntimeError, match="was torch.bfloat16.*now torch.float16"):
            call()
        assert_same(before, fingerprint(opt))


def test_swap_back_refused_after_a_conversion_then_restores_after_converting_back():
    model = torch.nn.Linear(6, 4)
    opt = LAWA(torch.optim.SGD(model.parameters(), lr=0.1), k=2)
    opt.snapshot()
    with torch.no_grad():
        model.weight.add_(1.0)
    training = [p.detach().clone() for p in model.parameters()]
    opt.snapshot()
    opt.swap_to_average()
    model.double()
    before = fingerprint(opt)  # the float64 weights hold the average; the backup, the training weights
    for _ in range(2):
        with pytest.raises(RuntimeError, match="now torch.float64"):
            opt.swap_back()
        assert_same(before, fingerprint(opt))
        assert opt.is_swapped
    model.float()  # new float32 storage, same layout: the backup goes there
    opt.swap_back()
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), training))


def test_a_refused_bucket_stops_the_snapshot_and_the_swap_of_every_bucket():
    """Two buckets (float32, bfloat16); the second one's parameter changed dtype: neither
    bucket is pushed or swapped, so the counts stay equal and no weight moves."""
    a = torch.nn.Parameter(torch.randn(5))
    h = torch.nn.Parameter(torch.randn(3).to(torch.bfloat16))
    opt = LAWA(torch.optim.SGD([a, h], lr=0.1), k=3)
    opt.snapshot()
    with torch.no_grad():
        a.add_(1.0)
    h.data = h.data.half()
    before = fingerprint(opt)
    for call in (opt.snapshot, opt.swap_to_average):
        with pytest.raises(RuntimeError, match="parameter 0 of a LAWA bucket changed"):
            call()
        assert_same(before, fingerprint(opt))
        assert not opt.is_swapped


REMOVALS = {
    "param-popped": (lambda opt: opt.param_groups[0]["params"].pop(), r"parameter 1 of param group 0 was removed from or replaced"),
    "param-replaced": (
        lambda opt: opt.param_groups[0]["params"].__setitem__(0, torch.nn.Parameter(torch.zeros(4, 6))),
        r"parameter 0 of param group 0 was removed from or replaced",
    ),
    "group-deleted": (lambda opt: opt.param_groups.pop(), r"param groups were removed .* \(2 groups then, 1 now\)"),
}


@pytest.mark.parametrize("name", REMOVALS)
def test_parameter_removed_from_param_groups_is_refused(name):
    """The history would go on averaging a tensor the optimizer no longer trains (and,
    for a replaced one, never the new tensor); state_dict() gave a bare KeyError."""
    model = torch.nn.Linear(6, 4)
    extra = torch.nn.Parameter(torch.ones(3))
    opt = LAWA(torch.optim.SGD(model.parameters(), lr=0.1), k=2)
    opt.add_param_group({"params": [extra]})
    opt.step()
    opt.snapshot()
    remove, match = REMOVALS[name]
    remove(opt)
    before = fingerprint(opt)
    for call in (opt.snapshot, opt.swap_to_average, opt.state_dict, opt.snapshot):
        with pytest.raises(RuntimeError, match=match):
            call()
        assert_same(before, fingerprint(opt))
        assert not opt.is_swapped


PARAMETERS_REFUSED = {
    "sparse-coo": (lambda: torch.randn(4, 3).to_sparse(), r"is a sparse tensor \(layout torch.sparse_coo\)"),
    "sparse-csr": (lambda: torch.randn(4, 3).to_sparse_csr(), r"is a sparse tensor \(layout torch.sparse_csr\)"),
    "meta": (lambda: torch.empty(4, 3, device="meta"), "is on the meta device and holds no values"),
}


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("name", PARAMETERS_REFUSED)
def test_sparse_and_meta_parameters_are_refused_at_construction(name):
    make, match = PARAMETERS_REFUSED[name]
    p = torch.nn.Parameter(make())
    with pytest.raises(ValueError, match=f"parameter 0 of param group 0 {match}"):
        LAWA(torch.optim.SGD([p], lr=0.1))
    opt = LAWA(torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1), k=2)
    opt.snapshot()
    before = fingerprint(opt)
    with pytest.raises(ValueError, match=f"parameter 0 of the added param group {match}"):
        opt.add_param_group({"params": [p]})
    assert_same(before, fingerprint(opt))
    assert len(opt.param_groups) == len(opt.optimizer.param_groups) == 1
    opt.snapshot()  # no generation was added: the history goes on as before
    assert opt._history.counts() == [2]


def test_a_shape_change_with_the_same_size_and_strides_is_refused():
    """A (6, 1) weight replaced by a (1, 6) tensor with strides (1, 1): the same element
    count and strides, another shape; the history's views would keep the old one."""
    p = torch.nn.Parameter(torch.zeros(6, 1))
    opt = LAWA(torch.optim.SGD([p], lr=0.1), k=2)
    opt.snapshot()
    p.data = torch.empty_strided((1, 6), (1, 1)).fill_(1.0)
    assert p.stride() == (1, 1) and p.numel() == 6
    before = fingerprint(opt)
    for call in (opt.snapshot, opt.swap_to_average, opt.state_dict):
        with pytest.raises(RuntimeError, match=r"was torch.float32, shape \(6, 1\).*now torch.float32, shape \(1, 6\)"):
            call()
        assert_same(before, fingerprint(opt))


def test_a_memory_format_change_after_the_history_is_built_is_refused(runner):
    p = torch.nn.Parameter(torch.randn(2, 3, 4, 5, device=DEVICE))
    opt = LAWA(torch.optim.SGD([p], lr=0.1), k=2, backend=runner)
    opt.snapshot()
    opt.snapshot()
    p.data = p.data.contiguous(memory_format=torch.channels_last)
    before = fingerprint(opt)
    for call in (opt.snapshot, opt.swap_to_average, opt.state_dict):
        with pytest.raises(RuntimeError, match=r"stride \(60, 20, 5, 1\).*now torch.float32, shape \(2, 3, 4, 5\), stride \(60, 1, 15, 3\)"):
            call()
        assert_same(before, fingerprint(opt))
