"""TWA against a dense float64 reference: projection, span, start point, errors."""

import pytest
import torch
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


def _trained(k=4, snapshots=6, **kw):
    """A model and a LAWA over it after ``snapshots`` epochs of 3 SGD steps each,
    plus the dense float64 snapshots (newest first) recorded independently."""
    m = _model()
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
    q = twa._basis[0].double()
    assert q.shape[0] == 4
    torch.testing.assert_close(q @ q.T, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-5)
    # every snapshot lies in the span of the basis: the dense projector reproduces it
    flat_q = torch.stack([_unpad(lawa, row) for row in q])
    torch.testing.assert_close(dense @ flat_q.T @ flat_q, dense, rtol=0, atol=1e-5)


def _unpad(lawa, flat):
    b = lawa._history.buckets[0]
    return torch.cat([b.view(flat, i).reshape(-1) for i in range(len(b.params))])


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
    torch.testing.assert_close(twa.coefficients() @ dense, _flat(m), rtol=0, atol=1e-5)


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


def test_history_untouched_and_state_shared():
    m, lawa, _ = _trained()
    before = [(b.ring.clone(), b.total.clone(), b.pushes.clone()) for b in lawa._history.buckets]
    sgd = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    twa = TWA(sgd, history=lawa)
    x, y = _data()
    _loss(m, x, y).backward()
    twa.step()
    for (ring, total, pushes), b in zip(before, lawa._history.buckets):
        assert torch.equal(ring, b.ring) and torch.equal(total, b.total) and torch.equal(pushes, b.pushes)
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


def test_errors():
    m = _model()
    empty = LAWA(torch.optim.SGD(m.parameters(), lr=0.1), k=3)
    with pytest.raises(RuntimeError, match="no snapshot"):
        TWA(torch.optim.SGD(m.parameters(), lr=0.1), history=empty)
    m, lawa, _ = _trained()
    with pytest.raises(TypeError, match="torch.optim.SGD.*got Adam"):
        TWA(torch.optim.Adam(m.parameters()), history=lawa)
    with pytest.raises(ValueError, match="not in optimizer"):
        TWA(torch.optim.SGD(list(m.parameters())[:2], lr=0.1), history=lawa)
    with pytest.raises(ValueError, match="does not hold"):
        TWA(torch.optim.SGD([*m.parameters(), nn.Parameter(torch.zeros(2))], lr=0.1), history=lawa)
    with pytest.raises(ValueError, match=r"last must be None or an int in \[1, 4\].*got 5"):
        TWA(torch.optim.SGD(m.parameters(), lr=0.1), history=lawa, last=5)
    with lawa.averaged(), pytest.raises(RuntimeError, match="swap_back"):
        TWA(torch.optim.SGD(m.parameters(), lr=0.1), history=lawa)
    m, ema, _ = _trained(k=1, mode="ema")
    with pytest.raises(ValueError, match="mode='uniform'"):
        TWA(torch.optim.SGD(m.parameters(), lr=0.1), history=ema)


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
