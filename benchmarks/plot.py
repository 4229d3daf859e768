"""The plot of ``benchmarks/report.py``: LAWA snapshot GB/s against size.

LAWA (Kaddour 2022, arXiv:2209.14981) snapshots move ``numel * (bytes(param) +
2 * bytes(slot) + 8)`` bytes; the plot shows how close each backend comes to a plain
copy of those bytes, per dtype, with the ``torch._foreach_*`` push beside it.
"""

from __future__ import annotations

from pathlib import Path


def plot(records: list[dict], path: Path) -> bool:
    """GB/s of the snapshot against size for each backend and dtype (flat sizes as lines,
    model parameter lists as squares), with the roofline and the foreach push measured
    in the same rounds; False without matplotlib or without snapshot records."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    snaps = [r for r in records if r["op"] == "snapshot"]
    if not snaps:
        return False
    by_size = lambda rs: sorted(rs, key=lambda r: r["numel"])  # noqa: E731
    flat = lambda rs: by_size(r for r in rs if r["workload"].startswith("flat"))  # noqa: E731
    model = lambda rs: by_size(r for r in rs if not r["workload"].startswith("flat"))  # noqa: E731
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for dtype in dict.fromkeys(r["param_dtype"] for r in snaps):
        of_dtype = [r for r in snaps if r["param_dtype"] == dtype]
        for label in dict.fromkeys(f"{r['backend']}/{r['impl']}" for r in of_dtype):
            rs = [r for r in of_dtype if f"{r['backend']}/{r['impl']}" == label]
            line = ax.plot([r["numel"] for r in flat(rs)], [r["gbps"] for r in flat(rs)], "o-",
                           label=f"LAWA {label} {dtype}")
            ax.plot([r["numel"] for r in model(rs)], [r["gbps"] for r in model(rs)], "s", ms=8,
                    color=line[0].get_color())
        # The roofline and the baselines are timed once per workload: any record holds them.
        first = list({r["workload"]: r for r in of_dtype}.values())
        ax.plot([r["numel"] for r in flat(first)], [r["roofline_gbps"] for r in flat(first)], "k--",
                label=f"copy roofline {dtype}")
        ax.plot([r["numel"] for r in model(first)], [r["roofline_gbps"] for r in model(first)], "k_", ms=14)
        ax.plot([r["numel"] for r in by_size(first)],
                [r["bytes"] / r["baseline_s"]["foreach"] / 1e9 for r in by_size(first)], "x", color="gray",
                label=f"torch._foreach_* push {dtype}")
        for r in model(first):
            ax.annotate(r["workload"], (r["numel"], r["roofline_gbps"]), textcoords="offset points",
                        xytext=(6, 4), fontsize=8)
    ax.set(xscale="log", xlabel="elements; squares: real models' parameter lists",
           ylabel="GB/s (bytes the snapshot must move)",
           title=f"LAWA snapshot, k={snaps[0]['k']}, amortised over k: {snaps[0]['device_name']}")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
