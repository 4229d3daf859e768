"""Packaging shim. All metadata lives in pyproject.toml.

This file must not import torch at module level: pip builds in an isolated
environment, and importing torch here would make it install a CUDA build of torch
into that environment on every install.

A plain ``pip install .`` never needs nvcc: the CUDA kernels in ``csrc/`` ship as
sources inside the package (as ``lawa_optim/csrc``) and are compiled on first use. To compile them ahead of time instead, into
``lawa_optim._lawa_cuda``, use the torch already installed (hence no build isolation)::

    LAWA_OPTIM_BUILD_CUDA=1 pip install --no-build-isolation .

``TORCH_CUDA_ARCH_LIST`` (e.g. ``"8.0 9.0"``) picks the GPU architectures.
"""

import os
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

#: csrc/ (C and CUDA sources), shipped as the package data of this code-free package.
CSRC_PACKAGE = "lawa_optim.csrc"


class BuildPy(build_py):
    """Also build ``lawa_optim.csrc`` from ``csrc/``: pyproject's package search only
    sees directories under ``lawa_optim/``, and the sources live at the top level."""

    def finalize_options(self) -> None:
        if CSRC_PACKAGE not in self.distribution.packages:
            self.distribution.packages.append(CSRC_PACKAGE)
        super().finalize_options()


def cuda_extension() -> tuple[list, type]:
    """The ahead-of-time CUDA extension and the command that builds it (imports torch)."""
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    # Relative paths: setuptools requires them for extension sources.
    sources = ["csrc/bindings.cpp", *sorted(p.as_posix() for p in Path("csrc").glob("*.cu"))]
    ext = CUDAExtension(
        "lawa_optim._lawa_cuda",
        sources,
        include_dirs=[str(Path(__file__).resolve().parent / "csrc")],
        # No --use_fast_math: the running mean and the averages must round as IEEE float32.
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-std=c++17"]},
    )
    return [ext], BuildExtension


cmdclass: dict[str, type] = {"build_py": BuildPy}
ext_modules: list = []
if os.environ.get("LAWA_OPTIM_BUILD_CUDA") == "1":
    ext_modules, cmdclass["build_ext"] = cuda_extension()

setup(
    package_dir={CSRC_PACKAGE: "csrc"},
    package_data={CSRC_PACKAGE: ["*.cu", "*.cuh", "*.h", "*.cpp", "*.c"]},
    cmdclass=cmdclass,
    ext_modules=ext_modules,
)
