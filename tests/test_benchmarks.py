"""The benchmark code (benchmarks/): its baselines compute what the LAWA ops compute and
write nothing they only read, the targets and the proof's summary follow hand-made
records, a hung stage is killed alone, and a tiny report, pytest-benchmark run and GPU
proof go through end to end, so the code cannot rot. Speed itself is measured by hand
(benchmarks/README.md), never asserted here."""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks import baselines, device_checks, gpu_proof, report, sass, suite, targets
from benchmarks.stages import Context, Stage, run_stages
from benchmarks.workloads import MODELS, Workload
from lawa_optim import ops
from lawa_optim.demo import source_version

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")

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
def test_recompute_baselines_match_the_op(setup, name):
    """The baselines sum the slots plainly, the op compensated: equal to float32 rounding."""
    b = setup.uniform
    ops.recompute(b)
    expected = b.total.clone()
    for t in setup.lists.total:  # the baselines see the parameters' slices, not the padding
        t.fill_(7.0)
    baselines.BASELINES["recompute"][name](setup.lists, K)
    assert ((b.total - expected).abs() <= K * 2.0**-24 * b.ring[:K].float().abs().sum(0)).all()


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
    records = report.run([4096], suite.OPS, [], repeats=1, k=K, device=CPU, out=tmp_path,
                         dtypes=(torch.float32, torch.bfloat16), min_seconds=0.0)
    out = capsys.readouterr().out
    assert "x foreach [range]" in out and "targets on cpu" in out
    (path,) = tmp_path.glob("*.json")
    assert path.name == f"{report.machine_slug(CPU)}.json"
    assert json.loads(path.read_text()) == json.loads(json.dumps(records))
    # the first record says where and under what load: it is printed above the table
    info, records = records[0], records[1:]
    assert info["op"] == "run" and len(info["load_before"]) == len(info["load_after"]) == 3
    assert info["code"] == source_version() and info["rounds"] == [1]
    assert f"load average (1, 5, 15 min) before {'/'.join(f'{x:.2f}' for x in info['load_before'])}" in out
    assert f"code: {info['code']['text']}" in out
    impls = suite.backends_here(CPU, torch.float32)[0]["torch"]
    assert sorted((r["op"], r["param_dtype"], r["impl"]) for r in records) == sorted(
        (op, d, impl) for op in suite.OPS for d in ("float32", "bfloat16") for impl in impls)
    # Bytes per element by hand: a float32 snapshot reads the weight and the old slot,
    # writes the slot and updates the float32 sum: 4 + 4 + 4 + 8; bfloat16: 2 + 2 + 2 + 8.
    per_element = {("snapshot", "float32"): 20, ("snapshot", "bfloat16"): 14, ("swap_back", "bfloat16"): 4,
                   ("recompute", "float32"): 4 * K + 4}
    for r in records:
        assert set(r["speedup"]) == set(baselines.BASELINES[r["op"]])
        assert r["calls"] == (K if r["op"] == "snapshot" else 1)
        if (r["op"], r["param_dtype"]) in per_element:
            assert r["bytes"] == 4096 * per_element[r["op"], r["param_dtype"]]
    pytest.importorskip("matplotlib")
    assert path.with_suffix(".png").stat().st_size > 0


def test_times_are_per_operation(monkeypatch):
    # Every timed call takes 6 s by this clock; a snapshot call is K pushes in a row.
    monkeypatch.setattr(report, "interleaved", lambda calls, *args: {name: [6.0] * 5 for name in calls})
    records = report.measure(Workload("w", [torch.ones(100)]), CPU, K, suite.OPS, 1, 0.0)
    for r in records:
        assert r["median_s"] == (6.0 / K if r["op"] == "snapshot" else 6.0)
        assert r["roofline_fraction"] == 1.0 and set(r["speedup"].values()) == {1.0}
        assert r["rounds"] == 5 and all(v == [1.0, 1.0] for v in r["speedup_range"].values())


def test_speedups_are_the_median_and_range_of_the_per_round_ratios(monkeypatch):
    # round by round: baselines 2, 8, 4, 2, 2 s against LAWA 1, 2, 4, 1, 2 s: ratios 2, 4, 1, 2, 1
    # (median 2, range 1-4), where the ratio of the medians would say 1
    times = lambda calls, *args: {n: [1.0, 2.0, 4.0, 1.0, 2.0] if n.startswith("lawa") else  # noqa: E731
                                  [2.0, 8.0, 4.0, 2.0, 2.0] for n in calls}
    monkeypatch.setattr(report, "interleaved", times)
    records = report.measure(Workload("w", [torch.ones(100)]), CPU, K, ("ema",), 5, 0.0)
    for r in records:
        assert r["same_rounds_as_baselines"]
        assert set(r["speedup"].values()) == {2.0} and all(v == [1.0, 4.0] for v in r["speedup_range"].values())
    assert report.ratios([2.0, 8.0, 4.0], [1.0, 2.0, 4.0], same_rounds=False) == {"median": 2.0, "min": 0.5, "max": 8.0}
    assert "2.00 [1.00-4.00]" in report.table(records)


@pytest.mark.parametrize("name", ["lawa", *baselines.BASELINES["snapshot"]])
def test_a_timed_snapshot_is_k_pushes_in_a_row(name):
    s, _ = distinct_setup()
    op = suite.operations(s, ("snapshot",))["snapshot"]
    for p in s.workload.params:
        p.add_(10.0)
    pushes = int(s.uniform.pushes)
    (op.lawa if name == "lawa" else op.baselines[name])()
    assert int(s.uniform.pushes) == pushes + (K if name == "lawa" else 0)
    for slot in s.lists.slots:  # one pass over the whole ring: every slot holds the new weights
        assert all(torch.equal(t, p) for t, p in zip(slot, s.workload.params))


def test_sizes_parse_with_binary_suffixes():
    assert [report.parse_size(t) for t in ("4096", "64M", "2k", "1G")] == [4096, 1 << 26, 2048, 1 << 30]
    for bad in ("0", "-3M", "lots", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="positive element count"):
            report.parse_size(bad)


def find(results: list[dict], **where) -> dict:
    (hit,) = [r for r in results if all(r["where"].get(k) == v for k, v in where.items())]
    return hit


def test_targets_compare_the_matching_record_with_its_bound():
    run = {"device": "cuda", "op": "snapshot", "param_dtype": "float32", "k": 6}
    records = [
        {**run, "backend": "cuda", "workload": "flat-64M", "roofline_fraction": 0.93},
        {**run, "backend": "triton", "workload": "flat-64M", "roofline_fraction": 0.84},
        {**run, "backend": "cuda", "workload": "gpt2-small", "speedup": {"foreach": 2.5, "authors": 5.9}},
        {**run, "backend": "cuda", "workload": "resnet50", "speedup": {"foreach": 2.0, "authors": 6.1},
         "device": "cpu"},  # another device's figure proves nothing here
        {"device": "cuda", "op": "unavailable", "backend": "triton", "reason": "triton cannot be imported"},
        {"device": "cuda", "op": "pinned_snapshot", "mode": "pinned-overlap", "numel": 1 << 30,
         "extra_steps_per_snapshot": 0.06},
    ]
    results = targets.evaluate(targets.GPU, records, absent="stage report timeout")
    assert len({r["target"] for r in results}) == len(targets.GPU)
    cuda_flat = find(results, op="snapshot", backend="cuda", workload="flat-64M")
    assert (cuda_flat["status"], cuda_flat["value"], cuda_flat["threshold"]) == ("pass", 0.93, 0.90)
    assert find(results, op="snapshot", backend="triton", workload="flat-64M")["status"] == "fail"  # < 0.85
    gpt2 = [r for r in results if r["where"].get("workload") == "gpt2-small" and r["where"]["backend"] == "cuda"]
    assert [(r["metric"], r["status"], r["threshold"]) for r in gpt2] == [
        ("speedup:foreach", "pass", 2.0), ("speedup:authors", "fail", 6)]  # >= k, k = 6
    assert all(r["status"] == "skipped" and "triton cannot be imported" in r["reason"]
               for r in results if r["where"].get("backend") == "triton" and r["where"].get("workload") in MODELS)
    resnet = [r for r in results if r["where"].get("workload") == "resnet50" and r["where"]["backend"] == "cuda"]
    assert [(r["status"], r["reason"]) for r in resnet] == [("skipped", "stage report timeout")] * 2
    assert find(results, op="pinned_snapshot")["status"] == "fail"  # 6 % of a step > 5 %


def test_device_checks_exercise_every_op_and_notice_a_swap_that_does_not_restore(monkeypatch):
    assert device_checks.exercise(CPU, ["torch"]) == 2 * len(device_checks.DTYPE_PAIRS)
    monkeypatch.setattr(ops, "swap_back", lambda bucket: None)
    with pytest.raises(RuntimeError, match="did not restore the weights"):
        device_checks.exercise(CPU, ["torch"])


def test_device_checks_swap_measures_no_allocation_and_notices_a_backup(tmp_path):
    """On the CPU (resident memory): the full average swaps in place, every row passes;
    a history that backs the weights up fails every row, by the bytes of the backup."""
    rows = device_checks.swap_memory(tmp_path / "swap.json", CPU, ["torch"], 8 << 20)
    assert [(r["param_dtype"], r["history_dtype"], r["status"]) for r in rows] == [
        (p, h, "pass") for p in ("float32", "bfloat16") for h in ("float32", "bfloat16")]
    assert json.loads((tmp_path / "swap.json").read_text())["rows"] == rows
    # In a fresh process: this one's freed memory could hold a backup without growing.
    code = ("import torch; from pathlib import Path; from benchmarks import device_checks; "
            "from lawa_optim.history import History; backup_for = History._backup_for; "
            "History._backup_for = staticmethod(lambda b, *args: backup_for(b, True, 'device')); "
            f"device_checks.swap_memory(Path({str(tmp_path / 'backup.json')!r}), torch.device('cpu'), ['torch'], 8 << 20)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "backup.json").read_text())["rows"]
    assert all(r["status"] == "fail" and r["added_bytes"] >= 0.9 * r["param_bytes"] for r in rows), rows


def test_triton_accesses_are_counted_by_width_from_the_ptx(monkeypatch):
    from lawa_optim.backends import triton as backend

    ptx = """
    @%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
    ld.global.b32 %r5, [%rd2];
    ld.global.L1::evict_last.v4.b32 { %r6, %r7, %r8, %r9 }, [%rd3];
    ld.param.u64 %rd4, [table];
    st.global.v4.b32 [ %rd4 + 0 ], { %r1, %r2, %r3, %r4 };
    @%p2 st.global.b16 [%rd5], %rs1;
    """
    monkeypatch.setattr(backend, "compile_ptx", lambda arch: {f"push:sm{arch}": ptx}, raising=False)
    assert device_checks.triton_accesses(90) == {"push:sm90": {"ld": 3, "ld.v4": 2, "st": 2, "st.v4": 1}}
    monkeypatch.delattr(backend, "compile_ptx")
    assert device_checks.triton_accesses(90).startswith("no compile_ptx in this version")


def test_a_stage_that_hangs_is_killed_with_its_children_and_the_next_ones_run(tmp_path):
    def spawn(pid: Path, then: str) -> list[str]:
        """A stage that starts a sleeping child, writes its pid to ``pid``, then runs ``then``."""
        return [sys.executable, "-c", "import subprocess, sys, time\n"
                "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
                f"open({str(pid)!r}, 'w').write(str(p.pid))\n{then}"]

    hung, left = tmp_path / "hung.pid", tmp_path / "left.pid"
    ctx = Context(tmp_path, True, tmp_path)
    results = run_stages([
        Stage("hang", 2, 1, lambda c: spawn(hung, "time.sleep(600)")),
        Stage("fail", 60, 1, lambda c: [sys.executable, "-c", "raise SystemExit(3)"]),
        Stage("fine", 60, 1, lambda c: spawn(left, "print('fine')")),
        Stage("unwanted", 60, 1, lambda c: "not wanted here"),
    ], ctx, budget_s=120)
    assert [(r["stage"], r["status"], r["returncode"]) for r in results] == [
        ("hang", "timeout", None), ("fail", "failed", 3), ("fine", "ok", 0), ("unwanted", "skipped", None)]
    assert results[0]["reason"] == "killed at its limit of 2 s" and results[3]["reason"] == "not wanted here"
    assert (tmp_path / "fine.log").read_text().endswith("fine\n")
    assert not alive(int(hung.read_text())) and not alive(int(left.read_text()))
    (late,) = run_stages([Stage("late", 60, 100, lambda c: [sys.executable, "-c", ""])], ctx, budget_s=5)
    assert late["status"] == "skipped" and late["reason"].startswith("out of time")


def alive(pid: int, wait_s: float = 10.0) -> bool:
    """Whether process ``pid`` still runs after up to ``wait_s`` seconds (a zombie does not)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return False
        if state == "Z":
            return False
        time.sleep(0.05)
    return True


def test_the_summary_marks_each_target_from_what_the_stages_measured(tmp_path):
    ctx = Context(tmp_path, False, tmp_path, env={"device": "cuda", "device_name": "GPU", "slug": "gpu"})
    run = {"device": "cuda", "op": "snapshot", "param_dtype": "float32", "k": 6, "workload": "flat-64M"}
    (tmp_path / "gpu.json").write_text(json.dumps([{**run, "backend": "cuda", "roofline_fraction": 0.95}]))
    stages = [{"stage": "report", "status": "ok", "reason": None},
              {"stage": "overlap", "status": "timeout", "reason": "killed at its limit of 120 s"}]
    summary = gpu_proof.summarize(ctx, stages, ["python", "-m", "benchmarks.gpu_proof"], 1.0)
    results = summary["targets"]
    assert [r["target"] for r in results] == [t.name for t in targets.GPU]
    assert find(results, op="snapshot", backend="cuda", workload="flat-64M")["status"] == "pass"
    assert find(results, op="swap_in", backend="cuda")["reason"] == "not measured in this run"
    assert find(results, op="pinned_snapshot")["reason"] == "stage overlap timeout: killed at its limit of 120 s"


def test_test_counts_come_from_the_junit_xml(tmp_path):
    (tmp_path / "tests.xml").write_text(
        '<testsuites><testsuite tests="7" failures="1" errors="1" skipped="2">'
        '<testcase classname="tests.test_cuda" name="test_a"><failure message="x"/></testcase>'
        '<testcase classname="tests.test_triton" name="test_b"><error message="y"/></testcase>'
        '<testcase classname="tests.test_triton" name="test_c"/></testsuite></testsuites>')
    result = {}
    gpu_proof._collect_tests(Context(tmp_path, False, tmp_path), result)
    missing = [t for t in gpu_proof.GPU_TESTS if not (ROOT / t).is_file()]
    assert result["details"] == {"tests": 7, "failures": 1, "errors": 1, "skipped": 2, "passed": 3,
                                 "failed": ["tests.test_cuda::test_a", "tests.test_triton::test_b"],
                                 "missing_files": missing}
    assert result["note"].startswith("3 passed, 1 failed, 1 errors, 2 skipped")


def test_build_and_memcheck_notes_come_from_what_the_stages_wrote(tmp_path):
    ctx = Context(tmp_path, False, tmp_path)
    accesses = {"push:float32:float32": {"ld": 10, "ld.v4": 6, "st": 4, "st.v4": 2},
                "swap_back:float32": {"ld": 3, "ld.v4": 1, "st": 3, "st.v4": 1}}
    (tmp_path / "build.json").write_text(json.dumps({"seconds": 71.04, "error": None, "build_dir": "/b",
                                                     "triton_global_accesses": accesses}))
    build = {}
    gpu_proof._collect_build(ctx, build)
    assert build["note"] == ("CUDA extension built in 71.0 s; Triton PTX: 7 of 13 global loads and 3 of 7 "
                             "stores 128-bit, over 2 kernel variants")
    (tmp_path / "memcheck.log").write_text("========= Invalid __global__ read of size 4\n"
                                           "========= ERROR SUMMARY: 2 errors\n")
    memcheck = {}
    gpu_proof._collect_memcheck(ctx, memcheck)
    assert memcheck == {"details": {"errors": 2}, "note": "memcheck: 2 errors"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU every stage runs for minutes: run it by hand")
def test_gpu_proof_without_a_gpu_runs_what_it_can_and_says_what_it_skipped(tmp_path):
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_proof", "--out", str(tmp_path), "--tiny"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # The child names its files by its own thread count, whatever this process's is now.
    (found,) = tmp_path.glob("*-gpu-proof.json")
    slug = found.name.removesuffix("-gpu-proof.json")
    assert slug.startswith(report.machine_slug(CPU).rsplit("-", 2)[0])
    summary = json.loads(found.read_text())
    stages = {s["stage"]: s for s in summary["stages"]}
    assert list(stages) == ["env", "build", "tests", "swap", "report", "overlap", "int8", "memcheck"]
    assert stages["env"]["status"] == stages["report"]["status"] == stages["swap"]["status"] == "ok"
    assert stages["swap"]["note"].startswith("4/4 pass")
    for name in ("build", "tests", "memcheck", "overlap", "int8"):
        assert stages[name]["status"] == "skipped" and stages[name]["reason"].startswith("no CUDA device here")
    assert [t["target"] for t in summary["targets"]] == [t.name for t in targets.GPU]
    assert all(t["status"] == "skipped" and t["reason"].startswith("no CUDA device here") for t in summary["targets"])
    measured = json.loads((tmp_path / f"{slug}.json").read_text())
    assert {(r["op"], r["param_dtype"]) for r in measured if "median_s" in r} == {
        (op, d) for op in suite.OPS for d in ("float32", "bfloat16")}
    logs = tmp_path / f"{slug}-gpu-proof-logs"
    assert sorted(p.name for p in logs.iterdir()) == ["env.json", "env.log", "report.log", "swap.json", "swap.log"]
    assert "skipped" in (tmp_path / f"{slug}-gpu-proof.txt").read_text()
    pytest.importorskip("matplotlib")
    assert (tmp_path / f"{slug}.png").stat().st_size > 0


def test_pytest_benchmark_suite_collects_and_runs():
    env = {**os.environ, "LAWA_BENCH_NUMEL": "4096", "LAWA_BENCH_MODELS": ""}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "benchmarks/bench_lawa.py",
         "--benchmark-disable"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert " passed" in done.stdout


def test_memory_benchmark_measures_what_memory_reports():
    """The resident memory a method adds, measured in a fresh process, matches
    ``LAWA.memory()``, and a peer holds what it must (a float32 copy of the model)."""
    import concurrent.futures
    import multiprocessing

    from benchmarks import memory

    methods = ["LAWA k, float32 history", "swa_utils.AveragedModel (EMA)"]
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
        lawa, peer = (pool.submit(memory.measure, m, "resnet50", 2).result() for m in methods)
    n = lawa["parameters"]
    # a few MB of first-use allocations (the optimizer, the kernels' library) aside
    assert lawa["held_bytes"] == pytest.approx(lawa["memory_total"], rel=0.01, abs=8e6)
    assert lawa["memory_total"] > 3 * 4 * n  # 2 float32 slots and a float32 sum
    assert lawa["swap_peak_bytes"] <= 0.01 * 4 * n  # in place: no backup
    assert peer["held_bytes"] == pytest.approx(4 * n, rel=0.05) and "swap_peak_bytes" not in peer


# -- benchmarks.sass: reading the Triton kernels' machine code -------------------------

#: A kernel's listing as ``nvdisasm -c`` prints it, cut down: a loop over steps whose rare
#: branch (a refresh) holds an inner loop, a store that the first push skips, a narrow
#: load, a masked tail and the self-branch nvdisasm's listings end with.
LISTING = """\
        .global         k
k:
.text.k:
        /*0000*/                   LDG.E.64 R4, desc[UR4][R2.64] ;
        /*0010*/              @!P0 BRA `(.L_x_0) ;
.L_x_3:
        /*0020*/                   LDG.E.128 R8, desc[UR4][R6.64] ;
        /*0030*/               @P1 BRA `(.L_x_1) ;
        /*0040*/                   FADD R8, R8, R9 ;
        /*0050*/                   BRA `(.L_x_2) ;
.L_x_1:
        /*0060*/                   MOV R12, RZ ;
.L_x_4:
        /*0070*/                   LDG.E.128 R16, desc[UR4][R14.64] ;
        /*0080*/                   FADD R12, R12, R16 ;
        /*0090*/               @P2 BRA `(.L_x_4) ;
        /*00a0*/                   FMUL R8, R12, R13 ;
        /*00b0*/                   FMUL R8, R8, R13 ;
        /*00c0*/                   FMUL R8, R8, R13 ;
.L_x_2:
        /*00d0*/                   STG.E.128 desc[UR4][R6.64], R8 ;
        /*00e0*/               @P4 BRA `(.L_x_6) ;
        /*00f0*/                   STG.E.128 desc[UR4][R22.64], R24 ;
.L_x_6:
        /*0100*/                   LDG.E R20, desc[UR4][R18.64] ;
        /*0110*/              @!P3 BRA `(.L_x_3) ;
.L_x_0:
        /*0120*/               @P0 EXIT ;
        /*0130*/              @!P5 STG.E.U16 desc[UR4][R2.64], R4 ;
        /*0140*/                   EXIT ;
.L_x_5:
        /*0150*/                   BRA `(.L_x_5);
"""


def test_sass_reads_a_listing():
    """The loop, its inner loop, and the cheapest iteration that still writes every
    store: counted by hand from LISTING."""
    instrs, labels = sass.parse_listing(LISTING)
    assert len(instrs) == 22 and labels[".L_x_4"] == 0x70 and labels[".L_x_5"] == 0x150
    cases = {0x10: ("BRA", False, (None)), 0x50: ("BRA", True, None), 0x120: ("EXIT", False, None),
             0x130: ("STG.E.U16", False, ("store", 16)), 0x100: ("LDG.E", False, ("load", 32)),
             0x0: ("LDG.E.64", False, ("load", 64)), 0xd0: ("STG.E.128", False, ("store", 128))}
    for i in instrs:
        if i.addr in cases:
            assert (i.opcode, i.ends_flow, i.access()) == cases[i.addr], hex(i.addr)
    assert not sass.Instr(0, "@P6 BRA P5, `(.L_x_24)").ends_flow  # a branch on two predicates
    assert not sass.Instr(0, "BRA !P5, `(.L_x_24)").ends_flow
    (main,) = sass.main_loops(instrs, labels)  # the self-branch holds no 128-bit access
    assert (main.head, main.tail) == (0x20, 0x110)
    record = sass.read_listing(LISTING, 8)
    (loop,) = record["loops"]
    # 0x20 0x30 0x40 0x50 | 0xd0 0xe0 | 0xf0 | 0x100 0x110: past the refresh, through both stores
    assert loop["path"] == {"instructions": 9, "loads_128": 1, "loads_narrow": 1, "stores_128": 2,
                            "stores_narrow": 0}
    assert loop["all"] == 16 - 3 and loop["per_element"] == 9 / 8
    (inner,) = loop["inner"]
    assert (inner["head"], inner["all"], inner["path"]["instructions"], inner["path"]["loads_128"]) == ("0x0070", 3, 3, 1)
    text = sass.table({"kernels": {"k": record}})
    assert text.splitlines()[1].split() == ["k", "22", "1", "8", "9", "1.1", "13", "1", "1", "2", "0"]
    assert text.splitlines()[2].split()[:3] == ["1.1", "3", "0.4"]
    with pytest.raises(ValueError, match="no loop with a 128-bit global access"):
        sass.read_listing(LISTING.replace(".128", ".64"), 8)


def _toolchain() -> str | None:
    """Why Triton's ptxas and nvdisasm cannot be run here, or None."""
    try:
        from triton import knobs
        from triton.backends.nvidia.compiler import get_ptxas

        tools = [get_ptxas(90).path, knobs.nvidia.nvdisasm.path]
    except Exception as exc:  # noqa: BLE001 -- any failure means: no toolchain
        return f"{type(exc).__name__}: {exc}"
    return None if all(Path(t).is_file() for t in tools) else f"missing: {tools}"


@pytest.mark.skipif(_toolchain() is not None, reason=f"Triton's ptxas/nvdisasm: {_toolchain()}")
def test_sass_of_the_float32_push_moves_the_parameters_128_bits_at_a_time(tmp_path):
    """For real, sm_90: where the host found every parameter aligned the push has one loop
    and it loads the parameter, the slot and the mean 128 bits at a time; the per-row
    variant keeps a second loop for misaligned rows, which loads the parameter one
    element (32 bits) at a time."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "sass.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.sass", "--kernels", "push:float32:float32",
                           "push:float32:float32:per_row", "--out", str(out)], check=False, cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    kernels = json.loads(out.read_text())["kernels"]
    (aligned,) = kernels["push:float32:float32"]["loops"]
    assert kernels["push:float32:float32"]["elements_per_thread"] == 8
    assert {k: aligned["path"][k] for k in ("loads_128", "loads_narrow", "stores_128", "stores_narrow")} == {
        "loads_128": 3 * 2, "loads_narrow": 0, "stores_128": 2 * 2, "stores_narrow": 0}
    rows = kernels["push:float32:float32:per_row"]["loops"]
    assert sorted(lp["path"]["loads_narrow"] for lp in rows) == [0, 8]
