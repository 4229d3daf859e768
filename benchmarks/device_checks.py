"""The small programs ``benchmarks.gpu_proof`` runs in their own processes.

    python -m benchmarks.device_checks env PATH       # versions, device, tools -> JSON
    python -m benchmarks.device_checks build PATH     # build the CUDA extension, timed -> JSON
    python -m benchmarks.device_checks exercise       # every fused op once (for compute-sanitizer)
    python -m benchmarks.device_checks swap PATH      # the allocation-free swap, measured -> JSON

``exercise`` runs each operation of the LAWA history (Kaddour 2022, arXiv:2209.14981)
on every fused backend of the GPU over parameters chosen to reach the edges of the
kernels' index arithmetic: one element, sizes around the 64-element alignment and a
vector width, a view that starts 12 bytes past an aligned address, an empty parameter
between others, a ``channels_last`` weight; float32 and bfloat16; a ring partly filled,
full, and wrapped; swaps of the whole average (with a backup and in place) and of the
``last=j`` newest snapshots. ``swap`` measures what ``averaged()`` adds to the memory at
its peak (``torch.cuda.max_memory_allocated`` on a GPU, the resident memory on the CPU)
for float32 and bfloat16 parameters with float32 and bfloat16 histories on every backend
of the device, against 1 % of the parameters' bytes. Without a GPU both run the torch
backend on the CPU, so the script cannot rot.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import re
import shutil
import subprocess
import time
from pathlib import Path

from lawa_optim._cli import Parser, output_file, parse_size


def _parser() -> Parser:
    ap = Parser(prog="python -m benchmarks.device_checks", description=__doc__.split("\n")[0])
    commands = ap.add_subparsers(dest="command", required=True)
    commands.add_parser("env", help="versions, device, tools -> JSON").add_argument("path", type=output_file)
    commands.add_parser("build", help="build the CUDA extension, timed -> JSON").add_argument("path", type=output_file)
    commands.add_parser("exercise", help="every fused op once (for compute-sanitizer)")
    swap = commands.add_parser("swap", help="the allocation-free swap, measured -> JSON")
    swap.add_argument("path", type=output_file)
    swap.add_argument("--parameters", type=parse_size, default=50_000_000,
                      help="parameter elements per model (default 50M)")
    return ap


if __name__ == "__main__":  # answer a bad argument or --help before the imports below, which take seconds
    _parser().parse_args()

import torch  # noqa: E402

from benchmarks import suite  # noqa: E402
from benchmarks.report import device_name, machine_slug  # noqa: E402
from lawa_optim import ops  # noqa: E402
from lawa_optim.history import Bucket  # noqa: E402

#: (parameter dtype, history dtype) pairs exercised.
DTYPE_PAIRS = ((torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16))


def env(path: Path) -> dict:
    """Versions, the device and the tools the proof needs, written to ``path``."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        triton_version = importlib.metadata.version("triton")  # without importing it: seconds
    except importlib.metadata.PackageNotFoundError:
        triton_version = None
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": triton_version, "device": device.type, "device_name": device_name(device),
            "slug": machine_slug(device),
            "tools": {t: shutil.which(t) for t in ("nvcc", "ninja", "compute-sanitizer", "nvidia-smi")}}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1))
    if info["tools"]["nvidia-smi"]:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem",
                               "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        info["nvidia_smi"] = done.stdout.strip() or done.stderr.strip()
    path.write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps(info, indent=1))
    return info


def build(path: Path) -> dict:
    """Build (or load) the CUDA extension, timed, and count the Triton kernels' global
    accesses for this GPU; written to ``path``. Exits 1 when the extension fails."""
    from lawa_optim.backends import cuda

    t0 = time.perf_counter()
    error = cuda.extension_error()
    major, minor = torch.cuda.get_device_capability()
    result = {"seconds": time.perf_counter() - t0, "error": error,
              "build_dir": None if error else str(cuda.build_dir()),
              "triton_global_accesses": triton_accesses(10 * major + minor)}
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    if error is not None:
        raise SystemExit(1)
    return result


def triton_accesses(arch: int) -> dict[str, dict[str, int]] | str:
    """Global loads and stores, and how many of them are 128 bits wide, in the PTX of each
    Triton kernel variant for ``arch`` (from ``lawa_optim.backends.triton.compile_ptx``):
    beside the measured Triton figures, it says whether a miss of the roofline comes from
    narrow accesses (issue 12, section 1). A string says why there are no counts."""
    try:
        from lawa_optim.backends import triton as backend

        compile_ptx = backend.compile_ptx
    except (ImportError, AttributeError) as exc:
        return f"no compile_ptx in this version ({type(exc).__name__}: {exc})"
    counts = {}
    for name, ptx in compile_ptx(arch).items():
        counts[name] = {f"{op}{width}": len(re.findall(rf"\b{op}\.global[^\s;]*{re.escape(width)}\b", ptx))
                        for op in ("ld", "st") for width in ("", ".v4")}
    return counts


def awkward_params(device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
    """Parameters that reach the edges of the kernels' index arithmetic (module docstring)."""
    g = torch.Generator().manual_seed(0)
    storage = torch.randn(3 + 4097, generator=g).to(device, dtype)
    conv = torch.randn(8, 5, 3, 3, generator=g).to(device, dtype).contiguous(memory_format=torch.channels_last)
    sizes = (1, 63, 64, 65, 1023, 1025, 3 * 8192 + 5)
    return [storage[3:], torch.empty(0, device=device, dtype=dtype), conv,
            *(torch.randn(n, generator=g).to(device, dtype) for n in sizes)]


def exercise(device: torch.device, backends: list[str], k: int = 3) -> int:
    """Run every operation of every backend in ``backends``; return the number of buckets."""
    buckets = 0
    for backend in backends:
        for pdtype, hdtype in DTYPE_PAIRS:
            params = awkward_params(device, pdtype)
            b = Bucket(params, k, "uniform", hdtype, "device", backend)
            for n in range(2 * k + 1):  # partial, full, then wrapped
                for p in params:
                    p.add_(1.0)
                ops.push(b)
                if n in (0, k - 1, 2 * k):
                    for last in (None, 1, min(n + 1, k)):
                        _swap_and_back(b, last)
                    if ops.exchanges(b):
                        _swap_and_back(b, None, in_place=True)
            ops.recompute(b)
            e = Bucket(params, k, "ema", None, "device", backend)
            for _ in range(3):
                ops.ema_update(e, 0.9)
            _swap_and_back(e, None)
            if ops.exchanges(e):
                _swap_and_back(e, None, in_place=True)
            buckets += 2
    if device.type == "cuda":
        torch.cuda.synchronize()
    return buckets


def _swap_and_back(b: Bucket, last: int | None, in_place: bool = False) -> None:
    weights, mean = [p.clone() for p in b.params], b.total.clone()
    b.backup = None if in_place else torch.empty(b.D, dtype=b.dtype, device=b.device)
    ops.swap_in(b, last)
    ops.swap_back(b)
    b.backup = None
    same = all(torch.equal(p, w) for p, w in zip(b.params, weights)) and torch.equal(b.total, mean)
    if not same:
        raise RuntimeError(f"{b.backend}: swap_back(last={last}{', in place' if in_place else ''}) did not "
                           "restore the weights and the mean bit for bit")


def _peak_added(device: torch.device, body) -> int:
    """Bytes ``body()`` adds at its peak: allocated CUDA memory on a GPU, resident memory
    (``VmHWM``, reset just before) on the CPU."""
    from benchmarks.memory import _reset_peak, _status

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        body()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(device) - before
    before = _status("VmRSS")
    _reset_peak()
    body()
    return _status("VmHWM") - before


def swap_memory(path: Path, device: torch.device, backends: list[str], parameters: int) -> list[dict]:
    """For every backend in ``backends`` and (parameter, history) dtype pair of float32 and
    bfloat16: ``parameters`` elements in 8 tensors, 3 snapshots (k = 2), then what
    ``averaged()`` adds at its peak against 1 % of the parameters' bytes, and whether the
    weights and the running mean came back bit for bit; rows written to ``path``. A row
    passes when both hold. One ``averaged()`` of a small model with the same dtypes runs
    first: what is measured is the swap, not the first use of a kernel's code."""
    from lawa_optim import LAWA

    rows = []
    for backend in backends:
        for pdtype in (torch.float32, torch.bfloat16):
            for hdtype in (torch.float32, torch.bfloat16):
                for size in (64, parameters // 8):
                    g = torch.Generator().manual_seed(0)
                    params = [torch.nn.Parameter(torch.randn(size, generator=g).to(device, pdtype)) for _ in range(8)]
                    opt = LAWA(torch.optim.SGD(params, lr=0.1), k=2, history_dtype=hdtype, backend=backend)
                    for _ in range(3):
                        with torch.no_grad():
                            torch._foreach_add_(params, 0.01)
                        opt.snapshot()
                    weights, means = [p.detach().clone() for p in params], [b.total.clone() for b in opt._history.buckets]

                    def body(opt: LAWA = opt) -> None:
                        with opt.averaged():
                            pass

                    added = _peak_added(device, body)
                restored = all(torch.equal(p, w) for p, w in zip(params, weights)) and all(
                    torch.equal(b.total, m) for b, m in zip(opt._history.buckets, means))
                param_bytes = sum(p.nbytes for p in params)
                ok = restored and added <= 0.01 * param_bytes
                rows.append({"backend": backend, "param_dtype": str(pdtype).removeprefix("torch."),
                             "history_dtype": str(hdtype).removeprefix("torch."), "parameters": 8 * size,
                             "param_bytes": param_bytes, "added_bytes": added, "limit_bytes": int(0.01 * param_bytes),
                             "restored": restored, "status": "pass" if ok else "fail"})
                del opt, params, weights, means
    path.write_text(json.dumps({"device": device_name(device), "rows": rows}, indent=1) + "\n")
    for r in rows:
        print(f"{r['backend']:7} {r['param_dtype']:9} {r['history_dtype']:9} {r['parameters']:>11,} params: "
              f"averaged() adds {r['added_bytes']:>10,} B (limit {r['limit_bytes']:,}), restored "
              f"{r['restored']}: {r['status']}")
    return rows


def main(argv: list[str] | None = None) -> None:
    """Command line: see the module docstring."""
    args = _parser().parse_args(argv)
    if args.command == "env":
        env(args.path)
    elif args.command == "build":
        build(args.path)
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        here = suite.backends_here(device, torch.float32)[0]
        backends = [name for name in here if device.type == "cpu" or name != "torch"]  # the fused ones on a GPU
        if args.command == "swap":
            rows = swap_memory(args.path, device, backends, args.parameters)
            if any(r["status"] != "pass" for r in rows):
                raise SystemExit(1)
            return
        print(f"exercised {exercise(device, backends)} buckets on {device_name(device)} with {backends}")


if __name__ == "__main__":
    main()
