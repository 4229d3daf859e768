"""Checkpoints: saving reads only, resuming is bit-exact, loads are exact independent
copies, and every malformed dict is refused before anything changes."""

import copy

import pytest
import torch
from conftest import Gate, assert_same, empty_first_group, fingerprint, offloaded, roundtrip
from torch import nn

from lawa_optim import LAWA, export_average
from lawa_optim.history import History
from lawa_optim.state_check import MAX_COUNT


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


def history_buffers(opt):
    return [(b.ring, b.total, b.pushes, b.emas) for b in opt._history.buckets]


# -- saving reads only; resuming is bit-exact ---------------------------------------------
CASES = {
    "uniform": {"k": 3},
    "uniform-bf16-history": {"k": 3, "history_dtype": torch.bfloat16},
    "uniform-recompute-2": {"k": 4, "recompute_every": 2},
    "uniform-every-start": {"k": 3, "every": 2, "start": 3},
    "ema": {"mode": "ema", "decay": 0.5},
    "phema": {"mode": "phema", "k": 4, "every": 2},
}
#: Snapshots held at the save point (5 epochs of 3 steps, a snapshot after each): min(5, k);
#: with every=2, start=3 the steps 4, 6, ..., 14 add 6 to the 5 explicit ones, min(11, 3);
#: EMA counts every update; phema pushes 2 widths at steps 2, 4, ..., 14 and after each epoch.
HELD = {"uniform": 3, "uniform-bf16-history": 3, "uniform-recompute-2": 4, "uniform-every-start": 3, "ema": 5,
        "phema": 4}


def now(model, opt):
    """The weights, the average and copies of the history buffers at this point."""
    live = [p.detach().clone() for p in model.parameters()]
    with opt.averaged():
        avg = [p.detach().clone() for p in model.parameters()]
    bufs = [[None if t is None else t.clone() for t in bs] for bs in history_buffers(opt)]
    return live, avg, bufs


@pytest.mark.parametrize("swapped", [False, True], ids=["live", "saved-while-swapped"])
@pytest.mark.parametrize("case", CASES)
def test_resume_is_bit_identical(backend, device, case, swapped):
    """Three runs of the same recipe: one never saves, one saves after 5 snapshots (k=3:
    between the refreshes at pushes 3 and 6) and goes on, one resumes from that save in
    a fresh model with other initial weights. At the save point and over the next 4
    snapshots (two more refreshes) the weights, the averages and every history buffer
    agree bit for bit."""
    kwargs = CASES[case]
    never_model, never = make(device, 0, backend, **kwargs)
    for e in range(5):
        epoch(never_model, never, e)
    expected = [now(never_model, never), *trace(never_model, never, range(5, 9))]
    expected_bufs = now(never_model, never)[2]

    model, opt = make(device, 0, backend, **kwargs)
    for e in range(5):
        epoch(model, opt, e)
    if swapped:
        opt.swap_to_average()
    saved = roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
    assert opt.num_snapshots == HELD[case]
    if swapped:
        opt.swap_back()
    went_on = [now(model, opt), *trace(model, opt, range(5, 9))]

    model2, opt2 = make(device, 1, backend, **kwargs)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    assert opt2.is_swapped == swapped and opt2.num_snapshots == HELD[case] and opt2.steps == opt.steps - 12
    if swapped:
        opt2.swap_back()
    resumed = [now(model2, opt2), *trace(model2, opt2, range(5, 9))]
    for got in (went_on, resumed):
        assert_same(got[0], expected[0], "at the save point")  # weights, average, buffers
        for (l0, a0), (l1, a1) in zip(expected[1:], got[1:]):
            assert all(torch.equal(x, y) for x, y in zip(l0, l1))
            assert all(torch.equal(x, y) for x, y in zip(a0, a1))
    assert_same(now(model, opt)[2], expected_bufs, "went on")
    assert_same(now(model2, opt2)[2], expected_bufs, "resumed")
    for p, q in zip(never_model.parameters(), model2.parameters()):  # Adam's moments came back too
        assert torch.equal(never.state[p]["exp_avg"], opt2.state[q]["exp_avg"])
        assert torch.equal(never.state[p]["exp_avg_sq"], opt2.state[q]["exp_avg_sq"])


def test_state_dict_is_read_only(backend, device):
    """After 5 snapshots with k=3 the running mean differs in its last bits from the slot
    mean that a recompute would leave: saving must keep it, and save it as it is."""
    model, opt = make(device, 0, backend, k=3)
    for e in range(5):
        epoch(model, opt, e)
    (b,) = opt._history.buckets
    total = b.total.clone()
    History.recompute(b)
    slot_mean = b.total.clone()
    b.total.copy_(total)
    assert not torch.equal(total, slot_mean)  # the case where recomputing on save shows
    before = fingerprint(opt)
    saved = roundtrip(opt.state_dict())  # a copy: the dict's tensors are views of the history
    assert_same(before, fingerprint(opt))
    for i, p in enumerate(model.parameters()):
        got = saved["state"][i]["lawa_mean"]
        assert got.dtype == torch.float32
        assert torch.equal(got, b.view(total, i))  # the mean as it was, not the slot mean


@pytest.mark.parametrize("version", ["0.1.0", "0.2.0"])
def test_checkpoint_without_running_mean_resumes_exactly(version):
    """Versions 0.1.0 and 0.2.0 saved no lawa_mean (0.2.0 a running sum, lawa_sum): the
    mean is rebuilt from the ring on load, as a refresh computes it. Such a checkpoint
    resumes bit for bit like a run that rebuilt its mean at that point went on."""
    model, opt = make("cpu", 0, k=3)
    for e in range(5):
        epoch(model, opt, e)
    for b in opt._history.buckets:  # the rebuild the load does
        History.recompute(b)
    saved = roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
    for entry in saved["opt"]["state"].values():
        mean = entry.pop("lawa_mean")
        if version == "0.2.0":
            entry["lawa_sum"] = mean * 3  # not used: the sum's last bits are not the mean's
    expected = trace(model, opt, range(5, 9))
    model2, opt2 = make("cpu", 1, k=3)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    got = trace(model2, opt2, range(5, 9))
    for (l0, a0), (l1, a1) in zip(expected, got):
        assert all(torch.equal(x, y) for x, y in zip(l0, l1))
        assert all(torch.equal(x, y) for x, y in zip(a0, a1))


# -- loads are exact, independent copies ----------------------------------------------------
def make_groups(seed, inner=torch.optim.Adam, **kwargs):
    """Two param groups over two buckets (float32 weights and a bfloat16 scale), in an
    ``inner`` optimizer (Adam) wrapped in a LAWA built with ``kwargs``."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 2))
    scale = nn.Parameter(torch.randn(2).to(torch.bfloat16))
    groups = [{"params": list(model[0].parameters())}, {"params": [*model[2].parameters(), scale], "lr": 1e-3}]
    return model, scale, LAWA(inner(groups, lr=1e-2), **kwargs)


def train(model, scale, opt, epochs):
    for e in epochs:
        g = torch.Generator().manual_seed(e)
        for _ in range(3):
            (model(torch.randn(8, 5, generator=g)) * scale.float()).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        opt.snapshot()


@pytest.mark.parametrize("swapped", [False, True], ids=["live", "swapped"])
@pytest.mark.parametrize("mode", ["uniform", "ema", "phema"])
def test_loaded_history_is_an_exact_independent_copy(mode, swapped):
    """Every tensor of every parameter comes back equal to the saved one; then every
    tensor of the loaded dict is overwritten, and the optimizer does not change."""
    model, scale, opt = make_groups(0, k=3, mode=mode)
    train(model, scale, opt, range(5))
    if swapped:
        opt.swap_to_average()
    loaded = copy.deepcopy(opt.state_dict())
    saved = copy.deepcopy(loaded)
    _, _, opt2 = make_groups(1, k=3, mode=mode)
    opt2.load_state_dict(loaded)
    reread = opt2.state_dict()
    assert reread["state"].keys() == saved["state"].keys() == set(range(5))
    for pid, entry in saved["state"].items():
        assert reread["state"][pid].keys() == entry.keys()
        for key, value in entry.items():
            assert_same(reread["state"][pid][key], value, f"[{pid}][{key!r}]")
    assert [g["lawa"] for g in reread["param_groups"]] == [g["lawa"] for g in saved["param_groups"]]
    before = fingerprint(opt2)
    with torch.no_grad():
        for entry in loaded["state"].values():
            for value in entry.values():
                value.fill_(7)
    assert_same(before, fingerprint(opt2))


def test_second_lawa_loaded_from_a_live_state_dict_is_independent():
    model, scale, opt = make_groups(0, k=3)
    train(model, scale, opt, range(4))
    model2, scale2, opt2 = make_groups(1, k=3)
    model2.load_state_dict(model.state_dict())
    scale2.data.copy_(scale)
    opt2.load_state_dict(opt.state_dict())  # the live dict: views of opt's history, opt's Adam state
    before = fingerprint(opt2)
    train(model, scale, opt, range(4, 7))
    assert_same(before, fingerprint(opt2))
    before = fingerprint(opt)
    train(model2, scale2, opt2, range(4, 7))
    assert_same(before, fingerprint(opt))


# -- refusals change nothing ---------------------------------------------------------------
def lawa(key, value, groups=(0, 1)):
    def edit(sd):
        for g in groups:
            sd["param_groups"][g]["lawa"][key] = value
    return edit


def no_lawa(key, groups=(0, 1)):
    def edit(sd):
        for g in groups:
            del sd["param_groups"][g]["lawa"][key]
    return edit


def entry(key, fn, pids=(0,)):
    """Replace ``state[pid][key]`` by ``fn(old)`` (``fn=None``: delete it)."""
    def edit(sd):
        for pid in pids:
            if fn is None:
                del sd["state"][pid][key]
            else:
                sd["state"][pid][key] = fn(sd["state"][pid].get(key))
    return edit


def plain_optimizer(sd):
    """What the wrapped optimizer's own state_dict() holds: no LAWA entry anywhere."""
    for g in sd["param_groups"]:
        del g["lawa"]
    for e in sd["state"].values():
        for key in [k for k in e if k.startswith("lawa_")]:
            del e[key]


#: The counters' bound is lawa_optim.state_check.MAX_COUNT = 2**62 (accepted: see
#: test_counters_at_the_bound_load_and_push).
BAD_COUNTERS = [None, "5", -1, 5.0, True, 10**30, 2**62 + 1, 2**63 - 1, 2**63, 2**64 + 1]
REFUSED = [
    *[
        pytest.param("uniform", False, lawa(name, bad),
                     rf"param group 0: lawa '{name}' must be an int in \[0, 2\*\*62\], got {bad!r}",
                     id=f"{name}={bad!r}")
        for name in ("pushes", "steps") for bad in BAD_COUNTERS
    ],
    pytest.param("uniform", False, no_lawa("pushes"), "param group 0: 'lawa' lacks 'pushes'", id="pushes-missing"),
    pytest.param("uniform", False, no_lawa("steps"), "param group 0: 'lawa' lacks 'steps'", id="steps-missing"),
    pytest.param("uniform", False, lawa("steps", 3, (1,)), "disagree on lawa 'steps'", id="steps-disagree"),
    pytest.param("uniform", False, no_lawa("swapped"), "'lawa' lacks 'swapped'", id="swapped-missing"),
    pytest.param("uniform", False, lawa("swapped", 1), "lawa 'swapped' must be a bool, got 1", id="swapped-int"),
    pytest.param("uniform", False, lawa("swapped", "False"), "'swapped' must be a bool", id="swapped-str"),
    pytest.param("uniform", False, lawa("swapped", True, (1,)), "disagree on lawa 'swapped'", id="swapped-disagree"),
    pytest.param("uniform", False, lawa("swapped", True), r"outside `with opt.averaged\(\):`", id="swapped-no-backup"),
    pytest.param("uniform", False, [lawa("swapped", True), lawa("pushes", 0)], "no param group has a snapshot",
                 id="swapped-no-snapshot"),
    pytest.param("uniform", False, no_lawa("generation"), "'lawa' lacks 'generation'", id="generation-missing"),
    pytest.param("uniform", False, lawa("generation", "0"), "'generation' must be None or an int", id="generation-str"),
    pytest.param("uniform", False, lawa("generation", -1), "'generation' must be None or an int", id="generation-negative"),
    pytest.param("uniform", False, lawa("generation", True, (0,)), "'generation' must be None or an int",
                 id="generation-bool"),
    pytest.param("uniform", False, lawa("generation", 2, (1,)), r"inconsistent LAWA generation list \[0, 2\]",
                 id="generation-gap"),
    pytest.param("uniform", False, lawa("generation", None, (0,)), r"inconsistent LAWA generation list \[None, 0\]",
                 id="generation-unbuilt-first"),
    pytest.param("uniform", False, [lawa("generation", 1, (1,)), lawa("pushes", 6, (1,))],
                 r"lawa 'pushes' grows from one generation to the next \(\[5, 6\]\)", id="pushes-grow"),
    pytest.param("uniform", False, lawa("pushes", 4, (1,)), "param group 1: lawa 'pushes' is 4, other groups of generation 0 have 5",
                 id="pushes-differ-in-generation"),
    pytest.param("uniform", False, lawa("generation", None, (1,)), r"param group 1: lawa 'pushes' is 5, but the group has no history",
                 id="pushes-of-unbuilt-group"),
    pytest.param("uniform", False, [lawa("generation", None, (1,)), lawa("pushes", 0, (1,))],
                 "parameter 0 of param group 1: the state_dict holds lawa_history, but its param group has no history",
                 id="history-of-unbuilt-group"),
    pytest.param("uniform", False, lambda sd: sd["param_groups"][0].update(lawa="x"),
                 "param group 0: 'lawa' must be a dict of LAWA settings and counters, got 'x'", id="lawa-str"),
    pytest.param("uniform", False, lambda sd: sd["param_groups"][1].pop("lawa"),
                 "param group 1: 'lawa' must be a dict of LAWA settings and counters, got None", id="lawa-missing-in-one"),
    pytest.param("uniform", False, lambda sd: [g.pop("lawa") for g in sd["param_groups"]],
                 r"opt.optimizer.load_state_dict", id="plain-optimizer"),
    pytest.param("uniform", False, plain_optimizer,
                 r"saved from a plain optimizer\. Load it into the wrapped one with opt\.optimizer\.load_state_dict",
                 id="plain-optimizer-dict"),
    pytest.param("uniform", False, lawa("k", 4), "saved with k=4, this LAWA has k=3", id="k"),
    pytest.param("uniform", False, lawa("k", 3.0), "saved with k=3.0, this LAWA has k=3", id="k-float"),
    pytest.param("uniform", False, lawa("mode", "ema"), "saved with mode='ema'", id="mode"),
    pytest.param("ema", False, lawa("mode", "uniform"), "saved with mode='uniform', this LAWA has mode='ema'",
                 id="mode-into-ema"),
    pytest.param("uniform", False, lawa("history_dtype", "bfloat16"), "saved with history_dtype='bfloat16'",
                 id="history-dtype"),
    pytest.param("uniform", False, lambda sd: sd["state"].update({0: "x"}),
                 "parameter 0 of param group 0: its state must be a dict, got 'x'", id="state-entry-str"),
    pytest.param("uniform", False, lambda sd: sd["param_groups"].__setitem__(1, "x"),
                 "param group 1 of the state_dict must be a dict with a 'params' list", id="group-str"),
    pytest.param("uniform", False, lambda sd: sd["param_groups"][1].update(params=(2, 3, 4)),
                 "param group 1 of the state_dict must be a dict with a 'params' list", id="params-tuple"),
    pytest.param("uniform", False, lambda sd: sd["param_groups"].pop(), "state_dict has 1 param groups, this optimizer has 2",
                 id="group-count"),
    pytest.param("uniform", False, lambda sd: sd["param_groups"][1]["params"].pop(),
                 "param group 1 of the state_dict has 2 parameters, this optimizer's has 3", id="param-count"),
    pytest.param("uniform", False, lambda sd: sd.pop("state"), "must have 'state'", id="state-missing"),
    *[
        pytest.param("uniform", False, entry("lawa_history", fn), match, id=f"history-{name}")
        for name, fn, match in [
            ("float64", lambda t: t.double(),
             r"parameter 0 of param group 0: lawa_history has dtype torch.float64, this optimizer needs torch.float32"),
            ("int64", lambda t: t.long(), "lawa_history has dtype torch.int64"),
            ("complex", lambda t: t.to(torch.complex64), "lawa_history has dtype torch.complex64"),
            ("bfloat16", lambda t: t.to(torch.bfloat16), "lawa_history has dtype torch.bfloat16, this optimizer needs torch.float32"),
            ("sparse", lambda t: t.to_sparse(), r"lawa_history is a sparse tensor \(layout torch.sparse_coo\)"),
            ("meta", lambda t: t.to("meta"), "lawa_history is on the meta device"),
            ("shape", lambda t: t[:2], r"lawa_history has shape \(2, 7, 5\), this optimizer needs \(3, 7, 5\)"),
            ("other-layout", lambda t: torch.zeros(3, 9, 5),
             r"parameter 0 of param group 0: lawa_history has shape \(3, 9, 5\), this optimizer needs \(3, 7, 5\)"),
            ("list", lambda t: t.tolist(), "lawa_history must be a tensor, got list"),
            ("missing", None, "parameter 0 of param group 0: the state_dict holds no lawa_history"),
        ]
    ],
    pytest.param("uniform", False, entry("lawa_history", lambda t: t.float(), pids=(4,)),
                 "parameter 2 of param group 1: lawa_history has dtype torch.float32, this optimizer needs torch.bfloat16",
                 id="history-float32-for-bfloat16"),
    *[
        pytest.param("uniform", False, entry("lawa_mean", fn, pids=pids), match, id=f"mean-{name}")
        for name, fn, pids, match in [
            ("float64", lambda t: t.double(), (0,), "lawa_mean has dtype torch.float64, this optimizer needs torch.float32"),
            ("float16", lambda t: t.half(), (0,), "lawa_mean has dtype torch.float16"),
            ("bfloat16-for-bfloat16", lambda t: t.to(torch.bfloat16), (4,),
             "parameter 2 of param group 1: lawa_mean has dtype torch.bfloat16, this optimizer needs torch.float32"),
            ("csr", lambda t: t.to_sparse_csr(), (0,), r"lawa_mean is a sparse tensor \(layout torch.sparse_csr\)"),
            ("meta", lambda t: t.to("meta"), (0,), "lawa_mean is on the meta device"),
            ("shape", lambda t: t.t(), (0,), r"lawa_mean has shape \(5, 7\), this optimizer needs \(7, 5\)"),
            ("missing-for-one", None, (0,), "lawa_mean for some parameters and not for others"),
        ]
    ],
    pytest.param("uniform", False, entry("lawa_ema", lambda _: torch.zeros(7, 5)),
                 "lawa_ema, which a LAWA with mode='uniform' does not save", id="ema-in-uniform"),
    pytest.param("uniform", False, entry("lawa_backup", lambda _: torch.zeros(7, 5)),
                 "holds lawa_backup, but no swap changed this parameter", id="backup-not-swapped"),
    *[
        pytest.param("uniform", True, entry("lawa_backup", fn, pids=pids), match, id=f"backup-{name}")
        for name, fn, pids, match in [
            ("int32", lambda t: t.int(), (0,), "lawa_backup has dtype torch.int32, this optimizer needs torch.float32"),
            ("float64", lambda t: t.double(), (0,), "lawa_backup has dtype torch.float64"),
            ("float32-for-bfloat16", lambda t: t.float(), (4,), "lawa_backup has dtype torch.float32, this optimizer needs torch.bfloat16"),
            ("shape", lambda t: t[:3], (0,), r"lawa_backup has shape \(3, 5\), this optimizer needs \(7, 5\)"),
            ("missing", None, (3,), r"parameter 1 of param group 1: the state_dict was saved while the average was swapped in"),
        ]
    ],
    *[
        pytest.param("ema", False, edit, match, id=f"ema-{name}")
        for name, edit, match in [
            ("float64", entry("lawa_ema", lambda t: t.double()), "lawa_ema has dtype torch.float64, this optimizer needs torch.float32"),
            ("bfloat16-for-bfloat16", entry("lawa_ema", lambda t: t.to(torch.bfloat16), pids=(4,)),
             "lawa_ema has dtype torch.bfloat16, this optimizer needs torch.float32"),
            ("shape", entry("lawa_ema", lambda t: t[None]), r"lawa_ema has shape \(1, 7, 5\), this optimizer needs \(7, 5\)"),
            ("missing", entry("lawa_ema", None), "holds no lawa_ema"),
            ("history", entry("lawa_history", lambda _: torch.zeros(3, 7, 5)), "lawa_history, which a LAWA with mode='ema' does not save"),
            ("sum", entry("lawa_sum", lambda _: torch.zeros(7, 5)), "lawa_sum, which a LAWA with mode='ema' does not save"),
        ]
    ],
    # phema, k=3 and two widths after 10 pushes (5 snapshots at steps 3, 6, ..., 15): slot 0
    # holds push 9 (width 1, t=15), slot 2 push 8 (width 0, t=15), slot 1 push 7 (width 1, t=12).
    pytest.param("uniform", False, lawa("mode", "phema"), "saved with mode='phema', this LAWA has mode='uniform'",
                 id="mode-phema-into-uniform"),
    *[
        pytest.param("phema", False, edit, match, id=f"phema-{name}")
        for name, edit, match in [
            ("sigma_rels", lawa("sigma_rels", [0.05, 0.2]),
             r"saved with sigma_rels=\[0.05, 0.2\], this LAWA has sigma_rels=\[0.05, 0.1\]"),
            ("sigma_rels-str", lawa("sigma_rels", "0.05"), "saved with sigma_rels='0.05'"),
            ("steps-missing", no_lawa("phema_steps"), r"param group 0: 'lawa' lacks 'phema_steps' \(mode 'phema'\)"),
            ("steps-negative", lawa("phema_steps", -1), r"lawa 'phema_steps' must be an int in \[0, 2\*\*62\], got -1"),
            ("steps-bool", lawa("phema_steps", True), "lawa 'phema_steps' must be an int"),
            ("steps-below-slots", lawa("phema_steps", 14), r"slot 0 \(push 9\) cannot hold \(15, 1\)"),
            ("steps-differ", lawa("phema_steps", 16, (1,)), "differ from its generation's other groups"),
            ("slots-not-list", lawa("phema_slots", 5), "lawa 'phema_slots' must be a list of k=3 entries"),
            ("slots-short", lawa("phema_slots", [[15, 1], [12, 1]]), "must be a list of k=3 entries"),
            ("slots-empty", lawa("phema_slots", [None, None, None]), r"slot 0 \(push 9\) cannot hold None"),
            ("slots-width", lawa("phema_slots", [[15, 0], [12, 1], [15, 0]]), r"slot 0 \(push 9\) cannot hold \(15, 0\)"),
            ("slots-split-snapshot", lawa("phema_slots", [[15, 1], [12, 1], [14, 0]]),
             r"slot 2 \(push 8\) cannot hold \(14, 0\)"),
            ("slots-later-older", lawa("phema_slots", [[15, 1], [16, 1], [15, 0]]), r"slot 1 \(push 7\)"),
            ("slots-float", lawa("phema_slots", [[15.0, 1], [12, 1], [15, 0]]), r"slot 0 \(push 9\)"),
            ("pushes-split", [lawa("pushes", 9)], "lawa 'pushes' is 9 with phema_steps=15; every snapshot pushes all 2"),
            ("emas-missing", entry("lawa_phema", None), "holds no lawa_phema"),
            ("emas-shape", entry("lawa_phema", lambda t: t[:1]), r"lawa_phema has shape \(1, 7, 5\), this optimizer needs \(2, 7, 5\)"),
            ("emas-float64", entry("lawa_phema", lambda t: t.double()), "lawa_phema has dtype torch.float64"),
            ("emas-bfloat16-for-bfloat16", entry("lawa_phema", lambda t: t.to(torch.bfloat16), pids=(4,)),
             "parameter 2 of param group 1: lawa_phema has dtype torch.bfloat16, this optimizer needs torch.float32"),
            ("history-missing", entry("lawa_history", None), "holds no lawa_history"),
            ("sum", entry("lawa_sum", lambda _: torch.zeros(7, 5)), "lawa_sum, which a LAWA with mode='phema' does not save"),
        ]
    ],
]

_SAVED = {}


def saved_dict(mode, swapped):
    """A state dict of a LAWA over ``make_groups`` after 5 epochs (15 Adam steps)."""
    if (mode, swapped) not in _SAVED:
        model, scale, opt = make_groups(0, k=3, mode=mode)
        train(model, scale, opt, range(5))
        if swapped:
            opt.swap_to_average()
        _SAVED[mode, swapped] = roundtrip(opt.state_dict())
    return copy.deepcopy(_SAVED[mode, swapped])


def loaded_target(mode):
    """Another run of the recipe: other weights, 2 epochs (6 Adam steps, Adam's ``step``
    6.0 where the dict has 15.0), so a partial load would show."""
    model, scale, opt = make_groups(1, k=3, mode=mode)
    train(model, scale, opt, range(2))
    return opt


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("mode,swapped,edit,match", REFUSED)
def test_malformed_state_dict_is_refused_and_changes_nothing(mode, swapped, edit, match):
    sd = saved_dict(mode, swapped)
    for fn in edit if isinstance(edit, list) else [edit]:
        fn(sd)
    opt = loaded_target(mode)
    before = fingerprint(opt)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    assert_same(before, fingerprint(opt))


def _out_of_memory(monkeypatch, opt):
    def extend(self, param_groups):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(History, "extend", extend)


def _wrapped_optimizer_refuses(monkeypatch, opt):
    def refuse(state_dict):
        raise ValueError("the wrapped optimizer refuses (simulated)")

    monkeypatch.setattr(opt.optimizer, "load_state_dict", refuse)


def _pending_snapshot_fails(monkeypatch, opt):
    """A snapshot into a pinned history still on its way, whose copy fails: the load must
    report it before it loads anything (the failed snapshot itself records nothing)."""
    transfer = offloaded(opt._history)
    transfer.gate = Gate(RuntimeError("copy failed (simulated)"))
    transfer.gate.opened.set()
    opt.snapshot()


@pytest.mark.parametrize("fail,exc", [
    (_out_of_memory, RuntimeError),
    (_wrapped_optimizer_refuses, ValueError),
    (_pending_snapshot_fails, RuntimeError),
], ids=["allocation", "wrapped-optimizer", "pending-snapshot"])
def test_failure_while_loading_changes_nothing(monkeypatch, fail, exc):
    sd = saved_dict("uniform", True)
    opt = loaded_target("uniform")
    before = fingerprint(opt)
    fail(monkeypatch, opt)
    with pytest.raises(exc, match="simulated"):
        opt.load_state_dict(sd)
    assert_same(before, fingerprint(opt))


# -- layout, generations, other optimizers ---------------------------------------------------
def test_state_dict_layout():
    model, opt = make("cpu", 0, k=3)
    for e in range(2):
        epoch(model, opt, e)
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups"}
    w = model[0].weight
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq", "lawa_history", "lawa_mean"}
    hist = sd["state"][0]["lawa_history"]
    assert hist.shape == (3, *w.shape)
    assert torch.equal(hist[1], w.detach())  # the newest of two snapshots is in slot 1
    assert sd["param_groups"][0]["lawa"]["pushes"] == 2
    assert "lawa_history" not in opt.state[w]  # the live optimizer state stays clean
    frozen = copy.deepcopy(sd)
    for e in range(2, 6):
        epoch(model, opt, e)
    # Views of the live history: a later snapshot shows in a dict not yet saved.
    assert not torch.equal(frozen["state"][0]["lawa_history"], sd["state"][0]["lawa_history"])


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


def test_empty_first_generation_round_trips():
    """A first param group with no parameters, then one added: the counts come back."""
    opt, _ = empty_first_group()
    sd = roundtrip(opt.state_dict())
    assert [(g["lawa"]["generation"], g["lawa"]["pushes"]) for g in sd["param_groups"]] == [(0, 0), (1, 2)]
    q = nn.Parameter(torch.zeros(3))
    opt2 = LAWA(torch.optim.SGD([{"params": []}], lr=0.1), k=3)
    opt2.add_param_group({"params": [q]})
    opt2.load_state_dict(sd)
    assert opt2.num_snapshots == 2
    with opt2.averaged():
        assert torch.equal(q.detach(), torch.full((3,), 1.5))


# -- the wrapped optimizer's part -----------------------------------------------------------
def sgd_momentum(groups, lr):
    return torch.optim.SGD(groups, lr=lr, momentum=0.9)


def sgd_dict(adam_hyperparameters):
    """Replace the dict by one of the same layout saved from LAWA(SGD(momentum=0.9));
    with ``adam_hyperparameters`` its param groups also get Adam's."""
    def edit(sd):
        model, scale, opt = make_groups(0, inner=sgd_momentum, k=3)
        train(model, scale, opt, range(5))
        other = roundtrip(opt.state_dict())
        if adam_hyperparameters:
            for group, adam in zip(other["param_groups"], sd["param_groups"]):
                group.update({key: value for key, value in adam.items() if key not in group})
        sd.clear()
        sd.update(other)
    return edit


def set_param_id(g, i, pid):
    return lambda sd: sd["param_groups"][g]["params"].__setitem__(i, pid)


WRAPPED_REFUSED = {
    "sgd-into-adam": (sgd_dict(False), "param group 0 of the state_dict lacks 'betas', a hyperparameter of Adam"),
    "sgd-state-into-adam": (sgd_dict(True), r"state\[0\] holds the keys \['momentum_buffer'\], but Adam saves "
                            r"\['exp_avg', 'exp_avg_sq', 'step'\] for parameter 0 of param group 0"),
    "lr-missing": (lambda sd: sd["param_groups"][1].pop("lr"), "param group 1 of the state_dict lacks 'lr'"),
    "lr-str": (lambda sd: sd["param_groups"][0].update(lr="0.01"),
               "param group 0 of the state_dict: Adam cannot step with its hyperparameters"),
    "amsgrad-without-its-state": (lambda sd: sd["param_groups"][0].update(amsgrad=True),
                                  r"Adam saves \['exp_avg', 'exp_avg_sq', 'max_exp_avg_sq', 'step'\]"),
    "exp-avg-shape": (entry("exp_avg", lambda t: t.flatten()),
                      r"state\[0\]\['exp_avg'\] has shape \(35,\) but parameter 0 of param group 0 has shape \(7, 5\)"),
    "exp-avg-shape-bias": (entry("exp_avg", lambda t: t[:1], pids=(3,)),
                           r"state\[3\]\['exp_avg'\] has shape \(1,\) but parameter 1 of param group 1 has shape \(2,\)"),
    "exp-avg-float64": (entry("exp_avg", lambda t: t.double()),
                        r"state\[0\]\['exp_avg'\] has dtype torch.float64, Adam holds torch.float32"),
    "exp-avg-float32-for-bfloat16": (entry("exp_avg_sq", lambda t: t.float(), pids=(4,)),
                                     r"state\[4\]\['exp_avg_sq'\] has dtype torch.float32, Adam holds torch.bfloat16"),
    "exp-avg-meta": (entry("exp_avg", lambda t: t.to("meta")), r"state\[0\]\['exp_avg'\] is on the meta device"),
    "step-meta": (entry("step", lambda t: t.to("meta"), pids=(2,)), r"state\[2\]\['step'\] is on the meta device"),
    "step-shape": (entry("step", lambda t: t.expand(3)), r"state\[0\]\['step'\] has shape \(3,\), Adam holds \(\)"),
    "step-str": (entry("step", lambda t: "15"), r"state\[0\]\['step'\] must be a tensor, got '15'"),
    "exp-avg-sq-missing": (entry("exp_avg_sq", None), r"state\[0\] holds the keys \['exp_avg', 'step'\], but Adam saves"),
    "momentum-extra": (entry("momentum_buffer", lambda _: torch.zeros(7, 5)),
                       r"state\[0\] holds the keys \['exp_avg', 'exp_avg_sq', 'momentum_buffer', 'step'\]"),
    "lawa-extra": (entry("lawa_extra", lambda _: torch.zeros(1), pids=(2,)),
                   "parameter 0 of param group 1: the state_dict holds 'lawa_extra', which LAWA does not save"),
    "one-id-for-two": (set_param_id(0, 1, 0), r"gives parameter 0 of param group 0 and parameter 1 of param group 0 "
                       r"one state id \(0\), but they are two parameters"),
    "one-id-across-groups": (set_param_id(1, 1, 2), r"gives parameter 0 of param group 1 and parameter 1 of "
                             r"param group 1 one state id \(2\)"),
    "unhashable-id": (set_param_id(1, 2, [4]), r"param group 1 of the state_dict: params\[2\] is \[4\], which is not a state id"),
}


@pytest.mark.parametrize("target", ["fresh", "trained"])
@pytest.mark.parametrize("case", WRAPPED_REFUSED)
def test_wrapped_optimizers_part_is_checked_before_anything_changes(case, target):
    """Against what Adam saves: learned from a probe where the live Adam has no state yet
    (``fresh``: nothing built, nothing stepped), the same where it has (``trained``)."""
    edit, match = WRAPPED_REFUSED[case]
    sd = saved_dict("uniform", False)
    edit(sd)
    opt = loaded_target("uniform") if target == "trained" else make_groups(1, k=3)[2]
    before = fingerprint(opt)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    assert_same(before, fingerprint(opt))


@pytest.mark.parametrize("value", [None, "sd.pt", 3, 2.5, [("state", {})]], ids=repr)
def test_a_state_dict_that_is_no_dict_is_refused_naming_it(value):
    opt = loaded_target("uniform")
    before = fingerprint(opt)
    with pytest.raises(TypeError, match=rf"state_dict must be a dict saved by LAWA.state_dict\(\), got {type(value).__name__}"):
        opt.load_state_dict(value)
    assert_same(before, fingerprint(opt))


def test_wrapped_optimizers_parts_that_torch_loads_are_loaded():
    """No false refusals: a step saved as a number (old torch versions), group keys that
    Adam's own loader fills in (saved before torch had them), a key Adam does not use (an
    LR scheduler's ``initial_lr``), and a dict saved with ``amsgrad=True``, whose state
    keys the probe learns from the saved hyperparameters."""
    sd = saved_dict("uniform", False)
    for pid, state in sd["state"].items():
        state["step"] = float(state["step"])
    for group in sd["param_groups"]:
        del group["decoupled_weight_decay"], group["maximize"]
        group["initial_lr"] = 0.5
    opt = loaded_target("uniform")
    opt.load_state_dict(sd)
    for p in opt.state:
        assert torch.equal(opt.state[p]["step"], torch.tensor(15.0))
    assert [(g["initial_lr"], g["decoupled_weight_decay"], g["maximize"]) for g in opt.param_groups] == [(0.5, False, False)] * 2

    model, scale, amsgrad = make_groups(0, inner=lambda groups, lr: torch.optim.Adam(groups, lr=lr, amsgrad=True), k=3)
    train(model, scale, amsgrad, range(2))
    opt = loaded_target("uniform")
    opt.load_state_dict(roundtrip(amsgrad.state_dict()))
    assert all("max_exp_avg_sq" in s for s in opt.state.values()) and len(opt.state) == 5


class Scaled(torch.optim.SGD):
    """An optimizer outside torch.optim whose constructor needs an argument of its own."""

    def __init__(self, params, scale, lr=0.1):
        super().__init__(params, lr=lr * scale, momentum=0.9)


def test_optimizer_that_cannot_be_probed_is_checked_against_its_live_state():
    def scaled(groups, lr):
        return Scaled(groups, 2.0, lr)

    model, scale, opt = make_groups(0, inner=scaled, k=3)
    train(model, scale, opt, range(3))
    saved = roundtrip(opt.state_dict())
    fresh = make_groups(1, inner=scaled, k=3)[2]
    trained = make_groups(1, inner=scaled, k=3)
    train(*trained, range(1))
    for target, edit, match in [
        (fresh, entry("momentum_buffer", lambda t: t.to("meta")), r"state\[0\]\['momentum_buffer'\] is on the meta device"),
        (trained[2], entry("momentum_buffer", lambda t: t.flatten()),
         r"state\[0\]\['momentum_buffer'\] has shape \(35,\) but parameter 0 of param group 0 has shape \(7, 5\)"),
        (trained[2], entry("exp_avg", lambda t: torch.zeros(7, 5)), r"state\[0\] holds the keys \['exp_avg', 'momentum_buffer'\]"),
    ]:
        sd = copy.deepcopy(saved)
        edit(sd)
        before = fingerprint(target)
        with pytest.raises(ValueError, match=match):
            target.load_state_dict(sd)
        assert_same(before, fingerprint(target))
    for target in (fresh, trained[2]):
        target.load_state_dict(copy.deepcopy(saved))
        assert torch.equal(target.state[target.param_groups[0]["params"][0]]["momentum_buffer"], saved["state"][0]["momentum_buffer"])


@pytest.mark.filterwarnings("ignore:optimizer contains a parameter group with duplicate parameters")
@pytest.mark.parametrize("twin", ["same-tensor", "same-memory"])
def test_one_state_id_for_one_parameter_listed_twice_is_loaded(twin):
    """torch saves a parameter listed twice under one id: such a dict loads where the two
    places hold one parameter (the same tensor, or the same elements of the same memory)."""
    p = nn.Parameter(torch.arange(4.0))
    opt = LAWA(torch.optim.SGD([p, p], lr=0.1, momentum=0.9), k=2)
    p.grad = torch.ones(4)
    opt.step()
    opt.snapshot()
    sd = roundtrip(opt.state_dict())
    (pid, again) = sd["param_groups"][0]["params"]
    assert pid == again
    q = nn.Parameter(torch.zeros(4))
    twins = [q, q] if twin == "same-tensor" else [q, nn.Parameter(q.data)]
    opt2 = LAWA(torch.optim.SGD(twins, lr=0.1, momentum=0.9), k=2)
    opt2.load_state_dict(sd)
    assert opt2.num_snapshots == 1
    # torch's loader gives the state to the last place that names the id
    assert torch.equal(opt2.state[twins[-1]]["momentum_buffer"], sd["state"][pid]["momentum_buffer"])
    reread = opt2.state_dict()
    for i in reread["param_groups"][0]["params"]:
        assert torch.equal(reread["state"][i]["lawa_history"], sd["state"][pid]["lawa_history"])


def test_counters_at_the_bound_load_and_push(runner):
    """``pushes``, ``steps`` and ``recompute_every`` at 2**62 (MAX_COUNT) are accepted, and
    the next snapshot writes slot 2**62 % 3 = 1 with no refresh ((2**62 + 1) % 2**62 != 0):
    the average is the mean of the saved window with that slot replaced."""
    sd = saved_dict("uniform", False)
    for group in sd["param_groups"]:
        group["lawa"].update(pushes=MAX_COUNT, steps=MAX_COUNT)
    model, scale, opt = make_groups(1, k=3, backend=runner, recompute_every=MAX_COUNT)
    opt.load_state_dict(sd)
    assert opt.steps == MAX_COUNT and opt.num_snapshots == 3
    params = [p for g in opt.param_groups for p in g["params"]]
    expected = []
    for i, p in enumerate(params):
        window = sd["state"][i]["lawa_history"].double().clone()
        window[MAX_COUNT % 3] = p.detach().to(window.dtype).double()
        expected.append(window.mean(0))
    assert opt.snapshot()
    assert [int(b.pushes) for b in opt._history.buckets] == [MAX_COUNT + 1] * 2
    with opt.averaged():
        for p, want in zip(params, expected):
            tol = 1e-6 if p.dtype == torch.float32 else 1e-2
            torch.testing.assert_close(p.detach().double(), want, rtol=tol, atol=tol)


# -- parameter names -------------------------------------------------------------------------
NAMES = ["0.weight", "0.bias", "2.weight", "2.bias"]


def named(seed, order=NAMES, names=True):
    """Two layers of the same shapes, so that only names tell their parameters apart; an
    Adam over them in ``order``, built from (name, parameter) pairs or (``names=False``)
    from the bare parameters."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    own = dict(model.named_parameters())
    params = [(n, own[n]) for n in order] if names else [own[n] for n in order]
    return model, LAWA(torch.optim.Adam(params, lr=1e-2), k=3)


def run(model, opt, epochs):
    for e in epochs:
        g = torch.Generator().manual_seed(e)
        for _ in range(2):
            model(torch.randn(8, 4, generator=g)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        opt.snapshot()


def test_names_in_another_order_load_by_name():
    """The live optimizer lists the second layer first: every parameter gets the history
    and the Adam state saved under its name, its names stay its own, the two ways of
    exporting agree with the saving run's average, and both runs go on alike."""
    model, opt = named(0)
    run(model, opt, range(4))
    saved = roundtrip(opt.state_dict())
    order = ["2.weight", "2.bias", "0.weight", "0.bias"]
    model2, opt2 = named(1, order)
    model2.load_state_dict(model.state_dict())
    opt2.load_state_dict(saved)
    assert opt2.param_groups[0]["param_names"] == order
    expected = export_average(model, opt)
    assert_same(export_average(model2, opt2), expected)
    assert_same(export_average(model2, opt2.state_dict()), expected)
    own, own2 = dict(model.named_parameters()), dict(model2.named_parameters())
    for name in NAMES:
        assert_same(opt2.state[own2[name]], opt.state[own[name]], name)
    run(model, opt, range(4, 6))
    run(model2, opt2, range(4, 6))
    assert_same(export_average(model2, opt2), export_average(model, opt))


@pytest.mark.parametrize("rename,match", [
    ({2: "head.weight"}, "parameter 2 of param group 0 is named 'head.weight' in the state_dict and '2.weight' in this optimizer"),
    ({0: "0.bias"}, "parameter 0 of param group 0 is named '0.bias' in the state_dict and '0.weight'"),
], ids=["other-name", "a-name-twice"])
def test_other_names_are_refused_naming_the_first(rename, match):
    model, opt = named(0)
    run(model, opt, range(2))
    sd = roundtrip(opt.state_dict())
    for i, name in rename.items():
        sd["param_groups"][0]["param_names"][i] = name
    model2, opt2 = named(1)
    run(model2, opt2, range(1))
    before = fingerprint(opt2)
    with pytest.raises(ValueError, match=match):
        opt2.load_state_dict(sd)
    assert_same(before, fingerprint(opt2))


def test_named_dict_leaves_an_unnamed_optimizer_unnamed():
    """By position, and the optimizer keeps no names: its state dicts carry none, and it
    still takes a param group without names (torch refuses one in a named optimizer)."""
    model, opt = named(0)
    run(model, opt, range(4))
    saved = roundtrip(opt.state_dict())
    model2, opt2 = named(1, names=False)
    model2.load_state_dict(model.state_dict())
    opt2.load_state_dict(saved)
    assert not any("param_names" in g for g in opt2.param_groups)
    assert not any("param_names" in g for g in opt2.state_dict()["param_groups"])
    expected = export_average(model, opt)
    assert_same(export_average(model2, opt2), expected)
    assert_same(export_average(model2, opt2.state_dict()), expected)
    opt2.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})


# -- resuming right after loading -----------------------------------------------------------
def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_mean(model, opt, window):
    """Inside ``opt.averaged()`` the model holds the mean of ``window`` (lists of weights),
    computed here in float64."""
    with opt.averaged():
        for i, p in enumerate(model.parameters()):
            want = torch.stack([w[i].double() for w in window]).mean(0)
            torch.testing.assert_close(p.detach().double(), want, rtol=1e-6, atol=1e-6)


def test_checkpoint_without_running_mean_swaps_and_pushes_right_after_loading(backend, device):
    """A 0.1.0 checkpoint (no lawa_mean) after 4 snapshots with k=3: the next push (n = 4) is
    no refresh, so nothing but the load rebuilds the mean. Right after loading the average
    is the mean of the last 3 snapshots, and after one more snapshot of the 3 newest."""
    model, opt = make(device, 0, backend, k=3)
    snaps = []
    for e in range(4):
        epoch(model, opt, e)
        snaps.append(weights(model))
    saved = roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
    for state in saved["opt"]["state"].values():
        del state["lawa_mean"]
    model2, opt2 = make(device, 1, backend, k=3)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    assert (4 + 1) % 3 != 0
    assert_mean(model2, opt2, snaps[1:4])
    epoch(model2, opt2, 4)
    snaps.append(weights(model2))
    assert_mean(model2, opt2, snaps[2:5])


@pytest.mark.parametrize("built", [False, True], ids=["group-not-built", "group-built"])
def test_saved_while_swapped_with_a_group_without_snapshot(built):
    """A group added after the last snapshot (built by a step, or not built yet) holds no
    snapshot, so the swap left it as it was and saved no backup for it. The resumed run
    swaps back to the training weights, the new group unchanged, and goes on like the run
    that never stopped."""
    model, opt = make("cpu", 0, k=3)
    for e in range(4):
        epoch(model, opt, e)
    extra = nn.Parameter(torch.full((3,), 5.0))
    opt.add_param_group({"params": [extra], "lr": 0.0})
    if built:
        opt.step()  # no gradients: changes no weight, builds the group's history
    training = weights(model)
    opt.swap_to_average()
    saved = roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
    assert [g["lawa"]["generation"] for g in saved["opt"]["param_groups"]] == [0, 1 if built else None]
    assert "lawa_backup" in saved["opt"]["state"][0] and "lawa_backup" not in saved["opt"]["state"].get(4, {})

    model2, opt2 = make("cpu", 1, k=3)
    extra2 = nn.Parameter(torch.full((3,), 5.0))
    opt2.add_param_group({"params": [extra2], "lr": 0.0})
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    assert opt2.is_swapped
    opt2.swap_back()
    opt.swap_back()
    assert_same(weights(model2), training)
    assert torch.equal(extra2.detach(), torch.full((3,), 5.0))
    for o, m, x in ((opt, model, extra), (opt2, model2, extra2)):
        epoch(m, o, 4)
        x.data.fill_(7.0)
        o.snapshot()
    assert opt2._history.counts() == opt._history.counts() == [3, 2]
    with opt.averaged(), opt2.averaged():
        assert_same(weights(model2), weights(model))
        assert torch.equal(extra2.detach(), torch.full((3,), 6.0))
    assert_same(fingerprint(opt2)["buffers"], fingerprint(opt)["buffers"])


@pytest.mark.parametrize("epochs,started", [(5, True), (2, False)], ids=["after-start", "before-start"])
def test_snapshot_right_after_loading_follows_start(epochs, started):
    """start=9: a dict saved after 15 steps snapshots at once after loading, before any
    step (and like the run that never stopped); one saved after 6 steps does not."""
    model, opt = make("cpu", 0, k=3, start=9)
    for e in range(epochs):
        epoch(model, opt, e)
    saved = roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
    model2, opt2 = make("cpu", 1, k=3, start=9)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    assert opt2.snapshot() is started
    assert opt.snapshot() is started
    assert opt2.num_snapshots == opt.num_snapshots == (3 if started else 0)
    assert_same(fingerprint(opt2)["buffers"], fingerprint(opt)["buffers"])
    if started:
        with opt.averaged(), opt2.averaged():
            assert_same(weights(model2), weights(model))
