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
from benchmarks.workloads import MODELS, flat_params
from lawa_optim import ops

ROOT = Path(__file__).resolve().parents[1]

K = 3


@pytest.fixture
def setup():
    g = torch.Generator().manual_seed(0)
    w = flat_params(8, torch.float32, torch.device("cpu"))
    w.params = [torch.randn(s, generator=g) for s in [(5,), (64, 3), (2, 3, 4)]]
    return suite.prepare(w, "torch", K)


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


def test_authors_mean_is_the_mean_of_the_stored_copies(setup):
    b, x = setup.uniform, setup.lists
    baselines.authors_push(x, K)
    held = b.ring.double().mean(0)
    for i in range(len(b.params)):
        torch.testing.assert_close(x.avg[i].double(), b.view(held, i), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["foreach", "loop", "authors"])
def test_swap_in_baselines_write_the_average_and_keep_the_weights(setup, name):
    b, x = setup.uniform, setup.lists
    weights = [p.clone() for p in b.params]
    baselines.BASELINES["swap_in"][name](x, K)
    mean = b.ring.double().mean(0)
    for i, p in enumerate(b.params):
        torch.testing.assert_close(p.double(), b.view(mean, i), rtol=1e-6, atol=1e-7)
        assert torch.equal(x.backup[i], weights[i])
    baselines.BASELINES["swap_back"][name if name != "authors" else "foreach"](x, K)
    assert all(torch.equal(p, w) for p, w in zip(b.params, weights))


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
