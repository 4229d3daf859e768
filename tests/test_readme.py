"""Every ```python block of README.md and examples/README.md runs as written.

A block runs in a fresh namespace that holds only the names a user brings to it
(``model``, ``loader``, ``loss_fn``, ``evaluate``, ``epochs``, ``opt``, ``module``, ``args``,
...), each a tiny real object from :class:`Harness`; everything else the block must import
itself. An HTML comment right before a block changes how it is checked:

* ``<!-- readme-test: continues -->``: runs in the namespace the block before it left
  (a recipe that goes on from the integration's example);
* ``<!-- readme-test: distributed -->``: runs on two gloo processes (as ``torchrun
  --nproc-per-node 2`` would), each rank with its own harness;
* ``<!-- readme-test: syntax -->``: only compiled, and every import it makes must resolve.

Files a block reads by name (``ckpt.pt``: ``{"model": ..., "optimizer": opt.state_dict()}``)
are written where it runs, a temporary folder.

A new block is run unless marked, so one that uses a name the harness does not bind fails
here: bind the name in :class:`Harness` (a tiny real object, nothing of the library
patched) or mark the block. The recipes' results are then checked against the frameworks'
own evaluation of the exported average.
"""

from __future__ import annotations

import ast
import copy
import functools
import importlib
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import assert_same  # noqa: E402
from torch import nn  # noqa: E402

transformers = pytest.importorskip("transformers", reason="the README's blocks need transformers")
pl = pytest.importorskip("lightning.pytorch", reason="the README's blocks need lightning")

from lawa_optim import LAWA, export_average  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
READMES = ("README.md", "examples/README.md")
MARKS = ("continues", "distributed", "syntax")
BLOCK = re.compile(r"(?:<!-- readme-test: (?P<mark>[a-z]+) -->\n)?```python\n(?P<code>.*?)^```", re.S | re.M)


@dataclass
class Block:
    file: str
    line: int
    mark: str | None
    code: str

    @property
    def id(self) -> str:
        return f"{self.file}:{self.line}"


def blocks() -> list[Block]:
    out = []
    for name in READMES:
        text = (ROOT / name).read_text()
        for m in BLOCK.finditer(text):
            line = text.count("\n", 0, m.start("code"))
            out.append(Block(name, line, m.group("mark"), m.group("code")))
    return out


def chains() -> list[list[Block]]:
    """Blocks run together: one block, or one followed by those marked ``continues``."""
    out: list[list[Block]] = []
    for b in blocks():
        if b.mark == "continues":
            assert out and out[-1][0].file == b.file, f"{b.id}: 'continues' with no block before it"
            out[-1].append(b)
        else:
            out.append([b])
    return out


def test_every_mark_is_known_and_right_before_its_block():
    for b in blocks():
        assert b.mark in (None, *MARKS), f"{b.id}: unknown mark {b.mark!r}; known: {MARKS}"
    written = sum((ROOT / name).read_text().count("<!-- readme-test:") for name in READMES)
    assert written == sum(b.mark is not None for b in blocks()), "a mark not on the line right before ```python"


# -- the user's side: a tiny model, its data, its loop ----------------------------------
IN, OUT, N = 6, 3, 32


class TinyConfig(transformers.PretrainedConfig):
    model_type = "lawa-readme-tiny"

    def __init__(self, width: int = 8, **kwargs):
        self.width = width
        super().__init__(**kwargs)


class TinyNet(transformers.PreTrainedModel):
    """A classifier with BatchNorm and a ``blocks`` list (for ``fully_shard``), usable as a
    plain module (``model(x)`` gives logits) and by the Hugging Face Trainer (``labels``
    give a loss)."""

    config_class = TinyConfig

    def __init__(self, config: TinyConfig):
        super().__init__(config)
        w = config.width
        self.stem = nn.Sequential(nn.Linear(IN, w), nn.BatchNorm1d(w), nn.ReLU())
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(w, w), nn.Tanh()) for _ in range(2)])
        self.head = nn.Linear(w, OUT)
        self.post_init()

    def forward(self, x, labels=None):
        h = self.stem(x)
        for block in self.blocks:
            h = block(h)
        logits = self.head(h)
        if labels is None:
            return logits
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, IN, generator=g)
    return x, (x[:, :OUT].argmax(1) + (x[:, -1] > 1).long()) % OUT


TRAIN, VAL = data(0), data(1)


def val_loss(model: nn.Module, loader=None) -> float:
    """The loss of ``model`` in eval mode on ``loader``'s batches (default: the validation
    data in one batch), the mean over the examples."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        batches = [VAL] if loader is None else list(loader)
        total = sum(nn.functional.cross_entropy(model(x), y, reduction="sum").item() for x, y in batches)
    model.train(was_training)
    return total / sum(len(y) for _, y in batches)


class TinyModule(pl.LightningModule):
    """An unchanged LightningModule: a plain optimizer, its own loaders, ``val_loss`` logged."""

    def __init__(self):
        super().__init__()
        self.net = TinyNet(TinyConfig())

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def train_dataloader(self):
        return loader(TRAIN, shuffle=True)

    def val_dataloader(self):
        return loader(VAL, batch_size=N)


def loader(xy, batch_size: int = 8, shuffle: bool = False) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*xy), batch_size=batch_size, shuffle=shuffle)


def examples(xy) -> list[dict[str, torch.Tensor]]:
    return [{"x": x, "labels": y} for x, y in zip(*xy)]


class Harness:
    """The names a user brings to a block, built on first use, one set per block."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        torch.manual_seed(0)

    epochs = 8  # > k = 6: the ring wraps

    @functools.cached_property
    def model(self) -> TinyNet:
        return TinyNet(TinyConfig())

    @functools.cached_property
    def loader(self) -> torch.utils.data.DataLoader:
        return loader(TRAIN, shuffle=True)

    @functools.cached_property
    def train_loader(self) -> torch.utils.data.DataLoader:
        return self.loader

    @functools.cached_property
    def val_loader(self) -> torch.utils.data.DataLoader:
        return loader(VAL, batch_size=N)

    @property
    def loss_fn(self):
        return nn.functional.cross_entropy

    @property
    def evaluate(self):
        return val_loss

    @functools.cached_property
    def opt(self) -> LAWA:
        """The LAWA of a run in progress: ``model`` trained for ``epochs`` epochs, a
        snapshot at each epoch's end."""
        opt = LAWA(torch.optim.SGD(self.model.named_parameters(), lr=0.1, momentum=0.9), k=6)
        for _ in range(self.epochs):
            for x, y in self.loader:
                self.loss_fn(self.model(x), y).backward()
                opt.step()
                opt.zero_grad()
            opt.snapshot()
        return opt

    @functools.cached_property
    def module(self) -> TinyModule:
        return TinyModule()

    @functools.cached_property
    def train(self) -> list[dict[str, torch.Tensor]]:
        return examples(TRAIN)

    @functools.cached_property
    def val(self) -> list[dict[str, torch.Tensor]]:
        return examples(VAL)

    @functools.cached_property
    def args(self) -> transformers.TrainingArguments:
        return transformers.TrainingArguments(
            output_dir=str(self.tmp / "hf"), num_train_epochs=3, per_device_train_batch_size=8,
            per_device_eval_batch_size=N, learning_rate=0.1, eval_strategy="epoch", save_strategy="no",
            use_cpu=True, report_to=[], disable_tqdm=True, logging_strategy="no", dataloader_num_workers=0,
        )

    @functools.cached_property
    def path(self) -> str:
        return str(self.tmp / "checkpoint")

    def write_files(self, code: str) -> None:
        """Files a block reads by name, written where it runs."""
        if "ckpt.pt" in code:
            torch.save({"model": self.model.state_dict(), "optimizer": self.opt.state_dict()}, self.tmp / "ckpt.pt")


NAMES = {n for n in dir(Harness) if not n.startswith("_") and n != "write_files"}


def used_names(code: str) -> set[str]:
    """The names a block reads before it assigns them, nested scopes included. A name
    counts as assigned where the statement that assigns it ends (``model = DDP(model)``
    reads ``model`` first)."""
    first_store: dict[str, tuple[int, int]] = {}
    loads = []
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            loads.append((node.id, (node.lineno, node.col_offset)))
        if not isinstance(node, ast.stmt):
            continue
        end = (node.end_lineno, node.end_col_offset)
        for inner in ast.walk(node):
            if isinstance(inner, ast.Name) and not isinstance(inner.ctx, ast.Load):
                name = inner.id
            elif isinstance(inner, ast.alias):
                name = inner.asname or inner.name.split(".")[0]
            else:
                continue
            first_store[name] = min(first_store.get(name, end), end)
    return {n for n, where in loads if where < first_store.get(n, (1 << 30, 0))}


def run_blocks(chain: list[Block], harness: Harness) -> dict:
    """Run ``chain`` in one namespace, from the block's folder's view: ``harness.tmp``."""
    ns: dict = {"__name__": "__readme__"}
    cwd = os.getcwd()
    os.chdir(harness.tmp)
    try:
        for b in chain:
            for name in sorted(used_names(b.code) & NAMES - ns.keys()):
                ns[name] = getattr(harness, name)
            harness.write_files(b.code)
            try:
                exec(compile(b.code, b.id, "exec"), ns)
            except NameError as e:
                raise AssertionError(
                    f"{b.id}: {e}. Import it in the block, bind it in tests/test_readme.py's Harness, "
                    "or mark the block <!-- readme-test: syntax -->"
                ) from e
    finally:
        os.chdir(cwd)
    return ns


def check_syntax_and_imports(b: Block) -> None:
    tree = ast.parse(b.code, b.id)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                importlib.import_module(a.name)
        elif isinstance(node, ast.ImportFrom):
            module = importlib.import_module(node.module)
            for a in node.names:
                if not hasattr(module, a.name):
                    importlib.import_module(f"{node.module}.{a.name}")


# -- the tests ----------------------------------------------------------------------------
LOCAL = [c for c in chains() if c[0].mark is None]
SYNTAX = [c for c in chains() if c[0].mark == "syntax"]
DISTRIBUTED = [c for c in chains() if c[0].mark == "distributed"]


def test_every_block_is_checked():
    covered = [b.id for c in LOCAL + SYNTAX + DISTRIBUTED for b in c]
    assert sorted(covered) == sorted(b.id for b in blocks())
    assert len(LOCAL) >= 5 and DISTRIBUTED  # the extraction found the blocks it must


@pytest.mark.parametrize("chain", LOCAL, ids=[c[0].id for c in LOCAL])
def test_block_runs(chain, tmp_path, one_thread):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the frameworks' advice on loader workers and logging
        run_blocks(chain, Harness(tmp_path))


@pytest.mark.parametrize("block", blocks(), ids=[b.id for b in blocks()])
def test_block_compiles_and_its_imports_resolve(block):
    """All that is checked of a block marked ``syntax``; a first check of the others."""
    check_syntax_and_imports(block)


def run_distributed(rank: int, world: int, out: Path, chains: list[list[Block]]) -> None:
    for i, chain in enumerate(chains):
        tmp = out / f"{i}"
        (tmp / f"rank{rank}").mkdir(parents=True, exist_ok=True)
        harness = Harness(tmp)  # the same weights on every rank, as after a broadcast
        harness.tmp = tmp / f"rank{rank}"
        harness.path = str(tmp / "checkpoint")  # shared by the ranks
        run_blocks(chain, harness)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_distributed_blocks_run_on_two_gloo_ranks(tmp_path):
    from test_distributed import run_ranks

    run_ranks(run_distributed, 2, tmp_path, DISTRIBUTED)


# -- the recipes give the average's numbers --------------------------------------------
def chain_with(text: str) -> list[Block]:
    (chain,) = [c for c in LOCAL if any(text in b.code for b in c[1:])]
    return chain


def test_lightning_recipes_give_the_average_and_its_metrics(tmp_path, one_thread):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ns = run_blocks(chain_with('["optimizer_states"]'), Harness(tmp_path))
    module, lawa = ns["module"], ns["lawa_cb"].lawa
    expected = export_average(module, lawa)
    assert_same(ns["avg"], expected)  # from the .ckpt, as from the live LAWA
    twin = TinyModule()
    twin.load_state_dict(expected)
    loss = val_loss(twin)
    assert ns["val_loss"] == pytest.approx(loss, rel=1e-6, abs=0)
    assert ns["metrics"]["val_loss"] == pytest.approx(loss, rel=1e-6, abs=0)
    twin.load_state_dict(ns["ckpt"]["state_dict"])
    assert val_loss(twin) != pytest.approx(loss, rel=1e-3)  # the training weights are not the average


def test_transformers_recipe_gives_the_average_metrics(tmp_path, one_thread):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ns = run_blocks(chain_with("log_history"), Harness(tmp_path))
    trainer, lawa = ns["trainer"], ns["lawa"]
    twin = copy.deepcopy(trainer.model)
    twin.load_state_dict(export_average(trainer.model, lawa))
    loss = val_loss(twin)
    assert ns["metrics"]["eval_loss"] == pytest.approx(loss, rel=1e-6, abs=0)
    assert ns["per_epoch"][-1]["eval_loss"] == pytest.approx(loss, rel=1e-6, abs=0)
    assert len(ns["per_epoch"]) == ns["args"].num_train_epochs
    assert val_loss(trainer.model) != pytest.approx(loss, rel=1e-3)
