"""torch.compile: compiled models see swaps without recompiling, and compiled steps
snapshot without graph breaks or per-step recompiles, with the eager results.

The oracle is the plain mean of the weights recorded after each snapshot and the same
run in eager mode. ``aot_eager`` runs the functionalization that Inductor also runs
(in-place writes applied when the graph ends), ``inductor`` the real code generation.
"""

from __future__ import annotations

import copy
import gc
import warnings

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

from lawa_optim import LAWA, compiled
from lawa_optim.backends.reference import compensated_sum

from conftest import COPIES, assert_same, fingerprint

K = 3


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def make(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 1))


def batch(t: int) -> torch.Tensor:
    return torch.randn(4, 5, generator=torch.Generator().manual_seed(t))


def mean_of_last(snaps: list[list[torch.Tensor]], k: int) -> list[torch.Tensor]:
    return [torch.stack(ws).mean(0) for ws in zip(*snaps[-k:])]


def weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_model_sees_swaps_without_recompiling(backend):
    model = make()
    opt = LAWA(torch.optim.SGD(model.parameters(), lr=0.1), k=K)
    snaps = []
    for t in range(5):
        model(batch(t)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        opt.snapshot()
        snaps.append(weights(model))
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for p, w in zip(reference.parameters(), mean_of_last(snaps, K)):
            p.copy_(w)
    cnt = CompileCounterWithBackend(backend)
    fast = torch.compile(model, backend=cnt)
    x = batch(99)
    with torch.no_grad():
        live = fast(x)
        torch.testing.assert_close(live, model(x))
        with opt.averaged():
            torch.testing.assert_close(fast(x), reference(x))
        torch.testing.assert_close(fast(x), live, rtol=0, atol=0)
    assert cnt.frame_count == 1


def sgd_and_snapshot(params: list[nn.Parameter], opt: LAWA, x: torch.Tensor) -> None:
    with torch.no_grad():
        torch._foreach_add_(params, [torch.tanh(p * x) for p in params], alpha=-0.1)
    opt.snapshot()


def run_steps(backend: str | None, mode: str, history_dtype: torch.dtype | None = None):
    """7 compiled (or, for ``None``, eager) steps after one eager snapshot."""
    model = make()
    params = list(model.parameters())
    opt = LAWA(torch.optim.SGD(params, lr=0.1), k=K, mode=mode, decay=0.5,
               recompute_every=None if history_dtype == torch.int8 else 2, history_dtype=history_dtype)
    opt.snapshot()  # allocates the history before compiling
    cnt = CompileCounterWithBackend(backend or "eager")
    fn = sgd_and_snapshot if backend is None else torch.compile(sgd_and_snapshot, fullgraph=True, backend=cnt)
    snaps = [weights(model)]
    for t in range(7):
        fn(params, opt, torch.tensor(float(t)))
        snaps.append(weights(model))
    return opt._history.buckets[0], snaps, cnt.frame_count


@pytest.mark.parametrize(
    "backend,mode", [("aot_eager", "uniform"), ("aot_eager", "ema"), ("inductor", "uniform")]
)
def test_fullgraph_step_with_snapshot(backend, mode):
    """No graph break on snapshot (fullgraph would raise), one compile for 7 steps; the
    ring holds exactly the recorded weights and the mean is recomputed on cadence."""
    b, snaps, frames = run_steps(backend, mode)
    assert frames == 1 and int(b.pushes) == len(snaps) == 8
    if mode == "uniform":
        for n in range(len(snaps) - K, len(snaps)):  # slot n % K holds snapshot n
            for i, w in enumerate(snaps[n]):
                assert torch.equal(b.view(b.ring[n % K], i), w)
        # Push 8 refreshed the mean (every 2): exactly the compensated slot sum, in slot
        # order, divided by K, from the recorded weights: slot 0 holds snapshot 6, slot 1
        # snapshot 7, slot 2 snapshot 5.
        for i in range(len(snaps[0])):
            slots = [snaps[6][i], snaps[7][i], snaps[5][i]]
            want = compensated_sum(slots, torch.zeros_like(slots[0])) / torch.tensor(float(K))
            assert torch.equal(b.view(b.total, i), want)
    else:
        # decay 0.5: both products are exact, so the one rounding of their sum is the
        # same fused or not.
        ema = snaps[0]
        for w in snaps[1:]:
            ema = [0.5 * e + 0.5 * x for e, x in zip(ema, w)]
        for i, e in enumerate(ema):
            assert torch.equal(b.view(b.total, i), e)


@pytest.mark.parametrize("mode", ["uniform", "ema"])
def test_compiled_snapshot_equals_eager_bit_for_bit(mode):
    """aot_eager computes the weights bit for bit as eager does; so must the history."""
    (eager, eager_snaps, _), (fast, snaps, _) = run_steps(None, mode), run_steps("aot_eager", mode)
    for a, b in zip(snaps, eager_snaps):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert torch.equal(fast.total, eager.total) and torch.equal(fast.pushes, eager.pushes)
    if mode == "uniform":
        assert torch.equal(fast.ring, eager.ring)


def test_compiled_int8_snapshot_equals_eager_bit_for_bit():
    """The 8-bit history through the op: codes, scales, anchor and counter as eager leaves them."""
    (eager, _, _), (fast, _, frames) = run_steps(None, "uniform", torch.int8), run_steps("aot_eager", "uniform", torch.int8)
    assert frames == 1
    for name in ("ring", "scales", "total", "pushes"):
        assert torch.equal(getattr(fast, name), getattr(eager, name)), name


def test_int8_snapshot_op_passes_opcheck():
    model = make()
    opt = LAWA(torch.optim.SGD(model.parameters(), lr=0.1), k=K, history_dtype=torch.int8)
    opt.snapshot()
    b = opt._history.buckets[0]
    torch.library.opcheck(compiled._snapshot, (b.params, b.ring, b.total, b.pushes, b.key, None, b.scales))


@pytest.mark.parametrize("mode", ["uniform", "ema"])
def test_snapshot_op_passes_opcheck(mode):
    """Schema (declared mutations), fake tensor and functionalized-dispatch checks."""
    model = make()
    opt = LAWA(torch.optim.SGD(model.parameters(), lr=0.1), k=K, mode=mode)
    opt.snapshot()
    b = opt._history.buckets[0]
    decay = 0.5 if mode == "ema" else None
    torch.library.opcheck(compiled._snapshot, (b.params, b.ring, b.total, b.pushes, b.key, decay))


def test_compiled_train_step_does_not_recompile_per_step():
    model = make()
    opt = LAWA(torch.optim.Adam(model.parameters(), lr=1e-2), k=K)
    snaps = []

    def train_step(x):
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        opt.snapshot()

    cnt = CompileCounterWithBackend("aot_eager")
    fast = torch.compile(train_step, backend=cnt)
    frames = []
    for t in range(8):
        fast(batch(t))
        snaps.append(weights(model))
        frames.append(cnt.frame_count)
    assert frames[2] == frames[-1], f"graphs compiled after each step: {frames}"
    breaks = " ".join(counters["graph_break"])
    assert "data pointer" not in breaks.lower() and "snapshot" not in breaks
    with opt.averaged():
        for p, w in zip(model.parameters(), mean_of_last(snaps, K)):
            torch.testing.assert_close(p, w)


def test_history_built_inside_a_compiled_region():
    """The first snapshot allocates eagerly (one break), later ones run compiled."""
    model = make()
    params = list(model.parameters())
    opt = LAWA(torch.optim.SGD(params, lr=0.1), k=K)
    cnt = CompileCounterWithBackend("aot_eager")
    fn = torch.compile(sgd_and_snapshot, backend=cnt)
    snaps = []
    for t in range(6):
        fn(params, opt, torch.tensor(float(t)))
        snaps.append(weights(model))
    # Two frames in all, both compiled at the first call (its eager build of the history
    # breaks the graph); no later call compiles again.
    assert opt.num_snapshots == K and cnt.frame_count == 2
    with opt.averaged():
        for p, w in zip(params, mean_of_last(snaps, K)):
            torch.testing.assert_close(p, w)


@pytest.mark.parametrize("how", COPIES)
def test_compiled_snapshot_of_a_copy_leaves_the_original(how):
    """A copy shared the compiled op's key with the original: its compiled snapshots
    wrote its weights into the original model and pushed into the original's history
    (and raised KeyError once the original was gone). Each history is its own: the
    copy's snapshots leave the original, the original's leave the copy."""
    model = make()
    opt = LAWA(torch.optim.SGD(model.parameters(), lr=0.1), k=K)
    opt.snapshot()
    fn = torch.compile(sgd_and_snapshot, fullgraph=True, backend="aot_eager")
    fn(list(model.parameters()), opt, torch.tensor(0.0))  # a graph exists for the original
    model2, opt2 = COPIES[how]((model, opt))
    params2 = list(model2.parameters())
    before = fingerprint(opt)
    snaps = []
    for t in range(1, 4):
        fn(params2, opt2, torch.tensor(float(t)))
        snaps.append(weights(model2))
    assert_same(before, fingerprint(opt))
    (b2,) = opt2._history.buckets
    for n, w in zip(range(2, 5), snaps):  # snapshot number n sits in slot n % K
        assert all(torch.equal(b2.view(b2.ring[n % K], i), x) for i, x in enumerate(w))
    before2 = fingerprint(opt2)  # and the other way round: the original's snapshots leave the copy
    fn(list(model.parameters()), opt, torch.tensor(5.0))
    assert int(opt._history.buckets[0].pushes) == 3
    assert_same(before2, fingerprint(opt2))
    del model, opt, before
    gc.collect()
    fn(params2, opt2, torch.tensor(4.0))
    snaps.append(weights(model2))
    with opt2.averaged():
        for p, w in zip(params2, mean_of_last(snaps, K)):
            torch.testing.assert_close(p, w)


def test_inductor_freezing_is_reported(monkeypatch):
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(compiled, "_freezing_warned", False)
    model = make()
    opt = LAWA(torch.optim.SGD(model.parameters(), lr=0.1), k=K)
    opt.snapshot()
    with inductor_config.patch(freezing=True), pytest.warns(UserWarning, match="freezing"):
        opt.swap_to_average()
    opt.swap_back()
    with inductor_config.patch(freezing=False), warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.swap_to_average()
    opt.swap_back()
