"""Benchmarks of the LAWA history (Kaddour 2022, arXiv:2209.14981) against the copy
roofline and the ways people average weights today; see benchmarks/README.md."""

from pathlib import Path

#: Where the benchmarks write their results by default.
RESULTS = Path(__file__).resolve().parent / "results"
