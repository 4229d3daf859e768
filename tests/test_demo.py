"""The demo: a tiny run checked against a hand-computed average, and its verdict."""

import copy
import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from lawa_optim import demo
from lawa_optim.paired import phases

HAS_MPL = importlib.util.find_spec("matplotlib") is not None


def test_split_per_seed():
    x, y = demo.load_digits()
    assert x.shape == (1797, 1, 8, 8) and 0.0 <= x.min() and x.max() <= 1.0
    xt, yt, xv, yv = demo.split(x, y, seed=0)
    assert (len(yt), len(yv)) == (1797 - demo.VAL_SIZE, demo.VAL_SIZE)
    # stratified: each class gets its share of the 600, rounded
    share = torch.bincount(y).double() * demo.VAL_SIZE / len(y)
    assert (torch.bincount(yv) - share).abs().max() <= 1
    assert not torch.equal(demo.split(x, y, seed=1)[3], yv)  # each seed its own split
    assert torch.equal(demo.split(x, y, seed=0)[3], yv)


def test_average_equals_hand_computed_mean_of_snapshots(one_thread):
    x, y = demo.load_digits()
    curves = demo.run_seed(seed=3, epochs=3, x=x, y=y, k=2)

    # oracle: the same seed with plain SGD and the cosine schedule, snapshots copied by
    # hand, the mean of the last 2 loaded into the model
    xt, yt, xv, yv = demo.split(x, y, 3)
    torch.manual_seed(3)
    model = demo.make_model()
    sgd = torch.optim.SGD(model.parameters(), lr=demo.LR, momentum=demo.MOMENTUM)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(sgd, T_max=3)
    gen = torch.Generator().manual_seed(3)
    snaps = []
    for _ in range(3):
        demo.train_epoch(model, sgd, xt, yt, gen)
        sched.step()
        snaps.append(copy.deepcopy(model.state_dict()))
    live = demo.evaluate(model, xv, yv)
    model.load_state_dict({k: (snaps[-1][k] + snaps[-2][k]) / 2 for k in snaps[-1]})
    avg = demo.evaluate(model, xv, yv)

    assert curves["live_loss"][-1] == pytest.approx(live[0], abs=1e-6) and curves["live_acc"][-1] == live[1]
    assert curves["avg_loss"][-1] == pytest.approx(avg[0], abs=1e-5) and curves["avg_acc"][-1] == pytest.approx(avg[1])
    assert curves["avg_loss"][0] == curves["live_loss"][0]  # one snapshot: the average is the live weights
    assert curves["avg_loss"][-1] != curves["live_loss"][-1]


def _runs(avg_minus_live_loss, live_loss, avg_acc, live_acc):
    """Seeds whose loss differences are given per seed and epoch."""
    return [{"live_loss": ll, "avg_loss": [a + d for a, d in zip(ll, dd)], "live_acc": la, "avg_acc": aa}
            for dd, ll, aa, la in zip(avg_minus_live_loss, live_loss, avg_acc, live_acc)]


def test_verdict_states_only_what_the_intervals_show():
    live = [[0.9, 0.5, 0.3, 0.25, 0.2, 0.2]] * 6
    runs = _runs(
        # thirds: epochs 1-2 LAWA lower by 0.1 in every seed; 3-4 equal within 0.005;
        # 5-6 two seeds higher, four lower: the interval contains 0
        [[-0.1, -0.1, 0.001, -0.001, 0.05, 0.05], [-0.1, -0.1, 0.0, 0.002, -0.05, -0.05],
         [-0.1, -0.1, 0.0, 0.0, -0.02, -0.02]] * 2,
        live,
        [[0.5, 0.8, 0.9, 0.95, 0.96, 0.97]] * 6,
        [[0.5, 0.7, 0.85, 0.94, 0.96, 0.97]] * 6,
    )
    lines = demo.verdict(runs)
    assert lines[0] == "epochs 1-2, mean validation loss: -0.1000 [-0.1000, -0.1000]: LAWA lower"
    assert lines[1].startswith("epochs 3-4, mean validation loss: +0.0003 [") and lines[1].endswith(": equal within +-0.005")
    assert lines[2].startswith("epochs 5-6, mean validation loss: -0.0067 [") and lines[2].endswith(
        ": not resolved (the interval contains 0)")
    assert lines[3].startswith("last epoch (6): loss -0.0067 [") and "accuracy +0.0000 [+0.0000, +0.0000]: equal within" in lines[3]
    # loss target 1.1 x 0.2 = 0.22: live reaches it at epoch 5; LAWA never in seeds 0 and 3
    # (0.25 at the end: counted as epoch 7), at epoch 5 in the others: savings -2, 0, 0, -2, 0, 0,
    # mean -2/3, standard deviation sqrt(16/15), t(5) = 2.5706: [-1.75, +0.42]
    assert lines[4] == ("epochs to reach 1.1 x the live weights' final loss: live median 5, LAWA median 5; "
                        "epochs LAWA saves per seed: mean -0.7 [-1.8, +0.4], median +0; LAWA earlier in 0 of 6 seeds, "
                        "later in 2, 2 never reach it (counted as epoch 7): not resolved (the interval contains 0)")
    # accuracy target 0.97 - 0.01 = 0.96: live at epoch 5, LAWA at epoch 5 in every seed: saves exactly 0
    assert lines[5].endswith("live median 5, LAWA median 5; epochs LAWA saves per seed: mean +0.0 [+0.0, +0.0], "
                             "median +0; LAWA earlier in 0 of 6 seeds, later in 0: equal within +-1")
    # three of these seeds: the same numbers, no interval and no verdict
    few = demo.verdict(runs[:3])
    assert few[0] == ("epochs 1-2, mean validation loss: -0.1000 (mean of 3 seed(s), no interval): "
                      "no verdict (3 seed(s); at least 6 are needed)")
    assert all(line.endswith("no verdict (3 seed(s); at least 6 are needed)") for line in few)


def test_phases():
    assert phases(20) == [(1, 6), (7, 13), (14, 20)]
    assert phases(2) == [(1, 1), (2, 2)]


def test_main_tiny_run(tmp_path, capsys):
    out = tmp_path / "demo.png"
    result = demo.main(["--epochs", "3", "--seeds", "2", "--out", str(out)])
    text = capsys.readouterr().out
    # The plot is drawn only where matplotlib is installed; without it nothing is written.
    assert out.stat().st_size > 1000 if HAS_MPL else not out.exists()
    runs = result["runs"]
    assert len(runs) == 2 and all(len(r["live_loss"]) == 3 for r in runs)
    assert all(0.5 < r["avg_acc"][-1] <= 1.0 for r in runs)  # 3 epochs already beat chance (0.1) by far
    assert "No verdict (2 seed(s); at least 6 are needed): the numbers alone" in text
    assert result["verdict"][0] in text and "[" not in "".join(result["verdict"])  # no interval from 2 seeds
    assert "code: git commit " in text or "code: unknown" in text
    mean = (runs[0]["avg_loss"][2] + runs[1]["avg_loss"][2]) / 2
    assert f"{mean:.4f}" in text


def test_source_version_names_the_commit_and_the_modified_files(monkeypatch):
    root = Path(demo.__file__).resolve().parent.parent
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not a git checkout")
    v = demo.source_version()
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                            capture_output=True, text=True).stdout.splitlines()
    assert v["commit"] == head and v["modified"] == [line[3:] for line in status]
    assert v["text"].startswith(f"git commit {head} (")

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(demo.subprocess, "run", no_git)
    assert demo.source_version() == {"commit": None, "modified": None,
                                     "text": "unknown (lawa_optim does not run from a git checkout)"}
