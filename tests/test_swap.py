"""A swap that allocates nothing: the full average trades places with the running mean.

``averaged()``, ``swap_to_average()`` and ``training_weights()`` over the full window
of float32 and bfloat16 parameters (float32 and bfloat16 histories) hold no backup:
``memory().backup`` reads 0 and the resident memory of a fresh process grows by less
than 1 % of the parameters' bytes inside ``averaged()`` on 50M parameters. The swap-back
restores the training weights and the running mean bit for bit, so a run that
evaluates is bit-identical to one that does not, a state dict taken while swapped is
the one taken with a backup, and a failure leaves the training weights in place.
``backup="device"|"cpu"`` still copies them and leaves the history untouched. The
arithmetic of the exchange itself is checked bit for bit per backend in test_ops.py.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_same, bits, fingerprint, roundtrip
from torch import nn

from lawa_optim import LAWA, ops
from lawa_optim.history import History

PAIRS = [(p, h) for p in (torch.float32, torch.bfloat16) for h in (torch.float32, torch.bfloat16)]
ROOT = Path(__file__).resolve().parents[1]


def pair_id(pair) -> str:
    return "-".join(str(d).removeprefix("torch.") for d in pair)


def model_and_opt(backend: str, pdtype: torch.dtype, hdtype: torch.dtype | None, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(7, 33), nn.Conv2d(3, 5, 3), nn.Linear(33, 4)).to(pdtype)
    model[1].weight.data = model[1].weight.data.contiguous(memory_format=torch.channels_last)
    opt = LAWA(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), k=3, history_dtype=hdtype,
               backend=backend, **kwargs)
    return model, opt


def train(model: nn.Module, opt: LAWA, steps: range, evaluate: bool = False) -> list[list[torch.Tensor]]:
    """A step and a snapshot per step; with ``evaluate``, a forward inside ``averaged()``
    after each snapshot. Returns the averages seen."""
    seen = []
    for t in steps:
        g = torch.Generator().manual_seed(t)
        x = torch.randn(4, 7, generator=g).to(model[0].weight.dtype)
        model[2](torch.relu(model[0](x))).square().mean().backward()
        opt.step()
        opt.zero_grad()
        opt.snapshot()
        if evaluate:
            with torch.no_grad(), opt.averaged():
                model[2](torch.relu(model[0](x)))
                seen.append([p.detach().clone() for p in model.parameters()])
    return seen


def state(model: nn.Module, opt: LAWA) -> dict:
    """Everything a later step or swap reads: weights, history buffers, the optimizer."""
    return {
        "weights": [p.detach().clone() for p in model.parameters()],
        "buffers": [[None if t is None else t.clone() for t in (b.ring, b.total, b.pushes, b.emas)] for b in opt._history.buckets],
        "inner": roundtrip(opt.optimizer.state_dict()),
    }


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_the_full_average_swaps_in_place_and_back_bit_for_bit(backend, pair):
    """No backup while swapped, the average the one a backup swap writes, and after the
    swap-back the weights and the running mean exactly as before."""
    model, opt = model_and_opt(backend, *pair)
    train(model, opt, range(5))
    before = state(model, opt)
    with opt.averaged(backup="device"):
        with_backup = [p.detach().clone() for p in model.parameters()]
        assert opt.memory().backup > 0
    assert_same(state(model, opt), before)
    with opt.averaged():
        assert opt.memory().backup == 0
        assert all(b.backup is None and b.exchanged is not None for b in opt._history.buckets)
        assert_same([p.detach().clone() for p in model.parameters()], with_backup)
        assert not torch.equal(bits(opt._history.buckets[0].total), bits(before["buffers"][0][1]))
    assert_same(state(model, opt), before)


@pytest.mark.parametrize("pdtype", [torch.float32, torch.bfloat16], ids=str)
def test_an_8bit_history_swaps_with_a_backup(backend, pdtype):
    """Its ``total`` is the anchor (the newest snapshot), not a mean: nothing is exchanged.
    The swap copies the weights, writes the average a ``backup="device"`` swap writes and
    leaves codes, scales and anchor untouched."""
    model, opt = model_and_opt(backend, pdtype, torch.int8)
    train(model, opt, range(5))
    before = state(model, opt)
    scales = [b.scales.clone() for b in opt._history.buckets]
    with opt.averaged(backup="device"):
        with_backup = [p.detach().clone() for p in model.parameters()]
    with opt.averaged():
        assert opt.memory().backup == sum(b.D * pdtype.itemsize for b in opt._history.buckets)
        assert all(b.exchanged is None for b in opt._history.buckets)
        assert_same([p.detach().clone() for p in model.parameters()], with_backup)
        assert_same(state(model, opt)["buffers"], before["buffers"])
    assert_same(state(model, opt), before)
    assert_same([b.scales for b in opt._history.buckets], scales)


@pytest.mark.parametrize("pdtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", ["uniform", "ema", "phema"])
def test_a_run_that_evaluates_is_bit_identical_to_one_that_does_not(backend, pdtype, mode):
    quiet, quiet_opt = model_and_opt(backend, pdtype, None, mode=mode)
    loud, loud_opt = model_and_opt(backend, pdtype, None, mode=mode)
    train(quiet, quiet_opt, range(8))
    seen = train(loud, loud_opt, range(8), evaluate=True)
    assert_same(state(loud, loud_opt), state(quiet, quiet_opt))
    with quiet_opt.averaged():
        assert_same([p.detach().clone() for p in quiet.parameters()], seen[-1])


@pytest.mark.parametrize("backup", ["gpu", "Device", 1, b"cpu", True])
def test_backup_is_validated_and_a_refusal_changes_nothing(backup):
    model, opt = model_and_opt("torch", torch.float32, None)
    train(model, opt, range(2))
    before = fingerprint(opt)
    message = rf"backup must be one of \(None, 'device', 'cpu'\), got {backup!r}"
    with pytest.raises(ValueError, match=message.replace("b'", "b\\'")):
        opt.swap_to_average(backup=backup)
    with pytest.raises(ValueError, match=message.replace("b'", "b\\'")):
        with opt.averaged(backup=backup):
            pytest.fail("the body ran")
    assert_same(fingerprint(opt), before)


@pytest.mark.parametrize("backup", ["device", "cpu"])
def test_a_backup_leaves_the_history_untouched_while_swapped(backend, backup):
    model, opt = model_and_opt(backend, torch.bfloat16, torch.float32)
    train(model, opt, range(4))
    history = [[t.clone() for t in (b.ring, b.total)] for b in opt._history.buckets]
    with opt.averaged():
        in_place = [p.detach().clone() for p in model.parameters()]
    with opt.averaged(backup=backup):
        assert opt.memory().backup == sum(b.D * 2 for b in opt._history.buckets)
        assert all(b.backup.device.type == "cpu" or backup == "device" for b in opt._history.buckets)
        assert_same([[t.clone() for t in (b.ring, b.total)] for b in opt._history.buckets], history)
        assert_same([p.detach().clone() for p in model.parameters()], in_place)


@pytest.mark.parametrize("mode", ["uniform", "ema", "phema"])
@pytest.mark.parametrize("pdtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_state_dict_saved_while_swapped_in_place_is_the_one_saved_with_a_backup(backend, pdtype, mode):
    """lawa_mean (lawa_ema, lawa_phema) holds the average kept and lawa_backup the
    training weights, not the words the exchange left; loaded, it swaps back to the
    training weights and resumes."""
    model, opt = model_and_opt(backend, pdtype, None, mode=mode)
    train(model, opt, range(5))
    with opt.averaged(backup="device"):
        with_backup = roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
    with opt.averaged():
        in_place = roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
    assert_same(in_place, with_backup)
    model2, opt2 = model_and_opt(backend, pdtype, None, seed=1, mode=mode)
    model2.load_state_dict(in_place["model"])
    opt2.load_state_dict(in_place["opt"])
    opt2.swap_back()
    train(model, opt, range(5, 8))
    train(model2, opt2, range(5, 8))
    assert_same(state(model2, opt2), state(model, opt))


def test_training_weights_inside_an_in_place_swap(backend):
    model, opt = model_and_opt(backend, torch.bfloat16, None)
    train(model, opt, range(4))
    before = state(model, opt)
    with opt.averaged():
        average = [p.detach().clone() for p in model.parameters()]
        with opt.training_weights():
            assert not opt.is_swapped and opt.memory().backup == 0
            assert_same(state(model, opt), before)
        assert opt.is_swapped
        assert_same([p.detach().clone() for p in model.parameters()], average)
    assert_same(state(model, opt), before)


@pytest.mark.parametrize("mode", ["uniform", "ema"])
def test_a_write_while_swapped_in_place_warns_and_keeps_the_training_weights(mode):
    """The weights written into were the running mean's: the swap-back restores the
    training weights whole and says what became of the average (uniform: rebuilt from
    the ring, as a refresh makes it)."""
    model, opt = model_and_opt("torch", torch.float32, None, mode=mode)
    train(model, opt, range(4))
    weights = [p.detach().clone() for p in model.parameters()]
    (b,) = opt._history.buckets
    with pytest.warns(RuntimeWarning, match="written while the average was swapped in"):
        with opt.averaged():
            with torch.no_grad():
                model[0].weight.add_(1.0)
            written = model[0].weight.detach().clone()
    assert_same([p.detach().clone() for p in model.parameters()], weights)
    if mode == "uniform":
        mean = b.total.clone()
        History.recompute(b)
        assert_same(b.total, mean)
    else:
        assert_same(b.view(b.total, 0), written)


def test_a_mean_that_is_not_finite_is_swapped_with_a_backup():
    """An infinity in the window leaves no finite mean to exchange: that swap backs the
    weights up (and averages the stored slots in float64 where the mean is not finite;
    bfloat16 history, so the newest slot cannot be the backup)."""
    p = nn.Parameter(torch.ones(10))
    opt = LAWA(torch.optim.SGD([p], lr=0.1), k=2, history_dtype=torch.bfloat16)
    opt.snapshot()
    with torch.no_grad():
        p[3] = float("inf")
    opt.snapshot()
    with opt.averaged():
        assert opt.memory().backup > 0
        assert p[3] == float("inf") and bool((p[:3] == 1.0).all())
    assert p[3] == float("inf")
    with torch.no_grad():
        p.fill_(2.0)
    opt.snapshot()
    opt.snapshot()  # the infinity has left the window and the refresh the mean
    with opt.averaged():
        assert opt.memory().backup == 0 and bool((p == 2.0).all())


@pytest.mark.parametrize("pdtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kwargs", [{"last": 2}, {"weights": [0.7, 0.3]}, {}], ids=["last", "weights", "full"])
def test_right_after_a_snapshot_the_newest_slot_is_the_backup(backend, pdtype, kwargs):
    """History of the parameters' dtype: the newest slot holds the weights bit for bit
    until they change, so ``last=``, ``weights=`` and float16's full average back up
    into it (nothing allocated, the ring unchanged); once the weights changed, even
    through ``.data`` (no version counter sees it), a buffer is allocated instead."""
    if backend == "triton" and pdtype == torch.float16 and not kwargs:
        pytest.skip("one float16 case is enough for the Triton interpreter")
    model, opt = model_and_opt(backend, pdtype, None)
    train(model, opt, range(4))
    before = state(model, opt)
    with opt.averaged(backup="device", **kwargs):
        with_backup = [p.detach().clone() for p in model.parameters()]
    with opt.averaged(**kwargs):
        assert opt.memory().backup == 0
        assert_same([p.detach().clone() for p in model.parameters()], with_backup)
        if kwargs or pdtype == torch.float16:  # (the full average of the others: in place)
            assert_same(state(model, opt)["buffers"], before["buffers"])
    assert_same(state(model, opt), before)
    model[0].weight.data[0, 0] += 1.0
    before = state(model, opt)
    with opt.averaged(**kwargs):
        assert opt.memory().backup > 0 or (not kwargs and pdtype != torch.float16)
    assert_same(state(model, opt), before)


def test_training_weights_changed_inside_a_swap_backed_up_in_the_ring_leave_the_ring_alone(backend):
    """``last=j`` backed up in the newest slot; inside ``training_weights()`` the weights
    change: leaving it backs them up into a new buffer, never into the ring."""
    model, opt = model_and_opt(backend, torch.float32, None)
    train(model, opt, range(4))
    ring = [b.ring.clone() for b in opt._history.buckets]
    with opt.averaged(last=2):
        average = [p.detach().clone() for p in model.parameters()]
        with opt.training_weights():
            with torch.no_grad():
                model[0].weight.add_(1.0)
            changed = [p.detach().clone() for p in model.parameters()]
        assert opt.memory().backup > 0
        assert_same([p.detach().clone() for p in model.parameters()], average)
    assert_same([p.detach().clone() for p in model.parameters()], changed)
    assert_same([b.ring.clone() for b in opt._history.buckets], ring)


def test_a_bucket_that_fails_to_swap_leaves_every_training_weight_in_place(monkeypatch):
    """Two buckets (float32, bfloat16): the second one's kernel refuses after the first
    swapped in place; the first is swapped back before the error reaches the caller."""
    a, b = nn.Parameter(torch.randn(70)), nn.Parameter(torch.randn(40).to(torch.bfloat16))
    opt = LAWA(torch.optim.SGD([a, b], lr=0.1), k=2)
    for _ in range(3):
        with torch.no_grad():
            a.add_(1.0)
            b.add_(1.0)
        opt.snapshot()
    before = fingerprint(opt)
    swap_in = ops.swap_in

    def failing(bucket, *args):
        if bucket.dtype == torch.bfloat16:
            raise RuntimeError("kernel refused")
        swap_in(bucket, *args)

    monkeypatch.setattr(ops, "swap_in", failing)
    with pytest.raises(RuntimeError, match="kernel refused"):
        with opt.averaged():
            pytest.fail("the body ran")
    assert_same(fingerprint(opt), before)


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_averaged_adds_under_one_percent_of_the_parameters_to_resident_memory(pair):
    """50M parameters in a fresh process: the peak resident memory inside ``averaged()``
    (VmHWM, reset just before) exceeds the memory before it by at most 1 % of the
    parameters' bytes. A swap with a backup adds their size (the check can fail)."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/status and /proc/self/clear_refs")

    def peak(**swap) -> dict:
        code = ("import json, torch; from benchmarks.memory import averaged_peak; "
                f"print(json.dumps(averaged_peak(torch.{pair_id(pair[:1])}, torch.{pair_id(pair[1:])}, **{swap!r})))")
        run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-2000:]
        return json.loads(run.stdout.splitlines()[-1])

    got = peak()
    assert got["parameters"] >= 50_000_000 and got["backup"] == 0
    assert got["peak_added"] <= 0.01 * got["param_bytes"], got
    if pair == (torch.float32, torch.float32):
        copied = peak(backup="device")
        assert copied["peak_added"] >= 0.99 * copied["param_bytes"], copied
