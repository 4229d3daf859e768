"""pytest-benchmark suite of the LAWA history (Kaddour 2022, arXiv:2209.14981).

    python -m pytest benchmarks/bench_lawa.py --benchmark-only --benchmark-json=out.json

Each operation of each backend that runs here is timed beside the copy roofline and
the baselines of :mod:`benchmarks.baselines`, on the same tensors. A snapshot is timed
as k in a row (:mod:`benchmarks.suite`): divide its times by ``extra_info["calls"]``. Workloads come from
``LAWA_BENCH_NUMEL`` (comma-separated flat sizes, default 1M,16M,64M) and
``LAWA_BENCH_MODELS`` (default resnet50,gpt2-small; empty for none). The test suite
runs it at a tiny size with ``--benchmark-disable`` so it cannot rot.
"""

from __future__ import annotations

import os

import pytest
import torch

from benchmarks import suite
from benchmarks.workloads import flat_params, model_params

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
K = 6
BACKENDS = suite.backends_here(DEVICE, torch.float32)[0]


def _workloads() -> list[tuple[str, int | str]]:
    sizes = os.environ.get("LAWA_BENCH_NUMEL", f"{1 << 20},{1 << 24},{1 << 26}")
    models = os.environ.get("LAWA_BENCH_MODELS", "resnet50,gpt2-small")
    return [("flat", int(n)) for n in sizes.split(",") if n] + [("model", m) for m in models.split(",") if m]


@pytest.fixture(scope="module", params=_workloads(), ids=lambda w: str(w[1]))
def workload(request):
    kind, what = request.param
    return flat_params(what, torch.float32, DEVICE) if kind == "flat" else model_params(what, torch.float32, DEVICE)


@pytest.fixture(scope="module", params=sorted(BACKENDS))
def setup(request, workload):
    return suite.prepare(workload, request.param, K)


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _run(benchmark, fn, nbytes: int, **info) -> None:
    benchmark.extra_info.update(bytes=nbytes, **info)

    def call() -> None:
        fn()
        _sync()

    benchmark(call)


@pytest.mark.parametrize("op", suite.OPS)
@pytest.mark.parametrize("impl", sorted({i for impls in BACKENDS.values() for i in impls}))
def test_lawa(benchmark, setup, op, impl):
    """The operation through lawa_optim.ops."""
    if impl not in BACKENDS[setup.backend]:
        pytest.skip(f"the {setup.backend} backend has no {impl} implementation")
    o = suite.operations(setup, (op,))[op]
    fn = suite.plain(o.lawa) if impl == "plain" else o.lawa
    _run(benchmark, fn, o.nbytes, calls=o.calls, backend=setup.backend, impl=impl, numel=setup.workload.numel,
         tensors=len(setup.workload.params))


@pytest.mark.parametrize("op", suite.OPS)
@pytest.mark.parametrize("baseline", ["roofline", "foreach", "loop", "authors"])
def test_baseline(benchmark, setup, op, baseline):
    """The same operation as people do it today, or the plain copy of its bytes."""
    o = suite.operations(setup, (op,))[op]
    if baseline == "roofline":
        src = torch.ones(o.nbytes // 2, dtype=torch.uint8, device=DEVICE)
        fn = suite.roofline(o, torch.empty_like(src), src)
    elif baseline in o.baselines:
        fn = o.baselines[baseline]
    else:
        pytest.skip(f"no {baseline} baseline for {op}")
    _run(benchmark, fn, o.nbytes, calls=o.calls, baseline=baseline, numel=setup.workload.numel,
         tensors=len(setup.workload.params))
