"""The performance targets of the LAWA history (Kaddour 2022, arXiv:2209.14981).

Each target is a ratio measured within one run (the operation against the copy
roofline or a baseline timed in the same rounds), so it holds on a shared machine where
absolute times do not. :func:`evaluate` compares the records of ``report.py`` and
``overlap.py`` with them: ``pass``, ``fail``, or ``skipped`` with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MODELS = ("resnet50", "gpt2-small")
#: The flat workload the roofline targets are measured at: 64M float32 elements.
FLAT = {"workload": "flat-64M", "param_dtype": "float32"}
#: The pinned-memory target's model: 2^30 float32 weights, 4 GiB (benchmarks/overlap.py).
BILLION = 1 << 30


@dataclass(frozen=True)
class Target:
    """``metric`` of the record matching ``where`` must be ``bound`` ``threshold`` (the
    record's k when ``threshold`` is None)."""

    device: str
    where: dict = field(hash=False)
    metric: str  # a record field, or "speedup:<baseline>"
    bound: str  # ">=" or "<="
    threshold: float | None

    @property
    def name(self) -> str:
        w = self.where
        if w["op"] == "pinned_snapshot":
            return f"{w['mode']} snapshot of {w['numel']:,} float32 weights: {METRICS[self.metric]}"
        what = " ".join(str(w[key]) for key in ("backend", "impl", "op", "workload", "param_dtype") if key in w)
        return f"{what}: {METRICS[self.metric]}"


METRICS = {
    "roofline_fraction": "fraction of the copy roofline",
    "speedup:foreach": "speed-up over the torch._foreach_* baseline",
    "speedup:authors": "speed-up over the authors' recompute of the mean",
    "extra_steps_per_snapshot": "extra time per snapshot, in training steps",
}


def _speedups(device: str, where: dict, baseline: str, threshold: float | None) -> list[Target]:
    return [Target(device, {**where, "workload": m, "param_dtype": "float32"}, f"speedup:{baseline}", ">=", threshold)
            for m in MODELS]


#: Issue 12 section 5: the GPU figures, each with its bound.
GPU: list[Target] = [
    Target("cuda", {"op": "snapshot", "backend": "cuda", **FLAT}, "roofline_fraction", ">=", 0.90),
    Target("cuda", {"op": "snapshot", "backend": "triton", **FLAT}, "roofline_fraction", ">=", 0.85),
    *[t for b in ("cuda", "triton") for base, bound in (("foreach", 2.0), ("authors", None))
      for t in _speedups("cuda", {"op": "snapshot", "backend": b}, base, bound)],
    *[Target("cuda", {"op": op, "backend": b, **FLAT}, "roofline_fraction", ">=", 0.90)
      for op in ("swap_in", "swap_back") for b in ("cuda", "triton")],
    Target("cuda", {"op": "pinned_snapshot", "mode": "pinned-overlap", "numel": BILLION},
           "extra_steps_per_snapshot", "<=", 0.05),
]

#: Issues 11 and 12: the CPU's C kernels against torch._foreach_* in the same run.
CPU: list[Target] = [
    Target("cpu", {"op": "snapshot", "backend": "torch", "impl": "fused-c", "workload": "gpt2-small",
                   "param_dtype": "float32"}, "speedup:foreach", ">=", 1.3),
    *[t for op in ("ema", "swap_in", "swap_back")
      for t in _speedups("cpu", {"op": op, "backend": "torch", "impl": "fused-c"}, "foreach", 1.0)],
]

TARGETS = {"cuda": GPU, "cpu": CPU}


def _value(record: dict, metric: str) -> float | None:
    if metric.startswith("speedup:"):
        return record.get("speedup", {}).get(metric.split(":", 1)[1])
    return record.get(metric)


def evaluate(targets: list[Target], records: list[dict], absent: str = "not measured in this run") -> list[dict]:
    """One result per target: its value in the last matching record and ``pass``/``fail``,
    or ``skipped`` with why (``absent`` when nothing says more)."""
    results = []
    for t in targets:
        matching = [r for r in records
                    if r.get("device") == t.device and all(r.get(k) == v for k, v in t.where.items())]
        result = {"target": t.name, "device": t.device, "where": t.where, "metric": t.metric, "bound": t.bound,
                  "threshold": t.threshold, "value": None, "status": "skipped", "reason": None}
        if not matching:
            down = [r for r in records if r.get("op") == "unavailable" and r.get("device") == t.device
                    and r.get("backend") == t.where.get("backend")]
            result["reason"] = f"the {t.where['backend']} backend did not run: {down[-1]['reason']}" if down else absent
        else:
            r = matching[-1]
            threshold = r["k"] if t.threshold is None else t.threshold
            value = _value(r, t.metric)
            ok = value is not None and (value >= threshold if t.bound == ">=" else value <= threshold)
            result.update(threshold=threshold, value=value, status="pass" if ok else "fail")
        results.append(result)
    return results


def _show(metric: str, x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.2f}x" if metric.startswith("speedup:") else f"{100 * x:.0f}%"


def table(results: list[dict]) -> str:
    """A fixed-width table of :func:`evaluate`'s results."""
    lines = [f"{'status':<9}{'value':>8}  {'target':<12}what", "-" * 100]
    for r in results:
        bound = f"{r['bound']} {'k' if r['threshold'] is None else _show(r['metric'], r['threshold'])}"
        line = f"{r['status']:<9}{_show(r['metric'], r['value']):>8}  {bound:<12}{r['target']}"
        lines.append(line + (f"\n{'':<31}({r['reason']})" if r["reason"] else ""))
    return "\n".join(lines)
