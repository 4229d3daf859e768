"""Extra time per training step of a LAWA snapshot into host memory (GPU only).

    python -m benchmarks.overlap                     # 1B float32 weights, k=6
    python -m benchmarks.overlap --numel 16M --out /tmp/pinned

LAWA (Kaddour 2022, arXiv:2209.14981) on a model whose k snapshots do not fit on its
GPU keeps them in host memory. This times a fixed stand-in training step (matrix
products, then an in-place update of every weight) over ``steps`` steps with one
snapshot after the first, against the same steps without one, for:

* ``cpu``: ``storage="cpu"``, the synchronous path (copy to pageable memory, then the
  host update, while the GPU idles);
* ``pinned-sync``: ``storage="pinned"`` but waiting for the snapshot at once;
* ``pinned-overlap``: ``storage="pinned"`` as used: the copy runs on a side stream and
  the host update on a worker thread while training goes on.

The window ends when the snapshot is in the ring, so nothing is left uncounted. The
snapshot timed is the one that completes a pass over the ring, the dearest of k (it
may also refresh the running mean from the ring).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from benchmarks import RESULTS
from lawa_optim._cli import Parser, int_at_least, output_dir, parse_size

#: 2^30 float32 weights: a 1B-parameter model (4 GiB), in tensors of 64M elements.
NUMEL, CHUNK = 1 << 30, 1 << 26


def _parser() -> Parser:
    ap = Parser(prog="python -m benchmarks.overlap", description=__doc__.split("\n")[0])
    ap.add_argument("--numel", type=parse_size, default=NUMEL, help="float32 weights (default 1G, 4 GiB)")
    ap.add_argument("--k", type=int_at_least(1), default=6, help="snapshots in the ring (default 6)")
    ap.add_argument("--steps", type=int_at_least(1), default=30, help="training steps per timed window (default 30)")
    ap.add_argument("--out", type=output_dir, default=RESULTS, help=f"output folder (default {RESULTS})")
    return ap


if __name__ == "__main__":  # answer a bad argument or --help before the imports below, which take seconds
    _parser().parse_args()

import torch  # noqa: E402

from benchmarks.report import machine_slug  # noqa: E402
from lawa_optim.history import History  # noqa: E402


def _window(step: Callable[[], None], steps: int, snapshot: Callable[[], None] | None,
            finish: Callable[[], None]) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(steps):
        step()
        if i == 0 and snapshot is not None:
            snapshot()
    finish()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def measure(numel: int = NUMEL, k: int = 6, steps: int = 30) -> list[dict]:
    """One record per storage mode: seconds per plain step and extra seconds per snapshot."""
    dev = torch.device("cuda")
    params = [torch.randn(min(CHUNK, numel - lo), device=dev) for lo in range(0, numel, CHUNK)]
    a = torch.randn(8192, 8192, device=dev)
    out = torch.empty_like(a)

    def step(hist: History | None = None) -> None:
        for _ in range(4):  # ~4.4 TFLOP: tens of ms, the scale of a real step
            torch.mm(a, a, out=out)
        if hist is not None:
            hist.before_step()  # what LAWA.step does: the update waits for a pending copy
        torch._foreach_add_(params, 1e-6)

    _window(step, 2, None, lambda: None)  # warm-up: kernels, allocator
    plain = _window(step, steps, None, lambda: None)
    records = []
    for storage, modes in (("cpu", ["cpu"]), ("pinned", ["pinned-sync", "pinned-overlap"])):
        hist = History(k, "uniform", None, storage, "auto", None)  # pinning 28 GiB takes a while: once
        hist.extend([{"params": params}])
        for mode in modes:
            records.append(_snapshot_record(mode, hist, params, k, steps, step, plain))
        del hist
    return records


def _snapshot_record(mode: str, hist: History, params: list[torch.Tensor], k: int,
                     steps: int, step: Callable[..., None], plain: float) -> dict:
    overlap = mode == "pinned-overlap"  # the others wait for the snapshot at once
    for b in hist.buckets:
        b.pushes.fill_(2 * k - 1)  # a full ring, and the push that completes a pass over it

    def finish() -> None:
        for b in hist.buckets:
            b.wait()

    def snapshot() -> None:
        hist.push()
        if not overlap:
            finish()

    extra = _window(lambda: step(hist), steps, snapshot, finish) - plain
    return {"op": "pinned_snapshot", "mode": mode, "device": "cuda",
            "device_name": torch.cuda.get_device_name(params[0].device),
            "numel": sum(p.numel() for p in params), "tensors": len(params), "k": k, "steps": steps,
            "step_s": plain / steps, "extra_s_per_snapshot": extra,
            "extra_steps_per_snapshot": extra / (plain / steps)}


def main(argv: list[str] | None = None) -> list[dict]:
    """Command line: measure, print, and write ``<machine>-pinned.json`` under ``--out``."""
    args = _parser().parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.overlap needs a CUDA GPU: it times copies from the GPU to pinned host memory")
    records = measure(args.numel, args.k, args.steps)
    print(f"\nsnapshot of {records[0]['numel'] / 1e9:.2f}B float32 weights into host memory, "
          f"k={records[0]['k']}; plain step {1e3 * records[0]['step_s']:.1f} ms")
    for r in records:
        print(f"  {r['mode']:<16}extra {1e3 * r['extra_s_per_snapshot']:>9.1f} ms per snapshot "
              f"({r['extra_steps_per_snapshot']:.2f} steps)")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{machine_slug(torch.device('cuda'))}-pinned.json"
    path.write_text(json.dumps(records, indent=1) + "\n")
    print(f"wrote {path}")
    return records


if __name__ == "__main__":
    main()
