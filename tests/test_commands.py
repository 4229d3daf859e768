"""Every command of the repository refuses a bad argument before any work: exit status 2
and one line on stderr naming the argument, as argparse words it, no traceback; and its
``--help`` shows the command a user types. Each refusal is checked in this process
(``main(argv)``), and the first of each command also as the user meets it, in a
subprocess."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: How each command is typed (after ``python``), its module, and the name its ``--help`` shows.
COMMANDS = {
    "report": (["benchmarks/report.py"], "benchmarks.report", "python benchmarks/report.py"),
    "report-module": (["-m", "benchmarks.report"], "benchmarks.report", "python benchmarks/report.py"),
    "gpu_proof": (["-m", "benchmarks.gpu_proof"], "benchmarks.gpu_proof", "python -m benchmarks.gpu_proof"),
    "overlap": (["-m", "benchmarks.overlap"], "benchmarks.overlap", "python -m benchmarks.overlap"),
    "device_checks": (["-m", "benchmarks.device_checks"], "benchmarks.device_checks",
                      "python -m benchmarks.device_checks"),
    "memory": (["-m", "benchmarks.memory"], "benchmarks.memory", "python -m benchmarks.memory"),
    "int8_accuracy": (["-m", "benchmarks.int8_accuracy"], "benchmarks.int8_accuracy",
                      "python -m benchmarks.int8_accuracy"),
    "int8_push": (["-m", "benchmarks.int8_push"], "benchmarks.int8_push", "python -m benchmarks.int8_push"),
    "int8_history": (["-m", "examples.int8_history"], "examples.int8_history", "python -m examples.int8_history"),
    "experiment": (["-m", "examples.lawa_experiment"], "examples.lawa_experiment", "python -m examples.lawa_experiment"),
    "posthoc": (["-m", "examples.posthoc_choice"], "examples.posthoc_choice", "python -m examples.posthoc_choice"),
    "demo": (["-m", "lawa_optim.demo"], "lawa_optim.demo", "python -m lawa_optim.demo"),
    "mutants": (["-m", "tools.mutants"], "tools.mutants", "python -m tools.mutants"),
    "phema_check": (["-m", "examples.phema_check"], "examples.phema_check", "python -m examples.phema_check"),
    "phema_bench": (["-m", "benchmarks.phema"], "benchmarks.phema", "python -m benchmarks.phema"),
    "sass": (["-m", "benchmarks.sass"], "benchmarks.sass", "python -m benchmarks.sass"),
    "distributed": (["examples/train_distributed.py"], "examples.train_distributed",
                    "torchrun --nproc-per-node 2 examples/train_distributed.py"),
}
MISSING = "/nonexistent/dir"

#: (command, arguments, the argument the refusal must name)
REFUSED = [
    ("report", ["--k", "0"], "--k"),
    ("report-module", ["--models", "nosuchmodel"], "--models"),
    ("report", ["--repeats", "0"], "--repeats"),
    ("report", ["--seconds", "-1"], "--seconds"),
    ("report", ["--sizes", "0"], "--sizes"),
    ("report", ["--out", f"{MISSING}/results"], "--out"),
    ("gpu_proof", ["--out", f"{MISSING}/results"], "--out"),
    ("gpu_proof", [], "--out"),
    ("overlap", ["--k", "0"], "--k"),
    ("overlap", ["--steps", "-1"], "--steps"),
    ("overlap", ["--out", f"{MISSING}/results"], "--out"),
    ("device_checks", ["env", f"{MISSING}/env.json"], "path"),
    ("device_checks", ["nosuchcheck"], "command"),
    ("memory", ["--k", "0"], "--k"),
    ("memory", ["--model", "nosuchmodel"], "--model"),
    ("memory", ["--out", f"{MISSING}/m.json"], "--out"),
    ("int8_accuracy", ["--k", "1"], "--k"),
    ("int8_accuracy", ["--drifts", "0.1,x"], "--drifts"),
    ("int8_accuracy", ["--snapshots", "6"], "--snapshots"),
    ("int8_accuracy", ["--out", f"{MISSING}/a.json"], "--out"),
    ("int8_push", ["--repeats", "0"], "--repeats"),
    ("int8_push", ["--model", "nosuchmodel"], "--model"),
    ("int8_push", ["--device", "tpu"], "--device"),
    ("int8_push", ["--out", f"{MISSING}/p.json"], "--out"),
    ("int8_history", ["--jobs", "0"], "--jobs"),
    ("int8_history", ["--data-dir", "/nonexistent"], "--data-dir"),
    ("int8_history", ["--out", f"{MISSING}/results"], "--out"),
    ("experiment", ["--data-dir", "/nonexistent"], "--data-dir"),
    ("experiment", ["--jobs", "0"], "--jobs"),
    ("experiment", ["--out", f"{MISSING}/results"], "--out"),
    ("posthoc", ["--data-dir", "/nonexistent"], "--data-dir"),
    ("posthoc", ["--k", "5"], "--k"),
    ("posthoc", ["--epochs", "5"], "--epochs"),
    ("posthoc", ["--seeds", "0"], "--seeds"),
    ("posthoc", ["--out", f"{MISSING}/results"], "--out"),
    ("demo", ["--out", f"{MISSING}/x.png"], "--out"),
    ("demo", ["--out", "."], "--out"),
    ("demo", ["--seeds", "0"], "--seeds"),
    ("demo", ["--epochs", "-2"], "--epochs"),
    ("mutants", ["--timeout", "-1"], "--timeout"),
    ("mutants", ["--only", "nosuchmutant"], "--only"),
    ("distributed", ["--epochs", "0"], "--epochs"),
    ("phema_check", ["--out", f"{MISSING}/results"], "--out"),
    ("phema_check", [], "--out"),
    ("phema_check", ["--out", "x", "--steps", "0"], "--steps"),
    ("phema_check", ["--out", "x", "--k", "1"], "--k"),
    ("phema_check", ["--out", "x", "--steps", "10", "--every", "20"], "--every"),
    ("phema_bench", ["--rounds", "0"], "--rounds"),
    ("phema_bench", ["--widths", "9"], "--widths"),
    ("phema_bench", ["--out", f"{MISSING}/p.json"], "--out"),
    ("sass", ["--arch", "70"], "--arch"),
    ("sass", ["--out", f"{MISSING}/s.json"], "--out"),
    ("sass", ["--kernels"], "--kernels"),
    ("sass", ["--kernels", "push:float32"], "--kernels"),
]


def check_refusal(command: str, name: str, status: int, stdout: str, stderr: str) -> None:
    assert status == 2, stderr
    (line,) = stderr.splitlines()  # one line: no usage, no traceback
    prog, error = line.split(": error: ", 1)  # a subcommand's prog adds its name
    assert prog.startswith(COMMANDS[command][2]), line
    assert error.startswith(f"argument {name}: ") or error.endswith(f"required: {name}"), line
    assert stdout == ""


def ids(cases) -> list[str]:
    return [" ".join([c, *a]) for c, a, _ in cases]


@pytest.mark.parametrize("command, args, name", REFUSED, ids=ids(REFUSED))
def test_a_bad_argument_is_refused_in_one_line(command, args, name, capsys):
    main = importlib.import_module(COMMANDS[command][1]).main
    with pytest.raises(SystemExit) as e:
        main(args)
    out = capsys.readouterr()
    check_refusal(command, name, e.value.code, out.out, out.err)


FIRST = [next(case for case in REFUSED if case[0] == command) for command in COMMANDS]


@pytest.mark.parametrize("command, args, name", FIRST, ids=ids(FIRST))
def test_the_command_refuses_it_before_any_work(command, args, name):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # as after `pip install -e .`
    # The timeout only stops a command that went to work: a refusal takes a second.
    r = subprocess.run([sys.executable, "-X", "importtime", *COMMANDS[command][0], *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    # -X importtime writes "import time: self | cumulative | module" to stderr, one line per import
    imports = [line for line in r.stderr.splitlines() if line.startswith("import time:")]
    stderr = "".join(f"{line}\n" for line in r.stderr.splitlines() if not line.startswith("import time:"))
    check_refusal(command, name, r.returncode, r.stdout, stderr)
    imported = {line.rsplit("|", 1)[1].strip() for line in imports[1:]}  # the first line is the header
    assert "lawa_optim._cli" in imported, imports  # the lines are there, and read right
    # Refused before torch (seconds to import) is loaded: a refusal costs the start of Python
    assert not {m for m in imported if m == "torch" or m.startswith("torch.")}, command


def test_the_model_names_the_commands_accept_are_the_workloads():
    """``--models``/``--model`` are checked against a tuple that needs no torch; it must
    name exactly the parameter lists the benchmarks build."""
    from benchmarks import targets, workloads

    assert sorted(targets.MODELS) == sorted(workloads.MODELS)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_the_command_a_user_types(command, capsys):
    with pytest.raises(SystemExit) as e:
        importlib.import_module(COMMANDS[command][1]).main(["--help"])
    assert e.value.code == 0
    usage = " ".join(capsys.readouterr().out.split())  # argparse wraps a long usage line
    assert usage.startswith(f"usage: {COMMANDS[command][2]} [-h]")


def test_the_package_imports_its_public_names_on_first_use():
    """``lawa_optim`` loads no torch by itself (the commands' checks import it) and still
    gives every name of ``__all__``, each from its own module."""
    code = ("import sys, lawa_optim; assert 'torch' not in sys.modules, 'torch imported'; "
            "from lawa_optim import *; from lawa_optim import LAWA; import lawa_optim.wrapper as w; "
            "assert LAWA is w.LAWA and set(lawa_optim.__all__) <= set(dir(lawa_optim)); "
            "[getattr(lawa_optim, n) for n in lawa_optim.__all__]; print(sorted(lawa_optim.__all__))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    import lawa_optim

    assert r.stdout.split() == str(sorted(lawa_optim.__all__)).split()
    with pytest.raises(AttributeError, match="no attribute 'nosuchname'"):
        lawa_optim.nosuchname  # noqa: B018
