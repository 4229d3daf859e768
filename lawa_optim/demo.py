"""LAWA on real data in under a minute: ``python -m lawa_optim.demo``.

Trains a small CNN with SGD and a cosine learning-rate schedule on the handwritten
digits that ship with scikit-learn (1,797 8x8 images, no download) and evaluates,
after every epoch, both the live weights and the average of the k = 6 latest
end-of-epoch snapshots, as in Latest Weight Averaging (Kaddour 2022, "Stop Wasting My
Time! Saving Days of ImageNet and BERT Training with Latest Weight Averaging",
arXiv:2209.14981). Every seed draws its own split, initialisation and batch order.
It prints the per-epoch paired differences (LAWA minus live) with Student-t 95 %
intervals over the seeds, the epochs each needs to reach targets set from the live
weights' own final loss and accuracy (medians, and the per-seed saving: its mean with
an interval and its median), a verdict that states only what those show (none with
fewer than 6 seeds), and saves a plot of loss and accuracy.

The model, training and evaluation helpers here are shared with ``examples/``; the
statistics and the words of the verdict are in :mod:`lawa_optim.paired`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from lawa_optim._cli import Parser, int_at_least, output_file


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = Parser(prog="python -m lawa_optim.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int_at_least(1), default=20, help="training epochs per seed (default 20)")
    p.add_argument("--seeds", type=int_at_least(1), default=10, help="number of seeds, 0..N-1 (default 10)")
    p.add_argument("--out", type=lambda t: t and output_file(t), default="lawa_demo.png",
                   help="plot path (default lawa_demo.png); '' for none")
    return p.parse_args(argv)


if __name__ == "__main__":  # answer a bad argument or --help before the imports below, which take seconds
    _parse(None)

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from lawa_optim.paired import (MARGINS, MIN_SEEDS, conclusion, no_verdict, paired, per_epoch, per_phase,  # noqa: E402
                               reach, reach_text, targets)
from lawa_optim.wrapper import LAWA  # noqa: E402

#: SGD settings of the demo: momentum 0.9 as in both papers; peak lr 0.1 and batch 32
#: train the digits in a few epochs (one seed of 20 epochs: about 2 s on one core).
LR = 0.1
MOMENTUM = 0.9
BATCH_SIZE = 32
#: Validation images per seed (stratified; the other 1,197 train): 1 image = 0.17 points.
VAL_SIZE = 600
#: Snapshots LAWA averages (the paper's default).
K = 6


def source_version() -> dict[str, object]:
    """The git commit of this checkout of ``lawa_optim`` and the tracked files that differ
    from it, for the record of every result file: ``{"commit", "modified", "text"}``
    (``commit`` None where the package does not run from a git checkout of its own)."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30,
                              check=True).stdout

    try:
        if Path(git("rev-parse", "--show-toplevel").strip()).resolve() != root:  # an installed copy inside another repository
            raise ValueError(root)
        commit, status = git("rev-parse", "HEAD").strip(), git("status", "--porcelain", "--untracked-files=no")
    except (OSError, ValueError, subprocess.SubprocessError):
        return {"commit": None, "modified": None, "text": "unknown (lawa_optim does not run from a git checkout)"}
    modified = [line[3:] for line in status.splitlines()]
    state = f"modified: {', '.join(modified)}" if modified else "clean tree"
    return {"commit": commit, "modified": modified, "text": f"git commit {commit} ({state})"}


def load_digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's digits as images ``(1797, 1, 8, 8)`` scaled to [0, 1] and labels."""
    from sklearn.datasets import load_digits as sk_load_digits

    x, y = sk_load_digits(return_X_y=True)
    return torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0, torch.tensor(y)  # pixels are 0..16


def split(x: Tensor, y: Tensor, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Seed ``seed``'s stratified split into training and ``VAL_SIZE`` validation images."""
    from sklearn.model_selection import train_test_split

    train, val = train_test_split(list(range(len(y))), test_size=VAL_SIZE, stratify=y, random_state=seed)
    return x[train], y[train], x[val], y[val]


def make_model() -> nn.Module:
    """A two-layer CNN for 8x8 images (6.1k parameters)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 2 * 2, 10),
    )


def batches(x: Tensor, y: Tensor, batch_size: int, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
    """Shuffled mini-batches of ``(x, y)`` in the order drawn from ``generator``."""
    order = torch.randperm(len(y), generator=generator)
    for start in range(0, len(y), batch_size):
        sel = order[start:start + batch_size]
        yield x[sel], y[sel]


def train_epoch(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor,
                generator: torch.Generator, batch_size: int = BATCH_SIZE) -> None:
    """One pass of ``opt`` over ``(x, y)`` in training mode."""
    model.train()
    for xb, yb in batches(x, y, batch_size, generator):
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    """Cross-entropy loss and accuracy of ``model`` (eval mode) on ``(x, y)``."""
    model.eval()
    logits = model(x)
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).double().mean().item()


def record(out: dict[str, list[float]], name: str, loss_acc: tuple[float, float]) -> None:
    """Append an evaluation to the curves ``{name}_loss`` and ``{name}_acc`` of ``out``."""
    out.setdefault(f"{name}_loss", []).append(loss_acc[0])
    out.setdefault(f"{name}_acc", []).append(loss_acc[1])


def run_seed(seed: int, epochs: int, x: Tensor, y: Tensor, k: int = K) -> dict[str, list[float]]:
    """Train one seed with ``LAWA(SGD, k)`` and a cosine schedule over ``epochs``,
    snapshot at each epoch end and evaluate the live weights and the average."""
    xt, yt, xv, yv = split(x, y, seed)
    torch.manual_seed(seed)
    model = make_model()
    opt = LAWA(torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM), k=k)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, list[float]] = {}
    for _ in range(epochs):
        train_epoch(model, opt, xt, yt, gen)
        opt.snapshot()
        sched.step()
        record(out, "live", evaluate(model, xv, yv))
        with opt.averaged():
            record(out, "avg", evaluate(model, xv, yv))
    return out


def curves(runs: Sequence[dict[str, list[float]]], key: str) -> list[list[float]]:
    """Curve ``key`` of every seed."""
    return [r[key] for r in runs]


def verdict(runs: Sequence[dict[str, list[float]]], label: str = "LAWA") -> list[str]:
    """Plain-language comparison of curve ``avg`` with curve ``live``, from paired
    intervals and ``MARGINS`` only: the mean loss difference over each third of the run, both metrics
    at the last epoch, and the epochs each needs to reach the targets set from the
    live weights' final values (per seed), as medians and as a per-seed saving. With
    fewer than ``MIN_SEEDS`` seeds every line gives the numbers and says that they carry no verdict."""
    epochs = len(runs[0]["live_loss"])
    lines = []
    for first, last, p in per_phase(curves(runs, "avg_loss"), curves(runs, "live_loss")):
        lines.append(f"epochs {first}-{last}, mean validation loss: {p.text()}: "
                     + conclusion(p, MARGINS["loss"], f"{label} lower", f"{label} higher"))
    loss, acc = (paired([r[f"avg_{m}"][-1] for r in runs], [r[f"live_{m}"][-1] for r in runs]) for m in ("loss", "acc"))
    lines.append(f"last epoch ({epochs}): loss {loss.text()}: {conclusion(loss, MARGINS['loss'], f'{label} lower', f'{label} higher')}; "
                 f"accuracy {acc.text()}: {conclusion(acc, MARGINS['acc'], f'{label} lower', f'{label} higher')}")
    for metric in ("loss", "acc"):
        live = curves(runs, f"live_{metric}")
        r = reach(live, curves(runs, f"avg_{metric}"), [targets(c, metric) for c in live], higher_is_better=metric == "acc")
        t = reach_text(r, metric, "live", label, whose="the live weights' ")
        lines.append(f"epochs to reach {t.target}: {t.medians}; epochs {label} saves per seed: {t.saved}: {t.says}")
    return lines


def plot(runs: Sequence[dict[str, list[float]]], out: str, title: str, k: int = K, note: str = "") -> bool:
    """Save the mean validation loss and accuracy of live and average (LAWA ``k``), and
    their paired differences with 95 % bands, to ``out``, with ``note`` at its foot;
    returns False (and saves nothing) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return False
    epochs = range(1, len(runs[0]["live_loss"]) + 1)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True)
    for col, (m, what) in enumerate((("loss", "validation loss"), ("acc", "validation accuracy"))):
        for name, label in (("live", "live weights"), ("avg", f"LAWA k={k}")):
            axes[0, col].plot(epochs, [sum(r[f"{name}_{m}"][e - 1] for r in runs) / len(runs) for e in epochs],
                              label=label)
        axes[0, col].set_ylabel(f"{what} (mean over seeds)")
        diff = per_epoch(curves(runs, f"avg_{m}"), curves(runs, f"live_{m}"))
        axes[1, col].plot(epochs, [p.mean for p in diff], color="C1")
        if len(runs) >= MIN_SEEDS:
            axes[1, col].fill_between(epochs, [p.lo for p in diff], [p.hi for p in diff], color="C1", alpha=0.25)
        axes[1, col].axhline(0, color="k", lw=0.8)
        axes[1, col].set_ylabel(f"LAWA - live, {what}" + (" (95% interval)" if len(runs) >= MIN_SEEDS else ""))
    axes[0, 0].set_yscale("log")
    for ax in axes.flat:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("epoch")
    axes[0, 0].legend()
    fig.suptitle(title)
    fig.text(0.5, 0.005, note, ha="center", va="bottom", fontsize=6)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    """Run the demo; returns the per-seed curves and the verdict."""
    args = _parse(argv)
    torch.set_num_threads(1)  # a 6k-parameter CNN gains nothing from more threads
    code = source_version()  # when the code is loaded, before anything is written
    x, y = load_digits()
    t0 = time.perf_counter()
    runs = [run_seed(seed, args.epochs, x, y) for seed in range(args.seeds)]
    seconds = time.perf_counter() - t0
    n = args.seeds
    print(f"LAWA k={K} vs live weights: digits CNN, SGD lr={LR} (cosine over {args.epochs} epochs) momentum={MOMENTUM} "
          f"batch={BATCH_SIZE}; {n} seed(s), each with its own split ({VAL_SIZE} validation images), init and batch order")
    print(f"code: {code['text']}")
    print("per epoch: means over seeds; LAWA - live as mean [95% Student-t interval over seeds]; seeds where LAWA is lower")
    print(f"{'epoch':>5} | {'live loss':>9} {'LAWA loss':>9} {'LAWA - live loss':>30} {'lower':>6} | "
          f"{'live acc':>8} {'LAWA acc':>8} {'LAWA - live acc':>24}")
    loss_d, acc_d = (per_epoch(curves(runs, f"avg_{m}"), curves(runs, f"live_{m}")) for m in ("loss", "acc"))
    for e in range(args.epochs):
        mean = {key: sum(r[key][e] for r in runs) / n for key in runs[0]}
        print(f"{e + 1:>5} | {mean['live_loss']:>9.4f} {mean['avg_loss']:>9.4f} {loss_d[e].text():>30} "
              f"{f'{loss_d[e].below}/{n}':>6} | {mean['live_acc']:>8.4f} {mean['avg_acc']:>8.4f} {acc_d[e].text():>24}")
    lines = verdict(runs)
    if n < MIN_SEEDS:
        print(f"{no_verdict(n)[0].upper()}{no_verdict(n)[1:]}: the numbers alone (LAWA minus live weights, means "
              "over the seeds):")
    else:
        print("verdict (LAWA minus live weights, mean [95% Student-t interval over seeds]):")
    for line in lines:
        print(f"  - {line}")
    print(f"trained {n} seed(s) x {args.epochs} epochs in {seconds:.1f} s")
    if args.out and plot(runs, args.out, f"digits CNN, cosine schedule, {n} seed(s)",
                         note=f"python -m lawa_optim.demo {' '.join(argv if argv is not None else sys.argv[1:])}; "
                              f"code: {code['text']}"):
        print(f"plot saved to {args.out}")
    return {"runs": runs, "verdict": lines}


if __name__ == "__main__":
    main()
