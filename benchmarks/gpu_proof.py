"""One command that proves the GPU side of LAWA (Kaddour 2022, arXiv:2209.14981).

    python -m benchmarks.gpu_proof --out DIR           # one H100: under 8 minutes
    python -m benchmarks.gpu_proof --out DIR --tiny    # tiny sizes (CI: seconds without a GPU)

Stages, each a child process with a hard time limit (its whole process group is killed
at the limit, so a hang costs that stage only, and what the others wrote stays):

- ``env``: versions, the device, the tools (``benchmarks.device_checks env``);
- ``build``: the CUDA extension compiled from scratch into a fresh build directory, timed,
  and the global accesses in the PTX of the Triton kernels counted (128-bit or narrower);
- ``tests``: the files of :data:`GPU_TESTS` under pytest, counted from its JUnit XML;
- ``swap``: the allocation-free swap (``benchmarks.device_checks swap``): what
  ``averaged()`` adds to ``torch.cuda.max_memory_allocated`` on 50M parameters, float32
  and bfloat16 parameters and histories, every fused backend, at most 1 % of the
  parameters' bytes, and the weights and the running mean back bit for bit (on the CPU:
  the torch backend and resident memory);
- ``report``: ``benchmarks/report.py``: flat 64M and 256M elements in float32 and bfloat16
  and the ResNet-50 and GPT-2 small parameter lists, every operation and backend;
- ``overlap``: ``benchmarks/overlap.py``, the pinned snapshot of a 1B-parameter model;
- ``int8``: ``benchmarks.int8_push``, the 8-bit history's snapshot beside the bfloat16
  ring's on GPT-2 small's parameters;
- ``memcheck``: ``compute-sanitizer --tool memcheck`` over ``benchmarks.device_checks exercise``.

Without CUDA the stages that need it are skipped with the reason and the report runs on
the CPU. All files go into DIR under names that start with the device's name:
``<device>.json``/``.png`` (report), ``<device>-pinned.json`` (overlap),
``<device>-gpu-proof.json``/``.txt`` (every stage, and every target of
:data:`benchmarks.targets.GPU` marked pass, fail or skipped with the reason) and
``<device>-gpu-proof-logs/`` (a log per stage). The exit status is 0 when every stage
that ran finished cleanly; a missed target is a result, not an error.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import shutil
import signal
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from benchmarks import targets
from benchmarks.stages import ROOT, Context, Interrupted, Stage, run_stages
from lawa_optim._cli import Parser, output_dir

#: The test files that run kernels on a GPU when one is present: the fused kernels against
#: the reference on the GPU (the bucket beyond 2**31 elements included), CUDA graphs, the
#: CUDA and Triton backends, the pinned-memory path, torch.compile, and the files whose
#: tests run on every backend. Files not in the checkout are named in the summary.
GPU_TESTS = ("tests/test_gpu_kernels.py", "tests/test_cuda_graphs.py", "tests/test_cuda.py", "tests/test_triton.py",
             "tests/test_pinned.py", "tests/test_compile.py", "tests/test_guarantee.py", "tests/test_ops.py",
             "tests/test_wrapper.py", "tests/test_state_dict.py")
#: Seconds for the whole proof: it must fit one 8-minute call with room to start.
BUDGET_S = 450.0
#: Seconds a single test may run when pytest-timeout is installed (else the stage's limit).
TEST_TIMEOUT_S = 90
#: pytest-xdist workers for the GPU tests, where it is installed.
TEST_WORKERS = 4


# -- the stages -------------------------------------------------------------------------

def _needs_cuda(ctx: Context) -> str | None:
    if ctx.env.get("device") == "cuda":
        return None
    return f"no CUDA device here ({ctx.env['device_name']})" if ctx.env else "the env stage did not report a device"


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _collect_env(ctx: Context, result: dict) -> None:
    info = _read_json(ctx.logs / "env.json")
    if not isinstance(info, dict):
        return
    ctx.env = info
    logs = ctx.out / f"{info['slug']}-gpu-proof-logs"  # the device's name is known from here on
    shutil.rmtree(logs, ignore_errors=True)
    ctx.logs = ctx.logs.rename(logs)
    result["log"] = str(logs / "env.log")
    result["note"] = f"{info['device_name']}, torch {info['torch']}, CUDA {info['cuda']}, triton {info['triton']}"
    if info["device"] == "cuda":  # a cold build, timed by the build stage and shared by the others
        ctx.scratch = Path(tempfile.mkdtemp(prefix="lawa-optim-build-"))
        ctx.child_env["LAWA_OPTIM_BUILD_DIR"] = str(ctx.scratch)


def _collect_build(ctx: Context, result: dict) -> None:
    info = _read_json(ctx.logs / "build.json")
    if not isinstance(info, dict):
        return
    result["details"] = info
    result["note"] = f"CUDA extension built in {info['seconds']:.1f} s" if info["error"] is None else info["error"]
    ptx = info["triton_global_accesses"]
    if isinstance(ptx, dict):
        total = {key: sum(c[key] for c in ptx.values()) for key in ("ld", "ld.v4", "st", "st.v4")}
        result["note"] += (f"; Triton PTX: {total['ld.v4']} of {total['ld']} global loads and {total['st.v4']} "
                           f"of {total['st']} stores 128-bit, over {len(ptx)} kernel variants")


def _tests(ctx: Context) -> list[str] | str:
    why = _needs_cuda(ctx)
    present = [t for t in GPU_TESTS if (ROOT / t).is_file()]
    if why or not present:
        return f"{why}: the GPU tests would repeat the CPU suite" if why else "no file of GPU_TESTS is in the checkout"
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={ctx.logs / 'tests.xml'}"]
    if importlib.util.find_spec("pytest_timeout") is not None:
        argv.append(f"--timeout={TEST_TIMEOUT_S}")  # a hung test fails alone, the others still report
    if importlib.util.find_spec("xdist") is not None:
        # The Triton tests compile a kernel for each operation and dtype pair at first use,
        # on one core per process: four workers compile four at a time.
        argv += ["-n", str(TEST_WORKERS)]
    return argv + present


def _collect_tests(ctx: Context, result: dict) -> None:
    missing = [t for t in GPU_TESTS if not (ROOT / t).is_file()]
    try:
        root = ET.parse(ctx.logs / "tests.xml").getroot()
    except (OSError, ET.ParseError):  # killed before pytest wrote it: the log has what ran
        result["details"] = {"missing_files": missing}
        return
    counts = {key: sum(int(s.get(key, 0)) for s in root.iter("testsuite"))
              for key in ("tests", "failures", "errors", "skipped")}
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in root.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    result["details"] = {**counts, "passed": passed, "failed": failed[:50], "missing_files": missing}
    result["note"] = (f"{passed} passed, {counts['failures']} failed, {counts['errors']} errors, "
                      f"{counts['skipped']} skipped")
    if missing:
        result["note"] += f"; not in the checkout: {', '.join(missing)}"


def _memcheck(ctx: Context) -> list[str] | str:
    tool = shutil.which("compute-sanitizer")
    why = _needs_cuda(ctx) or (None if tool else "compute-sanitizer is not installed")
    return why or [tool, "--tool", "memcheck", "--error-exitcode", "1",
                   sys.executable, "-m", "benchmarks.device_checks", "exercise"]


def _collect_memcheck(ctx: Context, result: dict) -> None:
    found = re.findall(r"ERROR SUMMARY: (\d+) error", (ctx.logs / "memcheck.log").read_text(errors="replace"))
    if found:
        result["details"] = {"errors": int(found[-1])}
        result["note"] = f"memcheck: {found[-1]} errors"


def _report(ctx: Context) -> list[str]:
    sizes, models = (["4096"], []) if ctx.tiny else (["64M", "256M"], list(targets.MODELS))
    # 0.5 s of rounds per measurement (at least 7): ~90 measurements fit in 2 minutes.
    return [sys.executable, "benchmarks/report.py", "--full", "--sizes", *sizes, "--dtypes", "float32", "bfloat16",
            "--models", *models, "--seconds", "0.01" if ctx.tiny else "0.5", *(["--repeats", "1"] if ctx.tiny else []),
            "--out", str(ctx.out)]


def _collect_report(ctx: Context, result: dict) -> None:
    records = _read_json(ctx.out / f"{ctx.env.get('slug')}.json")
    if isinstance(records, list):
        result["note"] = f"{sum('median_s' in r for r in records)} measurements"


def _overlap(ctx: Context) -> list[str] | str:
    return _needs_cuda(ctx) or [sys.executable, "-m", "benchmarks.overlap", "--out", str(ctx.out),
                                *(["--numel", "16M", "--steps", "3"] if ctx.tiny else [])]


def _collect_overlap(ctx: Context, result: dict) -> None:
    records = _read_json(ctx.out / f"{ctx.env.get('slug')}-pinned.json")
    if isinstance(records, list):
        result["note"] = ", ".join(f"{r['mode']} +{r['extra_steps_per_snapshot']:.3f} steps" for r in records)


def _int8(ctx: Context) -> list[str] | str:
    return _needs_cuda(ctx) or [sys.executable, "-m", "benchmarks.int8_push", "--device", "cuda",
                                "--out", str(ctx.out / f"{ctx.env.get('slug')}-int8-push.json"),
                                *(["--model", "resnet50", "--repeats", "3"] if ctx.tiny else [])]


def _collect_int8(ctx: Context, result: dict) -> None:
    record = _read_json(ctx.out / f"{ctx.env.get('slug')}-int8-push.json")
    if isinstance(record, dict):
        t = record["push_seconds"]
        result["note"] = (f"int8 push {t['int8']['median'] * 1e3:.2f} ms, bfloat16 {t['bfloat16']['median'] * 1e3:.2f} ms "
                          f"(ratio {record['int8_over_bfloat16']['median']:.2f})")


def _swap(ctx: Context) -> list[str]:
    return [sys.executable, "-m", "benchmarks.device_checks", "swap", str(ctx.logs / "swap.json"),
            "--parameters", "1M" if ctx.tiny else "50M"]


def _collect_swap(ctx: Context, result: dict) -> None:
    rows = (_read_json(ctx.logs / "swap.json") or {}).get("rows")
    if isinstance(rows, list):
        result["details"] = {"rows": rows}
        worst = max((r["added_bytes"] / r["param_bytes"] for r in rows), default=0.0)
        result["note"] = (f"{sum(r['status'] == 'pass' for r in rows)}/{len(rows)} pass; averaged() adds at most "
                          f"{100 * worst:.3f} % of the parameters' bytes")


def _env(ctx: Context) -> list[str]:
    return [sys.executable, "-m", "benchmarks.device_checks", "env", str(ctx.logs / "env.json")]


def _build(ctx: Context) -> list[str] | str:
    return _needs_cuda(ctx) or [sys.executable, "-m", "benchmarks.device_checks", "build", str(ctx.logs / "build.json")]


#: Limits and floors in seconds, sized for one H100 (expected: env 10, build 90, tests 100,
#: swap 20, report 110, overlap 55, memcheck 50): the limits add up to more than BUDGET_S, the
#: floors keep room for the figures. memcheck goes last: a sanitized Python is the slowest
#: and the least needed of the stages.
STAGES = [
    Stage("env", 60, 10, _env, _collect_env),
    Stage("build", 180, 60, _build, _collect_build),
    Stage("tests", 150, 60, _tests, _collect_tests),
    Stage("swap", 60, 15, _swap, _collect_swap),
    Stage("report", 150, 100, _report, _collect_report),
    Stage("overlap", 100, 60, _overlap, _collect_overlap),
    Stage("int8", 60, 20, _int8, _collect_int8),
    # Every allocation its own cudaMalloc, so memcheck sees an access past any tensor.
    Stage("memcheck", 75, 45, _memcheck, _collect_memcheck, {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}),
]


# -- the summary ------------------------------------------------------------------------

def summarize(ctx: Context, results: list[dict], command: list[str], seconds: float) -> dict:
    """Every target of :data:`benchmarks.targets.GPU` against what the stages measured."""
    slug = ctx.env.get("slug", "unknown-device")
    records = [r for name in (f"{slug}.json", f"{slug}-pinned.json")
               for r in (_read_json(ctx.out / name) or [])]
    stage = {r["stage"]: r for r in results}
    evaluated = []
    no_cuda = _needs_cuda(ctx)
    for t in targets.GPU:
        source = stage.get("overlap" if t.where["op"] == "pinned_snapshot" else "report")
        if no_cuda:
            absent = no_cuda
        elif source is None or source["status"] != "ok":
            absent = f"stage {source['stage']} {source['status']}: {source['reason']}" if source else "not run"
        else:
            absent = "not measured at --tiny sizes" if ctx.tiny else "not measured in this run"
        evaluated += targets.evaluate([t], records, absent)
    return {"command": shlex.join(command), "device_name": ctx.env.get("device_name", "an unknown device"),
            "env": ctx.env,
            "tiny": ctx.tiny, "budget_s": BUDGET_S, "seconds": round(seconds, 1), "gpu_tests": list(GPU_TESTS),
            "stages": results, "targets": evaluated}


def summary_text(summary: dict) -> str:
    """The stages and the targets as fixed-width tables."""
    lines = [f"LAWA GPU proof on {summary['device_name']}: {summary['command']}", "",
             f"{'stage':<10}{'status':<13}{'seconds':>8}{'limit':>7}  note"]
    for r in summary["stages"]:
        limit = "-" if r["limit_s"] is None else f"{r['limit_s']}"
        note = r["note"] or r["reason"] or ""
        lines.append(f"{r['stage']:<10}{r['status']:<13}{r['seconds']:>8.1f}{limit:>7}  {note}")
    counts = {s: sum(t["status"] == s for t in summary["targets"]) for s in ("pass", "fail", "skipped")}
    lines += ["", f"targets: {counts['pass']} pass, {counts['fail']} fail, {counts['skipped']} skipped "
              "(ratios measured within one run)", targets.table(summary["targets"])]
    return "\n".join(lines)


def _interrupt(signum: int, frame: object) -> None:
    raise Interrupted(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    """Command line: see the module docstring. Returns the exit status."""
    ap = Parser(prog="python -m benchmarks.gpu_proof", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=output_dir, required=True, help="folder for the results, plot, logs and summary")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes: checks that every stage runs, measures nothing")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    ctx = Context(args.out.resolve(), args.tiny, Path(tempfile.mkdtemp(prefix="gpu-proof-", dir=args.out)))
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _interrupt)
    t0 = time.monotonic()
    try:
        results = run_stages(STAGES, ctx, BUDGET_S)
    finally:
        if ctx.scratch is not None:
            shutil.rmtree(ctx.scratch, ignore_errors=True)
    command = ["python", "-m", "benchmarks.gpu_proof", *(sys.argv[1:] if argv is None else argv)]
    summary = summarize(ctx, results, command, time.monotonic() - t0)
    stem = ctx.out / f"{ctx.env.get('slug', 'unknown-device')}-gpu-proof"
    stem.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    text = summary_text(summary)
    stem.with_suffix(".txt").write_text(text + "\n")
    print("\n" + text + f"\n\nwrote {stem}.json, {stem}.txt and {ctx.logs}")
    return 0 if all(r["status"] in ("ok", "skipped") for r in results) and len(results) == len(STAGES) else 1


if __name__ == "__main__":
    sys.exit(main())
