"""The demo: a tiny run checked against a hand-computed average, and its verdict."""

import copy
import importlib.util

import torch

from lawa_optim import demo

HAS_MPL = importlib.util.find_spec("matplotlib") is not None


def test_splits():
    d = demo.load_digits_splits()
    assert (len(d.y_train), len(d.y_holdout), len(d.y_val)) == (1197, 300, 300)
    assert d.x_train.shape[1:] == (1, 8, 8) and 0.0 <= d.x_train.min() and d.x_train.max() <= 1.0
    assert torch.bincount(d.y_val).min() >= 29  # stratified: about 30 per class


def test_average_equals_hand_computed_mean_of_snapshots():
    torch.set_num_threads(1)
    data = demo.load_digits_splits()
    curves = demo.run_seed(seed=3, epochs=3, data=data, k=2)

    # oracle: the same seed with plain SGD, snapshots copied by hand, mean of the last 2
    torch.manual_seed(3)
    model = demo.make_model()
    sgd = torch.optim.SGD(model.parameters(), lr=demo.LR, momentum=demo.MOMENTUM)
    gen = torch.Generator().manual_seed(3)
    snaps = []
    for _ in range(3):
        demo.train_epoch(model, sgd, data.x_train, data.y_train, gen)
        snaps.append(copy.deepcopy(model.state_dict()))
    live = demo.evaluate(model, data.x_val, data.y_val)
    mean = {k: (snaps[-1][k] + snaps[-2][k]) / 2 for k in snaps[-1]}
    model.load_state_dict(mean)
    avg = demo.evaluate(model, data.x_val, data.y_val)

    assert abs(curves["live_loss"][-1] - live[0]) < 1e-6 and curves["live_acc"][-1] == live[1]
    assert abs(curves["avg_loss"][-1] - avg[0]) < 1e-5 and abs(curves["avg_acc"][-1] - avg[1]) < 1e-6
    assert curves["avg_loss"][0] == curves["live_loss"][0]  # one snapshot: the average is the live weights
    assert curves["avg_loss"][-1] != curves["live_loss"][-1]


def test_verdict_from_numbers():
    runs = [
        {"live_loss": [0.5, 0.3, 0.2, 0.1], "avg_loss": [0.5, 0.2, 0.1, 0.15]},
        {"live_loss": [0.7, 0.3, 0.3, 0.1], "avg_loss": [0.7, 0.2, 0.1, 0.15]},
    ]
    lines = demo.verdict(runs, target_loss=0.1, labels={"avg": "LAWA"})
    assert lines[0].startswith("LAWA has the lower mean validation loss in 2/4 epochs (2-3)")
    assert "largest gap at epoch 3: 0.100 vs 0.250 (60% lower)" in lines[0]
    assert lines[1] == "it is not better in epochs 1, 4"
    assert lines[2].endswith("live 4.0") and lines[3].endswith("LAWA 3.0")
    assert "1.0 epochs earlier" in lines[4]


def test_epochs_to_target():
    assert demo.epochs_to_target([0.5, 0.2, 0.09], 0.1) == 3
    assert demo.epochs_to_target([0.5, 0.96, 0.98], 0.97, higher_is_better=True) == 3
    assert demo.epochs_to_target([0.5, 0.4], 0.1) is None


def test_main_tiny_run(tmp_path, capsys):
    out = tmp_path / "demo.png"
    result = demo.main(["--epochs", "2", "--seeds", "1", "--out", str(out)])
    text = capsys.readouterr().out
    # The plot is drawn only where matplotlib is installed; without it nothing is written.
    assert out.stat().st_size > 1000 if HAS_MPL else not out.exists()
    agg = result["aggregate"]
    assert len(agg["live_loss"]) == 2 and all(s == 0.0 for _, s in agg["live_loss"])
    for key in ("live_acc", "avg_acc"):
        assert all(0.5 < m <= 1.0 for m, _ in agg[key])  # 2 epochs already beat chance (0.1) by far
    assert "verdict:" in text and f"{agg['avg_loss'][1][0]:.4f}" in text
