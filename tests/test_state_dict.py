"""Checkpoints: bit-identical resume, copies, and refusals that change nothing."""

import copy
import io

import pytest
import torch
from torch import nn

from lawa_optim import LAWA


def make(device, seed, backend="torch", **kwargs):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 2)).to(device)
    opt = LAWA(torch.optim.Adam(model.parameters(), lr=1e-2), backend=backend, **kwargs)
    return model, opt


def epoch(model, opt, e):
    g = torch.Generator().manual_seed(e)
    for _ in range(3):
        x = torch.randn(8, 5, generator=g).to(next(model.parameters()).device)
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    opt.snapshot()


def trace(model, opt, epochs):
    """Weights and averages after each of ``epochs``."""
    out = []
    for e in epochs:
        epoch(model, opt, e)
        live = [p.detach().clone() for p in model.parameters()]
        with opt.averaged():
            avg = [p.detach().clone() for p in model.parameters()]
        out.append((live, avg))
    return out


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


CASES = {
    "uniform": {"k": 3},
    "uniform-bf16-history": {"k": 3, "history_dtype": torch.bfloat16},
    "uniform-recompute-2": {"k": 4, "recompute_every": 2},
    "uniform-every-start": {"k": 3, "every": 2, "start": 3},
    "ema": {"mode": "ema", "decay": 0.5},
}


@pytest.mark.parametrize("swapped", [False, True], ids=["live", "saved-while-swapped"])
@pytest.mark.parametrize("case", CASES)
def test_resume_is_bit_identical(backend, device, case, swapped):
    kwargs = CASES[case]
    model, opt = make(device, 0, backend, **kwargs)
    for e in range(5):
        epoch(model, opt, e)
    if swapped:
        opt.swap_to_average()
    saved = roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
    held = opt.num_snapshots
    if swapped:
        opt.swap_back()
    expected = trace(model, opt, range(5, 9))

    model2, opt2 = make(device, 1, backend, **kwargs)  # other initial weights
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    assert opt2.is_swapped == swapped and opt2.num_snapshots == held > 0
    if swapped:
        opt2.swap_back()
    got = trace(model2, opt2, range(5, 9))
    for (l0, a0), (l1, a1) in zip(expected, got):
        assert all(torch.equal(x, y) for x, y in zip(l0, l1))
        assert all(torch.equal(x, y) for x, y in zip(a0, a1))
    for p, q in zip(model.parameters(), model2.parameters()):  # Adam's moments came back too
        assert torch.equal(opt.state[p]["exp_avg"], opt2.state[q]["exp_avg"])
        assert torch.equal(opt.state[p]["exp_avg_sq"], opt2.state[q]["exp_avg_sq"])


def test_state_dict_layout_and_copies():
    model, opt = make("cpu", 0, k=3)
    for e in range(2):
        epoch(model, opt, e)
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups"}
    w = model[0].weight
    hist = sd["state"][0]["lawa_history"]
    assert hist.shape == (3, *w.shape)
    assert torch.equal(hist[1], w.detach())  # the newest of two snapshots is in slot 1
    assert sd["param_groups"][0]["lawa"]["pushes"] == 2
    assert "lawa_history" not in opt.state[w]  # the live optimizer state stays clean
    frozen = copy.deepcopy(sd)
    for e in range(2, 6):
        epoch(model, opt, e)
    assert not torch.equal(frozen["state"][0]["lawa_history"], sd["state"][0]["lawa_history"])
    model2, opt2 = make("cpu", 1, k=3)
    model2.load_state_dict(model.state_dict())
    opt2.load_state_dict(frozen)
    assert opt2.num_snapshots == 2
    with torch.no_grad():
        frozen["state"][0]["lawa_history"].zero_()  # loading copied, it did not alias
    assert opt2._history.buckets[0].ring.abs().sum() > 0


def test_adam_initialises_after_loading_a_history_only_checkpoint():
    model, opt = make("cpu", 0, k=2)
    opt.snapshot()  # history but no Adam state yet
    sd = opt.state_dict()
    model2, opt2 = make("cpu", 1, k=2)
    opt2.load_state_dict(sd)
    epoch(model2, opt2, 0)  # Adam must see empty state and initialise
    assert "exp_avg" in opt2.state[model2[0].weight]


def test_generations_round_trip():
    model, opt = make("cpu", 0, k=3)
    extra = nn.Parameter(torch.ones(4))
    epoch(model, opt, 0)
    opt.add_param_group({"params": [extra]})
    epoch(model, opt, 1)
    extra.data.fill_(3.0)
    opt.snapshot()
    sd = roundtrip(opt.state_dict())
    assert [g["lawa"]["generation"] for g in sd["param_groups"]] == [0, 1]
    model2, opt2 = make("cpu", 1, k=3)
    extra2 = nn.Parameter(torch.zeros(4))
    opt2.add_param_group({"params": [extra2]})
    model2.load_state_dict(model.state_dict())
    opt2.load_state_dict(sd)
    assert opt2._history.counts() == [3, 2]
    with opt2.averaged():
        assert torch.equal(extra2.detach(), torch.full((4,), 2.0))


def history_fingerprint(model, opt):
    bufs = [(b.ring.clone() if b.ring is not None else None, b.total.clone(), int(b.pushes)) for b in opt._history.buckets]
    state = {id(p): {n: v.clone() for n, v in s.items()} for p, s in opt.state.items()}
    return [p.detach().clone() for p in model.parameters()], bufs, state, opt.steps


def assert_same(a, b):
    (w0, h0, s0, t0), (w1, h1, s1, t1) = a, b
    assert all(torch.equal(x, y) for x, y in zip(w0, w1)) and t0 == t1
    for (r0, tot0, n0), (r1, tot1, n1) in zip(h0, h1):
        assert (r0 is None or torch.equal(r0, r1)) and torch.equal(tot0, tot1) and n0 == n1
    assert s0.keys() == s1.keys()
    assert all(torch.equal(s0[k][n], s1[k][n]) for k in s0 for n in s0[k])


MISMATCHES = {
    "k": ({"k": 4}, "k=3"),
    "mode": ({"mode": "ema"}, "mode='uniform'"),
    "history_dtype": ({"history_dtype": torch.bfloat16}, "history_dtype=None"),
}


@pytest.mark.parametrize("name", MISMATCHES)
def test_mismatched_settings_are_refused_and_change_nothing(name):
    src_model, src = make("cpu", 0, k=3)
    for e in range(2):
        epoch(src_model, src, e)
    sd = src.state_dict()
    kwargs, saved_text = MISMATCHES[name]
    model, opt = make("cpu", 1, **{"k": 3, **kwargs})
    for e in range(3):
        epoch(model, opt, e)
    before = history_fingerprint(model, opt)
    with pytest.raises(ValueError, match=f"saved with {saved_text}"):
        opt.load_state_dict(sd)
    assert_same(before, history_fingerprint(model, opt))


def test_other_parameter_layout_is_refused():
    src_model, src = make("cpu", 0, k=3)
    epoch(src_model, src, 0)
    sd = src.state_dict()
    torch.manual_seed(0)
    other = nn.Sequential(nn.Linear(5, 9), nn.ReLU(), nn.Linear(9, 2))
    opt = LAWA(torch.optim.Adam(other.parameters(), lr=1e-2), k=3)
    epoch(other, opt, 0)
    before = history_fingerprint(other, opt)
    with pytest.raises(ValueError, match=r"parameter 0 of param group 0: lawa_history has shape \(3, 7, 5\)"):
        opt.load_state_dict(sd)
    assert_same(before, history_fingerprint(other, opt))


def test_plain_optimizer_state_dict_is_refused_with_the_remedy():
    model, opt = make("cpu", 0)
    epoch(model, opt, 0)
    with pytest.raises(ValueError, match=r"opt.optimizer.load_state_dict"):
        opt.load_state_dict(opt.optimizer.state_dict())
    assert opt.num_snapshots == 1
