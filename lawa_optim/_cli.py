"""Argument checks shared by the repository's commands (the demo, the examples, the
benchmarks and the tools).

Every argument is checked while parsing, before any work starts; a bad one ends the
command with exit status 2 and one line, ``PROG: error: argument --NAME: ...``, as
argparse words it (the usage is in ``--help``). Output paths: the folder that will hold
what a command writes must exist; an output folder itself is created if missing.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose refusals are one line on stderr, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an int >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"must be an int >= {low}, got {text!r}")
        return value

    return parse


def positive_float(text: str) -> float:
    """An argparse type: a finite float > 0."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def parse_size(text: str) -> int:
    """An element count: an int, or one with a K, M or G suffix (powers of 1024)."""
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:].upper(), 1)
    try:
        n = int(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        n = 0
    if n <= 0:
        raise argparse.ArgumentTypeError(f"a size must be a positive element count such as 4096 or 64M, got {text!r}")
    return n


def _writable_parent(path: Path) -> None:
    parent = path.resolve().parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"the folder {str(parent)!r} that would hold {str(path)!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"the folder {str(parent)!r} is not writable")


def output_dir(text: str) -> Path:
    """An argparse type: a folder to write into; created later if missing, but the folder
    that holds it must exist."""
    path = Path(text)
    if path.exists():
        if not path.is_dir():
            raise argparse.ArgumentTypeError(f"{text!r} exists and is not a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise argparse.ArgumentTypeError(f"the folder {text!r} is not writable")
    else:
        _writable_parent(path)
    return path


def output_file(text: str) -> Path:
    """An argparse type: a file to write, in a folder that exists."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder, not a file name")
    _writable_parent(path)
    return path
