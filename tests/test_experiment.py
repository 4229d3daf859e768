"""The LAWA/TWA experiment in examples/: a tiny smoke run, and the local Lookahead."""

import importlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch

HAS_MPL = importlib.util.find_spec("matplotlib") is not None

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def examples(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    return (importlib.import_module("examples.lawa_experiment"), importlib.import_module("examples.lookahead"))


def test_tiny_run(examples, tmp_path, capsys):
    exp, _ = examples
    result = exp.main(["--epochs", "3", "--seeds", "1", "--twa-starts", "2", "--twa-epochs", "1", "--out-dir", str(tmp_path)])
    run = result["runs"][0]
    # with at most 3 snapshots, every window k >= 3 averages all of them: same numbers
    assert run["lawa6_loss"] == run["lawa10_loss"] == run["lawa20_loss"]
    assert run["lawa2_loss"][0] == run["live_loss"][0] == run["ema_loss"][0]  # one snapshot
    assert run["lawa2_loss"][2] != run["lawa6_loss"][2]
    fit = result["twa_fits"][0][2]
    assert len(fit["t"]["coefficients"]) == 2 and 0.5 < fit["t"]["acc"] <= 1.0
    row = result["twa"][0]
    assert row["start"] == 2 and row["end"] == 3 and row["lawa6_at_start"] == run["lawa6_loss"][1]
    saved = json.loads((tmp_path / "lawa_experiment.json").read_text())
    assert saved["runs"][0]["bn_avg_upd_loss"] == run["bn_avg_upd_loss"]
    lines = (tmp_path / "lawa_experiment_curves.csv").read_text().splitlines()
    assert len(lines) == 4 and lines[0].startswith("epoch,live_loss_mean,live_loss_std")
    png = tmp_path / "lawa_experiment.png"
    assert png.stat().st_size > 1000 if HAS_MPL else not png.exists()
    assert "verdict" in capsys.readouterr().out


def test_batchnorm_stats_restored_after_update_bn(examples):
    """The live weights' BatchNorm statistics survive the evaluation of the average:
    the live curve equals a run that never evaluates the average."""
    exp, _ = examples
    from lawa_optim import demo

    data = demo.load_digits_splits()
    curves = exp.run_batchnorm(seed=1, epochs=2, data=data)
    torch.manual_seed(1)
    model = demo.make_model(batchnorm=True)
    sgd = torch.optim.SGD(model.parameters(), lr=demo.LR, momentum=demo.MOMENTUM)
    gen = torch.Generator().manual_seed(1)
    for epoch in range(2):
        demo.train_epoch(model, sgd, data.x_train, data.y_train, gen)
        assert curves["bn_live_loss"][epoch] == pytest.approx(demo.evaluate(model, data.x_val, data.y_val)[0], abs=1e-6)
    assert curves["bn_avg_upd_loss"][1] != curves["bn_avg_loss"][1]


def test_lookahead_against_hand_computation(examples):
    _, la = examples
    p = torch.nn.Parameter(torch.tensor([1.0]))
    opt = la.Lookahead(torch.optim.SGD([p], lr=0.1), k=2, alpha=0.5)
    for _ in range(2):
        p.grad = torch.tensor([1.0])  # constant gradient: fast weights move by -0.1 per step
        opt.step()
    # fast 1.0 -> 0.8; slow 1.0 + 0.5 * (0.8 - 1.0) = 0.9; fast reset to slow
    assert p.item() == pytest.approx(0.9)
    p.grad = torch.tensor([1.0])
    opt.step()
    assert p.item() == pytest.approx(0.8)
    with opt.slow_weights():
        assert p.item() == pytest.approx(0.9)
    assert p.item() == pytest.approx(0.8)
    with pytest.raises(ValueError, match="alpha must be in"):
        la.Lookahead(torch.optim.SGD([p], lr=0.1), alpha=0.0)
