"""The LAWA wrapper: averages against hand-kept snapshots, cadence, swaps, errors, hooks."""

import copy
import warnings

import pytest
import torch
from torch import nn

from lawa_optim import LAWA


def make_model(device, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(device)


def train_step(model, opt, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 6, generator=g).to(next(model.parameters()).device)
    loss = model(x).pow(2).mean()
    loss.backward()
    out = opt.step()
    opt.zero_grad()
    return out


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_mean(model, snaps, rtol=1e-6):
    for i, p in enumerate(model.parameters()):
        mean = torch.stack([s[i].double() for s in snaps]).mean(0)
        torch.testing.assert_close(p.detach().double(), mean, rtol=rtol, atol=1e-7)


def test_is_an_optimizer_sharing_the_wrapped_state():
    model = make_model("cpu")
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = LAWA(base, k=3)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is base.param_groups
    assert opt.state is base.state
    assert opt.defaults is base.defaults
    train_step(model, opt, 0)
    assert all("momentum_buffer" in opt.state[p] for p in model.parameters())
    assert set(opt.state[next(model.parameters())]) == {"momentum_buffer"}  # history is not in state


def test_lr_scheduler_drives_the_wrapped_optimizer():
    model = make_model("cpu")
    base = torch.optim.SGD(model.parameters(), lr=1.0)
    opt = LAWA(base, k=2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "scheduler.step() before optimizer.step()" warning
        for s in range(3):
            train_step(model, opt, s)
            sched.step()
    assert base.param_groups[0]["lr"] == 0.125


def test_step_returns_the_closure_loss():
    model = make_model("cpu")
    opt = LAWA(torch.optim.SGD(model.parameters(), lr=0.1))

    def closure():
        opt.zero_grad()
        loss = model(torch.ones(2, 6)).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.ndim == 0


def test_uniform_average_is_the_mean_of_the_latest_k(backend, device):
    model = make_model(device)
    opt = LAWA(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), k=4, backend=backend)
    assert opt.backend == backend
    snaps = []
    for epoch in range(7):
        for s in range(3):
            train_step(model, opt, 10 * epoch + s)
        assert opt.snapshot() is True
        snaps.append(weights(model))
        assert opt.num_snapshots == min(epoch + 1, 4)
        live = weights(model)
        ptrs = [p.data_ptr() for p in model.parameters()]
        with opt.averaged():
            assert opt.is_swapped
            assert_mean(model, snaps[-4:])
            assert [p.data_ptr() for p in model.parameters()] == ptrs
        assert not opt.is_swapped
        assert all(torch.equal(p, x) for p, x in zip(model.parameters(), live))


def test_last_j_averages_the_newest_snapshots(backend, device):
    model = make_model(device)
    opt = LAWA(torch.optim.SGD(model.parameters(), lr=0.1), k=5, backend=backend)
    snaps = []
    for epoch in range(7):
        train_step(model, opt, epoch)
        opt.snapshot()
        snaps.append(weights(model))
    for j in range(1, 6):
        with opt.averaged(last=j):
            assert_mean(model, snaps[-j:])


def test_ema_follows_the_recurrence(backend, device):
    model = make_model(device)
    opt = LAWA(torch.optim.SGD(model.parameters(), lr=0.1), mode="ema", decay=0.6, backend=backend)
    ema = None
    for epoch in range(5):
        train_step(model, opt, epoch)
        opt.snapshot()
        theta = [w.double() for w in weights(model)]
        ema = theta if ema is None else [0.6 * e + 0.4 * t for e, t in zip(ema, theta)]
    assert opt.num_snapshots == 5
    with opt.averaged():
        for p, e in zip(model.parameters(), ema):
            torch.testing.assert_close(p.detach().double(), e, rtol=1e-6, atol=1e-7)


def test_every_and_start_gate_automatic_snapshots(backend, device):
    model = make_model(device)
    opt = LAWA(torch.optim.SGD(model.parameters(), lr=0.1), k=10, every=3, start=5, backend=backend)
    after = {}
    for t in range(1, 13):
        if t < 5:
            assert opt.snapshot() is False  # explicit calls before `start` do nothing
        train_step(model, opt, t)
        after[t] = weights(model)
    # Snapshots after steps t >= 5 with t % 3 == 0: 6, 9, 12.
    assert opt.num_snapshots == 3
    with opt.averaged():
        assert_mean(model, [after[6], after[9], after[12]])


def test_frozen_parameters_enter_the_history():
    model = make_model("cpu")
    model[0].weight.requires_grad_(False)
    opt = LAWA(torch.optim.SGD(model.parameters(), lr=0.1), k=2)
    opt.snapshot()
    with torch.no_grad():
        model[0].weight.add_(2.0)
    frozen_then = model[0].weight.detach().clone()
    opt.snapshot()
    with opt.averaged():
        torch.testing.assert_close(model[0].weight.detach(), frozen_then - 1.0)


def test_snapshot_is_an_independent_copy():
    p = nn.Parameter(torch.ones(4))
    opt = LAWA(torch.optim.SGD([p], lr=0.1), k=2)
    opt.snapshot()
    with torch.no_grad():
        p.mul_(3.0)  # in place, same storage
    opt.snapshot()
    with opt.averaged():
        assert torch.equal(p.detach(), torch.full((4,), 2.0))


def test_averaged_swaps_back_when_the_body_raises():
    model = make_model("cpu")
    opt = LAWA(torch.optim.SGD(model.parameters(), lr=0.1), k=2)
    train_step(model, opt, 0)
    opt.snapshot()
    train_step(model, opt, 1)
    live = weights(model)
    with pytest.raises(KeyError):
        with opt.averaged():
            raise KeyError("evaluation failed")
    assert not opt.is_swapped
    assert all(torch.equal(p, x) for p, x in zip(model.parameters(), live))


def test_gradient_scaler_skipped_steps_take_no_snapshot():
    p = nn.Parameter(torch.ones(3))
    opt = LAWA(torch.optim.SGD([p], lr=0.1), k=4, every=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    scaler.scale((p * float("inf")).sum()).backward()
    scaler.step(opt)  # non-finite gradients: the optimizer step is skipped
    scaler.update()
    assert opt.num_snapshots == 0 and torch.equal(p.detach(), torch.ones(3))
    opt.zero_grad()
    scaler.scale(p.sum()).backward()
    scaler.step(opt)
    assert opt.num_snapshots == 1


def test_added_param_group_joins_from_the_next_snapshot():
    a = nn.Parameter(torch.zeros(3))
    b = nn.Parameter(torch.full((2,), 10.0))
    opt = LAWA(torch.optim.SGD([a], lr=0.1), k=3)
    for v in (1.0, 2.0):
        a.data.fill_(v)
        opt.snapshot()
    opt.add_param_group({"params": [b], "lr": 0.01})
    with opt.averaged():  # b has no snapshot yet: untouched
        assert torch.equal(a.detach(), torch.full((3,), 1.5))
        assert torch.equal(b.detach(), torch.full((2,), 10.0))
    for v in (3.0, 4.0):
        a.data.fill_(v)
        b.data.fill_(10 * v)
        opt.snapshot()
    with opt.averaged():
        assert torch.equal(a.detach(), torch.full((3,), 3.0))  # (2 + 3 + 4) / 3
        assert torch.equal(b.detach(), torch.full((2,), 35.0))  # (30 + 40) / 2
    assert opt.num_snapshots == 3


def test_hooks_run_on_the_wrapper():
    model = make_model("cpu")
    opt = LAWA(torch.optim.SGD(model.parameters(), lr=0.1))
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append(("pre", o)))
    opt.register_step_post_hook(lambda o, a, k: calls.append(("post", o)))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append(("sd", "lawa" in sd["param_groups"][0])))
    opt.register_load_state_dict_post_hook(lambda o: calls.append(("load", o)))
    train_step(model, opt, 0)
    sd = opt.state_dict()
    opt.load_state_dict(sd)
    assert calls == [("pre", opt), ("post", opt), ("sd", True), ("load", opt)]


def test_repr_names_settings_and_the_wrapped_optimizer():
    opt = LAWA(torch.optim.AdamW(make_model("cpu").parameters(), lr=1e-3), k=5, every=10)
    text = repr(opt)
    assert text.startswith("LAWA(k=5, mode='uniform', every=10") and "AdamW" in text and "lr: 0.001" in text


def test_deepcopy_of_the_wrapper_is_independent():
    model = make_model("cpu")
    opt = LAWA(torch.optim.SGD(model.parameters(), lr=0.1), k=2)
    opt.snapshot()
    clone = copy.deepcopy(opt)
    assert clone.k == 2 and clone.num_snapshots == 1
    assert clone.param_groups[0]["params"][0] is not model[0].weight


def test_zero_grad_reaches_the_parameters():
    model = make_model("cpu")
    opt = LAWA(torch.optim.SGD(model.parameters(), lr=0.1))
    model(torch.ones(1, 6)).sum().backward()
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


# -- bad input ---------------------------------------------------------------------
BAD_ARGS = [
    ({"k": 0}, ValueError, "k must be"),
    ({"k": 2.0}, ValueError, "k must be"),
    ({"k": True}, ValueError, "k must be"),
    ({"every": 0}, ValueError, "every must be"),
    ({"start": -1}, ValueError, "start must be"),
    ({"mode": "mean"}, ValueError, "mode must be one of"),
    ({"decay": 1.0}, ValueError, "decay must be"),
    ({"decay": -0.1}, ValueError, "decay must be"),
    ({"storage": "disk"}, ValueError, "storage must be one of"),
    ({"history_dtype": torch.int8}, ValueError, "history_dtype must be"),
    ({"backend": "numba"}, ValueError, "backend must be one of"),
    ({"recompute_every": 0}, ValueError, "recompute_every must be"),
]


@pytest.mark.parametrize("kwargs,exc,msg", BAD_ARGS, ids=lambda v: str(v) if isinstance(v, dict) else "")
def test_bad_arguments_are_named(kwargs, exc, msg):
    with pytest.raises(exc, match=msg) as info:
        LAWA(torch.optim.SGD(make_model("cpu").parameters(), lr=0.1), **kwargs)
    assert repr(next(iter(kwargs.values()))) in str(info.value)  # the value is named too


def test_non_optimizer_and_non_float_parameters_are_refused():
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        LAWA(make_model("cpu"))
    with pytest.raises(TypeError, match="already a LAWA"):
        LAWA(LAWA(torch.optim.SGD(make_model("cpu").parameters(), lr=0.1)))
    ints = torch.zeros(3, dtype=torch.int64)
    with pytest.raises(TypeError, match="int64"):
        LAWA(torch.optim.SGD([ints], lr=0.1))
    opt = LAWA(torch.optim.SGD(make_model("cpu").parameters(), lr=0.1))
    with pytest.raises(TypeError, match="floating-point"):
        opt.add_param_group({"params": [ints]})
    assert len(opt.param_groups) == 1


def snapshot_of_everything(model, opt):
    hist = [(b.ring.clone() if b.ring is not None else None, b.total.clone(), b.pushes.clone()) for b in opt._history.buckets]
    state = {id(p): {n: v.clone() for n, v in st.items()} for p, st in opt.state.items()}
    return weights(model), hist, state, opt.is_swapped


def assert_unchanged(before, after):
    (w0, h0, s0, sw0), (w1, h1, s1, sw1) = before, after
    assert all(torch.equal(a, b) for a, b in zip(w0, w1))
    for (r0, t0, n0), (r1, t1, n1) in zip(h0, h1):
        assert (r0 is None or torch.equal(r0, r1)) and torch.equal(t0, t1) and torch.equal(n0, n1)
    assert s0.keys() == s1.keys() and sw0 == sw1
    for k in s0:
        assert all(torch.equal(s0[k][n], s1[k][n]) for n in s0[k])


def test_misuse_raises_and_changes_nothing():
    model = make_model("cpu")
    opt = LAWA(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), k=3)
    train_step(model, opt, 0)
    with pytest.raises(RuntimeError, match="call opt.snapshot"):
        opt.swap_to_average()
    with pytest.raises(RuntimeError, match="already the training weights"):
        opt.swap_back()
    opt.snapshot()
    train_step(model, opt, 1)
    opt.snapshot()
    saved = opt.state_dict()
    for bad in (0, 3, 1.5):
        before = snapshot_of_everything(model, opt)
        with pytest.raises(RuntimeError, match=r"last must be an int in \[1, 2\]"):
            opt.swap_to_average(last=bad)
        assert_unchanged(before, snapshot_of_everything(model, opt))
    opt.swap_to_average()
    model(torch.ones(2, 6)).sum().backward()
    before = snapshot_of_everything(model, opt)
    for call in (opt.step, opt.swap_to_average, opt.snapshot, lambda: opt.load_state_dict(saved)):
        with pytest.raises(RuntimeError, match="swap_back"):
            call()
        assert_unchanged(before, snapshot_of_everything(model, opt))
    opt.swap_back()


def test_last_needs_uniform_mode():
    model = make_model("cpu")
    opt = LAWA(torch.optim.SGD(model.parameters(), lr=0.1), mode="ema")
    opt.snapshot()
    with pytest.raises(RuntimeError, match="mode='uniform'"):
        opt.swap_to_average(last=1)
    assert not opt.is_swapped


def test_explicit_backend_that_cannot_run_is_an_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    opt = LAWA(torch.optim.SGD(make_model("cpu").parameters(), lr=0.1), backend="cuda")
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run"):
        opt.snapshot()


def test_backward_through_a_swap_fails_loudly(backend, device):
    model = make_model(device)
    opt = LAWA(torch.optim.SGD(model.parameters(), lr=0.1), k=2, backend=backend)
    opt.snapshot()
    loss = model(torch.ones(2, 6, device=device)).pow(2).sum()  # graph saves the weights
    with opt.averaged():
        pass
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
