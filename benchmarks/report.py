"""Time the LAWA history (Kaddour 2022, arXiv:2209.14981) against its baselines.

    python benchmarks/report.py            # quick set, a couple of minutes on 2 CPU cores
    python benchmarks/report.py --full     # 1M..256M elements (as memory allows), all ops

For every backend that can run here, each operation is timed beside, in the same
run and on the same tensors, a plain copy of the bytes it must move (the roofline)
and the baselines of :mod:`benchmarks.baselines`. Prints a table, writes one JSON
record per measurement to ``benchmarks/results/<machine>.json`` and, with matplotlib,
a plot of GB/s against size to ``<machine>.png``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

if not __package__:  # run as a script: make `benchmarks` and `lawa_optim` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks import baselines, suite  # noqa: E402
from benchmarks.workloads import flat_params, model_params  # noqa: E402

QUICK = {"sizes": [1 << 20, 1 << 22, 1 << 24, 1 << 26], "size_ops": ("snapshot",),
         "models": ["resnet50", "gpt2-small"], "repeats": 5}
FULL = {"sizes": [1 << s for s in range(20, 29, 2)], "size_ops": suite.OPS,
        "models": ["resnet50", "gpt2-small"], "repeats": 7}
RESULTS = Path(__file__).resolve().parent / "results"


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model and the threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def interleaved(calls: dict[str, Callable[[], None]], repeats: int, device: torch.device,
                min_seconds: float = 1.0, max_rounds: int = 50) -> dict[str, float]:
    """Median wall time of each call, timed round-robin so that load from other processes
    on the machine falls on all of them alike: one warm-up round, then ``repeats``
    rounds, or more (up to ``max_rounds``) until the timed rounds take ``min_seconds``."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in calls}

    def one_round() -> float:
        start = time.perf_counter()
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
        return time.perf_counter() - start

    warm = one_round()
    for t in times.values():
        t.clear()
    for _ in range(max(repeats, min(max_rounds, int(min_seconds / max(warm, 1e-9))))):
        one_round()
    return {name: statistics.median(t) for name, t in times.items()}


def measure(workload, device: torch.device, k: int, op_names, repeats: int) -> list[dict]:
    """Records for every backend and operation on one workload; the roofline and the
    baselines are timed in the same rounds as the first backend."""
    dtype = workload.params[0].dtype
    most = max(suite.nbytes(op, workload.numel, dtype, dtype, k) for op in op_names)
    src = torch.ones(most // 2 // dtype.itemsize, dtype=dtype, device=device)
    dst = torch.empty_like(src)
    common = {"device": device.type, "device_name": device_name(device), "workload": workload.name,
              "param_dtype": str(dtype).removeprefix("torch."), "history_dtype": str(dtype).removeprefix("torch."),
              "numel": workload.numel, "tensors": len(workload.params), "k": k, "torch": torch.__version__,
              "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    base: dict[str, dict[str, float]] = {}
    records = []
    for backend, impls in suite.backends_here(device, dtype).items():
        setup = suite.prepare(workload, backend, k)
        for name, op in suite.operations(setup, op_names).items():
            op_impls = suite.impls_for(impls, name)
            calls = {f"lawa:{impl}": suite.plain(op.lawa) if impl == "plain" else op.lawa for impl in op_impls}
            if name not in base:
                half = op.nbytes // 2 // dtype.itemsize
                calls["roofline"] = lambda: baselines.roofline(dst[:half], src[:half])
                calls.update(op.baselines)
            t = interleaved(calls, repeats, device)
            base.setdefault(name, {b: t[b] for b in ["roofline", *op.baselines]})
            roof = op.nbytes / base[name]["roofline"] / 1e9
            for impl in op_impls:
                seconds = t[f"lawa:{impl}"]
                gbps = op.nbytes / seconds / 1e9
                records.append({**common, "op": name, "backend": backend, "impl": impl, "median_s": seconds,
                                "bytes": op.nbytes, "gbps": gbps, "roofline_gbps": roof,
                                "roofline_fraction": gbps / roof,
                                "baseline_s": {b: base[name][b] for b in op.baselines},
                                "speedup": {b: base[name][b] / seconds for b in op.baselines}})
        del setup
        gc.collect()
    return records


def memory_records(workload, k: int) -> list[dict]:
    """Bytes each approach holds beyond the model for ``k`` snapshots (float32 weights)."""
    n, p = workload.numel, workload.params[0].element_size()
    held = {"lawa": k * n * p + 4 * n, "foreach": k * n * p + 4 * n, "loop": k * n * p + 4 * n,
            "averaged_model_ema": n * p, "authors": k * n * p + n * p}
    return [{"op": "memory", "workload": workload.name, "numel": n, "tensors": len(workload.params), "k": k,
             "approach": a, "bytes": b} for a, b in held.items()]


def table(records: list[dict]) -> str:
    """A fixed-width table of the timing records."""
    head = f"{'workload':<12}{'op':<11}{'backend':<16}{'ms':>9}{'GB/s':>8}{'roof GB/s':>10}{'% roof':>8}" \
           f"{'x foreach':>10}{'x loop':>8}{'x authors':>10}"
    lines = [head, "-" * len(head)]
    for r in records:
        if r["op"] == "memory":
            continue
        sp = r["speedup"]
        cell = lambda b: f"{sp[b]:.2f}" if b in sp else "-"  # noqa: E731
        lines.append(f"{r['workload']:<12}{r['op']:<11}{r['backend'] + '/' + r['impl']:<16}"
                     f"{r['median_s'] * 1e3:>9.2f}{r['gbps']:>8.2f}{r['roofline_gbps']:>10.2f}"
                     f"{100 * r['roofline_fraction']:>7.0f}%{cell('foreach'):>10}{cell('loop'):>8}{cell('authors'):>10}")
    mem = [r for r in records if r["op"] == "memory"]
    if mem:
        lines += ["", f"extra memory held for k={mem[0]['k']} (MB):"]
        for r in mem:
            lines.append(f"  {r['workload']:<12}{r['approach']:<20}{r['bytes'] / 1e6:>10.0f}")
    return "\n".join(lines)


def plot(records: list[dict], path: Path) -> bool:
    """GB/s of the snapshot against size per backend (flat sizes as lines, model parameter
    lists as labelled points), with the roofline and the foreach push; False without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    snaps = [r for r in records if r["op"] == "snapshot"]
    by_size = lambda rs: sorted(rs, key=lambda r: r["numel"])  # noqa: E731
    flat = lambda rs: by_size(r for r in rs if r["workload"].startswith("flat"))  # noqa: E731
    model = lambda rs: by_size(r for r in rs if not r["workload"].startswith("flat"))  # noqa: E731
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in dict.fromkeys(f"{r['backend']}/{r['impl']}" for r in snaps):
        rs = [r for r in snaps if f"{r['backend']}/{r['impl']}" == label]
        line = ax.plot([r["numel"] for r in flat(rs)], [r["gbps"] for r in flat(rs)], "o-", label=f"LAWA {label}")
        ax.plot([r["numel"] for r in model(rs)], [r["gbps"] for r in model(rs)], "s", ms=8, color=line[0].get_color())
    first = list({r["workload"]: r for r in snaps}.values())
    ax.plot([r["numel"] for r in flat(first)], [r["roofline_gbps"] for r in flat(first)], "k--", label="copy roofline")
    ax.plot([r["numel"] for r in model(first)], [r["roofline_gbps"] for r in model(first)], "k_", ms=14)
    ax.plot([r["numel"] for r in by_size(first)],
            [r["bytes"] / r["baseline_s"]["foreach"] / 1e9 for r in by_size(first)], "x", color="gray",
            label="torch._foreach_* push")
    for r in model(first):
        ax.annotate(r["workload"], (r["numel"], r["roofline_gbps"]), textcoords="offset points",
                    xytext=(6, 4), fontsize=8)
    ax.set(xscale="log", xlabel="elements (float32); squares: real models' parameter lists",
           ylabel="GB/s (bytes the snapshot must move)",
           title=f"LAWA snapshot, k={snaps[0]['k']}: {snaps[0]['device_name']}")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def machine_slug(device: torch.device) -> str:
    """A file name for this machine: the device name, lower case, dashes."""
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def free_bytes(device: torch.device) -> int:
    """Memory free on ``device`` now."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def run(sizes, size_ops, models, repeats: int, k: int, device: torch.device, out: Path | None) -> list[dict]:
    """Measure, print the table, and write JSON and PNG under ``out`` (None: print only)."""
    records = []
    for numel in sizes:
        # Weights, ring, sums, backup, the mean of k copies, and the roofline's two buffers.
        need = numel * (4 + 4 * k + 20 + max(suite.nbytes(op, 1, torch.float32, torch.float32, k) for op in size_ops))
        if need > 0.8 * free_bytes(device):
            print(f"skipping {numel} elements: needs ~{need / 1e9:.1f} GB, {free_bytes(device) / 1e9:.1f} GB free")
            continue
        records += measure(flat_params(numel, torch.float32, device), device, k, size_ops, repeats)
        gc.collect()
    for name in models:
        w = model_params(name, torch.float32, device)
        records += measure(w, device, k, suite.OPS, repeats) + memory_records(w, k)
        del w
        gc.collect()
    print(table(records))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        stem = out / machine_slug(device)
        stem.with_suffix(".json").write_text(json.dumps(records, indent=1) + "\n")
        print(f"\nwrote {stem.with_suffix('.json')}")
        if plot(records, stem.with_suffix(".png")):
            print(f"wrote {stem.with_suffix('.png')}")
    return records


def main(argv: list[str] | None = None) -> None:
    """Command line: see the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--full", action="store_true", help="1M..256M elements, all operations, 7 repeats")
    ap.add_argument("--k", type=int, default=6, help="snapshots in the ring (default 6, the paper's)")
    ap.add_argument("--models", nargs="*", help="model parameter lists (default: resnet50 gpt2-small)")
    ap.add_argument("--repeats", type=int, help="timed calls per measurement (median reported)")
    ap.add_argument("--out", type=Path, default=RESULTS, help=f"output folder (default {RESULTS})")
    args = ap.parse_args(argv)
    cfg = FULL if args.full else QUICK
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run(cfg["sizes"], cfg["size_ops"], cfg["models"] if args.models is None else args.models,
        args.repeats or cfg["repeats"], args.k, device, args.out)
    if device.type == "cuda":
        from benchmarks import overlap

        overlap.main(args.out / f"{machine_slug(device)}-pinned.json")


if __name__ == "__main__":
    main()
