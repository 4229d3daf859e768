"""Measure the memory of weight averaging on GPT-2 small: this library's histories beside
``torch.optim.swa_utils.AveragedModel`` and Lightning's ``EMAWeightAveraging``.

    python -m benchmarks.memory                  # about a minute on 2 CPU cores
    python -m benchmarks.memory --k 10 --out /tmp/memory.json

Each method runs in a fresh process on float32 GPT-2 small (124.4M parameters, random
weights, on the CPU). Two figures are measured from the process's resident memory
(``/proc/self/status``), not computed: what the method holds after its first update
(``VmRSS`` after minus before), and the most it adds while the average is swapped in
for evaluation (the peak ``VmHWM``, reset just before, minus ``VmRSS`` before). The
library's own account, :meth:`lawa_optim.LAWA.memory`, is printed beside its rows.
Linux only (``/proc``).
"""

from __future__ import annotations

import concurrent.futures
import gc
import json
import multiprocessing
import re
import sys
from pathlib import Path

from benchmarks import RESULTS, targets
from lawa_optim import _cli


def _parser() -> _cli.Parser:
    parser = _cli.Parser(prog="python -m benchmarks.memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gpt2-small", choices=sorted(targets.MODELS), help="parameter list (default gpt2-small)")
    parser.add_argument("--k", type=_cli.int_at_least(1), default=6, help="snapshots averaged (default 6)")
    parser.add_argument("--out", type=_cli.output_file, default=None,
                        help="JSON file to write (default benchmarks/results/memory-<model>.json)")
    return parser


if __name__ == "__main__":  # answer a bad argument or --help before the imports below, which take seconds
    _parser().parse_args()

import torch  # noqa: E402

from benchmarks.report import device_name  # noqa: E402
from benchmarks.workloads import MODELS  # noqa: E402

#: What each row measures, by name: (kind, options, swap options).
METHODS = {
    "LAWA k, float32 history": ("lawa", {}, {}),
    "LAWA k, bfloat16 history": ("lawa", {"history_dtype": torch.bfloat16}, {}),
    "LAWA k, float32 history, backup='device'": ("lawa", {}, {"backup": "device"}),
    "LAWA mode='ema'": ("lawa", {"mode": "ema"}, {}),
    "swa_utils.AveragedModel (EMA)": ("averaged_model", {}, {}),
    "Lightning EMAWeightAveraging": ("lightning", {}, {}),
}


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current VmRSS (Linux >= 4.0)


def _model(name: str) -> torch.nn.Module:
    with torch.device("meta"):
        model = MODELS[name]()
    model = model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.detach().normal_(generator=g)
    return model


def measure(method: str, model_name: str, k: int) -> dict:
    """One row, in the calling process (run it in a fresh one)."""
    torch.set_num_threads(1)
    kind, options, swap = METHODS[method]
    # Every import before the first reading: a framework's import is not its average.
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import EMAWeightAveraging
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from lawa_optim import LAWA

    class Module(pl.LightningModule):
        def __init__(self, net: torch.nn.Module) -> None:
            super().__init__()
            self.net = net

    model = _model(model_name)
    params = sum(p.numel() for p in model.parameters())
    gc.collect()
    before = _status("VmRSS")
    row: dict = {"method": method, "parameters": params}
    if kind == "lawa":
        opt = LAWA(torch.optim.SGD(model.parameters(), lr=0.1), k=k, **options)
        opt.snapshot()
        row["memory()"] = str(opt.memory())
        row["memory_total"] = opt.memory().total
        swap_in, swap_out = (lambda: opt.swap_to_average(**swap)), opt.swap_back
    elif kind == "averaged_model":
        averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.999))
        averaged.update_parameters(model)
        swap_in = swap_out = None  # one evaluates the copy: nothing is swapped
    else:
        module = Module(model)
        callback = EMAWeightAveraging()
        callback.setup(None, module, "fit")  # creates its AveragedModel, as fit() does
        callback._average_model.update_parameters(module)
        swap_in = swap_out = lambda: callback._swap_models(module)  # noqa: E731 (its eval swap)
    gc.collect()
    held = _status("VmRSS")
    row["held_bytes"] = held - before
    if swap_in is not None:
        _reset_peak()
        swap_in()
        swap_out()
        row["swap_peak_bytes"] = _status("VmHWM") - held
    return row


def averaged_peak(dtype: torch.dtype, history_dtype: torch.dtype | None, parameters: int = 50_000_000,
                  k: int = 2, **swap: object) -> dict:
    """What ``with opt.averaged(**swap):`` adds to the resident memory of the calling
    process (run it in a fresh one) at its peak, over ``parameters`` elements of ``dtype``
    in 8 tensors, with ``k`` snapshots of ``history_dtype`` held: ``VmHWM`` (reset just
    before) minus ``VmRSS`` before, beside the parameters' bytes."""
    torch.set_num_threads(1)
    from lawa_optim import LAWA

    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(parameters // 8, generator=g).to(dtype)) for _ in range(8)]
    opt = LAWA(torch.optim.SGD(params, lr=0.1), k=k, history_dtype=history_dtype)
    for _ in range(k + 1):
        with torch.no_grad():
            for p in params:
                p.add_(0.01)
        opt.snapshot()
    gc.collect()
    before = _status("VmRSS")
    _reset_peak()
    with opt.averaged(**swap):
        inside = opt.memory()
    return {"parameters": sum(p.numel() for p in params), "param_bytes": sum(p.nbytes for p in params),
            "before": before, "peak_added": _status("VmHWM") - before, "backup": inside.backup}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not Path("/proc/self/clear_refs").exists():
        parser.error("needs Linux's /proc/self/status and /proc/self/clear_refs to read resident memory")
    out = args.out or RESULTS / f"memory-{args.model}.json"

    rows = []
    spawn = multiprocessing.get_context("spawn")
    for method in METHODS:
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
            rows.append(pool.submit(measure, method, args.model, args.k).result())
    name = f"{args.model}, float32, k={args.k}"
    print(f"{'method':42} {'held':>10} {'B/param':>8} {'swap adds':>10}   ({name}; resident memory, measured)")
    for r in rows:
        method = r["method"].replace("LAWA k", f"LAWA k={args.k}")
        peak = r.get("swap_peak_bytes")
        swap = f"{peak / 1e6:8.0f} MB" if peak is not None else "    (none)"
        print(f"{method:42} {r['held_bytes'] / 1e6:7.0f} MB {r['held_bytes'] / r['parameters']:8.2f} {swap}")
        if "memory()" in r:
            print(f"{'':42} memory(): {r['memory()']}")
    torch.set_num_threads(1)  # as in the measuring processes
    record = {"model": args.model, "dtype": "float32", "k": args.k, "torch": torch.__version__,
              "machine": device_name(torch.device("cpu")),
              "command": "python -m benchmarks.memory " + " ".join(sys.argv[1:] if argv is None else argv),
              "rows": rows}
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
