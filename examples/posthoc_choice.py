"""The average chosen after training, on Fashion-MNIST: does picking it on validation data pay?

Which LAWA window is best is not known in advance (Kaddour 2022, arXiv:2209.14981,
recommends k = 6). The ring holds the k latest snapshots, so any weighting of them can
be had after training from one saved state dict. This script measures what that choice
is worth. For every seed it trains the experiment's cosine run once (its split,
initialisation, batch order and settings: ``examples/lawa_runs.py``) under one
``LAWA`` with a ring of ``--k`` end-of-epoch snapshots, saves the LAWA state dict once
at the end, and from that file evaluates every candidate weighting
(:func:`candidates`: uniform windows, ramps, truncated EMAs), each after a BatchNorm
refresh on training images, on the seed's validation images. The candidate with the
lowest validation loss is the pick. The pick, the fixed window k = 6 and the live
weights are then compared on Fashion-MNIST's own test file (10,000 images that no seed
trains, refreshes or chooses on), paired over seeds with Student-t intervals.

Planned (fixed before the run): pick minus k = 6 fixed, test loss and test accuracy,
each at 97.5 % (family-wise 95 %, Bonferroni over the two). Everything else is
exploratory.

Run from the repository root: ``python -m examples.posthoc_choice --out DIR``. The
summary (``posthoc_choice.json`` and ``posthoc_choice.txt``) is rewritten after every
seed, so a run stopped early leaves the seeds that finished, and says how many.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

from examples import fashion_mnist
from examples.lawa_sizes import FAST, FULL  # the experiment's: seed s draws the same split as its seed s
from lawa_optim._cli import Parser, int_at_least, output_dir

FIXED = 6  # the paper's default window, the baseline
#: Decays of the truncated EMAs among the candidates (library convention: 1 - decay on the newest).
EMA_DECAYS = (0.5, 0.7, 0.8)
DEFAULT_OUT = "posthoc_choice_results"  # untracked (.gitignore)
METRICS = ("loss", "acc")


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = Parser(prog="python -m examples.posthoc_choice", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=output_dir, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT}/, not tracked)")
    p.add_argument("--seeds", type=int_at_least(1), default=FULL.seeds, help=f"seeds 0..N-1 (default {FULL.seeds})")
    p.add_argument("--epochs", type=int_at_least(FIXED), default=FULL.epochs,
                   help=f"epochs of the cosine run, at least {FIXED} (default {FULL.epochs})")
    p.add_argument("--k", type=int_at_least(FIXED), default=10,
                   help=f"snapshots the ring holds, at least {FIXED} (default 10)")
    fashion_mnist.add_data_dir(p, ("train", "test"))
    p.add_argument("--fast", action="store_true", help="tiny image counts (128 training images) for a smoke run")
    args = p.parse_args(argv)
    fashion_mnist.require(p, args.data_dir, ("train", "test"))
    return args


if __name__ == "__main__":  # answer a bad argument or --help before the imports below, which take seconds
    _parse(None)

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from examples import lawa_experiment as exp  # noqa: E402
from examples import lawa_runs as runs  # noqa: E402
from lawa_optim import LAWA, export_average, profiles, update_bn  # noqa: E402
from lawa_optim.demo import evaluate, source_version, train_epoch  # noqa: E402
from lawa_optim.paired import LEVEL, MARGINS, conclusion, paired  # noqa: E402


def candidates(held: int) -> dict[str, Tensor]:
    """The weightings the pick is made from, over the ``held`` snapshots of the ring:
    ``window(2)`` ... ``window(held)``, ``linear(held // 2)`` and ``linear(held)``, and
    the EMAs of :data:`EMA_DECAYS` truncated to the ring."""
    out = {f"window({j})": profiles.window(j) for j in range(2, held + 1)}
    out.update({f"linear({j})": profiles.linear(j) for j in sorted({max(2, held // 2), held})})
    with warnings.catch_warnings():  # the truncated mass is recorded in the results instead
        warnings.simplefilter("ignore", UserWarning)
        out.update({f"ema({d:g})": profiles.ema(d, held)[0] for d in EMA_DECAYS})
    return out


def truncated_mass(held: int) -> dict[str, float]:
    """The fraction of each EMA candidate's weight older than the ring (left out)."""
    return {f"ema({d:g})": d ** held for d in EMA_DECAYS}


def pick(val_loss: dict[str, float]) -> str:
    """The candidate with the lowest validation loss (the first listed, on a tie)."""
    return min(val_loss, key=val_loss.__getitem__)


def load_test(data_dir: str | None) -> tuple[Tensor, Tensor]:
    """Fashion-MNIST's test file, downsampled to 14x14 and scaled like the training split."""
    images, labels = fashion_mnist.load("test", data_dir)
    return torch.nn.functional.avg_pool2d(images.unsqueeze(1).float() / 255.0, 2), labels


def run_seed(seed: int, cfg: runs.Config, k: int, data_dir: str | None, workdir: Path) -> dict:
    """Train seed ``seed`` once, save the LAWA state dict, evaluate every candidate
    from the file on the validation and test images, and pick on validation loss."""
    torch.set_num_threads(1)
    cpu0 = time.process_time()
    data = runs.load_split(data_dir, cfg, seed)
    x_test, y_test = load_test(data_dir)
    torch.manual_seed(seed)
    model = runs.make_model()
    gen = torch.Generator().manual_seed(seed)
    lawa = LAWA(runs.sgd(model), k=k)
    sched = runs.schedule(lawa, "cosine", cfg.epochs)
    t0 = time.perf_counter()
    for _ in range(cfg.epochs):
        train_epoch(model, lawa, data.x, data.y, gen, cfg.batch)
        lawa.snapshot()
        sched.step()
    train_s = time.perf_counter() - t0

    def both(m: nn.Module) -> dict[str, float]:
        (vl, va), (tl, ta) = evaluate(m, data.x_val, data.y_val), evaluate(m, x_test, y_test)
        return {"val_loss": vl, "val_acc": va, "test_loss": tl, "test_acc": ta}

    t0 = time.perf_counter()
    out: dict = {"seed": seed, "held": lawa.num_snapshots, "test_images": len(y_test), "live": both(model)}
    refreshed = copy.deepcopy(model)
    update_bn([data.x_bn], refreshed)
    out["live_bn"] = both(refreshed)
    path = workdir / f"lawa_seed{seed}.pt"
    torch.save({"optimizer": lawa.state_dict()}, path)  # once, at the end; everything below reads the file
    fresh = runs.make_model()  # a model that never trained: the file alone gives the averages
    out["candidates"] = {}
    for name, weights in candidates(lawa.num_snapshots).items():
        fresh.load_state_dict(export_average(fresh, path, weights=weights, bn_loader=[data.x_bn]))
        out["candidates"][name] = both(fresh)
    path.unlink()
    out["pick"] = pick({name: c["val_loss"] for name, c in out["candidates"].items()})
    out["cost"] = {"train_s": train_s, "choose_s": time.perf_counter() - t0, "cpu_s": time.process_time() - cpu0}
    return out


def planned_names() -> tuple[str, ...]:
    """The planned comparisons, fixed before the run."""
    return (f"post-hoc pick - window({FIXED}) fixed, test loss", f"post-hoc pick - window({FIXED}) fixed, test accuracy")


def summarise(results: Sequence[dict], k: int) -> dict:
    """The planned and exploratory paired comparisons, and how often each candidate was picked."""
    held = results[0]["held"]
    fixed = f"window({FIXED})"
    names = list(candidates(held))

    def get(which: str, key: str) -> list[float]:
        """Per seed, ``key`` of the pick, of the live weights or of a named candidate."""
        pick_of = lambda r: r["candidates"][r["pick"]]  # noqa: E731
        return [(pick_of(r) if which == "pick" else r[which] if which in ("live", "live_bn")
                 else r["candidates"][which])[key] for r in results]

    level = exp.planned_level(len(planned_names()))
    s: dict = {"planned": {n: paired(get("pick", f"test_{m}"), get(fixed, f"test_{m}"), level)
                           for n, m in zip(planned_names(), METRICS)}}
    oracle = [min(r["candidates"].values(), key=lambda c: c["test_loss"]) for r in results]
    s["exploratory"] = {}
    for label, a, b in (("post-hoc pick - live weights", "pick", "live"),
                        ("post-hoc pick - live weights, BatchNorm refreshed", "pick", "live_bn"),
                        (f"window({FIXED}) fixed - live weights", fixed, "live"),
                        (f"post-hoc pick - window({held}) fixed (the whole ring)", "pick", f"window({held})")):
        for m in METRICS:
            s["exploratory"][f"{label}, test {m}"] = paired(get(a, f"test_{m}"), get(b, f"test_{m}"))
    s["exploratory"][f"post-hoc pick - window({FIXED}) fixed, validation loss (where it was chosen)"] = paired(
        get("pick", "val_loss"), get(fixed, "val_loss"))
    s["exploratory"][f"best candidate on the test set (hindsight) - window({FIXED}) fixed, test loss"] = paired(
        [c["test_loss"] for c in oracle], get(fixed, "test_loss"))
    s["candidates"] = {n: {"picked": sum(r["pick"] == n for r in results),
                           "val_loss": statistics.fmean(get(n, "val_loss")),
                           "test_loss": statistics.fmean(get(n, "test_loss")),
                           "test_acc": statistics.fmean(get(n, "test_acc")),
                           "test_loss_minus_fixed": paired(get(n, "test_loss"), get(fixed, "test_loss"))}
                       for n in names}
    s["truncated_ema_mass"] = truncated_mass(held)
    s["ring"] = k
    return s


def report(s: dict, n: int) -> list[str]:
    """The human-readable summary."""
    say = lambda p, m: conclusion(p, MARGINS[m], "lower", "higher")  # noqa: E731
    metric = lambda name: "loss" if "loss" in name.split(", ")[-1] else "acc"  # noqa: E731
    level = exp.planned_level(len(s["planned"]))
    L = [f"== planned: mean [{100 * level:.1f}% interval, family-wise 95% (Bonferroni over {len(s['planned'])})] =="]
    for name, p in s["planned"].items():
        L.append(f"{name}: {p.text()} ({say(p, metric(name))}; lower in {p.below} of {p.n} seeds, higher in {p.above})")
    L += ["", f"== exploratory: mean [{100 * LEVEL:.0f}% interval] =="]
    for name, p in s["exploratory"].items():
        L.append(f"{name}: {p.text()} ({say(p, metric(name))}; lower in {p.below} of {p.n} seeds, higher in {p.above})")
    L += ["", (f"== candidates (from the saved state dict of a ring of {s['ring']}; BatchNorm refreshed): times picked "
               f"on validation loss, means over {n} seeds, and test loss minus window({FIXED}) ==")]
    L.append(f"{'candidate':<11} {'picked':>6} {'val loss':>9} {'test loss':>9} {'test acc':>8} "
             f"{'test loss - window(' + str(FIXED) + ')':>27}")
    for name, c in s["candidates"].items():
        L.append(f"{name:<11} {c['picked']:>6} {c['val_loss']:>9.4f} {c['test_loss']:>9.4f} {c['test_acc']:>8.4f} "
                 f"{c['test_loss_minus_fixed'].text():>27}")
    L.append("EMA weight older than the ring, left out and the rest renormalised: "
             + ", ".join(f"{k} {v:.3f}" for k, v in s["truncated_ema_mass"].items()))
    return L


def main(argv: Sequence[str] | None = None) -> dict:
    """Run every seed; after each, print progress and rewrite the JSON and text summaries."""
    args = _parse(argv)
    cfg = dataclasses.replace(FAST if args.fast else FULL, seeds=args.seeds, epochs=args.epochs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    code = source_version()  # before anything is written: the output may be tracked
    load = os.getloadavg()
    command = exp.command_line(sys.argv[1:] if argv is None else argv, "examples.posthoc_choice")
    t0 = time.perf_counter()
    results: list[dict] = []
    with tempfile.TemporaryDirectory() as work:
        for seed in range(cfg.seeds):
            results.append(run_seed(seed, cfg, args.k, args.data_dir, Path(work)))
            seconds = time.perf_counter() - t0
            print(f"seed {seed} done ({len(results)} of {cfg.seeds}, {seconds:.0f} s)", file=sys.stderr, flush=True)
            s = summarise(results, args.k)
            done = len(results)
            status = None if done == cfg.seeds else (
                f"incomplete: {done} of {cfg.seeds} seeds finished; the summary covers seeds 0-{done - 1}")
            cpu = sum(r["cost"]["cpu_s"] for r in results)
            head = [f"command: {command}", f"code: {code['text']}", *([status] if status else []),
                    (f"{done} seeds, {cfg.epochs} epochs each, ring of {args.k}; {seconds:.0f} s wall in 1 process x 1 "
                     f"thread, {cpu:.0f} CPU seconds (load average before {load[0]:.2f}, now {os.getloadavg()[0]:.2f}); "
                     f"torch {torch.__version__}"),
                    (f"choice on the validation split ({cfg.val} images per seed), evaluation on the test file "
                     f"({results[0]['test_images']} images); 'equal within' = the whole interval inside the margin "
                     f"({', '.join(f'{k} {v:g}' for k, v in MARGINS.items() if k != 'epochs')})"), ""]
            lines = head + report(s, done)
            (out / "posthoc_choice.txt").write_text("\n".join(lines) + "\n")
            (out / "posthoc_choice.json").write_text(json.dumps(exp._jsonable({
                "command": command, "code": code, "incomplete": status, "config": cfg.__dict__, "k": args.k,
                "fixed": FIXED, "seconds": seconds, "cpu_seconds": cpu, "load_before": load,
                "load_after": os.getloadavg(), "machine": exp.machine(1), "margins": MARGINS,
                "planned_level": exp.planned_level(len(planned_names())), "summary": s, "runs": results}), indent=1))
    print("\n".join(lines))
    return {"results": results, "summary": s, "seconds": seconds}


if __name__ == "__main__":
    main()
