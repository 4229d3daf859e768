"""The 8-bit history's snapshot on the CPU beside the bfloat16 ring's, in one run.

    python -m benchmarks.int8_push                   # GPT-2 small, k=6: about a minute
    python -m benchmarks.int8_push --model resnet50 --repeats 5 --out /tmp/push.json
    python -m benchmarks.int8_push --device cuda --out DIR/int8-push.json   # on a GPU (CUDA, else Triton)

Float32 parameters of the model (random weights), two histories over them with k
snapshots already taken: ``history_dtype=torch.bfloat16`` (the raw ring, its running sum
refreshed every k pushes) and ``history_dtype=torch.int8``. One repetition times k pushes
in a row of each (a ring's cost includes its refresh), the two interleaved, alternating
which goes first, so a busy machine slows both alike; the median and the range over the
repetitions are reported, and ``int8 / bfloat16``, the median of the per-repetition
ratios of the push times. The requirement: the 8-bit push takes at most 1.25 times the
bfloat16 push's time (at least 0.8 times its speed). Writes the JSON record (default
``benchmarks/results/int8-push-<model>.json``).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

from benchmarks import RESULTS, targets
from lawa_optim import _cli

#: The requirement: the 8-bit push at least this fraction of the bfloat16 push's speed.
SPEED = 0.8


def _parser() -> _cli.Parser:
    parser = _cli.Parser(prog="python -m benchmarks.int8_push", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gpt2-small", choices=sorted(targets.MODELS),
                        help="parameter list (default gpt2-small)")
    parser.add_argument("--k", type=_cli.int_at_least(2), default=6, help="snapshots averaged (default 6)")
    parser.add_argument("--repeats", type=_cli.int_at_least(1), default=9, help="interleaved repetitions (default 9)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the weights live (default cpu)")
    parser.add_argument("--out", type=_cli.output_file, default=None,
                        help="JSON file to write (default benchmarks/results/int8-push-<model>.json)")
    return parser


if __name__ == "__main__":  # answer a bad argument or --help before the imports below, which take seconds
    _parser().parse_args()

import torch  # noqa: E402

from benchmarks.report import run_record  # noqa: E402
from benchmarks.suite import in_a_row  # noqa: E402
from benchmarks.workloads import model_params  # noqa: E402
from lawa_optim import ops  # noqa: E402
from lawa_optim.backends import cpu_kernels  # noqa: E402
from lawa_optim.history import Bucket  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model: str, k: int, repeats: int, device: torch.device | None = None) -> dict:
    """Per-repetition times of k pushes in a row, for both histories (on the CPU, the
    default, the fused C kernels; on a GPU the backend ``auto`` picks)."""
    device = device or torch.device("cpu")
    w = model_params(model, torch.float32, device)
    backend = "torch" if device.type == "cpu" else "auto"
    buckets = {name: Bucket(w.params, k, "uniform", dtype, "device", backend)
               for name, dtype in (("bfloat16", torch.bfloat16), ("int8", torch.int8))}
    calls = {name: in_a_row(lambda i, b=b: ops.push(b), k) for name, b in buckets.items()}
    for call in calls.values():  # fill the rings, build the work tables, compile
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for r in range(repeats):
        for name in (list(calls) if r % 2 == 0 else list(calls)[::-1]):
            _sync(device)
            start = time.perf_counter()
            calls[name]()
            _sync(device)
            times[name].append((time.perf_counter() - start) / k)
    ratios = [a / b for a, b in zip(times["int8"], times["bfloat16"])]
    return {
        "model": model, "numel": w.numel, "k": k, "repeats": repeats,
        "backends": {name: b.backend for name, b in buckets.items()},
        "push_seconds": {name: {"median": statistics.median(t), "min": min(t), "max": max(t), "all": t}
                         for name, t in times.items()},
        "int8_over_bfloat16": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)},
        "bytes_per_element": {"bfloat16": 4 + 2 * 2 + 2 * 4, "int8": 4 + 2 * 4 + 1 + 8 / 256},
    }


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: cuda is not available here")
    if device.type == "cpu" and cpu_kernels.library() is None:
        parser.error("the fused CPU kernels cannot be built here: nothing to compare")
    out = args.out or RESULTS / f"int8-push-{args.model}.json"
    run = run_record(device, "python -m benchmarks.int8_push " + " ".join(sys.argv[1:] if argv is None else argv))
    record = measure(args.model, args.k, args.repeats, device)
    run["load_after"] = list(os.getloadavg())
    record.update(machine=run["device_name"], torch=torch.__version__, command=run["command"], run=run)
    for name, t in record["push_seconds"].items():
        print(f"{name:9} push: median {t['median'] * 1e3:8.2f} ms (range {t['min'] * 1e3:.2f}-{t['max'] * 1e3:.2f}), "
              f"{record['bytes_per_element'][name]:.2f} B/element")
    ratio = record["int8_over_bfloat16"]
    speed = 1 / ratio["median"]
    print(f"int8 / bfloat16 push time: median {ratio['median']:.3f} (range {ratio['min']:.3f}-{ratio['max']:.3f}); "
          f"speed {speed:.2f}x the bfloat16 ring's ({'meets' if speed >= SPEED else 'BELOW'} {SPEED}x) "
          f"on {record['machine']}, {args.model} ({record['numel']:,} elements), k={args.k}")
    Path(out).write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
