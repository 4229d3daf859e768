"""A bucket's snapshot as one opaque custom op, so ``torch.compile`` traces it whole.

Eager snapshots run Python bookkeeping per bucket (a ``data_ptr`` check for moved
parameters, the reference backend's counter read) that Dynamo
cannot trace: each would be a graph break. Inside a compiled region the history calls
this op instead; its implementation is the same eager code, run when the compiled
graph runs, so results are identical. The op declares the tensors it writes
(``ring``, ``total``, ``pushes``) and reads the parameters, which orders it after an
optimizer update in the same graph.
"""

from __future__ import annotations

import itertools
import sys
import warnings
import weakref
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from lawa_optim.history import Bucket

_buckets: weakref.WeakValueDictionary[int, "Bucket"] = weakref.WeakValueDictionary()
_keys = itertools.count()


def register(bucket: "Bucket") -> int:
    """A key for ``bucket`` that the op passes as a constant (held weakly); never reused,
    so a copied bucket registered anew cannot reach the original."""
    key = next(_keys)
    _buckets[key] = bucket
    return key


# The schema is spelled out: torch 2.6 and older cannot infer one from postponed (string)
# annotations such as ``list[Tensor]``.
@torch.library.custom_op(
    "lawa_optim::snapshot",
    mutates_args=("ring", "total", "pushes"),
    schema="(Tensor[] params, Tensor(a1!)? ring, Tensor(a2!) total, Tensor(a3!) pushes, SymInt key, float? decay) -> ()",
)
def _snapshot(
    params: list[Tensor],
    ring: Tensor | None,
    total: Tensor,
    pushes: Tensor,
    key: int,
    decay: float | None,
) -> None:
    from lawa_optim.history import snapshot_bucket

    b = _buckets[key]
    # A compiler that has not written in place (aot_eager functionalizes in-place ops and
    # writes their results back when the graph ends) hands over other tensors: the
    # parameters' current values and copies of the buffers. Bring the parameters up to
    # date first (the graph writes the same values into them later), run the snapshot on
    # the bucket's own buffers, then give the copies the new contents.
    b.check_params()
    for given, own in zip(params, b.params):
        if given.data_ptr() != own.data_ptr():
            own.copy_(given)
    snapshot_bucket(b, decay)
    for given, own in ((ring, b.ring), (total, b.total), (pushes, b.pushes)):
        if given is not None and given.data_ptr() != own.data_ptr():
            given.copy_(own)


@_snapshot.register_fake
def _(params, ring, total, pushes, key, decay) -> None:
    return None


def snapshot(bucket: "Bucket", decay: float | None) -> None:
    """Run :func:`lawa_optim.history.snapshot_bucket` for ``bucket`` through the op."""
    _snapshot(bucket.params, bucket.ring, bucket.total, bucket.pushes, bucket.key, decay)


_freezing_warned = False


def warn_if_frozen() -> None:
    """Warn once when Inductor's ``freezing`` is on: it folds the weights of models
    compiled for inference into constants, so they never see a swap."""
    global _freezing_warned
    config = sys.modules.get("torch._inductor.config")  # not imported: nothing compiled with Inductor
    if _freezing_warned or config is None or not getattr(config, "freezing", False):
        return
    _freezing_warned = True
    warnings.warn(
        "torch._inductor.config.freezing is on: models compiled with it under no_grad keep "
        "the weights they were compiled with as constants and will not see "
        "swap_to_average(); compile them with freezing=False to evaluate the average",
        stacklevel=3,
    )
