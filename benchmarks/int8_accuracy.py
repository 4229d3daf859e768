"""The 8-bit history's error on a synthetic random walk, against the float32 history.

    python -m benchmarks.int8_accuracy               # k=6, 1,000 snapshots, about a minute
    python -m benchmarks.int8_accuracy --size 4096 --snapshots 50 --out /tmp/acc.json

Weights of RMS 1 take a Gaussian random-walk step of ``drift`` (times their RMS) before
each snapshot, for each drift given. Two LAWAs over equal float32 weights keep the
history in float32 (``history_dtype=None``) and in 8 bits (``history_dtype=torch.int8``).
After every snapshot past the first k, the ratio ``‖avg_int8 − avg_fp32‖ / ‖avg_fp32 −
newest‖`` is measured (the 8-bit error relative to the signal the average is made of:
its distance from the newest snapshot); the requirement is at most 1 % at every one.
Writes the JSON record (default ``benchmarks/results/int8-accuracy.json``) and prints one
line per drift.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from benchmarks import RESULTS
from lawa_optim import _cli

#: The requirement: the 8-bit error at most this fraction of the signal.
BOUND = 0.01


def _drifts(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        values = []
    if not values or not all(0 < v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"must be comma-separated numbers in (0, 1), got {text!r}")
    return values


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = _cli.Parser(prog="python -m benchmarks.int8_accuracy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=_cli.int_at_least(2), default=6, help="snapshots averaged (default 6)")
    parser.add_argument("--snapshots", type=_cli.int_at_least(1), default=1000, help="snapshots per drift (default 1000)")
    parser.add_argument("--size", type=_cli.int_at_least(1), default=1 << 18, help="weights (default 262144)")
    parser.add_argument("--drifts", type=_drifts, default=[1e-4, 1e-3, 1e-2],
                        help="random-walk steps per snapshot, times the weights' RMS (default 1e-4,1e-3,1e-2)")
    parser.add_argument("--seed", type=_cli.int_at_least(0), default=0, help="random seed (default 0)")
    parser.add_argument("--out", type=_cli.output_file, default=None,
                        help="JSON file to write (default benchmarks/results/int8-accuracy.json)")
    args = parser.parse_args(argv)
    if args.snapshots <= args.k:
        parser.error(f"argument --snapshots: must exceed --k ({args.k}) to measure anything, got {args.snapshots}")
    return args


if __name__ == "__main__":  # answer a bad argument or --help before the imports below, which take seconds
    _parse(None)

import torch  # noqa: E402

from benchmarks.report import device_name  # noqa: E402
from lawa_optim import LAWA  # noqa: E402


def walk(drift: float, k: int, snapshots: int, size: int, seed: int) -> dict:
    """One drift: the ratio after every snapshot past the first ``k``, summarised."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(size, generator=g)
    fp32, int8 = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    ref = LAWA(torch.optim.SGD([fp32], lr=0.0), k=k)
    opt = LAWA(torch.optim.SGD([int8], lr=0.0), k=k, history_dtype=torch.int8)
    ratios, errors, signals = [], [], []
    for n in range(1, snapshots + 1):
        step = torch.randn(size, generator=g) * drift
        with torch.no_grad():
            fp32.add_(step)
            int8.copy_(fp32)
        ref.snapshot()
        opt.snapshot()
        if n <= k:
            continue
        newest = fp32.detach().clone()
        with ref.averaged(), opt.averaged():
            signal = float((fp32.detach().double() - newest.double()).norm())
            error = float((int8.detach().double() - fp32.detach().double()).norm())
        ratios.append(error / signal)
        errors.append(error)
        signals.append(signal)
    r = torch.tensor(ratios, dtype=torch.float64)
    return {
        "drift": drift,
        "measured": len(ratios),
        "max_ratio": float(r.max()),
        "median_ratio": float(r.median()),
        "within_bound": bool((r <= BOUND).all()),
        "median_error_norm": float(torch.tensor(errors).median()),
        "median_signal_norm": float(torch.tensor(signals).median()),
    }


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    out = args.out or RESULTS / "int8-accuracy.json"
    rows = [walk(d, args.k, args.snapshots, args.size, args.seed) for d in args.drifts]
    print(f"k={args.k}, {args.snapshots} snapshots, {args.size} weights: ‖avg_int8 − avg_fp32‖ / ‖avg_fp32 − newest‖")
    for r in rows:
        verdict = "within" if r["within_bound"] else "BEYOND"
        print(f"drift {r['drift']:g}: max {r['max_ratio']:.3%}, median {r['median_ratio']:.3%} "
              f"over {r['measured']} snapshots ({verdict} {BOUND:.0%})")
    record = {
        "k": args.k, "snapshots": args.snapshots, "size": args.size, "seed": args.seed, "bound": BOUND,
        "torch": torch.__version__, "machine": device_name(torch.device("cpu")),
        "command": "python -m benchmarks.int8_accuracy " + " ".join(sys.argv[1:] if argv is None else argv),
        "rows": rows,
    }
    Path(out).write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")
    return 0 if all(r["within_bound"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
