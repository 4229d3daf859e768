"""The 8-bit history against the float32 history on Fashion-MNIST, paired over seeds.

    python -m examples.int8_history                # 10 seeds x 30 epochs, cosine schedule (~5 minutes)
    python -m examples.int8_history --fast --out /tmp/int8

Each seed (its split, initialisation and batch order, as ``examples/lawa_runs.py`` draws
them for ``examples/lawa_experiment.py``) trains the experiment's cosine run once. Two
LAWAs (k = 6) over the same SGD take the same end-of-epoch snapshots, one keeping them
in float32 and one in 8 bits (``history_dtype=torch.int8``), so the two averages differ
by the history format alone. After every epoch each average is evaluated on the seed's
validation images after a BatchNorm refresh, as the experiment evaluates LAWA. Reported
per epoch: the relative difference of the validation loss, (int8 − float32) / float32,
its mean over the seeds with a 95 % Student-t interval (:mod:`lawa_optim.paired`), and
the largest |difference| of any seed; the requirement is within 0.1 %. Writes
``int8_history.json`` and ``int8_history.txt`` to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import sys
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path

from examples import fashion_mnist
from examples.lawa_sizes import FAST, FULL, add_run_arguments
from lawa_optim._cli import Parser, output_dir

DEFAULT_OUT = "examples/results"
#: The requirement: the 8-bit history's LAWA validation loss within this fraction of the float32 one's.
BOUND = 0.001
K = 6
#: The experiment's sizes, with the 10 seeds the requirement names.
CONFIG = dataclasses.replace(FULL, seeds=10)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = Parser(prog="python -m examples.int8_history", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=output_dir, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT}/)")
    fashion_mnist.add_data_dir(p)
    add_run_arguments(p)
    args = p.parse_args(argv)
    fashion_mnist.require(p, args.data_dir)
    return args


if __name__ == "__main__":  # answer a bad argument or --help before the imports below, which take seconds
    _parse(None)

import torch  # noqa: E402

from examples import lawa_runs as runs  # noqa: E402
from lawa_optim import LAWA  # noqa: E402
from lawa_optim.paired import paired  # noqa: E402


def run_seed(seed: int, cfg: runs.Config, data_dir: str | None) -> dict:
    """One seed's cosine run: validation loss and accuracy of both averages per epoch."""
    torch.set_num_threads(1)
    s = runs.Seed(seed, runs.load_split(data_dir, cfg, seed), cfg)
    model, gen = s._start()
    opt = runs.sgd(model)
    fp32 = LAWA(opt, k=K)
    int8 = LAWA(opt, k=K, history_dtype=torch.int8)  # a second view of the same SGD
    sched = runs.schedule(fp32, "cosine", cfg.epochs)
    out: dict = {"seed": seed, "fp32": {"loss": [], "acc": []}, "int8": {"loss": [], "acc": []}}
    for _ in range(cfg.epochs):
        s._train(model, fp32, gen)
        fp32.snapshot()
        int8.snapshot()
        sched.step()
        for name, lawa in (("fp32", fp32), ("int8", int8)):
            with lawa.averaged():
                loss, acc = s._refreshed_eval(model)
            out[name]["loss"].append(loss)
            out[name]["acc"].append(acc)
    return out


def summarise(results: Sequence[dict]) -> list[dict]:
    """Per epoch: the paired relative loss difference and the accuracy difference."""
    rows = []
    for e in range(len(results[0]["fp32"]["loss"])):
        rel = [(r["int8"]["loss"][e] - r["fp32"]["loss"][e]) / r["fp32"]["loss"][e] for r in results]
        p = paired(rel, [0.0] * len(rel))
        acc = paired([r["int8"]["acc"][e] for r in results], [r["fp32"]["acc"][e] for r in results])
        rows.append({"epoch": e + 1, "relative_loss": p.__dict__, "max_abs_relative_loss": max(map(abs, rel)),
                     "within": -BOUND <= p.lo and p.hi <= BOUND, "acc": acc.__dict__})
    return rows


def main(argv: Sequence[str] | None = None) -> dict:
    """Run every seed, print the per-epoch summary, write JSON and text to ``--out``."""
    args = _parse(argv)
    cfg = FAST if args.fast else CONFIG
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    work = partial(run_seed, cfg=cfg, data_dir=args.data_dir)
    if args.jobs == 1:
        results = [work(seed) for seed in range(cfg.seeds)]
    else:
        with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
            results = pool.map(work, range(cfg.seeds), chunksize=1)
    seconds = time.perf_counter() - t0
    rows = summarise(results)
    command = " ".join(["python -m examples.int8_history", *(sys.argv[1:] if argv is None else argv)])
    lines = [f"command: {command}",
             f"{cfg.seeds} seeds x {cfg.epochs} epochs (cosine), LAWA k={K}, {seconds:.0f} s on {args.jobs} process(es)",
             ("validation loss of the 8-bit history's average relative to the float32 history's: "
              "mean [95% Student-t interval over seeds], largest |difference| of a seed; accuracy difference (int8 - fp32)"),
             ""]
    for r in rows:
        p, a = r["relative_loss"], r["acc"]
        lines.append(f"epoch {r['epoch']:2d}: {p['mean']:+.5%} [{p['lo']:+.5%}, {p['hi']:+.5%}], max {r['max_abs_relative_loss']:.5%}"
                     f"{'' if r['within'] else '  (beyond 0.1 %)'}; accuracy {a['mean']:+.4f} [{a['lo']:+.4f}, {a['hi']:+.4f}]")
    verdict = all(r["within"] for r in rows)
    lines += ["", f"every epoch's interval within ±{BOUND:.1%}: {'yes' if verdict else 'NO'}"]
    print("\n".join(lines))
    (out / "int8_history.txt").write_text("\n".join(lines) + "\n")
    (out / "int8_history.json").write_text(json.dumps({
        "command": command, "config": cfg.__dict__, "k": K, "bound": BOUND, "seconds": seconds,
        "torch": torch.__version__, "summary": rows, "runs": results}, indent=1) + "\n")
    return {"results": results, "summary": rows, "within": verdict}


if __name__ == "__main__":
    main()
