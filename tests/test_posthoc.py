"""examples/posthoc_choice.py on tiny IDX files written here (never the installed dataset):
the candidates, the pick against an independent computation (plain SGD, parameter copies
averaged in float64, torch's own BatchNorm refresh), the paired summary and the files."""

import json
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from examples import lawa_runs as runs
from examples import posthoc_choice as ph
from lawa_optim import paired
from lawa_optim.demo import evaluate, source_version

ROOT = Path(__file__).resolve().parents[1]
SEEDS, EPOCHS, K = 2, 7, 6  # 7 epochs into a ring of 6: the oldest snapshot has left it
ARGS = ["--fast", "--seeds", str(SEEDS), "--epochs", str(EPOCHS), "--k", str(K)]


def _idx(data: bytes, shape) -> bytes:
    return bytes([0, 0, 0x08, len(shape)]) + b"".join(struct.pack(">I", n) for n in shape) + data


def _write(root: Path, prefix: str, n: int, seed: int) -> None:
    pixels = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    (root / f"{prefix}-images-idx3-ubyte").write_bytes(_idx(pixels.numpy().tobytes(), (n, 28, 28)))
    (root / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx(bytes(i % 10 for i in range(n)), (n,)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Tiny training (200 images) and test (60 images) files of random pixels, labels i % 10."""
    root = tmp_path_factory.mktemp("fmnist")
    _write(root, "train", 200, 0)
    _write(root, "t10k", 60, 1)
    return root


@pytest.fixture(scope="module")
def run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    return ph.main([*ARGS, "--data-dir", str(data_dir), "--out", str(out)]), out


def test_candidates_by_hand():
    c = ph.candidates(6)
    assert list(c) == [f"window({j})" for j in range(2, 7)] + ["linear(3)", "linear(6)", "ema(0.5)", "ema(0.7)", "ema(0.8)"]
    assert c["window(4)"].tolist() == pytest.approx([0.25] * 4)
    assert c["linear(3)"].tolist() == pytest.approx([3 / 6, 2 / 6, 1 / 6])
    ema = [0.3 * 0.7**i for i in range(6)]
    assert c["ema(0.7)"].tolist() == pytest.approx([w / sum(ema) for w in ema])
    assert ph.truncated_mass(6)["ema(0.8)"] == pytest.approx(0.8**6)
    assert ph.pick({"a": 0.3, "b": 0.1, "c": 0.1}) == "b"  # lowest, the first on a tie


def _independent(seed: int, data_dir: Path) -> dict[str, tuple[float, float, float]]:
    """Per candidate, the validation loss and the test loss and accuracy, from plain SGD whose
    parameters are copied at every epoch end and averaged in float64 by hand."""
    torch.set_num_threads(1)
    cfg = ph.FAST
    data = runs.load_split(str(data_dir), cfg, seed)
    images, labels = runs.fashion_mnist.load("test", data_dir)
    x_test = F.avg_pool2d(images.unsqueeze(1).float() / 255.0, 2)
    torch.manual_seed(seed)
    model = runs.make_model()
    sgd = runs.sgd(model)
    sched = runs.schedule(sgd, "cosine", EPOCHS)
    gen = torch.Generator().manual_seed(seed)
    snapshots = []  # newest first
    for _ in range(EPOCHS):
        model.train()
        for xb, yb in runs.batches(data.x, data.y, cfg.batch, gen):
            sgd.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            sgd.step()
        snapshots.insert(0, [p.detach().double().clone() for p in model.parameters()])
        sched.step()
    out = {}
    for name, weights in ph.candidates(K).items():
        with torch.no_grad():
            for i, p in enumerate(model.parameters()):
                p.copy_(sum(w * snap[i] for w, snap in zip(weights.tolist(), snapshots)))
        torch.optim.swa_utils.update_bn([data.x_bn], model)
        val = evaluate(model, data.x_val, data.y_val)[0]
        out[name] = (val, *evaluate(model, x_test, labels))
    return out


@pytest.mark.parametrize("seed", range(SEEDS))
def test_pick_against_an_independent_computation(run, data_dir, seed):
    result, _ = run
    r = result["results"][seed]
    oracle = _independent(seed, data_dir)
    assert r["held"] == K and set(r["candidates"]) == set(oracle)
    for name, (val, test_loss, test_acc) in oracle.items():
        got = r["candidates"][name]
        assert got["val_loss"] == pytest.approx(val, rel=1e-5)
        assert got["test_loss"] == pytest.approx(test_loss, rel=1e-5)
        assert got["test_acc"] == pytest.approx(test_acc, abs=1 / 60 + 1e-9)  # at most one image flips
    best = min(v[0] for v in oracle.values())
    assert oracle[r["pick"]][0] <= best * (1 + 1e-5)  # the pick is the lowest validation loss
    assert r["pick"] == min(r["candidates"], key=lambda n: r["candidates"][n]["val_loss"])


def _mean(xs):
    return sum(xs) / len(xs)


def test_summary_from_the_per_seed_results(run):
    result, _ = run
    res, s = result["results"], result["summary"]
    loss, acc = (s["planned"][n] for n in ph.planned_names())
    d = [r["candidates"][r["pick"]]["test_loss"] - r["candidates"]["window(6)"]["test_loss"] for r in res]
    assert loss.level == 1 - 0.05 / 2
    lo, hi = paired.t_interval(d, loss.level)
    assert (loss.mean, loss.lo, loss.hi) == pytest.approx((_mean(d), lo, hi))
    assert acc.mean == pytest.approx(_mean([r["candidates"][r["pick"]]["test_acc"] - r["candidates"]["window(6)"]["test_acc"]
                                            for r in res]))
    live = s["exploratory"]["post-hoc pick - live weights, test loss"]
    assert live.mean == pytest.approx(_mean([r["candidates"][r["pick"]]["test_loss"] - r["live"]["test_loss"] for r in res]))
    picks = [r["pick"] for r in res]
    assert {n: c["picked"] for n, c in s["candidates"].items() if c["picked"]} == {p: picks.count(p) for p in picks}


def test_result_files(run):
    result, out = run
    saved = json.loads((out / "posthoc_choice.json").read_text())
    assert saved["command"].startswith("python -m examples.posthoc_choice --fast")
    assert saved["code"] == json.loads(json.dumps(source_version()))
    assert saved["incomplete"] is None and saved["machine"]["torch"] == torch.__version__
    assert saved["runs"][1]["candidates"] == result["results"][1]["candidates"]
    text = (out / "posthoc_choice.txt").read_text()
    assert "== planned: mean [97.5% interval, family-wise 95% (Bonferroni over 2)] ==" in text
    assert f"code: {saved['code']['text']}" in text and "incomplete" not in text


def test_a_run_stopped_early_leaves_the_seeds_that_finished(data_dir, tmp_path, monkeypatch):
    real = ph.run_seed

    def second_fails(seed, *args):
        if seed == 1:
            raise KeyboardInterrupt
        return real(seed, *args)

    monkeypatch.setattr(ph, "run_seed", second_fails)
    with pytest.raises(KeyboardInterrupt):
        ph.main([*ARGS, "--data-dir", str(data_dir), "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "posthoc_choice.json").read_text())
    assert saved["incomplete"] == "incomplete: 1 of 2 seeds finished; the summary covers seeds 0-0"
    assert [r["seed"] for r in saved["runs"]] == [0]
    assert saved["incomplete"] in (tmp_path / "posthoc_choice.txt").read_text()


def test_the_test_file_is_required(data_dir, tmp_path, capsys):
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        shutil.copy(data_dir / name, tmp_path / name)
    with pytest.raises(SystemExit) as e:
        ph.main(["--data-dir", str(tmp_path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "argument --data-dir: " in err and "t10k-images-idx3-ubyte" in err
    assert not (tmp_path / "out").exists()


def test_default_output_is_ignored_by_git():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    ignored = subprocess.run(["git", "check-ignore", "-q", f"{ph.DEFAULT_OUT}/posthoc_choice.json"], cwd=ROOT, check=False)
    assert ignored.returncode == 0
