"""Parameters that share memory: one parameter per memory, counted once; memory shared
in any other way refused (:func:`lawa_optim.history.parameter_owners`)."""

import operator
import warnings

import pytest
import torch
from conftest import DEVICE, assert_same, assert_same_bits, fingerprint, roundtrip
from torch import nn

from lawa_optim import LAWA, TWA, export_average
from lawa_optim.history import parameter_owners


def sgd(params, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's "duplicate parameters" warning
        return torch.optim.SGD(params, lr=0.1, **kwargs)


class Tied(nn.Module):
    """An embedding tied to the output layer, as GPT-2's wte and lm_head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(70, 3)
        self.head = nn.Linear(3, 70, bias=False)
        self.head.weight = self.emb.weight
        self.norm = nn.Parameter(torch.ones(3))


def cases():
    """name -> (the entries of the optimizer's param groups, the distinct memories)."""

    def listed_twice():
        p, q = nn.Parameter(torch.randn(5, device=DEVICE)), nn.Parameter(torch.randn(3, 70, device=DEVICE))
        return [{"params": [p, q, p]}], [p, q]

    def tied_listed_twice():
        m = Tied().to(DEVICE)
        return [{"params": [*m.parameters(), m.head.weight]}], list(m.parameters())

    def two_parameters_one_memory():
        p, q = nn.Parameter(torch.randn(2 * 64 + 1, device=DEVICE)), nn.Parameter(torch.randn(4, device=DEVICE))
        return [{"params": [p, q]}, {"params": [nn.Parameter(p.data)]}], [p, q]

    return {f.__name__: f for f in (listed_twice, tied_listed_twice, two_parameters_one_memory)}


def fill(memories, value):
    with torch.no_grad():
        for i, p in enumerate(memories):
            p.copy_(torch.arange(p.numel(), dtype=p.dtype).reshape(p.shape) * 0.25 + value + i)


@pytest.mark.parametrize("last", [None, 1])
@pytest.mark.parametrize("case", list(cases()))
def test_the_average_is_written_once_and_the_training_weights_come_back(runner, case, last):
    """The average of each memory is that of a LAWA over the distinct parameters (run by
    the plain torch code), and the training weights come back bit for bit."""
    groups, memories = cases()[case]()
    opt = LAWA(sgd(groups), k=3, backend=runner)
    twins = [nn.Parameter(p.detach().cpu().clone()) for p in memories]
    oracle = LAWA(sgd(twins), k=3, backend="torch")
    for value in (1.0, -2.0, 4.0, 0.5):
        fill(memories, value)
        fill(twins, value)
        opt.snapshot()
        oracle.snapshot()
    (b,) = opt._history.buckets
    assert len(b.params) == len(memories) and all(map(operator.is_, b.params, memories))
    assert b.D == oracle._history.buckets[0].D  # one slice per memory
    fill(memories, 9.0)
    live = [p.detach().clone() for p in memories]
    with opt.averaged(last), oracle.averaged(last):
        for p, t in zip(memories, twins):
            assert_same_bits(p.detach().cpu(), t.detach(), "the average")
        with opt.training_weights():
            for p, w in zip(memories, live):
                assert_same_bits(p.detach(), w, "inside training_weights()")
                assert not opt.is_swapped
        for p, t in zip(memories, twins):
            assert_same_bits(p.detach().cpu(), t.detach(), "the average after training_weights()")
    for p, w in zip(memories, live):
        assert_same_bits(p.detach(), w, "the training weights")


def test_tied_weights_of_a_model_are_one_parameter_as_before():
    m = Tied()
    opt = LAWA(sgd(m.parameters()), k=2)
    opt.snapshot()
    params = opt._history.buckets[0].params
    assert len(params) == 2 and params[0] is m.norm and params[1] is m.emb.weight
    assert parameter_owners(opt.param_groups) == [[(0, 0), (0, 1)]]


def test_owners_are_the_first_entry_in_param_groups_order():
    p, q = torch.randn(4), torch.randn(4)
    a = nn.Parameter(p)  # shares p's memory
    groups = [{"params": [q, a]}, {"params": [p, torch.randn(0), torch.randn(0)]}]
    assert parameter_owners(groups) == [[(0, 0), (0, 1)], [(0, 1), (1, 1), (1, 2)]]


def overlapping():
    """name -> two tensors sharing memory without being one parameter."""
    base = torch.randn(6)
    square = torch.randn(3, 2)
    return {
        "part of the other": (base, base[:3]),
        "overlapping ranges": (base[:4], base[2:]),
        "same bytes, another shape": (base, base.view(2, 3)),
        "same bytes, transposed": (square, square.t()),
        "same bytes, another dtype": (base, base.view(torch.bfloat16)),
    }


@pytest.mark.parametrize("name", list(overlapping()))
@pytest.mark.parametrize("call", ["snapshot", "step"])
def test_overlapping_memory_is_refused_at_the_first_snapshot_naming_both(name, call):
    a, b = overlapping()[name]
    first, second = nn.Parameter(torch.randn(2)), nn.Parameter(a)
    groups = [{"params": [first, second]}, {"params": [nn.Parameter(b)]}]
    opt = LAWA(sgd(groups), k=2)
    for p in (first, second):
        p.grad = torch.ones_like(p)
    before = fingerprint(opt)
    with pytest.raises(RuntimeError, match="share memory") as info:
        opt.snapshot() if call == "snapshot" else opt.step()
    message = str(info.value)
    assert f"parameter 1 of param group 0 ({a.dtype}, shape {tuple(a.shape)}" in message
    assert f"parameter 0 of param group 1 ({b.dtype}, shape {tuple(b.shape)}" in message
    assert_same(before, fingerprint(opt))


def moves():
    """name -> (the param groups, what the move does) for moves that change which
    parameters share memory after the history was built."""

    def now_shared():
        p, q = nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(5))
        return [p, q], lambda: setattr(q, "data", p.data)

    def now_overlapping():
        p, q = nn.Parameter(torch.randn(6)), nn.Parameter(torch.randn(3))
        return [p, q], lambda: setattr(q, "data", p.data[3:])

    def alias_moved_away():
        p = nn.Parameter(torch.randn(5))
        q = nn.Parameter(p.data)
        return [p, q], lambda: setattr(q, "data", q.data.clone())

    def owner_moved_away():
        p = nn.Parameter(torch.randn(5))
        q = nn.Parameter(p.data)
        return [p, q], lambda: setattr(p, "data", p.data.clone())

    return {f.__name__: f for f in (now_shared, now_overlapping, alias_moved_away, owner_moved_away)}


@pytest.mark.parametrize("name", list(moves()))
def test_a_move_that_changes_the_sharing_is_refused(runner, name):
    params, move = moves()[name]()
    opt = LAWA(sgd(params), k=2, backend=runner)
    opt.snapshot()
    opt.snapshot()
    move()
    before = fingerprint(opt)
    for call in (opt.snapshot, opt.swap_to_average, opt.state_dict):
        with pytest.raises(RuntimeError, match="share memory|shares it with|shared memory with"):
            call()
        assert_same(before, fingerprint(opt))


def test_a_swapped_alias_moved_away_is_refused_by_swap_back():
    p = nn.Parameter(torch.ones(5))
    q = nn.Parameter(p.data)
    opt = LAWA(sgd([p, q]), k=2)
    opt.snapshot()
    with torch.no_grad():
        p.fill_(3.0)
    opt.swap_to_average()
    q.data = q.data.clone()
    before = fingerprint(opt)
    with pytest.raises(RuntimeError, match="shared memory with parameter 0 of param group 0"):
        opt.swap_back()
    assert_same(before, fingerprint(opt))
    q.data = p.data  # undone: the swap back restores the training weights
    opt.swap_back()
    assert torch.equal(p.detach(), torch.full((5,), 3.0))


def test_an_added_group_sharing_a_built_parameters_memory_is_refused():
    p = nn.Parameter(torch.randn(5))
    opt = LAWA(sgd([p]), k=2)
    opt.snapshot()
    opt.add_param_group({"params": [nn.Parameter(p.data), nn.Parameter(torch.randn(2))]})
    before = fingerprint(opt)
    with pytest.raises(RuntimeError, match="parameter 0 of param group 1 shares the memory of parameter 0 of param group 0"):
        opt.snapshot()
    assert_same(before, fingerprint(opt))


@pytest.mark.parametrize("swapped", [False, True])
def test_a_parameter_listed_twice_is_saved_once_and_resumes_bit_for_bit(swapped):
    def build(seed):
        torch.manual_seed(seed)
        p, q = nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(3))
        return [p, q], LAWA(sgd([p, q, p], momentum=0.9), k=3)

    def train(params, opt, steps):
        for _ in range(steps):
            for p in params:
                p.grad = p.detach().sin()
            opt.step()
            opt.snapshot()

    params, opt = build(0)
    train(params, opt, 4)
    if swapped:
        opt.swap_to_average()
    sd = roundtrip(opt.state_dict())
    ids = sd["param_groups"][0]["params"]  # torch gives the tensor listed twice one id
    assert ids[0] == ids[2] != ids[1] and sorted(sd["state"]) == sorted({ids[0], ids[1]})
    assert sd["state"][ids[0]]["lawa_history"].shape == (3, 5)
    params2, opt2 = build(1)
    opt2.load_state_dict(sd)
    with torch.no_grad():
        for a, b in zip(params, params2):
            b.copy_(a)  # as the model's state dict holds them (the average, when swapped)
    if swapped:
        opt.swap_back()
        opt2.swap_back()
    assert_same([p.detach() for p in params], [p.detach() for p in params2])
    train(params, opt, 3)
    train(params2, opt2, 3)
    with opt.averaged(), opt2.averaged():
        assert_same([p.detach() for p in params], [p.detach() for p in params2])
    assert_same(opt.state_dict(), opt2.state_dict())


def test_two_parameters_on_one_memory_save_the_same_history():
    p = nn.Parameter(torch.randn(5))
    q = nn.Parameter(p.data)
    opt = LAWA(sgd([p, q]), k=2)
    opt.snapshot()
    sd = opt.state_dict()
    assert sd["param_groups"][0]["params"] == [0, 1]
    assert torch.equal(sd["state"][0]["lawa_history"], sd["state"][1]["lawa_history"])
    opt2 = LAWA(sgd([p, q]), k=2)
    opt2.load_state_dict(roundtrip(sd))
    assert_same(opt2.state_dict(), sd)


@pytest.mark.parametrize("named", [False, True])
@pytest.mark.parametrize("case", ["listed twice", "two tensors on one memory"])
def test_export_from_the_lawa_and_from_its_state_dict(case, named):
    model = nn.Linear(3, 2)
    entries = [("weight", model.weight), ("bias", model.bias), ("weight", model.weight)]
    if case != "listed twice":
        model.twin = nn.Parameter(model.weight.data)  # registered: the model names it
        entries[2] = ("twin", model.twin)
    opt = LAWA(sgd(entries if named else [p for _, p in entries]), k=3)
    snaps = []
    for value in (1.0, 2.0, 6.0):
        fill([model.weight, model.bias], value)
        opt.snapshot()
        snaps.append({n: p.detach().clone() for n, p in model.named_parameters()})
    before = fingerprint(opt, model=model)
    live = export_average(model, opt)
    saved = export_average(model, roundtrip(opt.state_dict()))
    assert_same(before, fingerprint(opt, model=model))
    assert_same(live, saved)
    for name, avg in live.items():
        mean = torch.stack([s[name].double() for s in snaps]).mean(0)
        torch.testing.assert_close(avg.double(), mean, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("case", ["listed_twice", "two_parameters_one_memory"])
def test_twa_refuses_an_optimizer_that_lists_a_memory_twice(case):
    """SGD steps each entry: a memory listed twice moves twice as far as the rest and
    leaves the span of the snapshots."""
    groups, memories = cases()[case]()
    lawa = LAWA(sgd(groups), k=3)
    for value in (1.0, -2.0, 4.0):
        fill(memories, value)
        lawa.snapshot()
    before = fingerprint(lawa)
    with pytest.raises(ValueError, match="lists the memory of parameter 0 of param group 0 again"):
        TWA(sgd([{"params": list(g["params"])} for g in groups]), history=lawa)
    assert_same(before, fingerprint(lawa))


@pytest.mark.parametrize("blocks", [False, True])
@pytest.mark.parametrize("case", ["listed_twice", "two_parameters_one_memory"])
def test_twa_over_a_history_with_shared_memory_stays_in_the_span(case, blocks):
    groups, memories = cases()[case]()
    lawa = LAWA(sgd(groups), k=3)
    for value in (1.0, -2.0, 4.0):
        fill(memories, value)
        lawa.snapshot()
    # Each memory once in the optimizer; blocks may name it by any of its tensors.
    named = [[p for g in groups for p in g["params"]]] if blocks else None
    twa = TWA(sgd(memories, momentum=0.9, weight_decay=0.01), history=lawa, blocks=named)
    start = torch.cat([p.detach().flatten() for p in memories]).double()
    (b,) = lawa._history.buckets
    snaps = torch.stack([torch.cat([t.flatten() for t in b.views(b.ring[s])]) for s in (2, 1, 0)]).double()
    for _ in range(3):
        for p in memories:
            p.grad = torch.randn_like(p)
        twa.step()
    flat = torch.cat([p.detach().flatten() for p in memories]).double()
    assert not torch.equal(flat, start)  # the steps moved the weights
    torch.testing.assert_close(twa.coefficients()[0] @ snaps, flat, rtol=1e-5, atol=1e-5)


def test_export_refuses_a_saved_id_listed_under_two_names():
    model = nn.Linear(3, 2)
    opt = LAWA(sgd([("weight", model.weight), ("bias", model.bias), ("weight", model.weight)]), k=2)
    opt.snapshot()
    sd = opt.state_dict()
    pid = sd["param_groups"][0]["params"][0]
    sd["param_groups"][0]["param_names"][2] = "bias"
    kept = fingerprint(opt, model=model)
    with pytest.raises(ValueError, match=f"source names its parameter {pid} both 'weight' and 'bias'"):
        export_average(model, sd)
    assert_same(kept, fingerprint(opt, model=model))
