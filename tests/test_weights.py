"""Any weighting of the stored snapshots (``weights=``) through the wrapper and
``export_average``, and the coefficient builders of :mod:`lawa_optim.profiles`.

The kernels' arithmetic is checked on every backend by tests/test_ops.py
(``test_weighted_contract``); here: the public API against float64 weighted sums of
kept copies of the snapshots, refusals that leave everything as it was, the rule for
parameter groups that hold fewer snapshots, and checkpoints read from files.
"""

import math
import warnings

import pytest
import torch
from conftest import assert_same, fingerprint, roundtrip
from torch import nn

import lawa_optim
from lawa_optim import LAWA, export_average, profiles


def make(device="cpu", k=4, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(device)
    return model, LAWA(torch.optim.SGD(model.parameters(), lr=0.1), k=k, **kwargs)


def snapshots(model, opt, count, seed=0):
    """``count`` snapshots of fresh random weights; float64 copies of each, oldest first."""
    g = torch.Generator().manual_seed(seed)
    kept = []
    for _ in range(count):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 3)
        opt.snapshot()
        kept.append([p.detach().double().clone() for p in model.parameters()])
    return kept


def assert_weighted(params, kept, weights, what=""):
    """Each parameter is the float64 sum of ``weights[j]`` times the ``j``-th newest kept
    snapshot, within the guarantee (1e-5 of the sum of the terms' magnitudes)."""
    w = [float(x) for x in weights]
    for i, p in enumerate(params):
        terms = [wj * kept[-1 - j][i] for j, wj in enumerate(w)]
        want = sum(terms)
        bound = 1e-5 * sum(t.abs() for t in terms) + 1e-7
        err = (p.detach().double() - want).abs()
        assert bool((err <= bound).all()), f"{what} parameter {i}: off by {float(err.max())}"


def live(model):
    return [p.detach().clone() for p in model.parameters()]


VECTORS = {
    "list": [0.4, 0.3, 0.2, 0.1],
    "tensor": torch.tensor([0.7, 0.6, -0.2, -0.1]),
    "shorter": (0.25, 0.75),
    "one": [1],
    "window": profiles.window(3),
    "linear": profiles.linear(4),
}


@pytest.mark.parametrize("name", VECTORS)
def test_weighted_average_is_the_float64_weighted_sum_and_swaps_back_bit_for_bit(backend, device, name):
    model, opt = make(device, backend=backend)
    kept = snapshots(model, opt, 6)  # the ring has wrapped
    before = live(model)
    ptrs = [p.data_ptr() for p in model.parameters()]
    with opt.averaged(weights=VECTORS[name]):
        assert opt.is_swapped
        assert [p.data_ptr() for p in model.parameters()] == ptrs
        assert_weighted(model.parameters(), kept, VECTORS[name], name)
    assert_same(live(model), before)
    opt.swap_to_average(weights=VECTORS[name])
    assert_weighted(model.parameters(), kept, VECTORS[name], name)
    opt.swap_back()
    assert_same(live(model), before)


def test_weighted_average_on_a_partly_filled_ring():
    model, opt = make(k=5)
    kept = snapshots(model, opt, 2)
    with opt.averaged(weights=[1.5, -0.5]):
        assert_weighted(model.parameters(), kept, [1.5, -0.5])


def test_window_is_last_j_to_within_the_guarantee():
    model, opt = make()
    snapshots(model, opt, 5)
    for j in range(1, 5):
        with opt.averaged(last=j):
            mean = live(model)
        with opt.averaged(weights=profiles.window(j)):
            for a, b in zip(live(model), mean):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def refusals():
    """name: (call on a LAWA holding 4 snapshots and its model, exception, message)."""
    return {
        "sum": (lambda o, m: o.swap_to_average(weights=[0.5, 0.4]), ValueError, r"weights sum to 0\.9"),
        "sum just off": (lambda o, m: o.swap_to_average(weights=[0.5, 0.5 + 2e-6]), ValueError, "not 1 within 1e-06"),
        "too long": (lambda o, m: o.swap_to_average(weights=[0.2] * 5), ValueError, "5 coefficients but 4 snapshots"),
        "empty": (lambda o, m: o.swap_to_average(weights=[]), ValueError, "weights is empty"),
        "nan": (lambda o, m: o.swap_to_average(weights=[1.0, math.nan]), ValueError, r"weights\[1\] is nan"),
        "inf": (lambda o, m: o.swap_to_average(weights=torch.tensor([math.inf, -math.inf])), ValueError,
                r"weights\[0\] is inf"),
        "with last": (lambda o, m: o.swap_to_average(2, weights=[0.5, 0.5]), ValueError, "both given"),
        "string": (lambda o, m: o.swap_to_average(weights="0.5"), TypeError, "sequence of floats"),
        "bool": (lambda o, m: o.swap_to_average(weights=[True]), TypeError, r"weights\[0\] must be a real number"),
        "2-D tensor": (lambda o, m: o.swap_to_average(weights=torch.ones(1, 1)), TypeError, "2-D tensor"),
        "averaged": (lambda o, m: o.averaged(weights=[2.0]).__enter__(), ValueError, "weights sum to 2"),
        "export": (lambda o, m: export_average(m, o, weights=[0.5, 0.6]), ValueError, "weights sum to 1.1"),
    }


@pytest.mark.parametrize("case", refusals())
def test_refused_weights_change_nothing(case):
    call, exc, message = refusals()[case]
    model, opt = make()
    snapshots(model, opt, 4)
    before = fingerprint(opt, model=model)
    with pytest.raises(exc, match=message):
        call(opt, model)
    assert not opt.is_swapped
    assert_same(fingerprint(opt, model=model), before)


def test_weights_in_ema_mode_are_refused():
    model, opt = make(mode="ema")
    snapshots(model, opt, 3)
    before = fingerprint(opt, model=model)
    with pytest.raises(RuntimeError, match="mode='ema', which keeps no ring"):
        opt.swap_to_average(weights=[1.0])
    with pytest.raises(ValueError, match="mode='ema', which keeps no ring"):
        export_average(model, roundtrip(opt.state_dict()), weights=[1.0])
    assert_same(fingerprint(opt, model=model), before)


def test_weights_while_swapped_are_refused():
    model, opt = make()
    snapshots(model, opt, 2)
    opt.swap_to_average()
    before = fingerprint(opt, model=model)
    with pytest.raises(RuntimeError, match="call swap_back"):
        opt.swap_to_average(weights=[1.0])
    assert_same(fingerprint(opt, model=model), before)


def later_group():
    """k = 3: one parameter snapshotted 4 times, then a second group (one parameter) added
    and everything snapshotted twice: the first holds 3 snapshots, the second 2."""
    a, b = nn.Parameter(torch.zeros(5)), nn.Parameter(torch.zeros(3))
    opt = LAWA(torch.optim.SGD([a], lr=0.1), k=3)
    kept_a, kept_b = [], []
    for v in range(4):
        a.data.fill_(float(v) + 0.25)
        opt.snapshot()
        kept_a.append([a.detach().double().clone()])
    opt.add_param_group({"params": [b]})
    for v in range(2):
        a.data.fill_(10.0 + v)
        b.data.copy_(torch.tensor([1.0, -2.0, 3.0]) * (v + 1) / 3)
        opt.snapshot()
        kept_a.append([a.detach().double().clone()])
        kept_b.append([b.detach().double().clone()])
    return opt, a, b, kept_a, kept_b


def test_a_group_added_later_takes_its_newest_coefficients_renormalised():
    opt, a, b, kept_a, kept_b = later_group()
    weights = [0.5, 0.3, 0.2]
    with opt.averaged(weights=weights):
        assert_weighted([a], kept_a, weights)
        assert_weighted([b], kept_b, [0.5 / 0.8, 0.3 / 0.8])
    model = nn.Module()
    model.a, model.b = a, b
    sd = roundtrip(opt.state_dict())
    live_export = export_average(model, opt, weights=weights)
    assert_same(export_average(model, sd, weights=weights), live_export)


def test_a_group_whose_newest_coefficients_cancel_is_refused_by_name():
    opt, a, b, _, _ = later_group()
    model = nn.Module()
    model.a, model.b = a, b
    sd = roundtrip(opt.state_dict())
    before = fingerprint(opt, model=model)
    with pytest.raises(ValueError, match=r"param group 1 holds 2 snapshots .* sum to 0\.0"):
        opt.swap_to_average(weights=[0.5, -0.5, 1.0])
    with pytest.raises(ValueError, match=r"param group 1 of source holds 2 snapshots"):
        export_average(model, sd, weights=[0.5, -0.5, 1.0])
    assert_same(fingerprint(opt, model=model), before)


def test_training_weights_inside_a_weighted_swap():
    model, opt = make()
    snapshots(model, opt, 5)
    before = live(model)
    with opt.averaged(weights=[0.1, 0.2, 0.7]):
        average = live(model)
        with opt.training_weights():
            assert not opt.is_swapped
            assert_same(live(model), before)
            assert not any("lawa_backup" in entry for entry in opt.state_dict()["state"].values())
        assert opt.is_swapped
        assert_same(live(model), average)
    assert_same(live(model), before)


# -- from a checkpoint file --------------------------------------------------------------


@pytest.mark.parametrize("layout", ["state dict", "under 'optimizer'"])
@pytest.mark.parametrize("weights", [None, [0.4, 0.3, 0.2, 0.1], [1.5, -0.5]], ids=["mean", "four", "two"])
def test_a_checkpoint_file_exports_what_the_live_lawa_does(tmp_path, layout, weights):
    model, opt = make(history_dtype=torch.bfloat16)
    kept = snapshots(model, opt, 7)
    path = tmp_path / "ckpt.pt"
    sd = opt.state_dict()
    torch.save(sd if layout == "state dict" else {"optimizer": sd, "epoch": 7}, path)
    expected = export_average(model, opt, weights=weights)
    before = fingerprint(opt, model=model)
    for source in (path, str(path)):
        assert_same(export_average(model, source, weights=weights), expected)
    assert_same(fingerprint(opt, model=model), before)
    if weights is not None:
        stored = [[s.to(torch.bfloat16).double() for s in snap] for snap in kept]
        params = [expected[name] for name, _ in model.named_parameters()]
        assert_weighted(params, stored, weights)


def test_a_file_that_is_not_a_lawa_checkpoint_is_refused_by_path(tmp_path):
    model, opt = make()
    snapshots(model, opt, 2)
    before = fingerprint(opt, model=model)
    missing = tmp_path / "missing.pt"
    with pytest.raises(FileNotFoundError, match=f"no checkpoint file at {str(missing)!r}"):
        export_average(model, missing)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=f"{str(garbage)!r} could not be read with torch.load"):
        export_average(model, garbage)
    for name, content in {"tensor": torch.zeros(3), "dict": {"model": model.state_dict()}}.items():
        path = tmp_path / f"{name}.pt"
        torch.save(content, path)
        with pytest.raises(ValueError, match=f"{str(path)!r} holds no LAWA state dict"):
            export_average(model, path)
    assert_same(fingerprint(opt, model=model), before)


def test_too_many_weights_for_a_checkpoint_are_refused(tmp_path):
    model, opt = make(k=4)
    snapshots(model, opt, 2)
    path = tmp_path / "ckpt.pt"
    torch.save(opt.state_dict(), path)
    with pytest.raises(ValueError, match="3 coefficients but 2 snapshots"):
        export_average(model, path, weights=[0.5, 0.25, 0.25])


# -- profiles ------------------------------------------------------------------------------


def test_profiles_is_a_public_module():
    assert lawa_optim.profiles is profiles and "profiles" in lawa_optim.__all__
    torch.testing.assert_close(lawa_optim.profiles.window(3), torch.full((3,), 1 / 3, dtype=torch.float64))


def test_linear_is_a_ramp_with_the_newest_heaviest():
    torch.testing.assert_close(profiles.linear(4), torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64) / 10)
    torch.testing.assert_close(profiles.linear(1), torch.ones(1, dtype=torch.float64))


def test_ema_follows_the_library_convention_truncated_to_the_ring():
    with pytest.warns(UserWarning, match=r"holds 87\.50% of the EMA's weight; the 12\.50% on older"):
        w, lost = profiles.ema(0.5, 3)
    assert lost == 0.125
    torch.testing.assert_close(w, torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64) / 7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        w, lost = profiles.ema(0.0, 2)  # the newest snapshot only: nothing left out
        assert lost == 0.0 and w.tolist() == [1.0, 0.0]
        w, lost = profiles.ema(0.1, 8)  # 1e-8 left out: under the threshold
        assert lost == pytest.approx(1e-8)


@pytest.mark.parametrize("call, message", [
    (lambda: profiles.window(0), "j must be an int >= 1"),
    (lambda: profiles.window(2.0), r"j must be an int >= 1 \(a number of snapshots\), got 2\.0"),
    (lambda: profiles.linear(True), "j must be an int >= 1"),
    (lambda: profiles.ema(1.0, 3), r"decay must be a float in \[0, 1\), got 1\.0"),
    (lambda: profiles.ema(-0.1, 3), "decay must be a float in"),
    (lambda: profiles.ema(0.5, 0), "k must be an int >= 1"),
])
def test_profile_arguments_are_checked(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_an_ema_profile_averages_as_the_ema_it_truncates():
    """With a ring that holds all but 2**-20 of it, the profile's average is the library's
    EMA over the same snapshots to that mass."""
    decay, k = 0.5, 20
    model, opt = make(k=k)
    ema_model, ema = make(mode="ema", decay=decay)
    g = torch.Generator().manual_seed(1)
    for _ in range(30):
        values = [torch.randn(p.shape, generator=g) for p in model.parameters()]
        for m, o in ((model, opt), (ema_model, ema)):
            with torch.no_grad():
                for p, v in zip(m.parameters(), values):
                    p.copy_(v)
            o.snapshot()
    weights, lost = profiles.ema(decay, k)
    assert lost == 2.0**-20
    with opt.averaged(weights=weights), ema.averaged():
        for a, b in zip(model.parameters(), ema_model.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=4 * 2.0**-20 * 4)
