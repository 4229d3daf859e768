"""LAWA under FSDP2 or DDP, with a distributed checkpoint, on CPU processes over gloo.

    torchrun --nproc-per-node 2 examples/train_distributed.py            # FSDP2
    torchrun --nproc-per-node 2 examples/train_distributed.py --ddp      # DDP

Each rank keeps the history of its own shard (FSDP2) or of the whole replica (DDP);
snapshots and swaps need no communication. At the end the script saves the model and
the optimizer (Adam's moments and the LAWA history) with torch.distributed.checkpoint,
loads them into a fresh model and checks that the average is the same.
"""

from __future__ import annotations

import tempfile

from lawa_optim._cli import Parser, int_at_least


def _parser() -> Parser:
    parser = Parser(prog="torchrun --nproc-per-node 2 examples/train_distributed.py",
                    description=__doc__.splitlines()[0])
    parser.add_argument("--ddp", action="store_true", help="DDP instead of FSDP2")
    parser.add_argument("--epochs", type=int_at_least(1), default=12, help="training epochs (default 12)")
    return parser


if __name__ == "__main__":  # answer a bad argument or --help before the imports below, which take seconds
    _parser().parse_args()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from torch import nn  # noqa: E402
from torch.distributed.checkpoint.state_dict import (  # noqa: E402
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard  # noqa: E402

from lawa_optim import LAWA, check_in_sync  # noqa: E402


def build(ddp: bool, seed: int) -> tuple[nn.Module, LAWA]:
    torch.manual_seed(seed)  # the same initial weights on every rank
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 1))
    if ddp:
        model = nn.parallel.DistributedDataParallel(model)
    else:
        for layer in (model[0], model[2]):
            fully_shard(layer)
        fully_shard(model)
    opt = LAWA(torch.optim.AdamW(model.parameters(), lr=3e-3), k=6)
    return model, opt


def data(rank: int, n: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Each rank's share of a noisy regression task."""
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(n, 16, generator=g)
    y = x[:, :4].sum(1, keepdim=True).sin() + 0.3 * torch.randn(n, 1, generator=g)
    return x, y


@torch.no_grad()
def mean_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    loss = nn.functional.mse_loss(model(x), y)
    dist.all_reduce(loss, op=dist.ReduceOp.AVG)
    return loss.item()


def checkpoint(model: nn.Module, opt: LAWA, path: str, save: bool) -> None:
    """Save, or load in place: model weights plus optimizer state, LAWA history included."""
    if isinstance(model, FSDPModule):
        model.reshard()  # an eval forward leaves the root gathered; state dicts read shards
    msd = get_model_state_dict(model)
    osd = get_optimizer_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    if save:
        dcp.save(state, checkpoint_id=path)
        return
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, msd)
    set_optimizer_state_dict(model, opt, osd)


def main(argv: list[str] | None = None) -> None:
    """Train, evaluate the average, save and reload it; run under torchrun."""
    args = _parser().parse_args(argv)
    dist.init_process_group("gloo")
    try:
        rank = dist.get_rank()
        model, opt = build(args.ddp, seed=0)
        x, y = data(rank)
        xv, yv = data(1000 + rank, n=256)
        for epoch in range(args.epochs):
            for i in range(0, len(x), 32):
                nn.functional.mse_loss(model(x[i : i + 32]), y[i : i + 32]).backward()
                opt.step()
                opt.zero_grad()
            opt.snapshot()  # on every rank: each keeps the history of its own weights
            live = mean_loss(model, xv, yv)
            with opt.averaged():  # every rank swaps: forwards gather shards from all of them
                avg = mean_loss(model, xv, yv)
            if rank == 0:
                print(f"epoch {epoch:2d}  val loss  live {live:.4f}  LAWA(k={opt.k}) {avg:.4f}")
        check_in_sync(opt)  # one small all-gather: same counters on every rank

        with tempfile.TemporaryDirectory() as tmp:
            path = [tmp]
            dist.broadcast_object_list(path)  # one directory for all ranks (one machine)
            checkpoint(model, opt, path[0], save=True)
            fresh, fresh_opt = build(args.ddp, seed=1)
            checkpoint(fresh, fresh_opt, path[0], save=False)
            with fresh_opt.averaged():
                restored = mean_loss(fresh, xv, yv)
            dist.barrier()  # nobody deletes the directory while another rank reads it
        if rank == 0:
            print(f"reloaded from a distributed checkpoint: LAWA val loss {restored:.4f} (was {avg:.4f})")
        if abs(restored - avg) > 1e-6:
            raise SystemExit(f"the reloaded average differs: {restored} != {avg}")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
