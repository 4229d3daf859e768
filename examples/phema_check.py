"""Post-hoc EMA from memory checked against the EMA itself and against ema_pytorch.

EDM2 (Karras et al. 2024) synthesises a power-function EMA of any width after training
from stored snapshots of two EMAs. ``LAWA(mode="phema")`` keeps the snapshots in its
ring buffer; ``ema_pytorch.PostHocEMA`` writes them to disk. This script trains a small
MLP on a noisy regression task, computes in float64 at every step the power-function
EMA of several widths (inside and outside the stored pair 0.05 and 0.10), and compares
with it, at the last step:

* ``opt.averaged(sigma_rel=s)``: the relative error ``||synth - direct|| / ||direct||``
  and ``||synth - direct|| / ||direct - live||`` (how much of the EMA's own departure
  from the live weights is wrong), beside the fit's relative profile error;
* ``PostHocEMA.synthesize_ema_model(sigma_rel=s)`` on the same run (same widths and
  snapshot interval, updated every step): the same errors, and the profile error of the
  least-squares fit over all its checkpoints;

and reports PostHocEMA's disk use beside ``opt.memory()``. Run::

    python -m examples.phema_check --out examples/results/phema
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path

from lawa_optim._cli import Parser, int_at_least, output_dir

#: Widths the LAWA and PostHocEMA keep (EDM2's pair).
STORED = (0.05, 0.10)
#: Widths synthesised and compared: inside the stored range, and outside it.
WIDTHS = (0.02, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.10, 0.12, 0.15, 0.25)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(prog="python -m examples.phema_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=output_dir, help="folder for phema_check.json and .txt")
    p.add_argument("--steps", type=int_at_least(1), default=4000, help="optimizer steps (4000)")
    p.add_argument("--every", type=int_at_least(1), default=400, help="snapshot interval in steps (400)")
    p.add_argument("--k", type=int_at_least(len(STORED)), default=8,
                   help="ring slots, at least one per stored width (8: 4 snapshot times x 2 widths)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.every > args.steps:
        p.error(f"argument --every: {args.every} is more than --steps {args.steps}: no snapshot would be taken")
    return args


if __name__ == "__main__":  # answer a bad argument or --help before the imports below, which take seconds
    parse(None)

import torch  # noqa: E402
from torch import nn  # noqa: E402

from lawa_optim import LAWA, phema  # noqa: E402


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().double().flatten() for p in model.parameters()])


def run(args: argparse.Namespace) -> dict:
    gen = torch.Generator().manual_seed(args.seed + 1)
    teacher = make_model(args.seed + 100)
    model = make_model(args.seed)
    opt = LAWA(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), k=args.k, mode="phema",
               sigma_rels=STORED, every=args.every, max_fit_error=math.inf)
    from ema_pytorch import PostHocEMA

    gammas = {s: phema.sigma_rel_to_gamma(s) for s in WIDTHS}
    direct: dict[float, torch.Tensor] = {}
    with tempfile.TemporaryDirectory() as folder:
        post = PostHocEMA(model, sigma_rels=STORED, update_every=1, checkpoint_every_num_steps=args.every,
                          checkpoint_folder=folder)
        start = time.perf_counter()
        for t in range(1, args.steps + 1):
            x = torch.randn(64, 16, generator=gen)
            with torch.no_grad():
                y = teacher(x) + 0.5 * torch.randn(64, 1, generator=gen)
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            post.update()
            theta = flat(model)
            for s, g in gammas.items():
                b = phema.beta(t, g)
                direct[s] = theta.clone() if t == 1 else b * direct[s] + (1 - b) * theta
        seconds = time.perf_counter() - start
        live = flat(model)
        disk = sum(f.stat().st_size for f in Path(folder).glob("*.pt"))
        files = len(list(Path(folder).glob("*.pt")))
        t_r = args.steps - args.steps % args.every
        ckpt_times = [t for t in range(args.every, args.steps + 1, args.every) for _ in STORED]
        ckpt_gammas = [phema.sigma_rel_to_gamma(s) for _ in range(args.steps // args.every) for s in STORED]
        rows = []
        for s in WIDTHS:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the fit's error is reported below
                with opt.averaged(sigma_rel=s):
                    ours = flat(model)
            fit = opt.last_fit
            held = fit.times
            theirs = flat(post.synthesize_ema_model(sigma_rel=s).ema_model)
            their_fit = phema.fit(ckpt_times, ckpt_gammas, t_r, gammas[s])
            want = direct[s]
            scale, moved = want.norm().item(), (want - live).norm().item()
            rows.append({
                "sigma_rel": s,
                "inside_stored_range": STORED[0] <= s <= STORED[-1],
                "lawa_fit_error": fit.error,
                "lawa_refused_by_default": fit.error > 0.05,
                "lawa_rel_error": (ours - want).norm().item() / scale,
                "lawa_error_over_ema_departure": (ours - want).norm().item() / moved,
                "posthocema_fit_error": their_fit.error,
                "posthocema_rel_error": (theirs - want).norm().item() / scale,
                "posthocema_error_over_ema_departure": (theirs - want).norm().item() / moved,
                "lawa_vs_posthocema_over_ema_departure": (ours - theirs).norm().item() / moved,
                "ema_departure_from_live": moved / scale,
            })
    mem = opt.memory()
    return {
        "command": "python -m examples.phema_check " + " ".join(sys.argv[1:]),
        "steps": args.steps, "every": args.every, "k": args.k, "seed": args.seed,
        "stored_sigma_rels": list(STORED), "parameters": mem.parameters,
        "synthesised_at_step": t_r, "seconds": round(seconds, 1),
        "lawa_memory_bytes": {"total": mem.total, "history": mem.history, "emas": mem.sum},
        "lawa_snapshot_times_held": sorted(set(held)),
        "posthocema_disk_bytes": disk, "posthocema_files": files,
        "rows": rows,
    }


def report(res: dict) -> str:
    m = res["lawa_memory_bytes"]
    lines = [
        f"{res['command']}",
        f"MLP of {res['parameters']:,} parameters, SGD, {res['steps']} steps, snapshots every {res['every']} steps "
        f"of the EMAs sigma_rel={res['stored_sigma_rels']}; synthesised at step {res['synthesised_at_step']} "
        f"({res['seconds']} s of training with both recorders and the float64 EMAs)",
        f"LAWA(mode='phema', k={res['k']}) memory: {m['total']:,} B (ring {m['history']:,} B, EMAs {m['emas']:,} B), "
        f"holding the snapshots of steps {res['lawa_snapshot_times_held']}",
        f"PostHocEMA disk: {res['posthocema_disk_bytes']:,} B in {res['posthocema_files']} float16 checkpoint files "
        "(every snapshot of the run)",
        "",
        "errors against the float64 power-function EMA computed every step; 'rel' = ||x - ema|| / ||ema||, "
        "'/dep' = ||x - ema|| / ||ema - live||",
        f"{'sigma_rel':>9} {'range':>7} | {'LAWA fit':>8} {'rel':>9} {'/dep':>8} | "
        f"{'PHE fit':>8} {'rel':>9} {'/dep':>8} | {'LAWA-PHE /dep':>13}",
    ]
    for r in res["rows"]:
        flag = "*" if r["lawa_refused_by_default"] else " "
        lines.append(
            f"{r['sigma_rel']:>9.2f} {'inside' if r['inside_stored_range'] else 'outside':>7} | "
            f"{r['lawa_fit_error']:>7.2%}{flag} {r['lawa_rel_error']:>9.2e} {r['lawa_error_over_ema_departure']:>8.2%} | "
            f"{r['posthocema_fit_error']:>8.2%} {r['posthocema_rel_error']:>9.2e} "
            f"{r['posthocema_error_over_ema_departure']:>8.2%} | {r['lawa_vs_posthocema_over_ema_departure']:>13.2%}"
        )
    lines.append("* refused by LAWA's default max_fit_error=0.05 (computed here with max_fit_error=inf)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    res = run(args)
    text = report(res)
    (args.out / "phema_check.json").write_text(json.dumps(res, indent=1) + "\n")
    (args.out / "phema_check.txt").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    torch.set_num_threads(1)  # a 5k-parameter model: threads would only wait for each other
    main()
