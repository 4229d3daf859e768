"""The Fashion-MNIST experiment in examples/: its fast mode on a tiny IDX file written
here (never the installed dataset), the split, the BatchNorm bookkeeping, Lookahead."""

import dataclasses
import importlib.util
import json
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import torch

from examples import lawa_experiment as exp
from examples import lawa_runs as runs
from examples.lookahead import Lookahead
from lawa_optim import paired
from lawa_optim.demo import evaluate, source_version

HAS_MPL = importlib.util.find_spec("matplotlib") is not None
ROOT = Path(__file__).resolve().parents[1]
N_IMAGES = 200


def _idx(data: bytes, shape) -> bytes:
    return bytes([0, 0, 0x08, len(shape)]) + b"".join(struct.pack(">I", n) for n in shape) + data


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A tiny Fashion-MNIST training file: 200 images of random pixels, labels i % 10."""
    root = tmp_path_factory.mktemp("fmnist")
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (N_IMAGES, 28, 28), dtype=torch.uint8, generator=g)
    (root / "train-images-idx3-ubyte").write_bytes(_idx(pixels.numpy().tobytes(), (N_IMAGES, 28, 28)))
    (root / "train-labels-idx1-ubyte").write_bytes(_idx(bytes(i % 10 for i in range(N_IMAGES)), (N_IMAGES,)))
    return root


@pytest.fixture(scope="module")
def fast(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    return exp.main(["--fast", "--jobs", "1", "--data-dir", str(data_dir), "--out", str(out)]), out


def _mean(xs):
    return sum(xs) / len(xs)


def test_fast_run_summary_matches_the_curves(fast):
    result, _ = fast
    res, s = result["results"], result["summary"]
    cfg = exp.FAST
    assert [r["seed"] for r in res] == list(range(cfg.seeds))
    for key in ("cosine", "step", "constant"):
        assert len(res[0][key]["live_loss"]) == cfg.epochs
    # the summary's per-epoch means are the means of the per-seed differences
    per_epoch = s["compare"]["constant: LAWA k=6 - live/loss"]["per_epoch"]
    for e, p in enumerate(per_epoch):
        assert p.mean == pytest.approx(_mean([r["constant"]["lawa6_loss"][e] - r["constant"]["live_loss"][e] for r in res]))
    # equal compute: LAWA at epoch `short` of the long cosine against the short run's end
    p = s["equal_compute"][f"LAWA k=6 at epoch {cfg.short} of the {cfg.epochs}-epoch cosine - cosine over {cfg.short} epochs/acc"]
    assert p.mean == pytest.approx(_mean([r["cosine"]["lawa6_acc"][cfg.short - 1] - r["short"]["live_bn_acc"][-1] for r in res]))
    twa = s["twa"]["start 2/loss"]["TWA-t - live at epoch 3"]
    assert twa.mean == pytest.approx(_mean([r["cosine"]["twa"][2]["t"]["loss"] - r["cosine"]["live_bn_loss"][2] for r in res]))
    reach = s["reach"]["cosine/live/loss/relaxed"]["epochs"]
    assert reach.a_hits == [next(e for e, v in enumerate(r["cosine"]["live_loss"], 1) if v <= 1.1 * r["cosine"]["live_loss"][-1])
                            for r in res]


def test_fast_run_curves(fast):
    result, _ = fast
    run = result["results"][0]["cosine"]
    # at most 4 snapshots: every window k >= 6 averages all of them
    assert run["lawa6_loss"] == run["lawa10_loss"] == run["lawa20_loss"]
    assert run["lawa2_loss"][3] != run["lawa6_loss"][3]
    # one snapshot: the average is the live weights, and with the live BatchNorm statistics so is its loss
    assert run["lawa6_nobn_loss"][0] == run["live_loss"][0]
    assert run["lawa6_loss"][0] == run["live_bn_loss"][0]  # and refreshed alike, alike
    assert run["lawa6_loss"][0] != run["live_loss"][0]  # the refresh changes the statistics
    coefs = run["twa"][2]["t"]["coefficients"]
    assert len(coefs) == 2  # TWA at epoch 2 spans the 2 snapshots held


def test_fast_run_files(fast):
    result, out = fast
    saved = json.loads((out / "lawa_experiment.json").read_text())
    assert saved["runs"][1]["cosine"]["ema_loss"] == result["results"][1]["cosine"]["ema_loss"]
    assert saved["command"].startswith("python -m examples.lawa_experiment --fast")
    assert saved["machine"]["torch"] == torch.__version__
    rows = (out / "lawa_experiment.csv").read_text().splitlines()
    assert rows[0].startswith("comparison,metric,epoch,mean,lo95,hi95")
    assert len(rows) == 1 + len(result["summary"]["compare"]) * exp.FAST.epochs
    assert "== equal compute" in (out / "lawa_experiment.txt").read_text()
    for name in ("lawa_experiment_curves.png", "lawa_experiment_findings.png"):
        assert (out / name).stat().st_size > 1000 if HAS_MPL else not (out / name).exists()


def test_command_line_records_kernel_environment(monkeypatch):
    for k in exp.KERNEL_ENV:
        monkeypatch.delenv(k, raising=False)
    assert exp.command_line(["--out", "x"]) == "python -m examples.lawa_experiment --out x"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    assert exp.command_line([]) == "ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python -m examples.lawa_experiment"


def test_split_disjoint_and_pooled(data_dir):
    images, labels = runs.fashion_mnist.load("train", data_dir)
    d = runs.split(images, labels, exp.FAST, seed=5)
    order = torch.randperm(N_IMAGES, generator=torch.Generator().manual_seed(5))
    first = images[order[0]].double() / 255
    # 2x2 average pooling, by hand
    pooled = (first[0::2, 0::2] + first[1::2, 0::2] + first[0::2, 1::2] + first[1::2, 1::2]) / 4
    torch.testing.assert_close(d.x[0, 0].double(), pooled, rtol=0, atol=1e-6)
    assert torch.equal(d.y_val, labels[order[160:192]])
    assert (len(d.y), len(d.y_hold), len(d.y_val), len(d.x_bn)) == (128, 32, 32, 32)
    assert not torch.equal(runs.split(images, labels, exp.FAST, seed=6).y, d.y)
    with pytest.raises(ValueError, match="the split needs 192 images .* the data holds 100"):
        runs.split(images[:100], labels[:100], exp.FAST, seed=0)


def test_live_curve_unaffected_by_evaluating_averages(data_dir, one_thread):
    """Refreshing BatchNorm statistics for LAWA puts the live ones back: the live curve
    equals a run that never evaluates an average."""
    d = runs.load_split(str(data_dir), exp.FAST, seed=1)
    curves = runs.Seed(1, d, exp.FAST).run("constant", 3)
    torch.manual_seed(1)
    model = runs.make_model()
    sgd = torch.optim.SGD(model.parameters(), lr=runs.LR, momentum=runs.MOMENTUM, weight_decay=runs.WEIGHT_DECAY)
    gen = torch.Generator().manual_seed(1)
    for epoch in range(3):
        model.train()
        for xb, yb in runs.batches(d.x, d.y, exp.FAST.batch, gen):
            sgd.zero_grad()
            torch.nn.functional.cross_entropy(model(xb), yb).backward()
            sgd.step()
        assert curves["live_loss"][epoch] == evaluate(model, d.x_val, d.y_val)[0]


def test_default_output_is_ignored_by_git():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    ignored = subprocess.run(["git", "check-ignore", "-q", f"{exp.DEFAULT_OUT}/lawa_experiment.json"], cwd=ROOT)
    assert ignored.returncode == 0


def test_lookahead_against_hand_computation():
    p = torch.nn.Parameter(torch.tensor([1.0]))
    opt = Lookahead(torch.optim.SGD([p], lr=0.1), k=2, alpha=0.5)
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
        Lookahead(torch.optim.SGD([p], lr=0.1), alpha=0.0)


def test_planned_comparisons_have_family_wise_intervals(fast):
    result, out = fast
    res, s = result["results"], result["summary"]
    cfg = exp.FAST
    names = exp.planned_names(cfg)
    assert list(s["planned"]) == list(names) and len(names) == 7
    level = 1 - 0.05 / len(names)
    assert all((v.saved if hasattr(v, "saved") else v).level == level for v in s["planned"].values())
    # the accuracy of the full cosine run's live weights (refreshed) against the shortened run, by hand
    full = [r["cosine"]["live_bn_acc"][-1] - r["short"]["live_bn_acc"][-1] for r in res]
    p = s["planned"][names[5]]
    lo, hi = paired.t_interval(full, level)
    assert (p.mean, p.lo, p.hi) == pytest.approx((_mean(full), lo, hi))
    text = (out / "lawa_experiment.txt").read_text()
    assert f"== planned comparisons (fixed before the run): mean [{100 * level:.2f}% interval" in text
    assert "Everything below is exploratory" in text


def test_ema_against_uniform_windows_of_its_length(fast):
    result, _ = fast
    res, s = result["results"], result["summary"]
    for name, key in (("cosine: EMA - live, both refreshed (uniform k=1)", "live_bn"), ("cosine: EMA - LAWA k=2", "lawa2")):
        last = s["compare"][f"{name}/loss"]["last"]
        assert last.mean == pytest.approx(_mean([r["cosine"]["ema_loss"][-1] - r["cosine"][f"{key}_loss"][-1] for r in res]))
    last = s["compare"]["cosine: LAWA k=6 - Lookahead/acc"]["last"]
    assert last.mean == pytest.approx(_mean([r["cosine"]["lawa6_acc"][-1] - r["lookahead"]["lookahead_acc"][-1] for r in res]))


def test_result_files_record_the_code(fast):
    _, out = fast
    saved = json.loads((out / "lawa_experiment.json").read_text())
    assert saved["code"] == json.loads(json.dumps(source_version()))
    assert saved["interrupted"] is None
    assert f"code: {saved['code']['text']}" in (out / "lawa_experiment.txt").read_text()


def test_an_interrupted_run_summarises_the_seeds_that_finished(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(exp, "FAST", dataclasses.replace(exp.FAST, seeds=3))
    real = runs.run_seed

    def third_interrupted(seed, **kwargs):
        if seed == 2:
            raise KeyboardInterrupt
        return real(seed, **kwargs)

    monkeypatch.setattr(runs, "run_seed", third_interrupted)
    result = exp.main(["--fast", "--jobs", "1", "--data-dir", str(data_dir), "--out", str(tmp_path)])
    assert [r["seed"] for r in result["results"]] == [0, 1]
    saved = json.loads((tmp_path / "lawa_experiment.json").read_text())
    assert saved["interrupted"] == "interrupted after 2 of 3 seeds: the summary covers seeds 0-1"
    assert saved["config"]["seeds"] == 2 and saved["interrupted"] in (tmp_path / "lawa_experiment.txt").read_text()
    assert result["summary"]["compare"]["cosine: LAWA k=6 - live/loss"]["last"].n == 2
