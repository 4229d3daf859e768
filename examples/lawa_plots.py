"""Plots of ``examples/lawa_experiment.py``: mean curves and paired differences with
their Student-t 95 % bands (LAWA, Kaddour 2022, arXiv:2209.14981)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from examples import lawa_runs as runs


def _band(ax, paireds: Sequence, label: str, color: str) -> None:
    epochs = range(1, len(paireds) + 1)
    ax.plot(epochs, [p.mean for p in paireds], color=color, label=label)
    ax.fill_between(epochs, [p.lo for p in paireds], [p.hi for p in paireds], color=color, alpha=0.2)


def _mean(curves: Sequence[Sequence[float]]) -> list[float]:
    return [sum(c[e] for c in curves) / len(curves) for e in range(len(curves[0]))]


def plot_all(results: Sequence[dict], s: dict, cfg: runs.Config, out: Path, note: str = "") -> bool:
    """Write ``lawa_experiment_curves.png`` and ``lawa_experiment_findings.png`` to
    ``out``, each with ``note`` (the command and the code) at its foot; returns False
    (and writes nothing) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return False
    curves = [("cosine", "live", "live (cosine)"), ("cosine", "live_bn", "live, BatchNorm refreshed"),
              *(("cosine", f"lawa{k}", f"LAWA k={k}") for k in runs.WINDOWS),
              ("cosine", "ema", "EMA (alpha 0.9)"), ("lookahead", "lookahead", "Lookahead"),
              ("short", "live", f"live, cosine over {cfg.short}")]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for col, m, ylabel in ((0, "loss", "validation loss"), (1, "acc", "validation accuracy")):
        ax = axes[0, col]
        later = []
        for i, (run, key, label) in enumerate(curves):
            mean = _mean([r[run][f"{key}_{m}"] for r in results])
            later += mean[2:] or mean
            ax.plot(range(1, len(mean) + 1), mean, label=label, color=f"C{i}", ls="--" if run == "short" else "-")
        lo, hi = min(later), max(later)
        ax.set_ylim(lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo))  # epochs 1-2 are off the scale
        ax.set_ylabel(f"{ylabel}, mean over {len(results)} seeds")
        ax = axes[1, col]
        for i, sched in enumerate(runs.SCHEDULES):
            _band(ax, s["compare"][f"{sched}: LAWA k=6 - live/{m}"]["per_epoch"], sched, f"C{i}")
            ax.plot(range(1, cfg.epochs + 1), [p.mean for p in s["compare"][f"{sched}: LAWA k=6 - live, both refreshed/{m}"]["per_epoch"]],
                    color=f"C{i}", ls=":", label=f"{sched}, live refreshed too")
        ax.axhline(0, color="k", lw=0.8)
        ax.set_ylabel(f"LAWA k=6 - live, {ylabel} (95% band)")
    axes[0, 1].legend(fontsize=8)
    axes[1, 1].legend(fontsize=8)
    for ax in axes.flat:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.suptitle(f"Fashion-MNIST 14x14, BatchNorm CNN, {len(results)} seeds")
    fig.text(0.5, 0.005, note, ha="center", va="bottom", fontsize=6)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    fig.savefig(out / "lawa_experiment_curves.png", dpi=100)
    plt.close(fig)

    panels = [
        ("k sweep (cosine): LAWA - live, both refreshed", [f"cosine: LAWA k={k} - live, both refreshed" for k in runs.WINDOWS],
         [f"k={k}" for k in runs.WINDOWS]),
        ("EMA (alpha 0.9) against uniform windows (cosine)",
         ["cosine: EMA - live, both refreshed (uniform k=1)", "cosine: EMA - LAWA k=2", "cosine: EMA - LAWA k=10"],
         ["EMA - uniform k=1 (live, refreshed)", "EMA - LAWA k=2", "EMA - LAWA k=10"]),
        ("Lookahead (cosine)", ["cosine: LAWA k=6 - Lookahead", "cosine: LAWA k=10 - Lookahead",
                                "cosine: Lookahead - live, both refreshed"],
         ["LAWA k=6 - Lookahead", "LAWA k=10 - Lookahead", "Lookahead - live"]),
        ("BatchNorm (cosine)", ["cosine: LAWA k=6 without - with BatchNorm refresh", "cosine: live refreshed - live"],
         ["LAWA k=6: running - refreshed stats", "live: refreshed - running stats"]),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.4))
    for ax, (title, names, labels) in zip(axes, panels):
        for i, (name, label) in enumerate(zip(names, labels)):
            _band(ax, s["compare"][f"{name}/loss"]["per_epoch"], label, f"C{i}")
        ax.axhline(0, color="k", lw=0.8)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("validation loss difference (95% band)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.text(0.5, 0.005, note, ha="center", va="bottom", fontsize=6)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(out / "lawa_experiment_findings.png", dpi=100)
    plt.close(fig)
    return True
