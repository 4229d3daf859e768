"""The mutation check (tools/mutants.py) cannot rot: every planted bug's original text is
still in its file exactly once and its tests exist. Running the mutants takes minutes:
by hand, before finishing a change to the kernels or the history (README, Contributing)."""

from tools.mutants import MUTANTS, Mutant, problems


def test_every_mutant_still_applies():
    assert problems() == []
    assert {m.name for m in MUTANTS if m.gpu} == {
        "slot-index-cuda", "count-cuda", "weighted-newest-slot-cuda", "sum-uncompensated-cuda",
        "int8-slot-index-cuda", "int8-open-loop-anchor-cuda",
        "exchange-keeps-the-wrong-half-cuda", "mean-step-not-divided-cuda",
    }


def test_a_stale_or_idle_edit_is_named(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\nx = 1\ny = 2\n")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_a.py").write_text("")
    stale = [
        Mutant("twice", "a.py", "x = 1", "x = 3", ("tests/test_a.py",)),
        Mutant("gone", "a.py", "z = 4", "z = 5", ("tests/test_a.py::test_b",)),
        Mutant("idle", "a.py", "y = 2", "y = 2", ("tests/test_a.py", "-k", "b")),
        Mutant("idle", "b.py", "y = 2", "y = 3", ("tests/test_missing.py",)),
    ]
    assert problems(tmp_path, stale) == [
        "idle: the name is used twice",
        "twice: its original text is in a.py 2 times, not once",
        "gone: its original text is in a.py 0 times, not once",
        "idle: the edit changes nothing",
        "idle: its original text is in b.py 0 times, not once",
        "idle: no test file tests/test_missing.py",
    ]
