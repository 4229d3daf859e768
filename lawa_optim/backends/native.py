"""Where the native sources of the fused backends are, where their builds go, and how a
C library is built and loaded without ever crashing the process.

Shared by the CUDA extension (:mod:`lawa_optim.backends.cuda`) and the fused CPU
kernels (:mod:`lawa_optim.backends.cpu_kernels`), both compiled on first use.

:func:`load_c_library` trusts a cached library only when its SHA-256 matches the digest
stored beside it: a library cut short (a killed build, a full disk) would otherwise be
mapped by ``dlopen`` and kill the process with SIGBUS at its first call. A new build is
written under a private name, loaded and checked for its symbols there, and only then
renamed into place (its digest first), so no process ever sees half a library.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import signal
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

#: Environment variable overriding the root of the build cache.
BUILD_DIR_ENV = "LAWA_OPTIM_BUILD_DIR"
#: Seconds the C compiler may take (a cold build of the CPU kernels takes about 2 s of CPU time).
COMPILE_TIMEOUT_S = 120.0


class BuildError(RuntimeError):
    """A native library could not be built or loaded; the message says why."""


def source_dir() -> Path:
    """The C/CUDA sources: shipped inside the package, or ``csrc/`` of a source checkout."""
    package = Path(__file__).resolve().parents[1]
    shipped = package / "csrc"
    return shipped if shipped.is_dir() else package.parent / "csrc"


def cache_root() -> Path:
    """Root of the build cache: ``$LAWA_OPTIM_BUILD_DIR``, else ``$XDG_CACHE_HOME/lawa_optim``
    (``~/.cache/lawa_optim``)."""
    root = os.environ.get(BUILD_DIR_ENV)
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lawa_optim"


def compiler() -> list[str]:
    """``$CC`` (default ``cc``) split as a shell splits it: ``CC="ccache gcc"`` works."""
    try:
        cc = shlex.split(os.environ.get("CC") or "cc")
    except ValueError as exc:  # an unbalanced quote: "No closing quotation"
        raise BuildError(f"CC={os.environ['CC']!r} cannot be split as a shell command ({exc})") from None
    if not cc:
        raise BuildError("CC is set to an empty command")
    return cc


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


def library_path(source: Path, cflags: Sequence[str]) -> Path:
    """Where the build of ``source`` with ``cflags`` is cached: the name holds a key of the
    source text, the compiler, the flags and the CPU, so a shared home directory never
    loads a build for another CPU or an older source."""
    key = hashlib.sha256(
        "\0".join([source.read_text(), *compiler(), *cflags, platform.machine(), _cpu_id()]).encode()
    ).hexdigest()[:16]
    return cache_root() / f"{source.stem}_{key}.so"


def digest_path(lib: Path) -> Path:
    """The file beside ``lib`` holding the SHA-256 of its contents."""
    return lib.with_name(lib.name + ".sha256")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def verified(lib: Path) -> bool:
    """Whether ``lib`` exists and matches the digest stored beside it."""
    try:
        return digest_path(lib).read_text().strip() == _sha256(lib)
    except OSError:
        return False


def _open(path: Path, symbols: Sequence[str]) -> ctypes.CDLL:
    try:
        dll = ctypes.CDLL(str(path))
    except OSError as exc:
        raise BuildError(f"{path} does not load: {exc}") from exc
    missing = [name for name in symbols if not hasattr(dll, name)]
    if missing:
        raise BuildError(f"{path} lacks the symbols {', '.join(missing)}")
    return dll


def _remove(*paths: Path) -> None:
    for path in paths:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def _write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        _remove(Path(tmp))


def _compile(source: Path, cflags: Sequence[str], out: Path) -> None:
    cmd = [*compiler(), *cflags, str(source), "-o", str(out)]
    try:
        # A session of its own, so a compiler that hangs is killed with its children
        # (`ccache gcc` runs gcc under ccache).
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    except OSError as exc:
        raise BuildError(f"cannot run the C compiler {shlex.join(cmd[:1])}: {exc}") from exc
    try:
        output, _ = proc.communicate(timeout=COMPILE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise BuildError(
            f"the C compiler {shlex.join(compiler())} did not finish within {COMPILE_TIMEOUT_S:g} s"
        ) from None
    if proc.returncode != 0:
        raise BuildError(f"{shlex.join(cmd)} failed with exit code {proc.returncode}: {output.strip()[-500:]}")


def load_c_library(source: Path, cflags: Sequence[str], symbols: Sequence[str]) -> ctypes.CDLL:
    """Load the cached build of ``source``, building it first when there is none or when
    the cached file fails its digest, does not load or lacks one of ``symbols`` (it is
    then removed and rebuilt, once). Raises :class:`BuildError` saying why when no
    library exposing ``symbols`` can be had."""
    try:
        lib = library_path(source, cflags)
        if lib.exists():
            if verified(lib):
                try:
                    return _open(lib, symbols)
                except BuildError:
                    pass
            _remove(lib, digest_path(lib))
        lib.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(suffix=".so", prefix=lib.stem + ".", dir=lib.parent)
        os.close(fd)
        tmp = Path(name)
        try:
            _compile(source, cflags, tmp)
            dll = _open(tmp, symbols)  # checked where no other process looks
            # The digest goes first: a process that finds the library finds its digest.
            _write_atomically(digest_path(lib), _sha256(tmp))
            os.replace(tmp, lib)
            return dll
        finally:
            _remove(tmp)
    except OSError as exc:
        raise BuildError(f"{type(exc).__name__}: {exc}") from exc
