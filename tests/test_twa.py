"""TWA against a dense float64 reference: projection, span, start point, errors."""

import copy

import pytest
import torch
from conftest import assert_same, fingerprint
from torch import nn

from lawa_optim import LAWA, TWA


def _model() -> nn.Module:
    torch.manual_seed(0)
    # a conv weight in channels_last exercises views with non-default strides
    m = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 2 * 2, 4), nn.ReLU(), nn.Linear(4, 3))
    m[0].weight.data = m[0].weight.data.contiguous(memory_format=torch.channels_last)
    return m


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 2, 4, 4, generator=g), torch.randint(0, 3, (16,), generator=g)


def _loss(m, x, y):
    return nn.functional.cross_entropy(m(x), y)


def _trained(k=4, snapshots=6, model=_model, **kw):
    """A model and a LAWA over it after ``snapshots`` epochs of 3 SGD steps each,
    plus the dense float64 snapshots (newest first) recorded independently."""
    m = model()
    x, y = _data()
    lawa = LAWA(torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.9), k=k, **kw)
    dense = []
    for _ in range(snapshots):
        for _ in range(3):
            _loss(m, x, y).backward()
            lawa.step()
            lawa.zero_grad()
        lawa.snapshot()
        dense.insert(0, _flat(m))
    return m, lawa, torch.stack(dense[:k])


def _flat(m) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).double() for p in m.parameters()])


def _grads(m) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1).double() for p in m.parameters()])


def _span_residual(dense: torch.Tensor, v: torch.Tensor) -> float:
    """Relative distance of ``v`` from the linear span of the rows of ``dense``."""
    c = torch.linalg.lstsq(dense.T, v.unsqueeze(1)).solution
    return ((dense.T @ c).squeeze(1) - v).norm().item() / v.norm().item()


def test_starts_at_mean_of_snapshots():
    m, lawa, dense = _trained()
    TWA(torch.optim.SGD(m.parameters(), lr=0.1), history=lawa)
    torch.testing.assert_close(_flat(m), dense.mean(0), rtol=0, atol=1e-6)


def test_last_uses_newest_snapshots():
    m, lawa, dense = _trained()
    twa = TWA(torch.optim.SGD(m.parameters(), lr=0.1), history=lawa, last=2)
    torch.testing.assert_close(_flat(m), dense[:2].mean(0), rtol=0, atol=1e-6)
    assert twa.num_snapshots == 2 and twa.rank == 2


def test_basis_orthonormal_and_spans_snapshots():
    m, lawa, dense = _trained()
    twa = TWA(torch.optim.SGD(m.parameters(), lr=0.1), history=lawa)
    q = twa._basis[0].double()  # one segment: all parameters back to back, in memory order
    assert q.shape == (4, dense.shape[1])
    torch.testing.assert_close(q @ q.T, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-5)
    # every snapshot lies in the span of the basis: the dense projector reproduces it
    dense_mem = torch.stack([_memory_order(m, row) for row in dense])
    torch.testing.assert_close(dense_mem @ q.T @ q, dense_mem, rtol=0, atol=1e-5)


def _memory_order(m, flat):
    """``flat`` (parameters in logical order) rearranged into each parameter's memory order."""
    out, start = [], 0
    for p in m.parameters():
        v = flat[start:start + p.numel()].reshape(p.shape)
        out.append(v.permute(*_memory_dims(p)).reshape(-1))
        start += p.numel()
    return torch.cat(out)


def _memory_dims(p):
    return sorted(range(p.dim()), key=lambda d: -p.stride(d))


def test_projection_matches_dense_reference():
    m, lawa, dense = _trained()
    twa = TWA(torch.optim.SGD(m.parameters(), lr=0.1), history=lawa)
    x, y = _data()
    _loss(m, x * 1.5, y).backward()
    g = _grads(m)
    twa.project_()
    # dense reference: orthogonal projector onto the row space of the snapshots
    q, _ = torch.linalg.qr(dense.T)
    torch.testing.assert_close(_grads(m), q @ (q.T @ g), rtol=1e-4, atol=1e-6 * g.norm().item())


def test_weights_stay_in_span_with_momentum_nesterov_and_weight_decay():
    m, lawa, dense = _trained()
    sgd = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2)
    twa = TWA(sgd, history=lawa)
    x, y = _data()
    for _ in range(25):
        _loss(m, x, y).backward()
        twa.step()
        twa.zero_grad()
    moved = (_flat(m) - dense.mean(0)).norm().item()
    assert moved > 1e-2  # it did train
    assert _span_residual(dense, _flat(m)) < 1e-5
    # the reported coefficients rebuild the weights from the snapshots (newest first)
    coefs = twa.coefficients()
    assert coefs.shape == (1, 4)
    torch.testing.assert_close(coefs[0] @ dense, _flat(m), rtol=0, atol=1e-5)


def test_unprojected_sgd_leaves_the_span():
    """The span check above can fail: plain SGD from the same start leaves the span."""
    m, lawa, dense = _trained()
    TWA(torch.optim.SGD(m.parameters(), lr=0.1), history=lawa)
    sgd = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    x, y = _data()
    for _ in range(5):
        _loss(m, x, y).backward()
        sgd.step()
        sgd.zero_grad()
    assert _span_residual(dense, _flat(m)) > 1e-3


def _history_buffers(lawa):
    """Copies of every buffer of the history (an 8-bit one's scales too)."""
    return [{name: None if getattr(b, name) is None else getattr(b, name).clone()
             for name in ("ring", "scales", "total", "pushes")} for b in lawa._history.buckets]


@pytest.mark.parametrize("history_dtype", [None, torch.int8], ids=["float32", "int8"])
def test_history_untouched_and_state_shared(history_dtype):
    m, lawa, _ = _trained(history_dtype=history_dtype)
    before = _history_buffers(lawa)
    sgd = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    twa = TWA(sgd, history=lawa)
    x, y = _data()
    _loss(m, x, y).backward()
    twa.step()
    assert_same(_history_buffers(lawa), before)  # bit for bit: codes, scales, anchor, counter
    assert twa.param_groups is sgd.param_groups and twa.state is sgd.state and twa.defaults is sgd.defaults
    assert len(sgd.state) == len(list(m.parameters()))  # momentum buffers live in the inner SGD
    calls = []
    twa.register_step_post_hook(lambda opt, args, kwargs: calls.append(opt))
    twa.step()
    assert calls == [twa]


def test_duplicate_snapshots_reduce_rank():
    m, lawa, dense = _trained(k=4, snapshots=3)
    lawa.snapshot()  # same weights again: 4 snapshots, rank 3
    twa = TWA(torch.optim.SGD(m.parameters(), lr=0.1), history=lawa)
    assert twa.num_snapshots == 4 and twa.rank == 3
    q = twa._basis[0].double()
    torch.testing.assert_close(q @ q.T, torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-5)


def _sgd(m):
    return torch.optim.SGD(m.parameters(), lr=0.1)


def _uneven(m, lawa):
    """A group added after the snapshots, then one more snapshot: counts [4, 1]."""
    extra = nn.Parameter(torch.zeros(2))
    lawa.add_param_group({"params": [extra]})
    lawa.snapshot()
    return torch.optim.SGD([*m.parameters(), extra], lr=0.1), lawa, {}


def _sharded(m, lawa):
    lawa._history.buckets[0].sharded = True  # as a DTensor parameter would make it
    return _sgd(m), lawa, {}


def _swapped(m, lawa):
    lawa.swap_to_average()
    return _sgd(m), lawa, {}


def _non_finite(m, lawa):
    """A NaN in one weight for one snapshot, then finite weights again: the snapshot
    before the newest holds the NaN (an 8-bit history restarts the block twice, so every
    snapshot before the newest reads as NaN in it)."""
    w = m[2].weight
    held = w[1, 2].item()
    with torch.no_grad():
        w[1, 2] = float("nan")
        lawa.snapshot()
        w[1, 2] = held
        lawa.snapshot()
    return _sgd(m), lawa, {}


def _blocks_case(edit):
    return lambda m, lawa: (_sgd(m), lawa, {"blocks": edit(m, _blocks(m))})


#: name: (_trained arguments, set-up(model, LAWA) -> (optimizer, history, TWA keywords), error, message)
REFUSED = {
    "no-snapshot": ({}, lambda m, lawa: (_sgd(m), LAWA(_sgd(m), k=3), {}), RuntimeError, "no snapshot"),
    "not-an-optimizer": ({}, lambda m, lawa: (m, lawa, {}), TypeError,
                         "optimizer must be a torch.optim.Optimizer, got Sequential"),
    "adam": ({}, lambda m, lawa: (torch.optim.Adam(m.parameters()), lawa, {}), TypeError, "torch.optim.SGD.*got Adam"),
    "stateful-sgd": ({}, lambda m, lawa: (lawa.optimizer, lawa, {}), ValueError,
                     r"already has state for 6 parameter\(s\).*fresh torch.optim.SGD"),
    "history-not-a-lawa": ({}, lambda m, lawa: (_sgd(m), lawa.optimizer, {}), TypeError,
                           "history must be a lawa_optim.LAWA, got SGD"),
    "ema": ({"k": 1, "mode": "ema"}, lambda m, lawa: (_sgd(m), lawa, {}), ValueError, "mode='uniform'"),
    "swapped": ({}, _swapped, RuntimeError, "swap_back"),
    "uneven-counts": ({}, _uneven, RuntimeError,
                      r"parameter groups hold different numbers of snapshots \(\[4, 1\]\)"),
    "last": ({}, lambda m, lawa: (_sgd(m), lawa, {"last": 5}), ValueError,
             r"last must be None or an int in \[1, 4\].*got 5"),
    "sharded": ({}, _sharded, ValueError, "sharded"),
    "non-finite": ({}, _non_finite, ValueError,
                   (r"snapshot\(s\) \[1\] \(0 the newest\) of the 4 chosen hold a NaN or an infinity "
                    r"\(in a parameter of shape \(4, 12\)\).*last=1 chooses only the newer ones")),
    "non-finite-int8": ({"history_dtype": torch.int8}, _non_finite, ValueError,
                        (r"snapshot\(s\) \[1, 2, 3\] \(0 the newest\) of the 4 chosen hold a NaN or an "
                         r"infinity \(in a parameter of shape \(4, 12\)\).*restarted by a non-finite delta"
                         r".*last=1 chooses only the newer ones")),
    "parameters-missing": ({}, lambda m, lawa: (torch.optim.SGD(list(m.parameters())[:2], lr=0.1), lawa, {}),
                           ValueError, r"4 parameter\(s\) of history are not in optimizer \(the first: "
                           r"parameter 2 of param group 0, of shape \(4, 12\)\)"),
    "parameter-extra": ({}, lambda m, lawa: (torch.optim.SGD([*m.parameters(), nn.Parameter(torch.zeros(2))], lr=0.1),
                                             lawa, {}),
                        ValueError, r"optimizer has 1 parameter\(s\) that history does not hold \(the first: "
                        r"parameter 6 of param group 0, of shape \(2,\)\)"),
    "blocks-empty": ({}, _blocks_case(lambda m, b: [b[0], [], *b[1:]]), ValueError, r"blocks\[1\] is empty"),
    "blocks-foreign-tensor": ({}, _blocks_case(lambda m, b: [[torch.zeros(2)], *b]), ValueError,
                              r"blocks\[0\] holds a tensor of shape \(2,\) that is not a parameter"),
    "blocks-twice": ({}, _blocks_case(lambda m, b: [b[0], b[1], [*b[2], m[0].bias]]), ValueError,
                     r"is in blocks\[0\] and blocks\[2\]"),
    "blocks-uncovered": ({}, _blocks_case(lambda m, b: b[:2]), ValueError,
                         r"2 parameter\(s\) of history are in no block"),
    "blocks-iterator": ({}, _blocks_case(lambda m, b: iter(b)), TypeError, "blocks must be None or a sequence"),
    "blocks-of-tensors": ({}, _blocks_case(lambda m, b: [p for blk in b for p in blk]), TypeError,
                          r"each block must be a collection \(list, tuple or other iterable\) of parameters, "
                          r"got a Tensor of shape \(3, 2, 3, 3\) as blocks\[0\]"),
    "blocks-of-ints": ({}, _blocks_case(lambda m, b: [*b, 3]), TypeError,
                       r"each block must be a collection .* got int 3 as blocks\[3\]"),
}


def _optimizer_record(opt):
    """The TWA's optimizer as a refusal must leave it: its state and groups."""
    if not isinstance(opt, torch.optim.Optimizer):
        return None
    return {"state_dict": copy.deepcopy(opt.state_dict()), "params": [[id(p) for p in g["params"]] for g in opt.param_groups]}


@pytest.mark.parametrize("case", REFUSED)
def test_refusals_change_nothing(case):
    """Each refusal of the constructor leaves the weights, the LAWA (its history, counters
    and the training SGD's momentum) and the optimizer given to TWA as they were."""
    trained, setup, exc, match = REFUSED[case]
    m, lawa, _ = _trained(**trained)
    optimizer, history, kwargs = setup(m, lawa)
    lawas = [x for x in (lawa, history) if isinstance(x, LAWA)]
    before = [fingerprint(x) for x in lawas], _optimizer_record(optimizer)
    with pytest.raises(exc, match=match):
        TWA(optimizer, history=history, **kwargs)
    assert_same(before, ([fingerprint(x) for x in lawas], _optimizer_record(optimizer)))


def test_bfloat16_history_span_of_stored_values():
    """With a bfloat16 history the span is that of the stored (rounded) snapshots."""
    m, lawa, dense = _trained(history_dtype=torch.bfloat16)
    stored = dense.float().bfloat16().double()
    twa = TWA(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3), history=lawa)
    torch.testing.assert_close(_flat(m), stored.mean(0), rtol=0, atol=1e-6)
    x, y = _data()
    for _ in range(10):
        _loss(m, x, y).backward()
        twa.step()
        twa.zero_grad()
    assert _span_residual(stored, _flat(m)) < 1e-5
    assert _span_residual(dense, _flat(m)) > 1e-4  # the unrounded snapshots span another space


# -- an 8-bit history: TWA trains over its stored snapshots, rebuilt from the codes -----

#: Float32 unit roundoff: a rounding to float32 errs by at most U times the value.
U = 2.0**-24


def _wide_model() -> nn.Module:
    """``_model`` with a hidden layer of 360 weights: two quantisation blocks of 256, the
    second one partial, beside the channels_last conv weight."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 2 * 2, 30), nn.ReLU(), nn.Linear(30, 3))
    m[0].weight.data = m[0].weight.data.contiguous(memory_format=torch.channels_last)
    return m


def _int8_stored(m, lawa, n):
    """The anchor and the ``n - 1`` newest dequantised deltas (newest first) of an 8-bit
    history, read from its state_dict and decoded by hand: flat, parameters in logical
    order as ``_flat``, float64. Blocks of 256 run over each parameter's memory order."""
    sd = lawa.state_dict()
    pushes, k = sd["param_groups"][0]["lawa"]["pushes"], lawa.k
    anchors, deltas = [], []
    for index, p in enumerate(m.parameters()):
        entry = sd["state"][index]
        dims = _memory_dims(p)
        in_memory = [p.shape[d] for d in dims]
        order = sorted(range(p.dim()), key=dims.__getitem__)  # memory order back to logical
        anchors.append(entry["lawa_anchor"].reshape(-1).double())
        rows = []
        for j in range(1, n):
            slot = (pushes - 1 - j) % (k - 1)
            codes = entry["lawa_history"][slot].permute(*dims).reshape(-1).float()
            scale = entry["lawa_scales"][slot].repeat_interleave(256)[:codes.numel()]
            delta = codes * scale  # the float32 product is the stored delta
            rows.append(delta.reshape(in_memory).permute(*order).reshape(-1).double())
        deltas.append(torch.stack(rows) if rows else torch.zeros(0, p.numel(), dtype=torch.float64))
    return torch.cat(anchors), torch.cat(deltas, dim=1)


def _int8_snapshots(anchor, deltas):
    """The stored snapshots, newest first: the anchor minus the cumulative deltas."""
    return torch.cat([anchor[None], anchor - deltas.cumsum(0)])


@pytest.mark.parametrize("last", [None, 2])
def test_int8_history_starts_at_mean_of_stored_snapshots(runner, last):
    """TWA over an 8-bit history starts at the float64 mean of its stored snapshots
    (rebuilt by hand from the state_dict) rounded once to float32, and agrees with the
    swap to the same average within the roundings of both."""
    m, lawa, dense = _trained(model=_wide_model, history_dtype=torch.int8, backend=runner)
    n = last or 4
    anchor, deltas = _int8_stored(m, lawa, n)
    mean = _int8_snapshots(anchor, deltas).mean(0)
    with lawa.averaged(last=n):
        swapped = _flat(m)
    twa = TWA(torch.optim.SGD(m.parameters(), lr=0.1), history=lawa, last=last)
    assert (twa.num_snapshots, twa.rank) == (n, n)
    # One rounding to float32 (U); 2**-40 covers the float64 sums' own rounding.
    torch.testing.assert_close(_flat(m), mean, rtol=U, atol=2.0**-40)
    # The swap sums W_0 * anchor - W_i * delta_i (W_i = (n - i) / n rounded to float32,
    # each product rounded, a compensated sum rounded once): within U |mean| + 2 U sum
    # |delta_i| of the mean; TWA within U |mean|; so 2 U (|mean| + sum |delta_i|) apart.
    bound = 2 * U * (mean.abs() + deltas.abs().sum(0)) + 2.0**-40
    assert bool(((_flat(m) - swapped).abs() <= bound).all())
    # the stored snapshots are not the exact weights: the 8-bit error is visible here
    assert (mean - dense[:n].mean(0)).abs().max() > 1e3 * U * mean.abs().max()


def test_int8_history_span_of_stored_snapshots():
    """The basis spans the rebuilt snapshots, and SGD with weight decay on projected
    gradients stays in their span (not in that of the exact weights)."""
    m, lawa, dense = _trained(model=_wide_model, history_dtype=torch.int8)
    stored = _int8_snapshots(*_int8_stored(m, lawa, 4))
    twa = TWA(torch.optim.SGD(m.parameters(), lr=0.1, weight_decay=1e-2), history=lawa)
    q = twa._basis[0].double()  # float32 rows: each entry rounded, |dQ| <= U |Q| = U sqrt(r)
    r = q.shape[0]
    assert r == 4
    # Q^T Q x - x = dQ^T Q x + Q^T dQ x + O(U^2) for x in the span: at most 2 U sqrt(r) |x|;
    # doubled for the float64 basis' own error (about 2**-53 times the condition number).
    for x in stored:
        xm = _memory_order(m, x)
        assert (xm @ q.T @ q - xm).norm() <= 4 * U * r**0.5 * xm.norm()
    x, y = _data()
    steps = 10
    for _ in range(steps):
        _loss(m, x, y).backward()
        twa.step()
        twa.zero_grad()
    w = _flat(m)
    assert (w - stored.mean(0)).norm() > 1e-2  # it did train
    # Each step rounds the weights to float32 (U |w|) and adds an update whose part out
    # of the span is the float32 projection's, 2 U sqrt(r) of the update, plus the
    # rounding of the update (U): the updates are smaller than the weights here.
    tol = (steps + 1) * (2 + 2 * r**0.5) * U
    assert _span_residual(stored, w) < tol
    assert _span_residual(dense[:4], w) > 10 * tol


def test_int8_history_after_a_restart_with_last():
    """After a block restarted (a NaN in the weights), the snapshots before the restart
    are refused (REFUSED, "non-finite-int8"), and ``last=1`` trains from the newest, the
    anchor."""
    m, lawa, _ = _trained(history_dtype=torch.int8)
    _non_finite(m, lawa)
    anchor, _ = _int8_stored(m, lawa, 1)
    assert bool(anchor.isfinite().all())
    twa = TWA(torch.optim.SGD(m.parameters(), lr=0.1), history=lawa, last=1)
    assert twa.rank == 1
    assert_same(_flat(m), anchor)  # the mean of one float32 snapshot is itself


def test_projection_is_joint_over_buckets():
    """Parameters of two dtypes live in two buckets; the span is that of the whole
    snapshots (one coefficient per snapshot), not one span per bucket."""
    torch.manual_seed(2)
    a = nn.Parameter(torch.randn(3, 4))
    b = nn.Parameter(torch.randn(5, dtype=torch.float64))
    lawa = LAWA(torch.optim.SGD([a, b], lr=0.1), k=3)
    dense = []
    for _ in range(3):
        with torch.no_grad():
            a.add_(torch.randn_like(a))
            b.add_(torch.randn_like(b))
        lawa.snapshot()
        dense.insert(0, torch.cat([a.detach().reshape(-1).double(), b.detach()]))
    dense = torch.stack(dense)
    twa = TWA(torch.optim.SGD([a, b], lr=0.1), history=lawa)
    assert len(lawa._history.buckets) == 2 and twa.rank == 3
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    g = torch.cat([a.grad.reshape(-1).double(), b.grad])
    twa.project_()
    q, _ = torch.linalg.qr(dense.T)
    got = torch.cat([a.grad.reshape(-1).double(), b.grad])
    torch.testing.assert_close(got, q @ (q.T @ g), rtol=1e-5, atol=1e-6)


def test_optimizer_with_state_is_refused():
    """The training SGD's momentum buffers are not in the span: TWA refuses it (REFUSED,
    "stateful-sgd"), and stepping it on projected gradients shows why (the weights leave
    the span)."""
    m, lawa, dense = _trained()
    sgd = lawa.optimizer  # the training SGD, with one momentum buffer per parameter
    twa = TWA(torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.9), history=lawa)
    x, y = _data()
    for _ in range(10):
        _loss(m, x, y).backward()
        twa.project_()
        sgd.step()  # what accepting the stateful optimizer would do
        sgd.zero_grad()
    assert _span_residual(dense, _flat(m)) > 1e-3


def _blocks(m):
    return [[m[0].weight, m[0].bias], [m[2].weight, m[2].bias], [m[4].weight, m[4].bias]]


def _block_slices(m):
    """Index ranges of the three blocks in the flat (logical-order) parameter vector."""
    sizes = [sum(p.numel() for p in blk) for blk in _blocks(m)]
    starts = [sum(sizes[:i]) for i in range(3)]
    return [slice(a, a + n) for a, n in zip(starts, sizes)]


def test_blockwise_projection_and_span_per_block():
    m, lawa, dense = _trained()
    twa = TWA(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2), history=lawa, blocks=_blocks(m))
    assert twa.num_blocks == 3 and twa.rank == 12
    x, y = _data()
    _loss(m, x * 1.5, y).backward()
    g = _grads(m)
    twa.project_()
    # dense reference: each block's gradient projected onto the span of its own slices
    want = torch.cat([torch.linalg.qr(dense[:, sl].T)[0] @ (torch.linalg.qr(dense[:, sl].T)[0].T @ g[sl])
                      for sl in _block_slices(m)])
    torch.testing.assert_close(_grads(m), want, rtol=1e-4, atol=1e-6 * g.norm().item())
    twa.zero_grad()
    for _ in range(25):
        _loss(m, x, y).backward()
        twa.step()
        twa.zero_grad()
    w = _flat(m)
    coefs = twa.coefficients()
    assert coefs.shape == (3, 4)
    for b, sl in enumerate(_block_slices(m)):
        assert _span_residual(dense[:, sl], w[sl]) < 1e-5
        torch.testing.assert_close(coefs[b] @ dense[:, sl], w[sl], rtol=0, atol=1e-5)
    # the blocks moved apart: one joint coefficient vector cannot give these weights
    assert _span_residual(dense, w) > 1e-3


def test_blocks_span_buckets_of_two_dtypes():
    """A block may hold parameters of two buckets (two dtypes): one coefficient vector
    for both, one for the other block."""
    torch.manual_seed(3)
    a, b, c = (nn.Parameter(torch.randn(3, 4)), nn.Parameter(torch.randn(5, dtype=torch.float64)),
               nn.Parameter(torch.randn(6)))
    lawa = LAWA(torch.optim.SGD([a, b, c], lr=0.1), k=3)
    dense = []
    for _ in range(3):
        with torch.no_grad():
            for p in (a, b, c):
                p.add_(torch.randn_like(p))
        lawa.snapshot()
        dense.insert(0, torch.cat([a.detach().reshape(-1).double(), b.detach(), c.detach().double()]))
    dense = torch.stack(dense)
    twa = TWA(torch.optim.SGD([a, b, c], lr=0.1), history=lawa, blocks=[[a, b], [c]])
    assert twa.rank == 6
    a.grad, b.grad, c.grad = torch.randn_like(a), torch.randn_like(b), torch.randn_like(c)
    g = torch.cat([a.grad.reshape(-1).double(), b.grad, c.grad.double()])
    twa.project_()
    got = torch.cat([a.grad.reshape(-1).double(), b.grad, c.grad.double()])
    for sl in (slice(0, 17), slice(17, 23)):
        q, _ = torch.linalg.qr(dense[:, sl].T)
        torch.testing.assert_close(got[sl], q @ (q.T @ g[sl]), rtol=1e-5, atol=1e-6)


def test_paper_schedule():
    m, lawa, _ = _trained()
    twa = TWA(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), history=lawa)
    sched = twa.paper_schedule(total_steps=8, lr_scale=3.0)
    x, y = _data()
    lrs = []
    for _ in range(8):
        lrs.append(twa.param_groups[0]["lr"])
        _loss(m, x, y).backward()
        twa.step()
        twa.zero_grad()
        sched.step()
    # lr 0.1 scaled to 0.3, divided by 10 after 4 of 8 steps (50 %) and after 6 (75 %)
    assert lrs == pytest.approx([0.3] * 4 + [0.03] * 2 + [0.003] * 2, rel=1e-12)


@pytest.mark.parametrize("args,exc,match", [
    ((3,), ValueError, r"total_steps must be an int >= 4 .* got 3"),
    ((8.0,), ValueError, r"total_steps must be an int >= 4 .* got 8.0"),
    ((8, 0), ValueError, "lr_scale must be a number > 0, got 0"),
    (None, RuntimeError, r"paper_schedule\(\) was called already"),
], ids=["few-steps", "float-steps", "zero-scale", "second-call"])
def test_paper_schedule_refusals_leave_the_learning_rate(args, exc, match):
    m, lawa, _ = _trained()
    twa = TWA(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), history=lawa)
    if args is None:
        twa.paper_schedule(8, lr_scale=3.0)
        args = (8, 3.0)
    lrs = [g["lr"] for g in twa.param_groups]
    with pytest.raises(exc, match=match):
        twa.paper_schedule(*args)
    assert [g["lr"] for g in twa.param_groups] == lrs
