"""The CUDA backend: compile checks and build/fallback logic that need no GPU.

The kernels are compiled for sm_80 and sm_90 as the extension builds them (warnings as
errors) and ptxas's report and the PTX are checked: no spills, only global memory
accesses, 128-bit vectors. On a GPU, tests/test_gpu_kernels.py and
tests/test_cuda_graphs.py run them against the pure-torch reference, bit for bit.
"""

import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import probe

import lawa_optim
from lawa_optim import ops
from lawa_optim.backends import cuda, native

CSRC = Path(__file__).resolve().parents[1] / "csrc"
NVCC = shutil.which("nvcc")
HAS_CUDA = torch.cuda.is_available()


# -- compile checks (no GPU needed) --------------------------------------------------


def ptx_functions(ptx: str) -> dict[str, str]:
    """The body of every kernel entry in ``ptx``, by mangled name."""
    parts = re.split(r"^(?:\.visible )?\.entry (\w+)\(", ptx, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


@pytest.fixture(scope="module", params=["80", "90"])
def nvcc_build(request, tmp_path_factory):
    """Each .cu compiled for sm_{arch} as the extension is (-O3, no fast math), warnings as
    errors: ptxas's resource report and the PTX of every kernel."""
    if NVCC is None:
        pytest.skip("nvcc is not installed")
    arch, keep = request.param, tmp_path_factory.mktemp(f"sm{request.param}")
    sources = sorted(CSRC.glob("*.cu"))
    assert sources, f"no .cu files in {CSRC}"
    report, ptx = "", {}
    for src in sources:
        cmd = [
            NVCC, "-c", "-std=c++17", "-O3", f"-I{CSRC}", f"-gencode=arch=compute_{arch},code=sm_{arch}",
            "-Werror", "all-warnings", "-Xcompiler=-Wall,-Wextra,-Werror", "-Xptxas", "-v",
            "--keep", "--keep-dir", str(keep), str(src), "-o", str(keep / f"{src.stem}.o"),
        ]
        run = subprocess.run(cmd, capture_output=True, text=True)
        assert run.returncode == 0, f"{' '.join(cmd)}\n{run.stdout}{run.stderr}"
        report += run.stderr
        ptx.update(ptx_functions((keep / f"{src.stem}.ptx").read_text()))
    return arch, report, ptx


def test_kernels_compile_without_warnings_or_spills(nvcc_build):
    arch, report, ptx = nvcc_build
    frames = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", report)
    assert len(frames) == len(ptx) > 0, report[-2000:]
    assert all(f == ("0", "0", "0") for f in frames), f"sm_{arch}: spills or local memory\n{report}"


def test_every_kernel_moves_data_with_128_bit_global_accesses(nvcc_build):
    """Parameter addresses come from the table: without the address-space assumption they
    compile to generic ld/st. Every access must be global, and every kernel must have its
    vector path."""
    arch, _, ptx = nvcc_build
    for name, body in ptx.items():
        accesses = re.findall(r"^\s*(ld|st)((?:\.\w+)*)\s", body, flags=re.M)
        generic = [op + q for op, q in accesses if not q.startswith((".global", ".param"))]
        assert not generic, f"sm_{arch} {name}: generic accesses {generic[:5]}"
        assert re.search(r"\bld\.global(\.\w+)*\.v4\.", body), f"sm_{arch} {name}: no 128-bit load"
        assert re.search(r"\bst\.global(\.\w+)*\.v4\.", body), f"sm_{arch} {name}: no 128-bit store"


def test_last_j_steps_through_the_ring_without_a_remainder(nvcc_build):
    """swap_in(last=j) walks the ring newest first: one 64-bit % k for the newest slot,
    never one per slot per vector step."""
    arch, _, ptx = nvcc_build
    last = {n: b for n, b in ptx.items() if "SwapInOp" in n and "LawaAverage2E" in n}
    assert len(last) == 9, sorted(ptx)
    for name, body in last.items():
        assert len(re.findall(r"\brem\.[su]64\b", body)) == 1, f"sm_{arch} {name}"


def test_weighted_swap_steps_through_the_ring_without_a_remainder_or_an_fma(nvcc_build):
    """swap_in(weights=...) walks the ring newest first like last=j (one 64-bit % k), and
    rounds every product before adding it, as the contract says."""
    arch, _, ptx = nvcc_build
    weighted = {n: b for n, b in ptx.items() if "SwapWeightedOp" in n}
    assert len(weighted) == 9, sorted(ptx)
    for name, body in weighted.items():
        assert len(re.findall(r"\brem\.[su]64\b", body)) == 1, f"sm_{arch} {name}"
        assert not re.search(r"\bfma\.", body), f"sm_{arch} {name}"
        assert re.search(r"\bmul\.rn\.f32\b", body), f"sm_{arch} {name}"


def test_phema_update_rounds_without_an_fma(nvcc_build):
    """The power-function EMAs: one kernel per parameter dtype, each product rounded before
    it is added, as the contract says (nvcc would contract them)."""
    arch, _, ptx = nvcc_build
    kernels = {n: b for n, b in ptx.items() if "PhemaOp" in n}
    assert len(kernels) == 3, sorted(ptx)
    for name, body in kernels.items():
        assert not re.search(r"\bfma\.", body), f"sm_{arch} {name}"
        assert re.search(r"\bmul\.rn\.f32\b", body), f"sm_{arch} {name}"


def test_sources_are_found():
    src = native.source_dir()
    assert (src / "bindings.cpp").is_file() and list(src.glob("*.cu"))


# -- availability (the error of backend="cuda" without CUDA: test_wrapper.py) ---------


@pytest.mark.skipif(HAS_CUDA, reason="needs a machine without CUDA")
def test_auto_without_cuda_does_not_pick_cuda():
    opt = lawa_optim.LAWA(torch.optim.SGD(torch.nn.Linear(3, 2).parameters(), lr=0.1))
    assert opt.backend != "cuda"


@pytest.mark.parametrize(
    "bucket, reason",
    [
        (probe("cpu"), "need it on a CUDA device"),
        (probe("cuda:0", "cuda:1"), "parameters are on cuda:1"),
        (probe("cuda", dtype=torch.float64), "parameter dtype is torch.float64"),
        (probe("cuda", history_dtype=torch.float64), "history dtype is torch.float64"),
    ],
)
def test_unavailable_names_the_reason(bucket, reason, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda, "_load", lambda: pytest.fail("must not build for this bucket"))
    assert reason in ops.unavailable("cuda", bucket)


# -- lazy build: cache directory, stale lock, failed build ---------------------------


def test_build_dir_env_var(tmp_path, monkeypatch):
    monkeypatch.setenv("LAWA_OPTIM_BUILD_DIR", str(tmp_path))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0 9.0+PTX")
    d = cuda.build_dir()
    assert d.parent == tmp_path and d.name.endswith("8.0_9.0+PTX")
    monkeypatch.delenv("LAWA_OPTIM_BUILD_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cuda.build_dir().parent == tmp_path / "xdg" / "lawa_optim"


def test_no_lock_keeps_the_directory(tmp_path):
    assert cuda.unlocked(tmp_path) == tmp_path


def test_stale_lock_moves_to_a_fresh_directory(tmp_path, monkeypatch):
    d = tmp_path / "build"
    d.mkdir()
    lock = d / "lock"
    lock.touch()
    old = time.time() - 2 * cuda.LOCK_TIMEOUT_S
    os.utime(lock, (old, old))
    monkeypatch.setattr(cuda.time, "sleep", lambda s: pytest.fail(f"waited {s} s for a stale lock"))
    with pytest.warns(RuntimeWarning, match="build lock"):
        fresh = cuda.unlocked(d)
    assert fresh != d and fresh.parent == tmp_path and fresh.is_dir()
    assert not (fresh / "lock").exists()


def test_live_lock_is_waited_for(tmp_path, monkeypatch):
    monkeypatch.setattr(cuda, "LOCK_TIMEOUT_S", 30.0)
    lock = tmp_path / "lock"
    lock.touch()
    threading.Timer(0.3, lock.unlink).start()
    assert cuda.unlocked(tmp_path) == tmp_path


def test_lock_held_past_the_timeout_gives_up(tmp_path, monkeypatch):
    monkeypatch.setattr(cuda, "LOCK_TIMEOUT_S", 0.5)
    (tmp_path / "build").mkdir()
    (tmp_path / "build" / "lock").touch()
    with pytest.warns(RuntimeWarning, match="build lock"):
        assert cuda.unlocked(tmp_path / "build") != tmp_path / "build"


def test_load_builds_into_the_cache_dir_without_fast_math(tmp_path, monkeypatch):
    from torch.utils import cpp_extension

    calls = []
    monkeypatch.setenv("LAWA_OPTIM_BUILD_DIR", str(tmp_path))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: calls.append(kw) or "module")
    assert cuda._load() == "module"
    (kw,) = calls
    assert Path(kw["build_directory"]).parent == tmp_path
    assert [Path(s).name for s in kw["sources"]] == ["bindings.cpp", *sorted(p.name for p in CSRC.glob("*.cu"))]
    assert all(Path(s).is_file() for s in kw["sources"])
    assert not any("fast_math" in f for f in kw["extra_cuda_cflags"] + kw["extra_cflags"])


def test_failed_build_warns_once_and_falls_back(monkeypatch):
    calls = []

    def failing_build():
        calls.append(1)
        raise RuntimeError("Error building extension 'lawa_optim_cuda'\nnvcc fatal")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda, "_ext", None)
    monkeypatch.setattr(cuda, "_ext_error", None)
    monkeypatch.setattr(cuda, "_load", failing_build)
    with pytest.warns(RuntimeWarning, match="Error building extension 'lawa_optim_cuda'") as rec:
        reason = cuda.unavailable(probe("cuda"))
        assert cuda.unavailable(probe("cuda")) == reason
        triton_runs = ops.unavailable("triton", probe("cuda")) is None
        assert ops.resolve("auto", probe("cuda")) == ("triton" if triton_runs else "torch")
    assert len([w for w in rec if "lawa_optim" in str(w.message)]) == 1
    assert len(calls) == 1
    assert "could not be built" in reason and "nvcc" not in reason
    with pytest.raises(RuntimeError, match="backend='cuda'.*could not be built"):
        ops.resolve("cuda", probe("cuda"))
