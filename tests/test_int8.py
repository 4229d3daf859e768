"""The 8-bit history (``history_dtype=torch.int8``) in the wrapper: what composes with it
(checkpoints, exports, ``every``/``start``, ``add_param_group``, ``training_weights``,
the pinned storage's worker, compiled snapshots) and what it refuses, changing nothing.
The kernels themselves are held to their contract in ``test_ops.py``
(``test_int8_contract``), and the stated error in ``test_guarantee.py``."""

import io

import pytest
import torch
from conftest import assert_same, assert_same_bits, fingerprint, offloaded
from torch import nn

from lawa_optim import LAWA, export_average, history_bytes
from lawa_optim.history import History

GPT2_SMALL = (  # (shape, count): token and position embeddings, 12 blocks, the final norm
    [((50257, 768), 1), ((1024, 768), 1)]
    + [((768,), 4), ((768, 2304), 1), ((2304,), 1), ((768, 768), 1), ((768,), 1),
       ((768, 3072), 1), ((3072,), 1), ((3072, 768), 1), ((768,), 1)] * 12
    + [((768,), 2)]
)


def model(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(300, 40), nn.ReLU(), nn.Conv2d(3, 5, 3), nn.Linear(40, 7))
    m[2].to(memory_format=torch.channels_last)
    return m


def walk(opt: LAWA, steps: int, seed: int = 1, scale: float = 1e-2) -> None:
    """``steps`` random-walk steps of the weights, a snapshot after each."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        with torch.no_grad():
            for group in opt.param_groups:
                for p in group["params"]:
                    p.add_(torch.randn(p.shape, generator=g) * scale)
        opt.snapshot()


def int8_lawa(m: nn.Module, k: int = 4, **kw) -> LAWA:
    return LAWA(torch.optim.SGD(m.parameters(), lr=0.1), k=k, history_dtype=torch.int8, **kw)


def test_ema_keeps_no_ring_so_int8_is_refused():
    with pytest.raises(ValueError, match="keeps no ring"):
        LAWA(torch.optim.SGD(model().parameters(), lr=0.1), history_dtype=torch.int8, mode="ema")
    with pytest.raises(ValueError, match="keeps no ring"):
        history_bytes(model(), history_dtype=torch.int8, mode="ema")


def test_phema_mode_refuses_an_8bit_history():
    with pytest.raises(ValueError, match="8-bit ring of mode='uniform'; mode='phema'"):
        LAWA(torch.optim.SGD(model().parameters(), lr=0.1), history_dtype=torch.int8, mode="phema")
    with pytest.raises(ValueError, match="mode='phema'"):
        history_bytes(model(), history_dtype=torch.int8, mode="phema")


def test_recompute_every_has_no_mean_to_rebuild():
    with pytest.raises(ValueError, match="keeps no running mean"):
        LAWA(torch.optim.SGD(model().parameters(), lr=0.1), history_dtype=torch.int8, recompute_every=3)


def test_float64_parameters_are_refused_changing_nothing():
    m = model().double()
    with pytest.raises(ValueError, match="float64.*history_dtype=None"):
        int8_lawa(m)
    opt = int8_lawa(model())
    walk(opt, 2)
    before = fingerprint(opt)
    with pytest.raises(ValueError, match="float64"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(3, dtype=torch.float64))]})
    assert_same(fingerprint(opt), before)


def test_a_resumed_run_continues_bit_for_bit():
    """Saved mid-run (through torch.save), loaded into a fresh LAWA over fresh weights:
    the codes, scales, anchor and counters come back, and every later snapshot and
    average equals the uninterrupted run's."""
    m1, m2 = model(), model()
    a = int8_lawa(m1, every=1)
    walk(a, 5)
    buf = io.BytesIO()
    torch.save({"model": m1.state_dict(), "opt": a.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    m2.load_state_dict(saved["model"])
    b = int8_lawa(m2, every=1)
    b.load_state_dict(saved["opt"])
    walk(a, 4, seed=9)
    walk(b, 4, seed=9)
    (x,), (y,) = a._history.buckets, b._history.buckets
    for name in ("ring", "scales", "total", "pushes"):
        assert_same_bits(getattr(x, name), getattr(y, name), name)
    for last in (None, 2):
        with a.averaged(last=last), b.averaged(last=last):
            for p, q in zip(m1.parameters(), m2.parameters()):
                assert_same_bits(p, q)


def test_export_from_a_checkpoint_and_a_file_equals_the_live_swap(tmp_path):
    """The file's bits are the live swap's, for the mean and a weighting, for a
    channels_last weight too (blocks follow memory order)."""
    m = model()
    opt = int8_lawa(m, k=5)
    walk(opt, 7)
    path = tmp_path / "ckpt.pt"
    torch.save(opt.state_dict(), path)
    for weights in (None, [0.5, 0.3, 0.2]):
        with opt.averaged(weights=weights):
            swapped = {k: v.clone() for k, v in m.state_dict().items()}
        for source in (opt, opt.state_dict(), path):
            out = export_average(m, source, weights=weights)
            for key, value in out.items():
                assert_same_bits(value, swapped[key], f"{type(source).__name__} {key}")


@pytest.mark.parametrize("key,value,match", [
    ("lawa_history", lambda t: t.fill_(-128), "code -128"),
    ("lawa_scales", lambda t: t.fill_(-1.0), "scales are"),
    ("lawa_scales", lambda t: t.fill_(float("inf")), "scales are"),
    ("lawa_anchor", lambda t: t.double(), "dtype torch.float64"),
    ("lawa_scales", lambda t: t[:, :0], "shape"),
    ("lawa_sum", lambda t: torch.zeros(3), "does not save"),
    # The float format's mean where the rule keeps 8 bits (an unsharded parameter).
    ("lawa_mean", lambda t: t, "lawa_mean, which this parameter's 8-bit history .* loads into sharded models only"),
])
def test_a_damaged_8bit_checkpoint_is_refused_changing_nothing(key, value, match):
    m = model()
    opt = int8_lawa(m)
    walk(opt, 5)
    sd = opt.state_dict()
    entry = sd["state"][0] = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in sd["state"][0].items()}
    entry[key] = value(entry.get(key, entry["lawa_anchor"]).clone())
    before = fingerprint(opt)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    assert_same(fingerprint(opt), before)


def test_a_float_checkpoint_does_not_load_into_an_8bit_history():
    m = model()
    plain = LAWA(torch.optim.SGD(m.parameters(), lr=0.1), k=4, history_dtype=torch.bfloat16)
    walk(plain, 2)
    opt = int8_lawa(m)
    walk(opt, 2)
    before = fingerprint(opt)
    with pytest.raises(ValueError, match="history_dtype"):
        opt.load_state_dict(plain.state_dict())
    assert_same(fingerprint(opt), before)


def test_every_start_and_added_groups_count_as_with_a_float_history():
    """``every``/``start`` snapshot at the same steps as a bfloat16 history, and a group
    added later averages only its own snapshots (within the 8-bit error of their mean)."""
    m = model()
    ref = LAWA(torch.optim.SGD(m.parameters(), lr=0.1), k=4, every=2, start=3, history_dtype=torch.bfloat16)
    opt = int8_lawa(m, every=2, start=3)
    for step in range(1, 10):
        for o in (ref, opt):
            for p in m.parameters():
                p.grad = torch.full_like(p, 0.01 * step)
            o.step()
    assert opt._history.counts() == ref._history.counts() == [3]  # steps 4, 6 and 8
    extra = nn.Parameter(torch.randn(500))
    opt.add_param_group({"params": [extra], "lr": 0.0})
    seen = []
    for shift in (0.5, -0.25):
        with torch.no_grad():
            extra.add_(shift)
        seen.append(extra.detach().double().clone())
        opt.snapshot()
    assert opt._history.counts() == [4, 2]
    with opt.averaged():
        err = (extra.detach().double() - torch.stack(seen).mean(0)).abs().max()
    assert float(err) <= 0.5 * 0.25 / 127 + 1e-6  # half a step of the one delta, halved by the mean


def test_training_weights_inside_a_swap():
    m = model()
    opt = int8_lawa(m)
    walk(opt, 5)
    trained = [p.detach().clone() for p in m.parameters()]
    with opt.averaged():
        average = [p.detach().clone() for p in m.parameters()]
        with opt.training_weights():
            for p, t in zip(m.parameters(), trained):
                assert_same_bits(p, t)
        for p, a in zip(m.parameters(), average):
            assert_same_bits(p, a)
    for p, t in zip(m.parameters(), trained):
        assert_same_bits(p, t)


def test_the_pinned_storages_worker_pushes_the_same_8bit_history():
    """The worker thread of a host-memory history (here with the fake transfer) runs the
    8-bit push: the same codes, scales and anchor as a synchronous history."""
    ps = [torch.randn(300), torch.randn(7, 5)]
    qs = [p.clone() for p in ps]
    hist = History(3, "uniform", torch.int8, "cpu", "torch", None)
    ref = History(3, "uniform", torch.int8, "cpu", "torch", None)
    hist.extend([{"params": ps}])
    ref.extend([{"params": qs}])
    offloaded(hist).gate.opened.set()
    for step in range(5):
        for p, q in zip(ps, qs):
            p.add_(0.01 * step)
            q.copy_(p)
        hist.push()
        ref.push()
    (b,), (r,) = hist.buckets, ref.buckets
    b.wait()
    for name in ("ring", "scales", "total", "pushes"):
        assert_same_bits(getattr(b, name), getattr(r, name), name)


def test_memory_at_k6_is_under_9_5_bytes_per_parameter():
    """Everything included (codes, scales, anchor, counters, alignment padding), from the
    shapes of GPT-2 small before anything is allocated, and on a live model the record
    equals what the buffers hold."""
    with torch.device("meta"):
        params = [torch.empty(shape) for shape, count in GPT2_SMALL for _ in range(count)]
    mem = history_bytes(params, 6, history_dtype=torch.int8)
    assert mem.parameters == 124_439_808
    assert mem.per_parameter <= 9.5 and mem.sum == 0 and mem.scales > 0
    m = model()
    opt = int8_lawa(m, k=6)
    walk(opt, 1)
    (b,) = opt._history.buckets
    held = opt.memory()
    assert held == history_bytes(m, 6, history_dtype=torch.int8)
    assert held.history == b.ring.numel() + 4 * b.total.numel() + 8 and held.scales == 4 * b.scales.numel()
    with opt.averaged():  # no running mean to exchange the weights with: they are copied
        assert opt.memory() == history_bytes(m, 6, history_dtype=torch.int8, swapped=True)
        assert opt.memory().backup == 4 * b.D


def test_random_walk_error_is_within_1_percent_of_the_signal(tmp_path, capsys):
    """The accuracy command on a smaller walk: at every snapshot after the first k, for
    each drift, the 8-bit average is within 1 % of ‖avg_fp32 − newest‖ of the float32
    history's average, and the record says so."""
    import json

    from benchmarks import int8_accuracy

    out = tmp_path / "acc.json"
    assert int8_accuracy.main(["--size", "3000", "--snapshots", "40", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert [r["drift"] for r in record["rows"]] == [1e-4, 1e-3, 1e-2]
    for r in record["rows"]:
        assert r["measured"] == 34 and r["within_bound"] and 0 < r["max_ratio"] <= 0.01


def test_a_checkpoint_loads_only_into_the_memory_format_it_was_saved_from():
    """The blocks are runs of 256 elements in memory order: a channels_last weight's
    history refuses to load into a contiguous one (and to export for it), changing nothing."""
    m = model()
    opt = int8_lawa(m)
    walk(opt, 3)
    sd = opt.state_dict()
    other = model()
    other[2].to(memory_format=torch.contiguous_format)
    fresh = int8_lawa(other)
    walk(fresh, 1)
    before = fingerprint(fresh)
    with pytest.raises(ValueError, match="memory format it was saved from"):
        fresh.load_state_dict(sd)
    assert_same(fingerprint(fresh), before)
    with pytest.raises(ValueError, match="memory format it was saved from"):
        export_average(other, sd)
