"""LAWA and TWA on Fashion-MNIST, as paired comparisons over seeds.

Kaddour 2022 ("Stop Wasting My Time!", arXiv:2209.14981) reports that the average of
the k latest end-of-epoch checkpoints (LAWA) reaches the live weights' loss and
accuracy many epochs earlier under a decaying schedule, that k = 6 works well and
much larger k hurts, that averaging early hurts, that uniform coefficients beat an
exponential average, and that LAWA beats Lookahead. Li et al. (TWA, ICLR 2023;
journal version arXiv:2205.13104) train the coefficients instead and report 30-40 %
fewer epochs. This script tests each claim under one protocol: for every seed (its
own split, initialisation and batch order; see ``examples/lawa_runs.py``) it trains
a BatchNorm CNN with cosine (main), step-decay and constant learning rates, a cosine
run shortened to fewer epochs (the equal-compute baseline) and Lookahead, fits TWA
from the cosine run's snapshots, and reports per-epoch paired differences with
Student-t 95 % intervals over the seeds. A short list of comparisons, :data:`PLANNED`,
was fixed before the run and is reported with family-wise 95 % intervals (Bonferroni);
every other interval is exploratory.

Run from the repository root: ``python -m examples.lawa_experiment`` (20 seeds, about
13 minutes on 2 idle CPU cores; ``--fast`` for a smoke run of seconds). It writes
``lawa_experiment.json``, ``lawa_experiment.csv``, ``lawa_experiment.txt`` and two
plots to ``--out``, each with the commit of the code that produced it. Interrupted
(Ctrl-C) after two seeds or more, it summarises the seeds that finished and says so.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, is_dataclass
from functools import partial
from pathlib import Path

from examples import fashion_mnist
from examples.lawa_sizes import FAST, FULL, add_run_arguments
from lawa_optim._cli import Parser, output_dir

DEFAULT_OUT = "lawa_experiment_results"  # untracked (.gitignore)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = Parser(prog="python -m examples.lawa_experiment", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=output_dir, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT}/, not tracked)")
    fashion_mnist.add_data_dir(p)
    add_run_arguments(p)
    args = p.parse_args(argv)
    fashion_mnist.require(p, args.data_dir)
    return args


if __name__ == "__main__":  # answer a bad argument or --help before the imports below, which take seconds
    _parse(None)

import torch  # noqa: E402

from examples import lawa_runs as runs  # noqa: E402
from examples.lawa_plots import plot_all  # noqa: E402
from lawa_optim.demo import source_version  # noqa: E402
from lawa_optim.paired import (LEVEL, MARGINS, Paired, Reach, conclusion, paired, per_epoch, per_phase,  # noqa: E402
                               phases, reach, reach_text, targets)

METRICS = ("loss", "acc")


def _curves(results: Sequence[dict], run: str, key: str) -> list[list[float]]:
    return [r[run][key] for r in results]


def compare(a: list[list[float]], b: list[list[float]], metric: str) -> dict:
    """Paired ``a - b`` per epoch, over each third of the run and at the last epoch."""
    epochs = per_epoch(a, b)
    return {"per_epoch": epochs, "phases": per_phase(a, b), "last": epochs[-1], "metric": metric}


def summarise(results: Sequence[dict], cfg: runs.Config) -> dict:
    """Every comparison of the experiment, from the per-seed curves."""
    s: dict = {"compare": {}, "reach": {}, "equal_compute": {}, "twa": {}}

    def add(name: str, run_a: str, a: str, run_b: str, b: str) -> None:
        for m in METRICS:
            s["compare"][f"{name}/{m}"] = compare(_curves(results, run_a, f"{a}_{m}"), _curves(results, run_b, f"{b}_{m}"), m)

    for sched in runs.SCHEDULES:
        add(f"{sched}: LAWA k=6 - live", sched, "lawa6", sched, "live")
        add(f"{sched}: LAWA k=6 - live, both refreshed", sched, "lawa6", sched, "live_bn")
    for k in runs.WINDOWS:
        if k != 6:
            add(f"cosine: LAWA k={k} - live, both refreshed", "cosine", f"lawa{k}", "cosine", "live_bn")
            add(f"cosine: LAWA k={k} - LAWA k=6", "cosine", f"lawa{k}", "cosine", "lawa6")
    # the EMA puts 0.9 on the newest snapshot, about one snapshot's window: uniform k=1 (the
    # live weights, refreshed like every average) and k=2 are its like-for-like baselines
    add("cosine: EMA - live, both refreshed (uniform k=1)", "cosine", "ema", "cosine", "live_bn")
    add("cosine: EMA - LAWA k=2", "cosine", "ema", "cosine", "lawa2")
    add("cosine: EMA - LAWA k=10", "cosine", "ema", "cosine", "lawa10")
    add("cosine: Lookahead - live, both refreshed", "lookahead", "lookahead", "cosine", "live_bn")
    add("cosine: LAWA k=6 - Lookahead", "cosine", "lawa6", "lookahead", "lookahead")
    add("cosine: LAWA k=10 - Lookahead", "cosine", "lawa10", "lookahead", "lookahead")
    add("cosine: LAWA k=6 without - with BatchNorm refresh", "cosine", "lawa6_nobn", "cosine", "lawa6")
    add("cosine: live refreshed - live", "cosine", "live_bn", "cosine", "live")
    add("cosine: LAWA k=6 - live, neither refreshed", "cosine", "lawa6_nobn", "cosine", "live")

    cost = [r["cost"] for r in results]
    counted = cfg.bn / (3 * cfg.train)  # a refresh is bn forwards; an epoch is train forwards + backwards (2x)
    measured = [(c["refresh_s"] / c["refreshes"]) / (c["train_s"] / c["train_epochs"]) for c in cost]
    s["refresh_cost"] = {"counted_epochs": counted, "measured_epochs": statistics.median(measured)}
    c = s["refresh_cost"]["measured_epochs"]
    for sched in runs.SCHEDULES:
        for live_key in ("live", "live_bn"):
            for m in METRICS:
                for target in TARGETS:
                    live, lawa = _curves(results, sched, f"{live_key}_{m}"), _curves(results, sched, f"lawa6_{m}")
                    t = [targets(curve, m, exact=target == "exact") for curve in live]
                    r = reach(live, lawa, t, higher_is_better=m == "acc")
                    # watching a refreshed curve at every epoch costs one refresh per epoch: epoch e costs
                    # e * (1 + c); the live weights' running statistics cost nothing
                    live_cost = 1 + c if live_key == "live_bn" else 1
                    costed = paired([h * live_cost for h in r.a_hits], [h * (1 + c) for h in r.b_hits])
                    s["reach"][f"{sched}/{live_key}/{m}/{target}"] = {"epochs": r, "refresh_counted": costed}

    T, Ts = cfg.epochs, cfg.short
    for m in METRICS:  # every side with refreshed BatchNorm statistics
        short = [c[-1] for c in _curves(results, "short", f"live_bn_{m}")]
        for label, run_key, epoch in ((f"LAWA k=6 at epoch {Ts} of the {T}-epoch cosine", "lawa6", Ts),
                                      (f"live at epoch {Ts} of the {T}-epoch cosine", "live_bn", Ts),
                                      (f"LAWA k=6 at epoch {T} of the {T}-epoch cosine", "lawa6", T),
                                      (f"live at epoch {T} of the {T}-epoch cosine", "live_bn", T)):
            a = [c[epoch - 1] for c in _curves(results, "cosine", f"{run_key}_{m}")]
            s["equal_compute"][f"{label} - cosine over {Ts} epochs/{m}"] = paired(a, short)

    for start in cfg.twa_starts:
        end = start + cfg.twa_epochs
        for m in METRICS:
            fit = {v: [r["cosine"]["twa"][start][v][m] for r in results] for v in ("t", "v")}
            at = lambda key, e: [c[e - 1] for c in _curves(results, "cosine", f"{key}_{m}")]  # noqa: E731
            k = min(start, max(runs.WINDOWS))  # the window that holds every snapshot TWA starts from
            rows = {
                f"TWA-t - LAWA k={k} at epoch {start} (its start)": (fit["t"], at(f"lawa{k}", start)),
                f"TWA-t - LAWA k=6 at epoch {end}": (fit["t"], at("lawa6", end)),
                f"TWA-t - live at epoch {end}": (fit["t"], at("live_bn", end)),
                f"TWA-t - live at epoch {T} (the full run)": (fit["t"], at("live_bn", T)),
                "TWA-v - TWA-t": (fit["v"], fit["t"]),
                f"TWA-v - live at epoch {T} (the full run)": (fit["v"], at("live_bn", T)),
            }
            s["twa"][f"start {start}/{m}"] = {k: paired(a, b) for k, (a, b) in rows.items()}
    s["planned"] = planned(results, cfg)
    return s


#: Targets of "epochs to reach": relaxed (1.1 x the final loss, the final accuracy - 1
#: point) and the final value itself.
TARGETS = ("relaxed", "exact")


def planned_names(cfg: runs.Config) -> tuple[str, ...]:
    """The planned comparisons, fixed before the 20-seed run: the claims the README makes
    (LAWA ahead during a cosine run and level at its end, the epochs it saves with and
    without the live weights refreshed, the schedule shortened in advance, TWA against
    training on). Every other interval is exploratory."""
    first, last = phases(cfg.epochs)[1]
    T, Ts, E = cfg.epochs, cfg.short, cfg.twa_starts[-1]
    return (f"cosine: LAWA k=6 - live, validation loss, mean over epochs {first}-{last}",
            f"cosine: LAWA k=6 - live, accuracy at epoch {T}",
            "cosine: epochs LAWA k=6 saves reaching the live weights' final accuracy - 0.01",
            "cosine: epochs LAWA k=6 saves reaching the refreshed live weights' final accuracy - 0.01",
            f"LAWA k=6 at epoch {Ts} of the {T}-epoch cosine - cosine over {Ts} epochs, accuracy",
            f"live at epoch {T} of the {T}-epoch cosine - cosine over {Ts} epochs, accuracy",
            f"TWA-t from epoch {E} - LAWA k=6 at epoch {E + cfg.twa_epochs}, loss")


#: Family-wise 95 % over the planned comparisons: each interval at 1 - 0.05 / m (Bonferroni).
def planned_level(m: int) -> float:
    """The level of each of ``m`` planned intervals."""
    return 1 - (1 - LEVEL) / m


def planned(results: Sequence[dict], cfg: runs.Config) -> dict[str, Paired | Reach]:
    """The planned comparisons (:func:`planned_names`), each at :func:`planned_level`."""
    names = planned_names(cfg)
    level = planned_level(len(names))
    first, last = phases(cfg.epochs)[1]
    T, Ts, E = cfg.epochs, cfg.short, cfg.twa_starts[-1]
    at = lambda run, key, e: [c[e - 1] for c in _curves(results, run, key)]  # noqa: E731
    mid = lambda key: [sum(c[first - 1:last]) / (last - first + 1) for c in _curves(results, "cosine", key)]  # noqa: E731

    def saves(live_key: str) -> Reach:
        live = _curves(results, "cosine", f"{live_key}_acc")
        return reach(live, _curves(results, "cosine", "lawa6_acc"), [targets(c, "acc") for c in live],
                     higher_is_better=True, level=level)

    short = [c[-1] for c in _curves(results, "short", "live_bn_acc")]
    values = (paired(mid("lawa6_loss"), mid("live_loss"), level),
              paired(at("cosine", "lawa6_acc", T), at("cosine", "live_acc", T), level),
              saves("live"), saves("live_bn"),
              paired(at("cosine", "lawa6_acc", Ts), short, level),
              paired(at("cosine", "live_bn_acc", T), short, level),
              paired([r["cosine"]["twa"][E]["t"]["loss"] for r in results], at("cosine", "lawa6_loss", E + cfg.twa_epochs),
                     level))
    return dict(zip(names, values))


SECTIONS = (
    ("LAWA k=6 - live weights, per schedule (LAWA with refreshed BatchNorm statistics, as in the paper; live with "
     "its running ones, and as a control also refreshed)",
     tuple(f"{sched}: LAWA k=6 - live{ctl}" for sched in runs.SCHEDULES for ctl in ("", ", both refreshed"))),
    ("k sweep (cosine)", tuple(f"cosine: LAWA k={k} - {ref}" for k in runs.WINDOWS if k != 6
                               for ref in ("live, both refreshed", "LAWA k=6"))),
    ("EMA vs uniform (alpha 0.9 on the newest checkpoint, as in the paper's Appendix C, against uniform windows of "
     "about the same length, k = 1 and 2, and the paper's k = 10)",
     ("cosine: EMA - live, both refreshed (uniform k=1)", "cosine: EMA - LAWA k=2", "cosine: EMA - LAWA k=10")),
    ("Lookahead (paper's Appendix B: alpha 0.8, k 5; slow weights refreshed)",
     ("cosine: Lookahead - live, both refreshed", "cosine: LAWA k=6 - Lookahead", "cosine: LAWA k=10 - Lookahead")),
    ("BatchNorm statistics", ("cosine: LAWA k=6 without - with BatchNorm refresh", "cosine: live refreshed - live",
                              "cosine: LAWA k=6 - live, neither refreshed")),
)


def report(s: dict, cfg: runs.Config, results: Sequence[dict]) -> list[str]:
    """The human-readable summary (printed and saved as text)."""
    L: list[str] = []
    n = cfg.seeds
    say = lambda p, m: conclusion(p, MARGINS[m], "lower", "higher")  # noqa: E731
    c = s["refresh_cost"]
    level = planned_level(len(s["planned"]))
    L += [f"== planned comparisons (fixed before the run): mean [{100 * level:.2f}% interval, family-wise 95% "
          f"(Bonferroni over {len(s['planned'])})] =="]
    for name, v in s["planned"].items():
        if isinstance(v, Reach):
            t = reach_text(v, "acc", "live", "LAWA")
            L.append(f"{name}: {t.medians}; saved {t.saved} ({t.says})")
        else:
            m = "loss" if name.endswith("loss") or "validation loss" in name else "acc"
            L.append(f"{name}: {v.text()} ({say(v, m)}; lower in {v.below} of {v.n} seeds, higher in {v.above})")
    L += ["", f"Everything below is exploratory: unadjusted 95% intervals, {count_intervals(s) - len(s['planned'])} in "
          "all (with the per-epoch ones in the CSV); read them as pointers, not as claims."]
    for title, names in SECTIONS:
        L += ["", f"== {title}: mean over each third of the run, and the last epoch =="]
        for name in names:
            for m in METRICS:
                cmp = s["compare"][f"{name}/{m}"]
                L.append(f"{name}, {m}: " + "; ".join(f"epochs {a}-{b} {p.text()} ({say(p, m)})" for a, b, p in cmp["phases"])
                         + f"; epoch {cfg.epochs} {cmp['last'].text()} ({say(cmp['last'], m)})")
        if title.startswith("LAWA k=6"):
            L.append(f"epochs to reach a target set from the live weights' final value (LAWA's saving, first epoch of "
                     f"live minus first epoch of LAWA, per seed; then in epochs of compute, counting one BatchNorm "
                     f"refresh, {c['measured_epochs']:.3f} epochs as measured, per evaluated epoch of every refreshed "
                     "curve):")
            for key, r in s["reach"].items():
                sched, live_key, m, target = key.split("/")
                e = r["epochs"]
                live = "live" if live_key == "live" else "live refreshed"
                t = reach_text(e, m, live, "LAWA", exact=target == "exact")
                L.append(f"  {sched}, {t.target} of {live}: {t.medians}; saved {t.saved} ({t.says}); "
                         f"with refreshes {r['refresh_counted'].text('+.1f')}")
    L += ["", "== per epoch, cosine: means over seeds; LAWA - live: mean [95% interval], seeds where LAWA is lower =="]
    L.append(f"{'epoch':>5} {'live loss':>9} {'LAWA-6':>7} {'LAWA-6 - live loss':>27} {'lower':>5} "
             f"{'same, both refreshed':>27} {'LAWA-20 - live, both refr.':>27} "
             f"{'live acc':>8} {'LAWA-6':>7} {'LAWA-6 - live acc':>27}")
    d6, c6, c20, a6 = (s["compare"][k]["per_epoch"] for k in (
        "cosine: LAWA k=6 - live/loss", "cosine: LAWA k=6 - live, both refreshed/loss",
        "cosine: LAWA k=20 - live, both refreshed/loss", "cosine: LAWA k=6 - live/acc"))
    for e in range(cfg.epochs):
        mean = lambda key: sum(r["cosine"][key][e] for r in results) / n  # noqa: E731
        L.append(f"{e + 1:>5} {mean('live_loss'):>9.4f} {mean('lawa6_loss'):>7.4f} {d6[e].text():>27} {d6[e].below:>2}/{n:<2} "
                 f"{c6[e].text():>27} {c20[e].text():>27} {mean('live_acc'):>8.4f} {mean('lawa6_acc'):>7.4f} {a6[e].text():>27}")
    L += ["", f"== equal compute: a cosine schedule shortened to {cfg.short} epochs (its final weights) against the "
          f"{cfg.epochs}-epoch run, BatchNorm refreshed on both sides ({c['measured_epochs']:.3f} epochs each) =="]
    for key, p in s["equal_compute"].items():
        label, m = key.rsplit("/", 1)
        L.append(f"{label}, {m}: {p.text()} ({say(p, m)}; lower in {p.below} of {p.n} seeds, higher in {p.above})")
    L += ["", f"== TWA from all snapshots held at epoch E, {cfg.twa_epochs} epochs' worth of steps with the papers' "
          f"schedule (lr {runs.TWA_LR_SCALE:g} x {runs.LR:g}, /10 at 50 % and 75 %), BatchNorm refreshed; "
          "compared with training on (live weights refreshed too) =="]
    for key, rows in s["twa"].items():
        start, m = key.split("/")
        for label, p in rows.items():
            L.append(f"E = {start.split()[1]}, {m}: {label}: {p.text()} ({say(p, m)})")
    return L


def count_intervals(x: object, seen: set[int] | None = None) -> int:
    """The distinct intervals a summary holds."""
    seen = set() if seen is None else seen
    if isinstance(x, (Paired, Reach)):
        new = id(x) not in seen
        seen.add(id(x))
        return int(new)
    if isinstance(x, dict):
        x = list(x.values())
    if isinstance(x, (list, tuple)):
        return sum(count_intervals(v, seen) for v in x)
    return 0


def per_epoch_rows(s: dict) -> list[list]:
    """CSV rows: one per comparison, metric and epoch."""
    rows = [["comparison", "metric", "epoch", "mean", "lo95", "hi95", "median", "seeds_below_0", "seeds_above_0", "seeds"]]
    for key, c in s["compare"].items():
        name, m = key.rsplit("/", 1)
        for e, p in enumerate(c["per_epoch"], start=1):
            rows.append([name, m, e, f"{p.mean:.6f}", f"{p.lo:.6f}", f"{p.hi:.6f}", f"{p.median:.6f}", p.below, p.above, p.n])
    return rows


def _jsonable(x):
    if is_dataclass(x) and not isinstance(x, type):
        return asdict(x)
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


#: Environment variables that choose the CPU kernels, hence the floating-point results.
KERNEL_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def command_line(argv: Sequence[str], module: str = "examples.lawa_experiment") -> str:
    """The command as typed (``python -m module``), with the kernel-choosing environment
    variables that are set."""
    env = [f"{k}={os.environ[k]}" for k in KERNEL_ENV if k in os.environ]
    return " ".join([*env, f"python -m {module}", *argv])


def machine(jobs: int) -> dict:
    """Where the numbers were measured."""
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout if shutil.which("lscpu") else ""
    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "processes": jobs, "threads_per_process": 1,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "lscpu": lscpu}


def main(argv: Sequence[str] | None = None) -> dict:
    """Run every seed, print the summary and write JSON, CSV, text and plots to ``--out``."""
    args = _parse(argv)
    cfg = FAST if args.fast else FULL
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    code = source_version()  # before anything is written: the output may be tracked
    load = os.getloadavg()
    t0 = time.perf_counter()
    work = partial(runs.run_seed, cfg=cfg, data_dir=args.data_dir)
    results: list[dict] = []
    interrupted = None
    with multiprocessing.get_context("spawn").Pool(args.jobs) if args.jobs > 1 else nullcontext() as pool:
        try:
            for r in (pool.imap(work, range(cfg.seeds)) if pool else map(work, range(cfg.seeds))):
                results.append(r)
                print(f"seed {r['seed']} done ({len(results)} of {cfg.seeds}, {time.perf_counter() - t0:.0f} s)",
                      file=sys.stderr, flush=True)
        except KeyboardInterrupt:  # summarise the seeds that finished, and say so
            if len(results) < 2:
                raise
            interrupted = f"interrupted after {len(results)} of {cfg.seeds} seeds: the summary covers seeds 0-{len(results) - 1}"
            print(interrupted, file=sys.stderr, flush=True)
            cfg = dataclasses.replace(cfg, seeds=len(results))
    seconds = time.perf_counter() - t0
    s = summarise(results, cfg)
    command = command_line(sys.argv[1:] if argv is None else argv)
    cpu = sum(r["cost"]["cpu_s"] for r in results)
    head = [f"command: {command}", f"code: {code['text']}", *([interrupted] if interrupted else []),
            f"{cfg.seeds} seeds, {seconds:.0f} s wall on {args.jobs} process(es) x 1 thread (load average before "
            f"{load[0]:.2f}, after {os.getloadavg()[0]:.2f}); {cpu:.0f} CPU seconds in all, about {cpu / args.jobs:.0f} s "
            f"of wall time on {args.jobs} idle core(s) (CPU seconds / {args.jobs}); torch {torch.__version__}",
            "differences: mean [95% Student-t interval over seeds] unless said otherwise; 'equal within' = the whole "
            f"interval inside the margin ({', '.join(f'{k} {v:g}' for k, v in MARGINS.items())})", ""]
    lines = head + report(s, cfg, results)
    print("\n".join(lines))
    (out / "lawa_experiment.txt").write_text("\n".join(lines) + "\n")
    (out / "lawa_experiment.json").write_text(json.dumps(_jsonable({
        "command": command, "code": code, "interrupted": interrupted, "config": cfg.__dict__, "seconds": seconds, "cpu_seconds": cpu, "load_before": load,
        "load_after": os.getloadavg(), "machine": machine(args.jobs), "margins": MARGINS,
        "summary": s, "runs": results}), indent=1))
    with open(out / "lawa_experiment.csv", "w", newline="") as f:
        csv.writer(f).writerows(per_epoch_rows(s))
    plot_all(results, s, cfg, out, note=f"{command}; code: {code['text']}")
    return {"results": results, "summary": s, "seconds": seconds}


if __name__ == "__main__":
    main()
