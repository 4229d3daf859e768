"""Distributed use over gloo on CPU: FSDP2 local-shard history, distributed checkpoints, DDP.

Each scenario runs once in spawned processes (a module-scoped fixture); ranks write what
they observed to files and the tests compare it here with an independent single-process
oracle: a plain model trained by plain Adam on the same data, whose averages are the
hand-computed means of its recorded snapshots. Every rank sees the same batches, so the
gradients averaged across ranks equal the single-process ones exactly.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import traceback
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import assert_same, fingerprint
from torch import nn

from lawa_optim import LAWA, check_in_sync, export_average, history_bytes

if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

import torch.distributed as dist  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from torch.distributed.checkpoint.state_dict import (  # noqa: E402
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402
from torch.distributed.tensor import DTensor, Shard, distribute_tensor  # noqa: E402

K = 3
EPOCHS = 5  # > K: the ring wraps
STEPS_PER_EPOCH = 2
LR = 1e-2
JOIN_TIMEOUT_S = 180  # a hang fails the test instead of blocking CI
PG_TIMEOUT = timedelta(seconds=60)


# -- the shared recipe --------------------------------------------------------------
def make_model(seed: int) -> nn.Sequential:
    """Uneven shards over 2 ranks (7 rows: 4 + 3) and empty ones (1 row: 1 + 0)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3), nn.Tanh(), nn.Linear(3, 1))


def batch(step: int, features: int = 5) -> torch.Tensor:
    return torch.randn(8, features, generator=torch.Generator().manual_seed(1000 + step))


EVAL_X = torch.randn(6, 5, generator=torch.Generator().manual_seed(7))


def train_epoch(model: nn.Module, opt: torch.optim.Optimizer, epoch: int, features: int = 5) -> None:
    for s in range(STEPS_PER_EPOCH):
        model(batch(epoch * STEPS_PER_EPOCH + s, features)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


def reference(epochs: int) -> dict:
    """Plain model, plain Adam: snapshots after each epoch and the mean of the K latest."""
    model = make_model(0)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    snaps = []
    for e in range(epochs):
        train_epoch(model, opt, e)
        snaps.append([p.detach().clone() for p in model.parameters()])
    avg = [torch.stack(ws).mean(0) for ws in zip(*snaps[-K:])]
    avg_model = make_model(0)
    with torch.no_grad():
        for p, a in zip(avg_model.parameters(), avg):
            p.copy_(a)
        return {
            "live": snaps[-1],
            "avg": avg,
            "out_live": model(EVAL_X),
            "out_avg": avg_model(EVAL_X),
            "exp_avg": [opt.state[p]["exp_avg"].clone() for p in model.parameters()],
        }


def shard(model: nn.Module) -> nn.Module:
    """FSDP2 with several modules; the root keeps its parameters gathered after forward."""
    fully_shard(model[0])
    fully_shard(model[2])
    fully_shard(model, reshard_after_forward=False)
    return model


def full(ts) -> list[torch.Tensor]:
    """Copies of the full tensors (on a 1-rank mesh ``full_tensor()`` aliases the shard)."""
    return [(t.full_tensor() if isinstance(t, DTensor) else t).detach().clone() for t in ts]


# -- process harness ----------------------------------------------------------------
def _entry(fn, rank: int, world: int, out: str, args: tuple) -> None:
    torch.set_num_threads(1)
    # A file rendezvous in the run's own folder: no port that another process can take
    # between choosing it and binding it.
    store = f"file://{Path(out, 'rendezvous').resolve()}"
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=world, timeout=PG_TIMEOUT)
    try:
        fn(rank, world, Path(out), *args)
        # No rank tears down while another still talks to it.
        dist.barrier()
        status = 0
    except BaseException:
        Path(out, f"error{rank}.txt").write_text(traceback.format_exc())
        traceback.print_exc()
        status = 1
    dist.destroy_process_group()
    # destroy_process_group() does not end the gloo backend here: FSDP2's DeviceMesh holds
    # the process group and DTensor's sharding caches hold the mesh, so its three native
    # threads (gloo_tcp_loop, 2 x pt_gloo_runloop) outlive it, also after gc.collect().
    # A normal exit then destroys the backend during interpreter finalization, in whatever
    # order that runs, while the other rank's exit closes the sockets those threads poll;
    # the rare aborts of a rank at exit ("terminate called without an active exception",
    # a native thread torn down while running: once in 13 runs) point there. Everything
    # this rank has to say is in its files: leave without finalization.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def run_ranks(fn, world: int, out: Path, *args) -> None:
    """Run ``fn(rank, world, out, *args)`` on ``world`` gloo ranks; fail on error or hang."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_entry, args=(fn, r, world, str(out), args)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(JOIN_TIMEOUT_S)
    finally:
        hung = [p for p in procs if p.is_alive()]
        for p in hung:
            p.kill()
            p.join(10)
    errors = "\n".join(f.read_text() for f in sorted(out.glob("error*.txt")))
    assert not hung, f"ranks {[procs.index(p) for p in hung]} hung\n{errors}"
    assert all(p.exitcode == 0 for p in procs), f"exit codes {[p.exitcode for p in procs]}\n{errors}"


# -- rank programs --------------------------------------------------------------------
def fsdp_train_and_save(rank: int, world: int, out: Path) -> None:
    model = shard(make_model(0))
    opt = LAWA(torch.optim.Adam(model.parameters(), lr=LR), k=K)
    params = list(model.parameters())
    for e in range(EPOCHS):
        train_epoch(model, opt, e)
        opt.snapshot()
    rec = {"local_numels": [p.to_local().numel() for p in params]}
    # No communication: rank 0 swaps in and back alone while rank 1 waits at the barrier
    # (a collective inside would pair with the barrier and fail or hang).
    if rank == 0:
        opt.swap_to_average()
        solo = [p.to_local().clone() for p in params]
        opt.swap_back()
    dist.barrier()
    with torch.no_grad():
        rec["out_live"] = model(EVAL_X)
        # The trap: the root group kept its gathered parameters after this forward.
        rec["root_unsharded"] = not isinstance(model[4].weight, DTensor)
        opt.swap_to_average()
        if rank == 0:
            rec["solo_swap_matches"] = all(torch.equal(a, p.to_local()) for a, p in zip(solo, params))
        rec["out_avg"] = model(EVAL_X)
        rec["avg"] = full(params)
        opt.swap_back()
        rec["out_back"] = model(EVAL_X)
        rec["live"] = full(params)
    buckets = opt._history.buckets
    rec["bucket_numels"] = [n for b in buckets for n in b.numels]
    rec["bucket_plain"] = all(not isinstance(t, DTensor) for b in buckets for t in b.params)
    # The eval forward left the root gathered; state dicts read the registered shards.
    model.reshard()
    osd = get_optimizer_state_dict(model, opt)
    dcp.save({"model": get_model_state_dict(model), "optim": osd}, checkpoint_id=str(out / "ckpt"))
    rec["exp_avg"] = full(opt.state[p]["exp_avg"] for p in params)
    with opt.averaged():  # saved while swapped: the model holds the average
        osd = get_optimizer_state_dict(model, opt)
        dcp.save({"model": get_model_state_dict(model), "optim": osd}, checkpoint_id=str(out / "swapped"))
    torch.save(rec, out / f"train{rank}.pt")


def load_into(model: nn.Module, opt: LAWA, ckpt: Path) -> None:
    msd = get_model_state_dict(model)
    osd = get_optimizer_state_dict(model, opt)
    dcp.load({"model": msd, "optim": osd}, checkpoint_id=str(ckpt), no_dist=not dist.is_initialized())
    set_model_state_dict(model, msd)
    set_optimizer_state_dict(model, opt, osd)


def observe_loaded(model: nn.Module, opt: LAWA) -> dict:
    params = list(model.parameters())
    rec = {"num_snapshots": opt.num_snapshots, "steps": opt.steps}
    rec["exp_avg"] = full(opt.state[p]["exp_avg"] for p in params)
    with torch.no_grad():
        with opt.averaged():
            rec["out_avg"] = model(EVAL_X)
            rec["avg"] = full(params)
    # One more epoch: the restored Adam moments and ring decide the next average.
    train_epoch(model, opt, EPOCHS)
    opt.snapshot()
    with torch.no_grad(), opt.averaged():
        rec["avg_next"] = full(params)
    return rec


def optimizer_record(model: nn.Module, opt: LAWA) -> dict:
    """The counters, this rank's history buffers and Adam's full moments."""
    params = list(model.parameters())
    return {
        "steps": opt.steps, "is_swapped": opt.is_swapped, "num_snapshots": opt.num_snapshots,
        "history": [[t.clone() for t in (b.ring, b.total, b.pushes)] for b in opt._history.buckets],
        "exp_avg": full(opt.state[p]["exp_avg"] for p in params),
        "exp_avg_sq": full(opt.state[p]["exp_avg_sq"] for p in params),
    }


def load_swapped(model: nn.Module, opt: LAWA, ckpt: Path) -> dict:
    """A checkpoint saved while swapped: refused with the remedy, the optimizer as it was
    right before the refused load (after the loader's warm-up step)."""
    msd = get_model_state_dict(model)
    osd = get_optimizer_state_dict(model, opt)
    dcp.load({"model": msd, "optim": osd}, checkpoint_id=str(ckpt), no_dist=not dist.is_initialized())
    set_model_state_dict(model, msd)
    before = optimizer_record(model, opt)
    try:
        set_optimizer_state_dict(model, opt, osd)
    except ValueError as exc:
        return {"error": str(exc), "before": before, "after": optimizer_record(model, opt)}
    return {"error": None}


def fsdp_load(rank: int, world: int, out: Path, ckpt: str) -> None:
    model = shard(make_model(1))  # other initial weights: all must come from the checkpoint
    opt = LAWA(torch.optim.Adam(model.parameters(), lr=LR), k=K)
    load_into(model, opt, Path(ckpt, "ckpt"))
    rec = observe_loaded(model, opt)
    model = shard(make_model(2))
    opt = LAWA(torch.optim.Adam(model.parameters(), lr=LR), k=K)
    rec["swapped"] = load_swapped(model, opt, Path(ckpt, "swapped"))
    torch.save(rec, out / f"load{rank}.pt")


def phema_recipe(model: nn.Module) -> tuple[LAWA, list[list[torch.Tensor]]]:
    """mode="phema" over ``model`` for EPOCHS epochs, a snapshot after each, k=4: the
    synthesised width-0.07 EMA and the live one, as full tensors."""
    opt = LAWA(torch.optim.Adam(model.parameters(), lr=LR), k=4, mode="phema")
    for e in range(EPOCHS):
        train_epoch(model, opt, e)
        opt.snapshot()
    return opt, phema_averages(model, opt)


def phema_averages(model: nn.Module, opt: LAWA) -> list[list[torch.Tensor]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fit's error, checked in test_phema_mode.py
        with torch.no_grad(), opt.averaged(sigma_rel=0.07):
            fitted = full(model.parameters())
    with torch.no_grad(), opt.averaged():
        live = full(model.parameters())
    return [fitted, live]


def fsdp_phema(rank: int, world: int, out: Path) -> None:
    """FSDP2 local shards in phema mode: the averages, then a distributed checkpoint loaded
    into a fresh sharded model with other weights, whose averages must be the same."""
    model = shard(make_model(0))
    opt, rec = phema_recipe(model)
    model.reshard()
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=str(out / "ckpt"))
    model2 = shard(make_model(1))
    opt2 = LAWA(torch.optim.Adam(model2.parameters(), lr=LR), k=4, mode="phema")
    load_into(model2, opt2, out / "ckpt")
    rec.append(phema_averages(model2, opt2))
    torch.save(rec, out / f"phema{rank}.pt")


def ddp_train(rank: int, world: int, out: Path) -> None:
    model = nn.parallel.DistributedDataParallel(make_model(0))
    opt = LAWA(torch.optim.Adam(model.parameters(), lr=LR), k=K)
    for e in range(EPOCHS):
        train_epoch(model, opt, e)
        opt.snapshot()
    rec = {}
    with torch.no_grad():
        with opt.averaged():
            rec["avg"] = full(model.parameters())
            rec["out_avg"] = model(EVAL_X)
        rec["live"] = full(model.parameters())
    check_in_sync(opt)
    if rank == 0:
        opt.snapshot()  # the misuse: a snapshot on one rank only
    try:
        check_in_sync(opt)
        rec["misuse"] = None
    except RuntimeError as exc:
        rec["misuse"] = str(exc)
    torch.save(rec, out / f"ddp{rank}.pt")


# -- fixtures -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ref():
    return {"saved": reference(EPOCHS), "next": reference(EPOCHS + 1)}


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    run_ranks(fsdp_train_and_save, 2, out)
    return out, [torch.load(out / f"train{r}.pt") for r in range(2)]


def load_run(tmp_path_factory, fsdp_run, world: int) -> list[dict]:
    out = tmp_path_factory.mktemp(f"load{world}")
    run_ranks(fsdp_load, world, out, str(fsdp_run[0]))
    return [torch.load(out / f"load{r}.pt") for r in range(world)]


def assert_all_close(got, want) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


# -- FSDP2 ----------------------------------------------------------------------------
def test_fsdp_shards_are_uneven_and_empty(fsdp_run):
    _, recs = fsdp_run
    assert recs[0]["local_numels"] == [20, 4, 14, 2, 3, 1]
    assert recs[1]["local_numels"] == [15, 3, 7, 1, 0, 0]


def test_fsdp_history_holds_only_the_local_shard(fsdp_run):
    _, recs = fsdp_run
    for r in recs:
        assert r["bucket_numels"] == r["local_numels"] and r["bucket_plain"]


def test_fsdp_swap_runs_on_one_rank_alone(fsdp_run):
    _, recs = fsdp_run
    assert recs[0]["solo_swap_matches"]


def test_fsdp_average_equals_reference(fsdp_run, ref):
    _, recs = fsdp_run
    for r in recs:
        assert_all_close(r["avg"], ref["saved"]["avg"])
        assert_all_close(r["live"], ref["saved"]["live"])


def test_fsdp_forward_after_swaps_equals_unsharded_reference(fsdp_run, ref):
    _, recs = fsdp_run
    for r in recs:
        assert r["root_unsharded"], "the eval forward must leave the root gathered (the trap)"
        torch.testing.assert_close(r["out_live"], ref["saved"]["out_live"])
        torch.testing.assert_close(r["out_avg"], ref["saved"]["out_avg"])
        torch.testing.assert_close(r["out_back"], ref["saved"]["out_live"])


# -- distributed checkpoints ------------------------------------------------------------
def check_loaded(recs: list[dict], ref: dict) -> None:
    for r in recs:
        assert r["num_snapshots"] == K and r["steps"] == EPOCHS * STEPS_PER_EPOCH
        assert_all_close(r["avg"], ref["saved"]["avg"])
        torch.testing.assert_close(r["out_avg"], ref["saved"]["out_avg"])
        assert_all_close(r["exp_avg"], ref["saved"]["exp_avg"])
        assert_all_close(r["avg_next"], ref["next"]["avg"])
        swapped = r["swapped"]
        assert "outside `with opt.averaged():`" in swapped["error"]
        assert_same(swapped["after"], swapped["before"])
        after = swapped["after"]
        assert after["steps"] == 1 and not after["is_swapped"] and after["num_snapshots"] == 0  # the warm-up step only


def test_dcp_two_ranks_to_two(tmp_path_factory, fsdp_run, ref):
    check_loaded(load_run(tmp_path_factory, fsdp_run, 2), ref)


def test_dcp_two_ranks_to_one(tmp_path_factory, fsdp_run, ref):
    check_loaded(load_run(tmp_path_factory, fsdp_run, 1), ref)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_dcp_two_ranks_to_plain_model(fsdp_run, ref):
    model = make_model(1)
    opt = LAWA(torch.optim.Adam(model.parameters(), lr=LR), k=K)
    load_into(model, opt, fsdp_run[0] / "ckpt")
    rec = observe_loaded(model, opt)
    model = make_model(2)
    opt = LAWA(torch.optim.Adam(model.parameters(), lr=LR), k=K)
    rec["swapped"] = load_swapped(model, opt, fsdp_run[0] / "swapped")
    check_loaded([rec], ref)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_dcp_directory_exports_the_average_on_one_process(tmp_path, fsdp_run, ref):
    """The distributed checkpoint directory, converted on one process without a process
    group (``dcp_to_torch_save``), exports the average the ranks held."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(fsdp_run[0] / "ckpt"), str(tmp_path / "ckpt.pt"))
    model = make_model(1)
    got = export_average(model, torch.load(tmp_path / "ckpt.pt")["optim"])
    assert_all_close([got[n] for n, _ in model.named_parameters()], ref["saved"]["avg"])


# -- DDP ------------------------------------------------------------------------------
def test_ddp_ranks_agree_with_reference(tmp_path, ref):
    run_ranks(ddp_train, 2, tmp_path)
    for r in range(2):
        rec = torch.load(tmp_path / f"ddp{r}.pt")
        assert_all_close(rec["avg"], ref["saved"]["avg"])
        torch.testing.assert_close(rec["out_avg"], ref["saved"]["out_avg"])
        assert_all_close(rec["live"], ref["saved"]["live"])
        assert "snapshots pushed" in rec["misuse"] and "rank 1: {'steps': 10" in rec["misuse"]


# -- the 8-bit history under FSDP2 ----------------------------------------------------
FEATURES8 = 256
#: Which parameters of make_model8 keep 8 bits (rows of 256 and 512 elements); the others
#: (rows of 5 elements, biases) keep a ring of float32.
INT8 = [True, False, False, False, True, False]
WEIGHTS = (0.5, 0.3, 0.2)
AVERAGES = ({}, {"last": 2}, {"weights": WEIGHTS})


def make_model8(seed: int) -> nn.Sequential:
    """Shards over 2 ranks of 3 + 2 rows of 256 elements, 1 + 0 rows of 512 (empty), and
    parameters whose rows are no multiple of 256 elements (5 elements, 1-D biases)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(FEATURES8, 5), nn.Tanh(), nn.Linear(5, 512), nn.Tanh(), nn.Linear(512, 1))


def lawa8(model: nn.Module) -> LAWA:
    return LAWA(torch.optim.Adam(model.parameters(), lr=LR), k=K, history_dtype=torch.int8)


def averages8(params, opt: LAWA) -> list[list[torch.Tensor]]:
    """The full average, last=2 and weights=WEIGHTS of ``params``, as full tensors."""
    params = list(params)
    out = []
    for kw in AVERAGES:
        with torch.no_grad(), opt.averaged(**kw):
            out.append(full(params))
    return out


def fsdp8_train(rank: int, world: int, out: Path) -> None:
    model = shard(make_model8(0))
    opt = lawa8(model)
    params = list(model.parameters())
    rec = {"snaps": []}
    for e in range(EPOCHS):
        train_epoch(model, opt, e, FEATURES8)
        opt.snapshot()
        rec["snaps"].append(full(params))
    int8 = {id(p): b.int8 for b in opt._history.buckets for p in b.sources}
    rec["int8"] = [int8[id(p)] for p in params]
    rec["memory"] = dataclasses.asdict(opt.memory())
    rec["predicted"] = dataclasses.asdict(history_bytes(model, K, history_dtype=torch.int8))
    rec["avg"] = averages8(model.parameters(), opt)
    model.reshard()
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=str(out / "ckpt"))
    gathered = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    if rank == 0:
        torch.save(gathered, out / "full.pt")
    train_epoch(model, opt, EPOCHS, FEATURES8)  # the uninterrupted run goes on
    opt.snapshot()
    rec["next"] = averages8(model.parameters(), opt)
    # Shards that are not whole rows, or not laid out row by row: refused, by the LAWA and
    # by history_bytes.
    mesh = init_device_mesh("cpu", (world,))
    columns = nn.Parameter(distribute_tensor(torch.randn(4, 512), mesh, [Shard(1)]))
    transposed = nn.Parameter(DTensor.from_local(torch.randn(512, 4).t(), mesh, [Shard(0)], run_check=False))
    rec["refused"] = []
    for call in (
        lambda: lawa8(nn.ParameterList([columns])),
        lambda: history_bytes([columns], K, history_dtype=torch.int8),
        lambda: lawa8(nn.ParameterList([transposed])),
    ):
        try:
            call()
            rec["refused"].append(None)
        except ValueError as exc:
            rec["refused"].append(str(exc))
    torch.save(rec, out / f"train{rank}.pt")


def fsdp8_load(rank: int, world: int, out: Path, ckpt: str) -> None:
    """Load into a fresh sharded model with other weights; go on one epoch; then a dict
    whose entry has the 8-bit format where the parameter keeps its own dtype: refused."""
    model = shard(make_model8(1))
    opt = lawa8(model)
    load_into(model, opt, Path(ckpt, "ckpt"))
    rec = {"avg": averages8(model.parameters(), opt)}
    train_epoch(model, opt, EPOCHS, FEATURES8)
    opt.snapshot()
    rec["next"] = averages8(model.parameters(), opt)
    sd = opt.state_dict()
    entry = sd["state"][1]  # the first bias: a float32 ring
    entry["lawa_anchor"] = entry.pop("lawa_mean")
    before = optimizer_record(model, opt)
    try:
        opt.load_state_dict(sd)
        rec["wrong_format"] = None
    except ValueError as exc:
        rec["wrong_format"] = str(exc)
    assert_same(optimizer_record(model, opt), before)
    torch.save(rec, out / f"load{rank}.pt")


def unsharded(snaps: list[list[torch.Tensor]], history_dtype: torch.dtype | None) -> list[list[torch.Tensor]]:
    """AVERAGES of the same snapshots pushed into an unsharded LAWA of ``history_dtype``."""
    params = [nn.Parameter(t.clone()) for t in snaps[0]]
    opt = LAWA(torch.optim.SGD(params, lr=0.0), k=K, history_dtype=history_dtype)
    for snap in snaps:
        with torch.no_grad():
            torch._foreach_copy_(params, snap)
        opt.snapshot()
    return averages8(params, opt)


@pytest.fixture(scope="module")
def fsdp8_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp8")
    run_ranks(fsdp8_train, 2, out)
    return out, [torch.load(out / f"train{r}.pt") for r in range(2)]


def test_fsdp_8bit_history_keeps_rows_of_256_in_8_bits(fsdp8_run):
    """Rows of multiples of 256 elements in 8 bits, the rest in float32; the memory held
    is what history_bytes predicts and what the shards need, counted by hand."""
    _, recs = fsdp8_run
    # Per rank: (rows of 256, rows of 512 in 2 blocks each) -> scales of K - 1 slots;
    # the float32 rings of 3 + 1280 + 256 + 1 (2 + 1280 + 256 + 0) elements, each padded to 64.
    blocks = [3 + 2, 2 + 1]  # an empty shard still takes one block
    for r, rec in enumerate(recs):
        assert rec["int8"] == INT8
        assert rec["memory"] == rec["predicted"]
        assert rec["memory"]["scales"] == 4 * (K - 1) * blocks[r]
        assert rec["memory"]["sum"] == 4 * (64 + 1280 + 256 + 64)
        assert "placements (Shard(dim=1),)" in rec["refused"][0] and "torch.bfloat16" in rec["refused"][0]
        assert rec["refused"][1] == rec["refused"][0].replace("parameter 0 of param group 0", "params: parameter 0")
        assert "local shard (shape (4, 512), stride (1, 4)) is not laid out row by row" in rec["refused"][2]


def test_fsdp_8bit_averages_equal_the_unsharded_run(fsdp8_run):
    """The full average, last=2 and weights= equal, bit for bit, those of unsharded LAWAs
    over the same snapshots: 8-bit for the 8-bit parameters (their blocks, counted from
    each parameter's start, are the row chunks of Shard(0)), float32 for the others."""
    _, recs = fsdp8_run
    snaps = recs[0]["snaps"]
    int8, float32 = unsharded(snaps, torch.int8), unsharded(snaps, None)
    want = [[a if q else b for a, b, q in zip(x, y, INT8)] for x, y in zip(int8, float32)]
    for r, rec in enumerate(recs):
        assert_same(rec["snaps"], snaps)
        assert_same(rec["avg"], want, f"rank {r}")
    # The two formats differ on every 8-bit parameter: the comparison tells them apart.
    assert not any(torch.equal(a, b) for a, b, q in zip(int8[0], float32[0], INT8) if q)


@pytest.mark.parametrize("world", [2, 1])
def test_fsdp_8bit_checkpoint_reshards(tmp_path, fsdp8_run, world):
    """A distributed checkpoint loaded on 2 ranks and on 1 (resharded): the same averages
    bit for bit, and one more epoch gives the uninterrupted run's averages; a dict
    whose entry has the wrong format for its parameter is refused, changing nothing."""
    out, recs = fsdp8_run
    run_ranks(fsdp8_load, world, tmp_path, str(out))
    for r in range(world):
        rec = torch.load(tmp_path / f"load{r}.pt")
        assert_same(rec["avg"], recs[0]["avg"], f"rank {r} of {world}: loaded")
        assert_same(rec["next"], recs[0]["next"], f"rank {r} of {world}: one epoch on")
        assert "parameter 1 of param group 0: the state_dict holds lawa_anchor" in rec["wrong_format"]
        assert "a sharded parameter whose rows are not a multiple of 256" in rec["wrong_format"]


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_fsdp_8bit_export_from_gathered_state_dict(fsdp8_run):
    """export_average reads the gathered dict, 8-bit and float32 entries mixed, as the
    sharded swaps computed them; an unsharded LAWA refuses to load it, changing nothing."""
    out, recs = fsdp8_run
    model = make_model8(1)
    names = [n for n, _ in model.named_parameters()]
    for kw, want in ((AVERAGES[0], recs[0]["avg"][0]), (AVERAGES[2], recs[0]["avg"][2])):
        got = export_average(model, out / "full.pt", **kw)
        assert_same([got[n] for n in names], want)
    opt = lawa8(model)
    opt.snapshot()
    before = fingerprint(opt, model=model)
    with pytest.raises(ValueError, match="parameter 0 of param group 0: lawa_scales has shape \\(2, 5, 1\\).*sharded models only"):
        opt.load_state_dict(torch.load(out / "full.pt"))
    assert_same(fingerprint(opt, model=model), before)


def test_fsdp_phema_shards_equal_the_unsharded_run(tmp_path):
    """Each rank keeps the EMAs and the ring of its shards; the synthesised and the live
    EMA equal those of the same recipe on one process, also after a distributed checkpoint."""
    run_ranks(fsdp_phema, 2, tmp_path)
    _, want = phema_recipe(make_model(0))
    for r in range(2):
        fitted, live, (loaded_fitted, loaded_live) = torch.load(tmp_path / f"phema{r}.pt")
        assert_all_close(fitted, want[0])
        assert_all_close(live, want[1])
        assert_same(loaded_fitted, fitted, f"rank {r}: loaded, sigma_rel=0.07")
        assert_same(loaded_live, live, f"rank {r}: loaded, the live EMA")


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_fsdp_8bit_export_from_the_distributed_checkpoint_on_one_process(tmp_path, fsdp8_run):
    """The distributed checkpoint directory, converted on one process without a process
    group (``dcp_to_torch_save``), exports the averages the sharded swaps computed."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out, recs = fsdp8_run
    dcp_to_torch_save(str(out / "ckpt"), str(tmp_path / "ckpt.pt"))
    optim = torch.load(tmp_path / "ckpt.pt")["optim"]
    model = make_model8(1)
    names = [n for n, _ in model.named_parameters()]
    for kw, want in ((AVERAGES[0], recs[0]["avg"][0]), (AVERAGES[2], recs[0]["avg"][2])):
        got = export_average(model, optim, **kw)
        assert_same([got[n] for n in names], want)
