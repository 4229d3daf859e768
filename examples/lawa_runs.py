"""The training runs of one seed for ``examples/lawa_experiment.py``.

Per seed (its own split, initialisation and batch order), a small BatchNorm CNN on
14x14 Fashion-MNIST is trained with SGD under several learning-rate schedules; every
curve is measured on the seed's validation images after every epoch. Averaged weights
(LAWA, Kaddour 2022, arXiv:2209.14981; Lookahead's slow weights; TWA, Li et al. ICLR
2023 / arXiv:2205.13104) are evaluated after a BatchNorm refresh on ``bn`` training
images, as the LAWA paper does on ImageNet, and the time of every refresh is measured
so that its cost can be counted.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from examples import fashion_mnist
from examples.lawa_sizes import Config
from examples.lookahead import Lookahead
from lawa_optim import LAWA, TWA, update_bn
from lawa_optim.demo import batches, evaluate, record, train_epoch

#: Peak learning rate (chosen for the live weights on pilot seeds 100-101, before any
#: LAWA curve was looked at), momentum as in both papers, weight decay as in TWA's.
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-4
#: The learning-rate schedules every seed trains under (see :func:`schedule`).
SCHEDULES = ("cosine", "step", "constant")
#: LAWA windows read from one ring of the largest (paper: k = 6 default, > 10-16 hurts).
WINDOWS = (2, 6, 10, 20)
#: Paper's Appendix C: alpha = 0.9 on the newest checkpoint, i.e. decay 0.1 here.
EMA_DECAY = 0.1
#: Paper's Appendix B Lookahead setting (alpha 0.8, k 5 steps).
LA_K, LA_ALPHA = 5, 0.8
#: TWA learning rate as a multiple of the peak training rate (the authors' scripts use
#: 20 on CIFAR and 3 on ImageNet), chosen on the pilot seeds like LR.
TWA_LR_SCALE = 3.0


@dataclass
class Data:
    """One seed's split, images downsampled to 14x14 and scaled to [0, 1]."""

    x: Tensor
    y: Tensor
    x_hold: Tensor
    y_hold: Tensor
    x_val: Tensor
    y_val: Tensor
    x_bn: Tensor  # the first training images, read by every BatchNorm refresh


def split(images: Tensor, labels: Tensor, cfg: Config, seed: int) -> Data:
    """Seed ``seed``'s disjoint training, held-out and validation images, drawn from
    ``images`` in a random order of its own."""
    need = cfg.train + cfg.holdout + cfg.val
    if len(labels) < need:
        raise ValueError(f"the split needs {need} images (train + holdout + val), the data holds {len(labels)}")
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    sizes = [cfg.train, cfg.holdout, cfg.val]
    x = F.avg_pool2d(images[order[:need]].unsqueeze(1).float() / 255.0, 2)
    xs, ys = torch.split(x, sizes), torch.split(labels[order[:need]], sizes)
    return Data(xs[0], ys[0], xs[1], ys[1], xs[2], ys[2], x_bn=xs[0][: cfg.bn])


def load_split(data_dir: str | None, cfg: Config, seed: int) -> Data:
    """Load the Fashion-MNIST training file and draw seed ``seed``'s split from it."""
    return split(*fashion_mnist.load("train", data_dir), cfg, seed)


def make_model() -> nn.Module:
    """Two conv-BatchNorm-ReLU-pool blocks and a linear layer (2.7k parameters)."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 3 * 3, 10),
    )


def sgd(model: nn.Module) -> torch.optim.SGD:
    """SGD over ``model``'s parameters with the experiment's settings."""
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)


def schedule(opt: torch.optim.Optimizer, name: str, epochs: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-epoch learning-rate schedule: ``cosine`` to 0, ``step`` (/10 at 50 % and
    75 %, as in the TWA papers' regular training) or ``constant``."""
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    if name == "step":
        return torch.optim.lr_scheduler.MultiStepLR(opt, [epochs // 2, (3 * epochs) // 4], 0.1)
    if name == "constant":
        return torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0)
    raise ValueError(f"schedule must be 'cosine', 'step' or 'constant', got {name!r}")


class Seed:
    """Everything one seed trains; each run starts from the same initialisation and
    draws its batches in the same order."""

    def __init__(self, seed: int, data: Data, cfg: Config) -> None:
        self.seed, self.data, self.cfg = seed, data, cfg
        self.refresh_s = 0.0  # time spent in BatchNorm refreshes
        self.refreshes = 0
        self.train_s = 0.0  # time spent in training epochs
        self.train_epochs = 0

    def _start(self) -> tuple[nn.Module, torch.Generator]:
        torch.manual_seed(self.seed)
        return make_model(), torch.Generator().manual_seed(self.seed)

    def _train(self, model: nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator) -> None:
        t0 = time.perf_counter()
        train_epoch(model, opt, self.data.x, self.data.y, gen, self.cfg.batch)
        self.train_s += time.perf_counter() - t0
        self.train_epochs += 1

    def _eval(self, model: nn.Module) -> tuple[float, float]:
        return evaluate(model, self.data.x_val, self.data.y_val)

    def _refreshed_eval(self, model: nn.Module) -> tuple[float, float]:
        """Refresh BatchNorm statistics for the weights ``model`` holds, evaluate, and put
        the previous statistics back."""
        saved = [b.clone() for b in model.buffers()]
        t0 = time.perf_counter()
        update_bn([self.data.x_bn], model)
        self.refresh_s += time.perf_counter() - t0
        self.refreshes += 1
        result = self._eval(model)
        with torch.no_grad():
            for b, s in zip(model.buffers(), saved):
                b.copy_(s)
        return result

    def run(self, name: str, epochs: int) -> dict:
        """Live weights (with their running BatchNorm statistics, and refreshed) and
        LAWA k=6 under schedule ``name``; the cosine run also keeps the other windows,
        EMA, LAWA without refresh and the TWA fits."""
        model, gen = self._start()
        opt = sgd(model)
        main = name == "cosine"
        lawa = LAWA(opt, k=max(WINDOWS) if main else 6)
        ema = LAWA(opt, k=1, mode="ema", decay=EMA_DECAY) if main else None  # a second view of the same SGD
        sched = schedule(lawa, name, epochs)
        out: dict = {"twa": {}} if main else {}
        for epoch in range(1, epochs + 1):
            self._train(model, lawa, gen)
            lawa.snapshot()
            if main:
                ema.snapshot()
            sched.step()
            record(out, "live", self._eval(model))
            record(out, "live_bn", self._refreshed_eval(model))  # the refresh alone, as a control
            if main:
                self._main_extras(out, model, lawa, ema, epoch)
            else:
                with lawa.averaged(last=min(6, lawa.num_snapshots)):
                    record(out, "lawa6", self._refreshed_eval(model))
        return out

    def _main_extras(self, out: dict, model: nn.Module, lawa: LAWA, ema: LAWA, epoch: int) -> None:
        """The cosine run's evaluations at the end of ``epoch``: every window (k = 6 also
        without a refresh), the EMA, and the TWA fits at the epochs they start from."""
        for k in WINDOWS:
            with lawa.averaged(last=min(k, lawa.num_snapshots)):
                if k == 6:
                    record(out, "lawa6_nobn", self._eval(model))
                record(out, f"lawa{k}", self._refreshed_eval(model))
        with ema.averaged():
            record(out, "ema", self._refreshed_eval(model))
        if epoch in self.cfg.twa_starts:
            out["twa"][epoch] = {v: self._twa(model, lawa, v) for v in ("t", "v")}

    def short(self, epochs: int) -> dict:
        """The equal-compute baseline: live weights under a cosine over ``epochs``."""
        model, gen = self._start()
        opt = sgd(model)
        sched = schedule(opt, "cosine", epochs)
        out: dict = {}
        for _ in range(epochs):
            self._train(model, opt, gen)
            sched.step()
            record(out, "live", self._eval(model))
            record(out, "live_bn", self._refreshed_eval(model))
        return out

    def lookahead(self, epochs: int) -> dict:
        """SGD inside Lookahead under the cosine schedule; the slow weights are evaluated."""
        model, gen = self._start()
        inner = sgd(model)
        opt = Lookahead(inner, k=LA_K, alpha=LA_ALPHA)
        sched = schedule(inner, "cosine", epochs)
        out: dict = {}
        for _ in range(epochs):
            self._train(model, opt, gen)
            sched.step()
            with opt.slow_weights():
                record(out, "lookahead", self._refreshed_eval(model))
        return out

    def _twa(self, model: nn.Module, lawa: LAWA, variant: str) -> dict:
        """Fit TWA from all snapshots ``lawa`` holds with the papers' recipe, for
        ``twa_epochs`` epochs' worth of steps on the training (``"t"``) or held-out
        (``"v"``) images; evaluate after a refresh and put the model back."""
        saved = copy.deepcopy(model.state_dict())
        twa = TWA(sgd(model), history=lawa)
        steps = self.cfg.twa_epochs * -(-self.cfg.train // self.cfg.batch)
        sched = twa.paper_schedule(steps, lr_scale=TWA_LR_SCALE)
        x, y = (self.data.x, self.data.y) if variant == "t" else (self.data.x_hold, self.data.y_hold)
        gen = torch.Generator().manual_seed(10_000 + self.seed)
        model.train()
        for xb, yb in _cycle(x, y, self.cfg.batch, gen, steps):
            twa.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            twa.step()
            sched.step()
        loss, acc = self._refreshed_eval(model)
        result = {"loss": loss, "acc": acc, "coefficients": twa.coefficients()[0].tolist()}
        model.load_state_dict(saved)
        return result


def _cycle(x: Tensor, y: Tensor, batch: int, gen: torch.Generator, steps: int) -> Iterator[tuple[Tensor, Tensor]]:
    """``steps`` shuffled mini-batches, passing over ``(x, y)`` as often as needed."""
    done = 0
    while True:
        for xb, yb in batches(x, y, batch, gen):
            if done == steps:
                return
            yield xb, yb
            done += 1


def run_seed(seed: int, cfg: Config, data_dir: str | None) -> dict:
    """All runs of one seed, with the time spent training and refreshing BatchNorm and
    the CPU time of the whole seed."""
    torch.set_num_threads(1)  # one process per core; a 2.7k-parameter CNN gains nothing from more
    cpu0 = time.process_time()
    s = Seed(seed, load_split(data_dir, cfg, seed), cfg)
    out = {"seed": seed}
    for name in SCHEDULES:
        out[name] = s.run(name, cfg.epochs)
    out["short"] = s.short(cfg.short)
    out["lookahead"] = s.lookahead(cfg.epochs)
    out["cost"] = {"train_s": s.train_s, "train_epochs": s.train_epochs, "refresh_s": s.refresh_s,
                   "refreshes": s.refreshes, "cpu_s": time.process_time() - cpu0}
    return out
