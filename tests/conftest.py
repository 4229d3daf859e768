"""Shared fixtures: the device under test and the backends to run every test on.

Without a GPU the Triton kernels run on CPU tensors in Triton's interpreter, which
must be switched on before triton is first imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from lawa_optim import ops  # noqa: E402
from lawa_optim.history import history_device  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = ("torch", "triton", "cuda")


def backend_skip_reason(name: str, dtype: torch.dtype = torch.float32) -> str | None:
    """Why ``name`` cannot run float tensors on DEVICE here, or None."""
    from types import SimpleNamespace

    probe = SimpleNamespace(
        device=history_device(DEVICE, "device"), param_device=DEVICE, dtype=dtype, history_dtype=dtype
    )
    return ops.unavailable(name, probe)


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    """Every backend that can run on DEVICE; the others are skipped with the reason."""
    reason = backend_skip_reason(request.param)
    if reason is not None:
        pytest.skip(f"backend {request.param!r} unavailable: {reason}")
    return request.param


@pytest.fixture
def device() -> torch.device:
    return DEVICE
