"""Time the LAWA history (Kaddour 2022, arXiv:2209.14981) against its baselines.

    python benchmarks/report.py            # quick set: under 2 minutes on 2 idle CPU cores
    OMP_NUM_THREADS=1 python benchmarks/report.py     # the same on 1 thread: about 3 minutes
    python benchmarks/report.py --full     # 1M..256M elements (as memory allows), all ops
    python benchmarks/report.py --full --sizes 64M 256M --dtypes float32 bfloat16

For every backend that can run here, each operation is timed beside, in the same
run and on the same tensors, a plain copy of the bytes it must move (the roofline)
and the baselines of :mod:`benchmarks.baselines`; a snapshot is timed as k in a row
(:mod:`benchmarks.suite`). Prints a table and the targets of
:mod:`benchmarks.targets`, writes one JSON record per measurement to
``benchmarks/results/<machine>.json`` (after every workload, so an interrupted run
keeps what it measured) and, with matplotlib, a plot to ``<machine>.png``.
"""

from __future__ import annotations

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

from benchmarks import RESULTS, targets  # noqa: E402
from lawa_optim._cli import Parser, int_at_least, output_dir, parse_size, positive_float  # noqa: E402

#: The dtypes ``--dtypes`` accepts, by their torch names.
DTYPE_NAMES = ("float32", "bfloat16", "float16")


def _parser() -> Parser:
    ap = Parser(prog="python benchmarks/report.py", description=__doc__.split("\n")[0])
    ap.add_argument("--full", action="store_true", help="1M..256M elements, all operations, 7 repeats")
    ap.add_argument("--sizes", nargs="*", type=parse_size, help="flat sizes in elements, e.g. 64M (default: by --full)")
    ap.add_argument("--dtypes", nargs="+", choices=sorted(DTYPE_NAMES), default=["float32"],
                    help="dtypes of the flat sizes (weights and history; default float32)")
    ap.add_argument("--k", type=int_at_least(1), default=6, help="snapshots in the ring (default 6, the paper's)")
    ap.add_argument("--models", nargs="*", choices=sorted(targets.MODELS),
                    help="model parameter lists (default: resnet50 gpt2-small)")
    ap.add_argument("--repeats", type=int_at_least(1), help="least timed rounds per measurement (median reported)")
    ap.add_argument("--seconds", type=positive_float, default=1.0, help="least seconds of timed rounds per measurement")
    ap.add_argument("--out", type=output_dir, default=RESULTS, help=f"output folder (default {RESULTS})")
    return ap


if __name__ == "__main__":  # answer a bad argument or --help before the imports below, which take seconds
    _parser().parse_args()

import torch  # noqa: E402

from benchmarks import suite  # noqa: E402
from benchmarks.plot import plot  # noqa: E402
from benchmarks.workloads import flat_params, model_params  # noqa: E402
from lawa_optim.demo import source_version  # noqa: E402

QUICK = {"sizes": [1 << 20, 1 << 22, 1 << 24, 1 << 26], "size_ops": ("snapshot",),
         "models": ["resnet50", "gpt2-small"], "repeats": 5}
FULL = {"sizes": [1 << s for s in range(20, 29, 2)], "size_ops": suite.OPS,
        "models": ["resnet50", "gpt2-small"], "repeats": 7}
#: Environment variables that set the threads the timed operations use.
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


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


def dtype_name(dtype: torch.dtype) -> str:
    """``float32`` for ``torch.float32``."""
    return str(dtype).removeprefix("torch.")


def machine_slug(device: torch.device) -> str:
    """A file name for this machine: the device name, lower case, dashes."""
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def interleaved(calls: dict[str, Callable[[], None]], repeats: int, device: torch.device,
                min_seconds: float = 1.0, max_rounds: int = 50) -> dict[str, list[float]]:
    """Wall times of each call, one per round, timed round-robin so that load from other
    processes on the machine falls on all of them alike: one warm-up round (compilation,
    caches), then rounds until there are ``repeats`` and they took ``min_seconds``, or
    ``max_rounds`` of them."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in calls}

    def one_round() -> None:
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)

    one_round()
    for t in times.values():
        t.clear()
    start = time.perf_counter()
    for rounds in range(1, max(max_rounds, repeats) + 1):
        one_round()
        if rounds >= repeats and time.perf_counter() - start >= min_seconds:
            break
    return times


def ratios(base: list[float], lawa: list[float], same_rounds: bool) -> dict[str, float]:
    """How many times faster ``lawa`` is than ``base``: timed in the same rounds, the
    median and range of the per-round ratios; timed in rounds of their own, the ratio of
    the medians and the widest range the times allow."""
    if same_rounds:
        r = [b / t for b, t in zip(base, lawa)]
        return {"median": statistics.median(r), "min": min(r), "max": max(r)}
    return {"median": statistics.median(base) / statistics.median(lawa), "min": min(base) / max(lawa),
            "max": max(base) / min(lawa)}


def measure(workload, device: torch.device, k: int, op_names, repeats: int, min_seconds: float) -> list[dict]:
    """Records for every backend and operation on one workload; the roofline and the
    baselines are timed in the same rounds as the first backend. Times are per
    operation: a row of ``calls`` operations, divided by ``calls``. Each speed-up is the
    median of the per-round ratios, with their range under ``speedup_range``."""
    dtype = workload.params[0].dtype
    most = max(suite.nbytes(op, workload.numel, dtype, dtype, k) for op in op_names)
    src = torch.ones(most // 2 // dtype.itemsize, dtype=dtype, device=device)
    dst = torch.empty_like(src)
    common = {"device": device.type, "device_name": device_name(device), "workload": workload.name,
              "param_dtype": dtype_name(dtype), "history_dtype": dtype_name(dtype), "numel": workload.numel,
              "tensors": len(workload.params), "k": k, "torch": torch.__version__,
              "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    base: dict[str, dict[str, list[float]]] = {}
    records = []
    for backend, impls in suite.backends_here(device, dtype)[0].items():
        setup = suite.prepare(workload, backend, k)
        for name, op in suite.operations(setup, op_names).items():
            calls = {f"lawa:{impl}": suite.plain(op.lawa) if impl == "plain" else op.lawa for impl in impls}
            if name not in base:
                calls["roofline"] = suite.roofline(op, dst, src)
                calls.update(op.baselines)
            t = {key: [s / op.calls for s in times] for key, times in interleaved(calls, repeats, device, min_seconds).items()}
            same_rounds = name not in base
            base.setdefault(name, {b: t[b] for b in ["roofline", *op.baselines]})
            roof = op.nbytes / statistics.median(base[name]["roofline"]) / 1e9
            for impl in impls:
                seconds = statistics.median(t[f"lawa:{impl}"])
                gbps = op.nbytes / seconds / 1e9
                speed = {b: ratios(base[name][b], t[f"lawa:{impl}"], same_rounds) for b in op.baselines}
                records.append({**common, "op": name, "backend": backend, "impl": impl, "calls": op.calls,
                                "median_s": seconds, "bytes": op.nbytes, "gbps": gbps, "roofline_gbps": roof,
                                "roofline_fraction": gbps / roof,
                                "baseline_s": {b: statistics.median(base[name][b]) for b in op.baselines},
                                "speedup": {b: v["median"] for b, v in speed.items()},
                                "speedup_range": {b: [v["min"], v["max"]] for b, v in speed.items()},
                                "rounds": len(t[f"lawa:{impl}"]), "same_rounds_as_baselines": same_rounds})
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
    """A fixed-width table of the timing records: each speed-up as the median of the
    per-round ratios and their range, after the machine and its load."""
    head = f"{'workload':<12}{'dtype':<10}{'op':<11}{'backend':<16}{'ms':>9}{'GB/s':>8}{'roof GB/s':>10}" \
           f"{'% roof':>8}{'x foreach [range]':>20}{'x loop [range]':>20}{'x authors [range]':>20}"
    lines = [run_line(r) for r in records if r["op"] == "run"] + [head, "-" * len(head)]
    for r in records:
        if "median_s" not in r:
            continue
        sp, rng = r["speedup"], r.get("speedup_range", {})
        cell = lambda b: (f"{sp[b]:.2f} [{rng[b][0]:.2f}-{rng[b][1]:.2f}]" if b in rng  # noqa: E731
                          else f"{sp[b]:.2f}" if b in sp else "-")
        lines.append(f"{r['workload']:<12}{r['param_dtype']:<10}{r['op']:<11}{r['backend'] + '/' + r['impl']:<16}"
                     f"{r['median_s'] * 1e3:>9.2f}{r['gbps']:>8.2f}{r['roofline_gbps']:>10.2f}"
                     f"{100 * r['roofline_fraction']:>7.0f}%"
                     f"{cell('foreach'):>20}{cell('loop'):>20}{cell('authors'):>20}")
    mem = [r for r in records if r["op"] == "memory"]
    if mem:
        lines += ["", f"extra memory held for k={mem[0]['k']} (MB):"]
        for r in mem:
            lines.append(f"  {r['workload']:<12}{r['approach']:<20}{r['bytes'] / 1e6:>10.0f}")
    return "\n".join(lines)


def run_line(r: dict) -> str:
    """The machine, its load and the code of a run record, in one paragraph."""
    rounds = r.get("rounds", [])
    return (f"{r['command']}\ncode: {r['code']['text']}\n{r['device_name']}, {r['cpu_count']} CPUs; load average "
            f"(1, 5, 15 min) before {'/'.join(f'{x:.2f}' for x in r['load_before'])}, after "
            f"{'/'.join(f'{x:.2f}' for x in r['load_after'])}; each ratio: median [range] of the per-round ratios"
            + (f" over {', '.join(map(str, rounds))} interleaved rounds" if rounds else "") + "\n")


def run_record(device: torch.device, command: str) -> dict:
    """What a run's numbers depend on besides the code under test: the machine, its load
    (updated as the run goes on), the command and the commit."""
    return {"op": "run", "device": device.type, "device_name": device_name(device), "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__,
            "command": command, "code": source_version(), "load_before": list(os.getloadavg()),
            "load_after": list(os.getloadavg())}


def free_bytes(device: torch.device) -> int:
    """Memory free on ``device`` now (on a GPU, after handing cached blocks back)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def run(sizes, size_ops, models, repeats: int, k: int, device: torch.device, out: Path | None,
        dtypes=(torch.float32,), min_seconds: float = 1.0, command: str = "") -> list[dict]:
    """Measure flat ``sizes`` in each of ``dtypes`` (operations ``size_ops``) and the float32
    parameter lists of ``models`` (every operation); print the table and the targets;
    write JSON and PNG under ``out`` (None: print only). The first record describes the
    run (:func:`run_record`, with ``command``)."""
    path = None if out is None else out / f"{machine_slug(device)}.json"
    info = run_record(device, command)
    records = [info]
    records += [{"op": "unavailable", "device": device.type, "backend": name, "param_dtype": dtype_name(d),
                "reason": why}
               for d in dtypes for name, why in suite.backends_here(device, d)[1].items()]
    for r in records[1:]:
        print(f"not timed: the {r['backend']} backend with {r['param_dtype']}: {r['reason']}")
    workloads = [(lambda n=n, d=d: flat_params(n, d, device), n, d, size_ops) for n in sizes for d in dtypes]
    workloads += [(lambda m=m: model_params(m, torch.float32, device), None, torch.float32, suite.OPS)
                  for m in models]
    if path is not None:
        out.mkdir(parents=True, exist_ok=True)
    for build, numel, dtype, op_names in workloads:
        if numel is not None:
            # Weights, ring, sums, backup, the mean of k copies, and the roofline's two buffers.
            most = max(suite.nbytes(op, 1, dtype, dtype, k) for op in op_names)
            need = numel * (dtype.itemsize * (k + 3) + 12 + most)
            free = free_bytes(device)
            if need > 0.8 * free:
                print(f"skipping {numel} elements of {dtype}: needs ~{need / 1e9:.1f} GB, {free / 1e9:.1f} GB free")
                continue
        t0 = time.perf_counter()
        w = build()
        records += measure(w, device, k, op_names, repeats, min_seconds)
        if numel is None:
            records += memory_records(w, k)
        info["load_after"] = list(os.getloadavg())
        info["rounds"] = sorted({r["rounds"] for r in records if "median_s" in r})
        print(f"measured {w.name} {dtype_name(dtype)} in {time.perf_counter() - t0:.0f} s", flush=True)
        del w
        gc.collect()
        if path is not None:
            path.write_text(json.dumps(records, indent=1) + "\n")
    print(table(records))
    print(f"\ntargets on {device.type} (ratios measured in this run):")
    print(targets.table(targets.evaluate(targets.TARGETS[device.type], records)))
    if path is not None:
        print(f"\nwrote {path}")
        if plot(records, path.with_suffix(".png")):
            print(f"wrote {path.with_suffix('.png')}")
    return records


def main(argv: list[str] | None = None) -> list[dict]:
    """Command line: see the module docstring."""
    args = _parser().parse_args(argv)
    cfg = FULL if args.full else QUICK
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = [f"{k}={os.environ[k]}" for k in THREAD_ENV if k in os.environ]
    command = " ".join([*env, "python benchmarks/report.py", *(sys.argv[1:] if argv is None else argv)])
    return run(cfg["sizes"] if args.sizes is None else args.sizes, cfg["size_ops"],
               cfg["models"] if args.models is None else args.models, args.repeats or cfg["repeats"], args.k,
               device, args.out, [DTYPES[d] for d in args.dtypes], args.seconds, command)


if __name__ == "__main__":
    main()
