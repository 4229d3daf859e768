"""The Fashion-MNIST IDX loader on tiny IDX files written here, byte for byte."""

import gzip
import re
import struct

import pytest
import torch

from examples import fashion_mnist as fm


def _idx(data: bytes, shape: tuple[int, ...]) -> bytes:
    """An unsigned-byte IDX file, written from the format's definition."""
    return bytes([0, 0, 0x08, len(shape)]) + b"".join(struct.pack(">I", n) for n in shape) + data


def _write(root, split, images: bytes, labels: bytes, n: int, gz: bool, size=(3, 2)):
    names = fm.FILES[split]
    for name, blob in ((names[0], _idx(images, (n, *size))), (names[1], _idx(labels, (n,)))):
        if gz:
            (root / f"{name}.gz").write_bytes(gzip.compress(blob))
        else:
            (root / name).write_bytes(blob)


@pytest.mark.parametrize("gz", [False, True])
def test_reads_bytes_exactly(tmp_path, gz):
    images = bytes(range(251, 251 - 24, -1))  # 4 images of 3x2, values 251..228
    labels = bytes([9, 0, 3, 7])
    _write(tmp_path, "test", images, labels, 4, gz)
    x, y = fm.load("test", tmp_path)
    assert x.dtype == torch.uint8 and x.shape == (4, 3, 2)
    assert x.reshape(-1).tolist() == list(images)
    assert x[1, 2, 0].item() == images[1 * 6 + 2 * 2 + 0]  # C order: image, row, column
    assert y.dtype == torch.int64 and y.tolist() == [9, 0, 3, 7]


def test_plain_file_preferred_over_gz_and_default_dir(tmp_path, monkeypatch):
    _write(tmp_path, "train", bytes(6), bytes([1]), 1, gz=False)
    _write(tmp_path, "train", bytes([5] * 6), bytes([2]), 1, gz=True)
    assert fm.load("train", tmp_path)[1].tolist() == [1]
    monkeypatch.setattr(fm, "DEFAULT_DIR", tmp_path)
    assert fm.load("train")[1].tolist() == [1]


def test_missing_file_names_path_and_remedy(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"t10k-images-idx3-ubyte not found.*apt-get install dataset-fashion-mnist"):
        fm.load("test", tmp_path)


def test_truncated_data_names_file_and_sizes(tmp_path):
    _write(tmp_path, "test", bytes(4 * 6 - 5), bytes(4), 4, gz=False)
    path = tmp_path / "t10k-images-idx3-ubyte"
    msg = f"{path}: truncated: the header promises shape 4x3x2 = 24 data bytes after the 16-byte header, the file holds 19"
    with pytest.raises(ValueError, match=re.escape(msg)):
        fm.load("test", tmp_path)


def test_too_long_and_short_header(tmp_path):
    _write(tmp_path, "test", bytes(4 * 6 + 1), bytes(4), 4, gz=False)
    with pytest.raises(ValueError, match="too long: .* 24 data bytes .* the file holds 25"):
        fm.load("test", tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(_idx(b"", (4, 3, 2))[:10])
    with pytest.raises(ValueError, match="truncated: 10 bytes, shorter than the 16-byte IDX header"):
        fm.load("test", tmp_path)


def test_truncated_gzip(tmp_path):
    _write(tmp_path, "test", bytes(range(24)), bytes(4), 4, gz=True)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-9])
    with pytest.raises(ValueError, match=re.escape(f"{path}: not a complete gzip file")):
        fm.load("test", tmp_path)


def test_wrong_magic_count_mismatch_and_labels(tmp_path):
    _write(tmp_path, "test", bytes(24), bytes(4), 4, gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx(bytes(4), (4, 1)))  # 2 dimensions
    with pytest.raises(ValueError, match="magic number 00000802 is not 00000801"):
        fm.load("test", tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx(bytes(3), (3,)))
    with pytest.raises(ValueError, match="holds 4 images but .* holds 3 labels"):
        fm.load("test", tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx(bytes([0, 1, 10, 2]), (4,)))
    with pytest.raises(ValueError, match="label 10 found; expected labels 0..9"):
        fm.load("test", tmp_path)
    with pytest.raises(ValueError, match=r"split must be one of \('train', 'test'\), got 'val'"):
        fm.load("val", tmp_path)
