"""Snapshots captured in a CUDA graph and replayed, bit for bit against eager snapshots
of the pure-torch reference on the same GPU (skipped without a GPU).

The fused kernels read the snapshot counter on the device and decide the exact
refresh of the running sum there, so one captured snapshot writes the right slot and
refreshes at the right replay, across several passes over the ring; the reference
decides on the host, so it is the independent oracle.
"""

import pytest
import torch
from conftest import assert_same_bits, dtype_id, make_params, set_values, swap_in, twins

from lawa_optim import LAWA, ops

CUDA = torch.device("cuda")


def snapshot(b, mode):
    if mode == "uniform":
        ops.push(b)
    else:
        ops.ema_update(b, 0.8)


@pytest.mark.parametrize("mode,hdtype", [("uniform", torch.float32), ("uniform", torch.bfloat16), ("ema", None)],
                         ids=lambda x: x if isinstance(x, str) else dtype_id(x) if x else "-")
def test_captured_snapshot_replays_like_eager_snapshots(fused, mode, hdtype):
    """k = 3: one eager snapshot, then 8 replays of the captured one (refreshes at the 3rd,
    6th and 9th push), each compared with an eager reference snapshot of the same weights."""
    b, ref = twins(make_params(CUDA, torch.float32, seed=11), 3, mode, hdtype, fused)
    set_values((b, ref), 0)
    snapshot(b, mode)  # builds the tables and compiles the kernels outside the capture
    snapshot(ref, mode)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        snapshot(b, mode)
    assert int(b.pushes) == 1, "capturing must not run the snapshot"
    for n in range(2, 10):
        set_values((b, ref), n)
        graph.replay()
        snapshot(ref, mode)
        assert int(b.pushes) == n
        if b.ring is not None:
            assert_same_bits(b.ring, ref.ring, f"ring after replay {n - 1}")
        assert_same_bits(b.total, ref.total, f"sum after replay {n - 1}")
    for x in (b, ref):
        swap_in(x, None)
    for i, (p, q) in enumerate(zip(b.params, ref.params)):
        assert_same_bits(p, q, f"average of parameter {i} after the replays")


def test_captured_step_and_snapshot_replay_like_eager_ones(fused):
    """An SGD step with momentum and a snapshot captured together through the LAWA
    wrapper, replayed with fresh gradients: weights, ring and sum follow an eager run of
    the reference backend bit for bit, and the averages agree after every pass."""

    def build(backend):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(33, 17), torch.nn.Linear(17, 5)).to(CUDA)
        opt = LAWA(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), k=3, backend=backend)
        grads = [torch.zeros_like(p) for p in model.parameters()]
        for p, g in zip(model.parameters(), grads):
            p.grad = g  # the graph reads these tensors: new gradients are copied into them
        return model, opt, grads

    def feed(grads, step):
        gen = torch.Generator(device=CUDA).manual_seed(step)
        for g in grads:
            g.copy_(torch.randn(g.shape, generator=gen, device=CUDA))

    model, opt, grads = build(fused)
    ref_model, ref_opt, ref_grads = build("torch")
    for o, g in ((opt, grads), (ref_opt, ref_grads)):  # allocates momentum buffers and the history
        feed(g, 0)
        o.step()
        o.snapshot()
    assert opt.backend == fused
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
        opt.snapshot()
    for step in range(1, 9):
        feed(grads, step)
        graph.replay()
        feed(ref_grads, step)
        ref_opt.step()
        ref_opt.snapshot()
        for i, (p, q) in enumerate(zip(model.parameters(), ref_model.parameters())):
            assert_same_bits(p, q, f"weight {i} after replay {step}")
        for b, r in zip(opt._history.buckets, ref_opt._history.buckets):
            assert_same_bits(b.ring, r.ring, f"ring after replay {step}")
            assert_same_bits(b.total, r.total, f"sum after replay {step}")
        if step % 3 == 0:
            with opt.averaged(), ref_opt.averaged():
                for i, (p, q) in enumerate(zip(model.parameters(), ref_model.parameters())):
                    assert_same_bits(p, q, f"average of weight {i} after replay {step}")
