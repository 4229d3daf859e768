"""update_bn: BatchNorm statistics recomputed for the weights the model holds, against
statistics computed by hand in float64 from kept copies of the snapshots."""

import torch
from torch import nn

from lawa_optim import LAWA, update_bn


def statistics(weights: list[torch.Tensor], data: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The cumulative averages update_bn leaves for a Linear layer with ``weights``
    (weight, bias; float64): the mean over batches of each batch's mean and of its
    unbiased variance."""
    w, b = weights
    hs = [x.double() @ w.T + b for x in data]
    return torch.stack([h.mean(0) for h in hs]).mean(0), torch.stack([h.var(0) for h in hs]).mean(0)


def test_update_bn_recomputes_statistics_for_the_average():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6))
    opt = LAWA(torch.optim.SGD(model.parameters(), lr=0.1), k=2)
    data = [torch.randn(10, 4) for _ in range(3)]
    snaps = []
    for scale in (1.0, 3.0):
        with torch.no_grad():
            model[0].weight.mul_(scale)
        opt.snapshot()
        snaps.append([p.detach().double().clone() for p in model[0].parameters()])
    model.eval()
    for last, held in [(None, snaps), (1, snaps[-1:])]:
        with opt.averaged(last=last):
            # (input, target) batches as loaders yield, and bare inputs.
            update_bn([(x, 0) for x in data] if last is None else data, model)
            assert not model.training and model[1].momentum == 0.1  # mode and momentum restored
            assert int(model[1].num_batches_tracked) == len(data)
            mean, var = statistics([torch.stack(ws).mean(0) for ws in zip(*held)], data)
            torch.testing.assert_close(model[1].running_mean.double(), mean, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(model[1].running_var.double(), var, rtol=1e-5, atol=1e-6)
