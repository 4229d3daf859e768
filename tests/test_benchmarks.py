"""The benchmark code (benchmarks/): its baselines compute what the LAWA ops compute, and
a tiny report and pytest-benchmark run go through end to end, so the code cannot rot.
Speed itself is measured by hand (benchmarks/README.md), never asserted here."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import baselines, report, suite
from benchmarks.workloads import MODELS, Workload
from lawa_optim import ops

ROOT = Path(__file__).resolve().parents[1]

K = 3


SHAPES = [(5,), (64, 3), (2, 3, 4)]


def distinct_setup(dtype: torch.dtype = torch.float32) -> tuple[suite.Setup, list[list[torch.Tensor]]]:
    """A full ring of K different snapshots, and float64 copies of them kept aside
    (``suite.prepare`` pushes the same weights K times, under which a mean or a slot
    mix-up would not show)."""
    g = torch.Generator().manual_seed(0)
    w = Workload("three", [torch.randn(shape, generator=g).to(dtype) for shape in SHAPES])
    s = suite.prepare(w, "torch", K)
    kept = []
    for n in range(K):
        for p in w.params:
            p.mul_(-1.5).add_(n)
        ops.push(s.uniform)
        ops.ema_update(s.ema, suite.DECAY)
        kept.append([p.double() for p in w.params])
    return s, kept


@pytest.fixture
def setup():
    return distinct_setup()[0]


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bit pattern of ``t`` (NaN payloads and signed zeros included)."""
    return t.contiguous().view(torch.uint8)


#: What each baseline may write, by field of ``baselines.Lists`` (push number K goes into
#: slot K % K = 0); everything else it is handed must keep its bits.
WRITES = {
    ("snapshot", "foreach"): ("slots[0]", "total"),
    ("snapshot", "loop"): ("slots[0]", "total"),
    ("snapshot", "authors"): ("slots[0]", "avg"),
    ("ema", "foreach"): ("total",),
    ("ema", "loop"): ("total",),
    ("swap_in", "foreach"): ("backup", "params"),
    ("swap_in", "loop"): ("backup", "params"),
    ("swap_in", "authors"): ("backup", "params", "avg"),
    ("swap_back", "foreach"): ("params",),
    ("swap_back", "loop"): ("params",),
    ("recompute", "foreach"): ("total",),
    ("recompute", "loop"): ("total",),
}
ARGS = {"snapshot": K, "ema": suite.DECAY, "swap_in": K, "swap_back": K, "recompute": K}


def named_tensors(x: baselines.Lists) -> dict[str, torch.Tensor]:
    """Every tensor a baseline is handed, by field (``slots[s]`` for ring slot s)."""
    named = {f"slots[{s}] {i}": t for s, slot in enumerate(x.slots) for i, t in enumerate(slot)}
    for name in ("params", "total", "backup", "avg"):
        named.update({f"{name} {i}": t for i, t in enumerate(getattr(x, name))})
    return named


def test_every_baseline_declares_what_it_writes():
    assert set(WRITES) == {(op, name) for op, impls in baselines.BASELINES.items() for name in impls}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op,name", sorted(WRITES))
def test_no_baseline_modifies_what_it_only_reads(op, name, dtype):
    s, _ = distinct_setup(dtype)
    x = s.ema_lists if op == "ema" else s.lists
    before = {key: bits(t).clone() for key, t in named_tensors(x).items()}
    baselines.BASELINES[op][name](x, ARGS[op])
    changed = [key for key, t in named_tensors(x).items()
               if not key.startswith(WRITES[op, name]) and not torch.equal(bits(t), before[key])]
    assert changed == []


def test_model_parameter_lists_have_the_real_shapes():
    with torch.device("meta"):
        counts = {name: [p.numel() for p in build().parameters()] for name, build in MODELS.items()}
    assert (len(counts["resnet50"]), sum(counts["resnet50"])) == (161, 25_557_032)
    assert (len(counts["gpt2-small"]), sum(counts["gpt2-small"])) == (148, 124_439_808)


@pytest.mark.parametrize("name", ["foreach", "loop"])
def test_push_baselines_write_the_same_ring_and_sum(setup, name):
    b, x = setup.uniform, setup.lists
    for p in b.params:
        p.mul_(-1.5)
    ring0, total0 = b.ring.clone(), b.total.clone()
    ops.push(b)  # snapshot number K goes into slot 0
    lawa_ring, lawa_total = b.ring.clone(), b.total.clone()
    b.ring.copy_(ring0)
    b.total.copy_(total0)
    baselines.BASELINES["snapshot"][name](x, K)
    assert torch.equal(b.ring, lawa_ring)
    torch.testing.assert_close(b.total, lawa_total, rtol=1e-6, atol=1e-6)  # two roundings, not one


def test_authors_push_stores_the_weights_and_means_the_k_latest():
    s, kept = distinct_setup()
    x = s.lists
    for p in x.params:
        p.add_(0.25)
    baselines.authors_push(x, K)  # snapshot number K replaces snapshot 0
    latest = kept[1:] + [[p.double() for p in x.params]]
    for i, p in enumerate(x.params):
        assert torch.equal(x.slots[0][i], p)
        mean = sum(snap[i] for snap in latest) / K
        torch.testing.assert_close(x.avg[i].double(), mean, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["foreach", "loop", "authors"])
def test_swap_in_baselines_write_the_average_and_keep_the_weights(name):
    s, kept = distinct_setup()
    x = s.lists
    weights = [p.clone() for p in x.params]
    baselines.BASELINES["swap_in"][name](x, K)
    for i, p in enumerate(x.params):
        mean = sum(snap[i] for snap in kept) / K
        torch.testing.assert_close(p.double(), mean, rtol=1e-6, atol=1e-7)
        assert torch.equal(x.backup[i], weights[i])
    baselines.BASELINES["swap_back"][name if name != "authors" else "foreach"](x, K)
    assert all(torch.equal(p, w) for p, w in zip(x.params, weights))


@pytest.mark.parametrize("name", ["foreach", "loop"])
def test_recompute_baselines_match_the_op_bit_for_bit(setup, name):
    b = setup.uniform
    ops.recompute(b)
    expected = b.total.clone()
    for t in setup.lists.total:  # the baselines see the parameters' slices, not the padding
        t.fill_(7.0)
    baselines.BASELINES["recompute"][name](setup.lists, K)
    assert torch.equal(b.total, expected)


@pytest.mark.parametrize("name", ["foreach", "loop"])
def test_ema_baselines_match_the_op(setup, name):
    e = setup.ema
    for p in e.params:
        p.add_(1.0)
    before = e.total.clone()
    ops.ema_update(e, suite.DECAY)
    expected = e.total.clone()
    e.total.copy_(before)
    baselines.BASELINES["ema"][name](setup.ema_lists, suite.DECAY)
    torch.testing.assert_close(e.total, expected, rtol=1e-6, atol=1e-6)


def test_bytes_moved_follow_the_design_formula():
    # DESIGN.md: a snapshot moves D * (bytes(param) + 2 * bytes(slot) + 8).
    assert suite.nbytes("snapshot", 10, torch.float32, torch.bfloat16, 6) == 10 * (4 + 4 + 8)
    assert suite.nbytes("recompute", 10, torch.bfloat16, torch.bfloat16, 6) == 10 * (6 * 2 + 4)


def test_quick_report_runs_end_to_end(tmp_path, capsys):
    records = report.run([4096], suite.OPS, [], repeats=1, k=K, device=torch.device("cpu"), out=tmp_path)
    out = capsys.readouterr().out
    assert "snapshot" in out and "x foreach" in out
    (path,) = tmp_path.glob("*.json")
    saved = json.loads(path.read_text())
    assert saved == json.loads(json.dumps(records))
    keys = {"op", "backend", "device_name", "param_dtype", "history_dtype", "numel", "tensors", "median_s",
            "bytes", "gbps", "roofline_gbps", "roofline_fraction", "speedup"}
    assert {r["op"] for r in saved} == set(suite.OPS)
    for r in saved:
        assert keys <= r.keys()
        assert r["gbps"] == pytest.approx(r["bytes"] / r["median_s"] / 1e9)
        assert set(r["speedup"]) == set(baselines.BASELINES[r["op"]])
    pytest.importorskip("matplotlib")
    assert path.with_suffix(".png").stat().st_size > 0


def test_pytest_benchmark_suite_collects_and_runs():
    env = {**os.environ, "LAWA_BENCH_NUMEL": "4096", "LAWA_BENCH_MODELS": ""}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "benchmarks/bench_lawa.py",
         "--benchmark-disable"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert " passed" in done.stdout
