"""Fashion-MNIST from its original IDX files, offline.

Fashion-MNIST (Xiao, Rasul and Vollgraf 2017, arXiv:1708.07747) is 70,000 grey 28x28
images of clothing in 10 classes, shipped as four IDX files (gzipped or not). Debian
and Ubuntu package them as ``dataset-fashion-mnist`` (``apt-get install
dataset-fashion-mnist``), which puts them in :data:`DEFAULT_DIR`; on other systems,
point ``root`` at any directory holding the same four files.

IDX format (LeCun et al.): two zero bytes, a type byte (0x08: unsigned bytes, the only
type these files use), the number of dimensions, each dimension as a big-endian
uint32, then the data in C order.
"""

from __future__ import annotations

import argparse
import gzip
import math
import struct
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor

#: Where the Debian/Ubuntu package ``dataset-fashion-mnist`` installs the files.
DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")

#: Split name -> (images file, labels file), without the optional ``.gz``.
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CLASSES = 10
_UBYTE = 0x08


def find(root: Path, name: str) -> Path:
    """``root/name`` or ``root/name.gz``, whichever exists (the plain file first)."""
    for path in (root / name, root / f"{name}.gz"):
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{root / name} not found (nor {name}.gz): expected the Fashion-MNIST IDX file {name!r} in "
        f"{root}; install the files with `apt-get install dataset-fashion-mnist` (they go to "
        f"{DEFAULT_DIR}) or pass the directory that holds them"
    )


def add_data_dir(parser: argparse.ArgumentParser, splits: tuple[str, ...] = ("train",)) -> None:
    """``--data-dir``, the directory :func:`require` checks for the files of ``splits``."""
    what = ", training and test" if "test" in splits else ""
    parser.add_argument("--data-dir", default=None,
                        help=f"directory with the Fashion-MNIST IDX files{what} (default {DEFAULT_DIR})")


def require(parser: argparse.ArgumentParser, data_dir: str | None, splits: tuple[str, ...] = ("train",)) -> None:
    """Refuse ``--data-dir`` through ``parser`` (one line, exit 2) unless every file of
    ``splits`` is there: checked in the command's own process, before any work and before
    worker processes that would read them."""
    try:
        for split in splits:
            for name in FILES[split]:
                find(DEFAULT_DIR if data_dir is None else Path(data_dir), name)
    except FileNotFoundError as e:
        parser.error(f"argument --data-dir: {e}")


def read_idx(path: Path, ndim: int) -> Tensor:
    """Read an unsigned-byte IDX file with ``ndim`` dimensions (gzipped when its name
    ends in ``.gz``) into a uint8 tensor, refusing a wrong header or a truncated file."""
    import torch  # here: the experiment checks --data-dir with `find` before torch is loaded

    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise ValueError(f"{path}: not a complete gzip file ({e}); the download or copy was cut short") from e
    if len(raw) < 4:
        raise ValueError(f"{path}: truncated: {len(raw)} bytes, shorter than the 4-byte IDX magic number")
    zero, dtype, dims = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != _UBYTE or dims != ndim:
        raise ValueError(
            f"{path}: IDX magic number {raw[:4].hex()} is not 0000080{ndim} (unsigned bytes, {ndim} "
            "dimension(s)); is this the right file?"
        )
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise ValueError(f"{path}: truncated: {len(raw)} bytes, shorter than the {head}-byte IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:head])
    size = math.prod(shape)
    if len(raw) != head + size:
        raise ValueError(
            f"{path}: {'truncated' if len(raw) < head + size else 'too long'}: the header promises shape "
            f"{'x'.join(map(str, shape))} = {size} data bytes after the {head}-byte header, "
            f"the file holds {len(raw) - head}"
        )
    return torch.frombuffer(bytearray(raw[head:]), dtype=torch.uint8).reshape(shape)


def load(split: str = "train", root: str | Path | None = None) -> tuple[Tensor, Tensor]:
    """Images ``(N, 28, 28)`` uint8 and labels ``(N,)`` int64 of one split.

    Args:
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000).
        root: directory holding the IDX files (default :data:`DEFAULT_DIR`).
    """
    if split not in FILES:
        raise ValueError(f"split must be one of {tuple(FILES)}, got {split!r}")
    root = DEFAULT_DIR if root is None else Path(root)
    images_name, labels_name = FILES[split]
    images_path, labels_path = find(root, images_name), find(root, labels_name)
    images = read_idx(images_path, 3)
    labels = read_idx(labels_path, 1)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{images_path} holds {images.shape[0]} images but {labels_path} holds {labels.shape[0]} "
            "labels; expected one label per image"
        )
    if labels.numel() and int(labels.max()) >= CLASSES:
        raise ValueError(f"{labels_path}: label {int(labels.max())} found; expected labels 0..{CLASSES - 1}")
    return images, labels.long()
