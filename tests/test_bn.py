"""update_bn: BatchNorm statistics recomputed for the weights the model holds."""

import torch
from torch import nn

from lawa_optim import LAWA, update_bn


def test_update_bn_recomputes_statistics_for_the_average():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6))
    opt = LAWA(torch.optim.SGD(model.parameters(), lr=0.1), k=2)
    data = [torch.randn(10, 4) for _ in range(3)]
    for scale in (1.0, 3.0):
        with torch.no_grad():
            model[0].weight.mul_(scale)
        opt.snapshot()
    model.eval()
    with opt.averaged():
        update_bn([(x, 0) for x in data], model)  # (input, target) batches as loaders yield
        assert not model.training  # the mode is restored
        # Cumulative averaging: the mean over batches of each batch's statistics.
        hs = [model[0](x).detach() for x in data]
        torch.testing.assert_close(model[1].running_mean, torch.stack([h.mean(0) for h in hs]).mean(0))
        torch.testing.assert_close(model[1].running_var, torch.stack([h.var(0) for h in hs]).mean(0))
    before = model[1].running_mean.clone()
    with opt.averaged(last=1):  # other weights, other statistics
        update_bn(data, model)
    assert not torch.allclose(model[1].running_mean, before)
