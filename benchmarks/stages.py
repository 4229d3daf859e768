"""Stages of a proof run: child processes with hard time limits, in one process tree.

``benchmarks.gpu_proof`` proves the GPU side of LAWA (Kaddour 2022, arXiv:2209.14981)
in stages. Each runs in its own process group, so at its time limit the stage and
everything it started (ninja, nvcc, pytest's children) are killed, and the stages
after it still run: a hang costs one stage, never the results of the others.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class Interrupted(Exception):
    """SIGTERM or SIGINT reached the proof: stop the stage, write what there is."""


@dataclass
class Context:
    """What the stages share: the output folder, the size, and what ``env`` found."""

    out: Path
    tiny: bool
    logs: Path
    env: dict = field(default_factory=dict)
    scratch: Path | None = None  # a folder of this run's own, removed at the end
    child_env: dict = field(default_factory=lambda: {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])})


@dataclass
class Stage:
    """A child process: ``command`` gives its argv, or why it is skipped; ``collect`` reads
    what it wrote into its result (also after a failure or a timeout)."""

    name: str
    limit_s: float  # hard limit
    floor_s: float  # kept free for it while earlier stages run; with less left it is skipped
    command: Callable[[Context], list[str] | str]
    collect: Callable[[Context, dict], None] = lambda ctx, result: None
    extra_env: dict = field(default_factory=dict)


def kill_group(proc: subprocess.Popen) -> None:
    """Stop ``proc`` and everything it started (ninja, nvcc, pytest's children)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            pass
        os.killpg(proc.pid, signal.SIGKILL)  # whatever outlived the leader, too
    except ProcessLookupError:
        pass
    proc.wait()


def run_group(argv: list[str], timeout_s: float, *, cwd: Path = ROOT, env: dict | None = None,
              stdout=None, stderr=None) -> tuple[int | None, str | None, str | None]:
    """Run ``argv`` in a session (process group) of its own, ended with everything it
    started when it exits, runs past ``timeout_s`` or is interrupted: ``(exit status, None at
    the timeout; stdout; stderr)``, the output as text where ``stdout``/``stderr`` is a pipe."""
    proc = subprocess.Popen(argv, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL, cwd=cwd, env=env,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        return None, out, err
    except BaseException:
        kill_group(proc)
        raise
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # nothing it started outlives it
    except ProcessLookupError:
        pass
    return proc.returncode, out, err


def run_command(argv: list[str], log: Path, timeout_s: float, env: dict) -> tuple[str, int | None, float]:
    """Run ``argv`` in its own process group with output to ``log``: ``("ok" | "failed" |
    "timeout", exit status, seconds)``."""
    t0 = time.monotonic()
    with open(log, "w") as f:
        f.write(f"$ {shlex.join(argv)}\n")
        f.flush()
        rc, _, _ = run_group(argv, timeout_s, env=env, stdout=f, stderr=subprocess.STDOUT)
    if rc is None:
        return "timeout", None, time.monotonic() - t0
    return ("ok" if rc == 0 else "failed"), rc, time.monotonic() - t0


def run_stages(stages: list[Stage], ctx: Context, budget_s: float) -> list[dict]:
    """Run ``stages`` in order within ``budget_s`` seconds; one result per stage, fewer
    when :class:`Interrupted` stops the run (the stage it stopped is ``interrupted``)."""
    deadline = time.monotonic() + budget_s
    results = []
    for i, stage in enumerate(stages):
        result = {"stage": stage.name, "status": "skipped", "seconds": 0.0, "limit_s": None, "returncode": None,
                  "reason": None, "note": None, "log": None}
        results.append(result)
        try:
            limit = min(stage.limit_s, deadline - time.monotonic() - sum(s.floor_s for s in stages[i + 1:]))
            _run_stage(stage, ctx, result, limit)
        except Interrupted as stop:
            result.update(status="interrupted", reason=f"stopped by {stop}; no further stages ran")
            return results
        finally:
            print(f"{stage.name:<9} {result['status']:<12} {result['seconds']:>6.1f} s  "
                  f"{result['note'] or result['reason'] or ''}", flush=True)
    return results


def _run_stage(stage: Stage, ctx: Context, result: dict, limit: float) -> None:
    what = stage.command(ctx)
    if isinstance(what, str):
        result["reason"] = what
        return
    if limit < stage.floor_s:
        result["reason"] = f"out of time: {max(limit, 0):.0f} s left for it, it needs {stage.floor_s:.0f} s"
        return
    log = ctx.logs / f"{stage.name}.log"
    result.update(status="running", limit_s=round(limit), log=str(log))
    status, rc, seconds = run_command(what, log, limit, {**ctx.child_env, **stage.extra_env})
    result.update(status=status, returncode=rc, seconds=round(seconds, 1))
    if status == "timeout":
        result["reason"] = f"killed at its limit of {limit:.0f} s"
    elif status == "failed":
        result["reason"] = f"exit status {rc}: see {log.name}"
    stage.collect(ctx, result)
