"""The native build never crashes a process.

Each failure mode of the cached C library and of the compiler is tried for real in a
fresh process whose first snapshots must end with exit code 0 (a SIGBUS shows as -7)
and the right average; the processes of all scenarios run side by side.
"""

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lawa_optim.backends import cpu_kernels, native

ROOT = Path(__file__).resolve().parents[1]
SOURCE = native.source_dir() / cpu_kernels.SOURCE

pytestmark = pytest.mark.skipif(cpu_kernels.library() is None, reason="no C compiler for the fused CPU kernels")

#: The first snapshots of a fresh process: prints which code ran, whether the averages
#: were right, and how many times the fallback warned.
SCRIPT = textwrap.dedent("""
    import sys, warnings
    warnings.simplefilter("always")
    import torch
    from lawa_optim import LAWA
    from lawa_optim.backends import cpu_kernels, native
    native.COMPILE_TIMEOUT_S = float(sys.argv[1])
    with warnings.catch_warnings(record=True) as caught:
        ok = True
        for _ in range(2):  # a second optimizer must not warn again
            p = torch.nn.Parameter(torch.zeros(1000))
            opt = LAWA(torch.optim.SGD([p], lr=0.1), k=2)
            for value in (1.0, 2.0, 4.0):
                with torch.no_grad():
                    p.fill_(value)
                opt.snapshot()
            with opt.averaged():
                ok &= bool((p == 3.0).all())
            ok &= bool((p == 4.0).all())
    fallback = [w for w in caught if "could not be built" in str(w.message)]
    for w in fallback:
        print("WARNING", w.message, file=sys.stderr)
    assert opt.backend == "torch", opt.backend  # the C kernels or the plain code: the torch backend
    print("fused" if cpu_kernels.library() is not None else "plain", ok, len(fallback))
""")


def script(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    path.chmod(0o755)
    return path


def compile_to(lib: Path, source: Path) -> None:
    lib.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([*native.compiler(), *cpu_kernels.CFLAGS, str(source), "-o", str(lib)], check=True)


def write_digest(lib: Path) -> None:
    native.digest_path(lib).write_text(hashlib.sha256(lib.read_bytes()).hexdigest())


def truncated(lib: Path, tmp: Path) -> None:
    """An interrupted write under the digest of the whole library (the one this process
    loaded): dlopen of it dies of SIGBUS."""
    lib.parent.mkdir(parents=True)
    lib.write_bytes(native.library_path(SOURCE, cpu_kernels.CFLAGS).read_bytes())
    write_digest(lib)
    data = lib.read_bytes()
    lib.write_bytes(data[: len(data) // 2])


def zero_bytes(lib: Path, tmp: Path) -> None:
    """An empty file, with its own (matching) digest: it fails to load instead."""
    lib.parent.mkdir(parents=True)
    lib.write_bytes(b"")
    write_digest(lib)


def no_symbols(lib: Path, tmp: Path) -> None:
    """A valid library, digest included, without the kernels' symbols."""
    other = tmp / "other.c"
    other.write_text("int not_a_lawa_kernel(void) { return 0; }\n")
    compile_to(lib, other)
    write_digest(lib)


#: name -> (CC or None, what to put in the build directory first or None, compiler timeout).
SCENARIOS = {
    "truncated": (None, truncated, native.COMPILE_TIMEOUT_S),
    "zero bytes": (None, zero_bytes, native.COMPILE_TIMEOUT_S),
    "no symbols": (None, no_symbols, native.COMPILE_TIMEOUT_S),
    "slow compiler": ("{tmp}/slow-cc", None, 2.0),
    "compiler with arguments": ("'{tmp}/wrapper with space' --mark " + native.compiler()[0], None,
                                native.COMPILE_TIMEOUT_S),
    "unbalanced quote": ("'" + native.compiler()[0], None, native.COMPILE_TIMEOUT_S),
}


def library_path(cc: str | None, build_dir: Path) -> Path:
    with pytest.MonkeyPatch.context() as m:
        m.setenv(native.BUILD_DIR_ENV, str(build_dir))
        m.delenv("CC", raising=False)
        if cc is not None:
            m.setenv("CC", cc)
        return native.library_path(SOURCE, cpu_kernels.CFLAGS)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every scenario's process, started together: name -> (exit code, last line of
    output, stderr, the library's path, the scenario's directory)."""
    started = {}
    for name, (cc, damage, timeout_s) in SCENARIOS.items():
        tmp = tmp_path_factory.mktemp(name.replace(" ", "-"))
        script(tmp / "slow-cc", f"#!/bin/sh\necho $$ > '{tmp}/cc.pid'\nexec sleep 300\n")
        script(tmp / "wrapper with space", f"#!/bin/sh\necho \"$1\" > '{tmp}/wrapper.log'\nshift\nexec \"$@\"\n")
        cc = None if cc is None else cc.format(tmp=tmp)
        build_dir = tmp / "cache"
        try:
            lib = library_path(cc, build_dir)
        except native.BuildError:  # a CC that does not split has no library path
            lib = build_dir / "none.so"
        if damage is not None:
            damage(lib, tmp)
        env = {**os.environ, native.BUILD_DIR_ENV: str(build_dir), "PYTHONPATH": str(ROOT)}
        env.pop("CC", None)
        if cc is not None:
            env["CC"] = cc
        proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(timeout_s)], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started[name] = (proc, lib, tmp)
    out = {}
    for name, (proc, lib, tmp) in started.items():
        stdout, stderr = proc.communicate(timeout=600)
        out[name] = (proc.returncode, (stdout.strip().splitlines() or [""])[-1], stderr, lib, tmp)
    return out


def assert_in_place(lib: Path) -> None:
    """A verified library in place, its digest beside it, no temporary file left."""
    assert lib.stat().st_size > 1000 and native.verified(lib)
    assert sorted(p.name for p in lib.parent.iterdir()) == sorted([lib.name, native.digest_path(lib).name])


@pytest.mark.parametrize("name", ["truncated", "zero bytes", "no symbols"])
def test_a_damaged_library_is_removed_and_rebuilt(runs, name):
    rc, line, stderr, lib, _ = runs[name]
    assert rc == 0, f"exit code {rc}\n{stderr[-3000:]}"
    assert line == "fused True 0", stderr
    assert_in_place(lib)


def test_a_hanging_compiler_is_killed_and_the_plain_code_runs(runs):
    rc, line, stderr, lib, tmp = runs["slow compiler"]
    assert rc == 0, f"exit code {rc}\n{stderr[-3000:]}"
    assert line == "plain True 1", stderr  # one warning for two optimizers
    assert "did not finish within 2 s" in stderr
    with pytest.raises(ProcessLookupError):
        os.kill(int((tmp / "cc.pid").read_text()), 0)  # killed, not left sleeping
    assert list(lib.parent.iterdir()) == [], "nothing left in the cache (made before the compiler ran)"


def test_a_compiler_command_with_arguments_is_split_like_a_shell(runs):
    """``CC="ccache gcc"``: a quoted path with a space, an argument, then the compiler."""
    rc, line, stderr, lib, tmp = runs["compiler with arguments"]
    assert rc == 0, f"exit code {rc}\n{stderr[-3000:]}"
    assert line == "fused True 0", stderr
    assert (tmp / "wrapper.log").read_text().strip() == "--mark"
    assert_in_place(lib)


def test_a_compiler_command_that_does_not_split_warns_and_the_plain_code_runs(runs):
    """``CC="'gcc"`` (an unbalanced quote): the documented warning, then the plain code."""
    rc, line, stderr, lib, tmp = runs["unbalanced quote"]
    assert rc == 0, f"exit code {rc}\n{stderr[-3000:]}"
    assert line == "plain True 1", stderr  # one warning for two optimizers
    assert "cannot be split as a shell command (No closing quotation)" in stderr
    assert not lib.parent.exists(), "nothing built, no cache made"


def test_a_failing_compiler_leaves_no_library_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv(native.BUILD_DIR_ENV, str(tmp_path / "cache"))
    cc = script(tmp_path / "broken-cc", "#!/bin/sh\necho 'broken-cc: internal error' >&2\nexit 3\n")
    monkeypatch.setenv("CC", str(cc))
    lib = native.library_path(SOURCE, cpu_kernels.CFLAGS)
    lib.parent.mkdir(parents=True)
    lib.write_bytes(b"\x7fELF" + bytes(100))  # damaged, and no digest: never loaded
    with pytest.raises(native.BuildError, match="exit code 3: broken-cc: internal error"):
        native.load_c_library(SOURCE, cpu_kernels.CFLAGS, tuple(cpu_kernels.SIGNATURES))
    assert list(lib.parent.iterdir()) == [], "the damaged library and the temporary file are gone"


def test_a_verified_library_is_loaded_again_not_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv(native.BUILD_DIR_ENV, str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    symbols = tuple(cpu_kernels.SIGNATURES)
    native.load_c_library(SOURCE, cpu_kernels.CFLAGS, symbols)
    lib = native.library_path(SOURCE, cpu_kernels.CFLAGS)
    assert_in_place(lib)
    stamp = lib.stat().st_mtime_ns, lib.stat().st_ino
    assert all(hasattr(native.load_c_library(SOURCE, cpu_kernels.CFLAGS, symbols), s) for s in symbols)
    assert (lib.stat().st_mtime_ns, lib.stat().st_ino) == stamp


def test_the_digest_catches_every_change(tmp_path):
    lib = tmp_path / "x.so"
    lib.write_bytes(b"library contents")
    assert not native.verified(lib), "no digest: not trusted"
    write_digest(lib)
    assert native.verified(lib)
    for damaged in (b"library content", b"", b"library contentS"):
        lib.write_bytes(damaged)
        assert not native.verified(lib)
    lib.unlink()
    assert not native.verified(lib)
