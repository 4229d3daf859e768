"""LAWA on real data in seconds: ``python -m lawa_optim.demo``.

Trains a small CNN with SGD on the handwritten digits that ship with scikit-learn
(1,797 8x8 images, no download) and evaluates, after every epoch, both the live
weights and the average of the k = 6 latest end-of-epoch snapshots, as in Latest
Weight Averaging (Kaddour 2022, "Stop Wasting My Time! Saving Days of ImageNet and
BERT Training with Latest Weight Averaging", arXiv:2209.14981). It prints per-epoch
validation loss and accuracy (mean and spread over seeds), the epochs each needs to
reach a target, a verdict computed from those numbers, and saves a plot.

The data loading, model, training and evaluation helpers here are shared with the
experiments in ``examples/``.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lawa_optim.wrapper import LAWA

#: SGD settings of the demo (momentum 0.9 as in both papers; lr 0.1 and batch 32 train
#: the digits in a few epochs: 30 epochs of one seed take about 5 s on one CPU core).
LR = 0.1
MOMENTUM = 0.9
BATCH_SIZE = 32
#: Validation and held-out sizes; the remaining 1,197 images train. The held-out
#: split is only read by the validation-set variant of TWA in ``examples/``.
VAL_SIZE = 300
HOLDOUT_SIZE = 300
#: Demo target: validation loss the live weights reach around epoch 10 (see
#: examples/README.md), so that "epochs to reach target" separates the two.
TARGET_LOSS = 0.10


@dataclass
class Digits:
    """The three fixed splits of scikit-learn's digits, images scaled to [0, 1]."""

    x_train: Tensor
    y_train: Tensor
    x_holdout: Tensor
    y_holdout: Tensor
    x_val: Tensor
    y_val: Tensor


def load_digits_splits() -> Digits:
    """Load the digits and split them (stratified, fixed ``random_state=0``) into
    1,197 training, 300 held-out and 300 validation images of shape (1, 8, 8)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0  # pixels are 0..16
    y = torch.tensor(y, dtype=torch.int64)
    idx = list(range(len(y)))
    rest, val = train_test_split(idx, test_size=VAL_SIZE, stratify=y, random_state=0)
    train, holdout = train_test_split(rest, test_size=HOLDOUT_SIZE, stratify=y[rest], random_state=0)
    return Digits(x[train], y[train], x[holdout], y[holdout], x[val], y[val])


def make_model(batchnorm: bool = False) -> nn.Module:
    """A two-layer CNN (6.1k parameters), with BatchNorm after each convolution if asked."""

    def block(cin: int, cout: int) -> list[nn.Module]:
        norm = [nn.BatchNorm2d(cout)] if batchnorm else []
        return [nn.Conv2d(cin, cout, 3, padding=1), *norm, nn.ReLU(), nn.MaxPool2d(2)]

    return nn.Sequential(*block(1, 16), *block(16, 32), nn.Flatten(), nn.Linear(32 * 2 * 2, 10))


def batches(x: Tensor, y: Tensor, batch_size: int, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
    """Shuffled mini-batches of ``(x, y)`` in the order drawn from ``generator``."""
    order = torch.randperm(len(y), generator=generator)
    for start in range(0, len(y), batch_size):
        sel = order[start:start + batch_size]
        yield x[sel], y[sel]


def train_epoch(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    generator: torch.Generator,
    batch_size: int = BATCH_SIZE,
) -> float:
    """One pass of ``opt`` over ``(x, y)`` in training mode; returns the mean batch loss."""
    model.train()
    total, n = 0.0, 0
    for xb, yb in batches(x, y, batch_size, generator):
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        total += loss.item()
        n += 1
    return total / n


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    """Cross-entropy loss and accuracy of ``model`` (eval mode) on ``(x, y)``."""
    model.eval()
    logits = model(x)
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def epochs_to_target(curve: Sequence[float], target: float, higher_is_better: bool = False) -> int | None:
    """First epoch (counted from 1) whose value reaches ``target``, or None if none does."""
    for epoch, v in enumerate(curve, start=1):
        if (v >= target) if higher_is_better else (v <= target):
            return epoch
    return None


def record(out: dict[str, list[float]], name: str, loss_acc: tuple[float, float]) -> None:
    """Append an evaluation to the curves ``{name}_loss`` and ``{name}_acc`` of ``out``."""
    out.setdefault(f"{name}_loss", []).append(loss_acc[0])
    out.setdefault(f"{name}_acc", []).append(loss_acc[1])


def run_seed(seed: int, epochs: int, data: Digits, k: int = 6) -> dict[str, list[float]]:
    """Train one seed with ``LAWA(SGD, k)``, snapshot at each epoch end and evaluate the
    live weights and the average on the validation split after every epoch."""
    torch.manual_seed(seed)
    model = make_model()
    opt = LAWA(torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM), k=k)
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, list[float]] = {}
    for _ in range(epochs):
        train_epoch(model, opt, data.x_train, data.y_train, gen)
        opt.snapshot()
        record(out, "live", evaluate(model, data.x_val, data.y_val))
        with opt.averaged():
            record(out, "avg", evaluate(model, data.x_val, data.y_val))
    return out


def aggregate(runs: Sequence[dict[str, list[float]]]) -> dict[str, list[tuple[float, float]]]:
    """Per key and epoch, (mean, std) over the runs of several seeds."""
    return {key: [mean_std([r[key][e] for r in runs]) for e in range(len(runs[0][key]))] for key in runs[0]}


def verdict(
    runs: Sequence[dict[str, list[float]]],
    target_loss: float,
    live: str = "live",
    avg: str = "avg",
    labels: dict[str, str] | None = None,
) -> list[str]:
    """Plain-language comparison of curve ``avg`` with curve ``live``, from the numbers:
    the epochs where the mean validation loss of ``avg`` is lower, the largest gap, and
    the mean epochs to reach ``target_loss``; ``labels`` names the curves in the text."""
    labels = labels or {}
    agg = aggregate(runs)
    live_loss = [m for m, _ in agg[f"{live}_loss"]]
    avg_loss = [m for m, _ in agg[f"{avg}_loss"]]
    better = [e + 1 for e, (a, b) in enumerate(zip(avg_loss, live_loss)) if a < b]
    lines = []
    if better:
        e = max(better, key=lambda i: live_loss[i - 1] - avg_loss[i - 1])
        lines.append(
            f"{labels.get(avg, avg)} has the lower mean validation loss in {len(better)}/{len(live_loss)} epochs "
            f"({_ranges(better)}); largest gap at epoch {e}: {avg_loss[e - 1]:.3f} vs {live_loss[e - 1]:.3f} "
            f"({100 * (1 - avg_loss[e - 1] / live_loss[e - 1]):.0f}% lower)"
        )
    else:
        lines.append(f"{labels.get(avg, avg)} never has a lower mean validation loss than {labels.get(live, live)} here")
    worse = [e + 1 for e, (a, b) in enumerate(zip(avg_loss, live_loss)) if a >= b]
    if better and worse:
        lines.append(f"it is not better in epochs {_ranges(worse)}")
    reach = {}
    for name in (live, avg):
        hits = [epochs_to_target(r[f"{name}_loss"], target_loss) for r in runs]
        reach[name] = hits
        got = [h for h in hits if h is not None]
        txt = f"{mean_std(got)[0]:.1f}" if got else "never"
        missed = f" ({len(hits) - len(got)} of {len(hits)} seeds never)" if got and len(got) < len(hits) else ""
        lines.append(f"epochs to reach validation loss <= {target_loss}: {labels.get(name, name)} {txt}{missed}")
    pairs = [(a, b) for a, b in zip(reach[live], reach[avg]) if a is not None and b is not None]
    if pairs:
        saved = mean_std([a - b for a, b in pairs])[0]
        when = f"{saved:.1f} epochs earlier than" if saved >= 0 else f"{-saved:.1f} epochs later than"
        lines.append(
            f"{labels.get(avg, avg)} reaches it {when} {labels.get(live, live)} "
            f"(mean over the {len(pairs)} seed(s) where both reach it)"
        )
    return lines


def _ranges(epochs: Sequence[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``"1-3, 7"``."""
    parts, start = [], epochs[0]
    for prev, cur in zip(epochs, [*epochs[1:], None]):
        if cur != prev + 1:
            parts.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = cur
    return ", ".join(parts)


def plot(curves: dict[str, list[tuple[float, float]]], labels: dict[str, str], out: str, title: str) -> bool:
    """Save validation loss and accuracy per epoch (mean, shaded +-1 std) to ``out``;
    returns False (and saves nothing) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric, ylabel in ((axes[0], "loss", "validation loss"), (axes[1], "acc", "validation accuracy")):
        later = []  # means from epoch 3 on set the y range: epochs 1-2 are off the scale
        for name, label in labels.items():
            stats = curves[f"{name}_{metric}"]
            epochs = range(1, len(stats) + 1)
            mean = [m for m, _ in stats]
            later += mean[2:] or mean
            ax.plot(epochs, mean, label=label)
            ax.fill_between(epochs, [m - s for m, s in stats], [m + s for m, s in stats], alpha=0.12)
        lo, hi = min(later), max(later)
        pad = 0.3 * (hi - lo) or 0.05
        ax.set_ylim(max(lo - pad, 0.0), min(hi + pad, 1.0) if metric == "acc" else hi + pad)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lawa_optim.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=30, help="training epochs per seed (default 30)")
    p.add_argument("--seeds", type=int, default=5, help="number of seeds, 0..N-1 (default 5)")
    p.add_argument("--k", type=int, default=6, help="snapshots averaged (default 6, the paper's)")
    p.add_argument("--target-loss", type=float, default=TARGET_LOSS, help=f"target validation loss (default {TARGET_LOSS})")
    p.add_argument("--out", default="lawa_demo.png", help="plot path (default lawa_demo.png); '' for none")
    args = p.parse_args(argv)
    for name in ("epochs", "seeds", "k"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be an int >= 1, got {getattr(args, name)}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    """Run the demo; returns the per-seed curves, their aggregate and the verdict."""
    args = _parse(argv)
    torch.set_num_threads(1)  # a 6k-parameter CNN gains nothing from more threads
    data = load_digits_splits()
    t0 = time.perf_counter()
    runs = [run_seed(seed, args.epochs, data, args.k) for seed in range(args.seeds)]
    seconds = time.perf_counter() - t0
    agg = aggregate(runs)
    print(f"LAWA k={args.k} vs live weights: digits CNN, SGD lr={LR} momentum={MOMENTUM} batch={BATCH_SIZE}, "
          f"{args.seeds} seed(s), mean +- std, validation split of {VAL_SIZE} images")
    print(f"{'epoch':>5} | {'live loss':>15} {'live acc':>15} | {'LAWA loss':>15} {'LAWA acc':>15}")
    for e in range(args.epochs):
        cells = [f"{agg[key][e][0]:.4f} +- {agg[key][e][1]:.4f}" for key in ("live_loss", "live_acc", "avg_loss", "avg_acc")]
        print(f"{e + 1:>5} | {cells[0]:>15} {cells[1]:>15} | {cells[2]:>15} {cells[3]:>15}")
    labels = {"live": "live weights (SGD)", "avg": f"LAWA k={args.k}"}
    lines = verdict(runs, args.target_loss, labels=labels)
    print("verdict:")
    for line in lines:
        print(f"  - {line}")
    print(f"trained {args.seeds} seed(s) x {args.epochs} epochs in {seconds:.1f} s")
    if args.out:
        if plot(agg, labels, args.out, f"digits CNN, {args.seeds} seed(s), mean +- std"):
            print(f"plot saved to {args.out}")
    return {"runs": runs, "aggregate": agg, "verdict": lines}


if __name__ == "__main__":
    main()
