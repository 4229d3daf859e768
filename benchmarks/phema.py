"""The per-step cost of ``LAWA(mode="phema")``: E power-function EMAs (EDM2, Karras et
al. 2024) updated in one fused pass, against ``torch._foreach_lerp_`` once per EMA.

    python -m benchmarks.phema                       # GPT-2 small, E = 2 and 4, CPU
    python -m benchmarks.phema --widths 2 --rounds 5 --out /tmp/phema.json

The fused update (:func:`lawa_optim.ops.phema_update`; on the CPU the C kernel of
``csrc/cpu_kernels.c``) reads each parameter once for all E EMAs; the baseline is what
``ema_pytorch``'s ``PostHocEMA`` and ``torch.optim.swa_utils`` do, one ``lerp_`` pass over
the parameters per EMA, here in its fastest form, ``torch._foreach_lerp_`` over the
whole list. Both run on the float32 parameter list of GPT-2 small (148 tensors, 124.4M
elements, random weights; :mod:`benchmarks.workloads`) at step t = 1000, timed in
interleaved rounds (the order alternating from round to round) so that load from other
processes falls on both alike; the ratio baseline / fused is taken per round and its
median and range reported. Writes one JSON record per E.
"""

from __future__ import annotations

import datetime
import json
import statistics
import time

from benchmarks import RESULTS
from lawa_optim._cli import Parser, int_at_least, output_file

#: The widths of E EMAs: EDM2's pair, and between and beyond it.
SIGMA_RELS = {1: (0.10,), 2: (0.05, 0.10), 3: (0.05, 0.10, 0.15), 4: (0.05, 0.075, 0.10, 0.15)}


def _parser() -> Parser:
    p = Parser(prog="python -m benchmarks.phema", description=__doc__.split("\n\n")[0])
    p.add_argument("--widths", type=int, nargs="+", default=[2, 4], choices=sorted(SIGMA_RELS),
                   help="numbers of EMAs to time (2 4)")
    p.add_argument("--rounds", type=int_at_least(1), default=9, help="interleaved rounds (9)")
    p.add_argument("--out", type=output_file, default=None,
                   help="JSON file (default: benchmarks/results/phema-<machine>.json)")
    return p


if __name__ == "__main__":  # answer a bad argument or --help before the imports below, which take seconds
    _parser().parse_args()

import torch  # noqa: E402

from benchmarks.report import device_name, machine_slug  # noqa: E402
from benchmarks.workloads import model_params  # noqa: E402
from lawa_optim import ops, phema  # noqa: E402
from lawa_optim.backends import cpu_kernels  # noqa: E402
from lawa_optim.history import Bucket  # noqa: E402

STEP = 1000


def measure(widths: int, rounds: int, workload: str = "gpt2-small") -> dict:
    """One record: the fused update of ``widths`` EMAs against one ``_foreach_lerp_`` per EMA."""
    device = torch.device("cpu")
    w = model_params(workload, torch.float32, device)
    sigma_rels = SIGMA_RELS[widths]
    alphas = [phema.alpha(STEP, phema.sigma_rel_to_gamma(s)) for s in sigma_rels]
    b = Bucket(w.params, widths, "phema", None, "device", "torch", widths=widths)
    a = torch.tensor(alphas, dtype=torch.float32)
    emas = [[p.detach().clone() for p in w.params] for _ in range(widths)]
    for e in range(widths):
        torch._foreach_copy_(b.views(b.emas[e]), w.params)

    def fused() -> None:
        ops.phema_update(b, a)

    def foreach_lerp() -> None:
        for ema, alpha in zip(emas, alphas):
            torch._foreach_lerp_(ema, w.params, alpha)

    calls = {"fused": fused, "foreach_lerp": foreach_lerp}
    for fn in calls.values():  # warm-up: the C library's build, caches, page faults
        fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for r in range(rounds):
        for name in (list(calls) if r % 2 == 0 else list(reversed(calls))):
            t0 = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - t0)
    ratios = [base / mine for base, mine in zip(times["foreach_lerp"], times["fused"])]
    moved = w.numel * (4 + 8 * widths)  # the fused pass: read the weight, read and write each EMA
    fused_s = statistics.median(times["fused"])
    return {
        "benchmark": "phema_update", "workload": workload, "numel": w.numel, "tensors": len(w.params),
        "widths": widths, "sigma_rels": list(sigma_rels), "step": STEP, "rounds": rounds,
        "device_name": device_name(device), "fused_c_kernel": cpu_kernels.runs(b, "phema"),
        "fused_ms": 1e3 * fused_s, "foreach_lerp_ms": 1e3 * statistics.median(times["foreach_lerp"]),
        "fused_gbps": moved / fused_s / 1e9,
        "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
        "torch": torch.__version__,
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def line(r: dict) -> str:
    return (
        f"{r['workload']} ({r['numel'] / 1e6:.1f}M float32, {r['tensors']} tensors), E={r['widths']}: "
        f"fused {r['fused_ms']:.1f} ms ({r['fused_gbps']:.1f} GB/s), foreach_lerp x E {r['foreach_lerp_ms']:.1f} ms; "
        f"foreach_lerp / fused = {r['ratio_median']:.2f}x median, {r['ratio_min']:.2f}-{r['ratio_max']:.2f}x over "
        f"{r['rounds']} rounds ({r['device_name']})"
    )


def main(argv: list[str] | None = None) -> list[dict]:
    args = _parser().parse_args(argv)
    out = args.out or RESULTS / f"phema-{machine_slug(torch.device('cpu'))}.json"
    records = []
    for widths in args.widths:
        records.append(measure(widths, args.rounds))
        print(line(records[-1]), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(records, indent=1) + "\n")
    return records


if __name__ == "__main__":
    main()
