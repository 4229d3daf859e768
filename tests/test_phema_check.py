"""examples/phema_check.py (its refusals: tests/test_commands.py): a short run writes its
results, and the synthesised EMAs inside the stored range are near the float64 ones."""

import json

import pytest


def test_short_run_writes_results(tmp_path):
    pytest.importorskip("ema_pytorch")
    from examples import phema_check

    phema_check.main(["--out", str(tmp_path), "--steps", "300", "--every", "50", "--k", "6"])
    res = json.loads((tmp_path / "phema_check.json").read_text())
    assert (tmp_path / "phema_check.txt").read_text().startswith("python -m examples.phema_check")
    assert res["lawa_snapshot_times_held"] == [200, 250, 300] and res["posthocema_files"] == 12
    rows = {r["sigma_rel"]: r for r in res["rows"]}
    for s in (0.05, 0.10):  # a stored width at the newest snapshot: that snapshot, float32 rounding
        assert rows[s]["lawa_fit_error"] < 1e-6 and rows[s]["lawa_rel_error"] < 1e-5
    for s in (0.06, 0.07, 0.08, 0.09):
        assert rows[s]["lawa_error_over_ema_departure"] < 0.05
