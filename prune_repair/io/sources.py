"""Data sources that load only what is asked for: tensor data sliced, ImageFolder files read
from disk batch by batch (a DataLoader with workers), and seeded index draws.

Example:
    >>> draw_indices(10, 3, seed=0).tolist() == draw_indices(10, 3, seed=0).tolist()
    True
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .errors import DataError
from .data import _is_image, load_dataset
from .errors import _first_line
from .preprocess import Preprocess


def draw_indices(n: int, size: int, seed: int) -> torch.Tensor:
    """``size`` of ``range(n)`` drawn without replacement from ``seed`` (the draw of
    :func:`calibration_batch`)."""
    if size < 1:
        raise DataError(f"calibration size must be at least 1, got {size}: ask for at least one sample")
    if size > n:
        raise DataError(f"calibration size {size} exceeds the {n} samples in the data: ask for fewer samples")
    return torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))[:size]


class TensorSource:
    """A data spec held in memory as ``(x, y)`` tensors (MNIST, .pt, .npz)."""

    streams = False

    def __init__(self, x: torch.Tensor, y: torch.Tensor, name: str):
        self.x, self.y, self.name = x, y, name

    def __len__(self) -> int:
        return len(self.y)

    @property
    def targets(self) -> torch.Tensor:
        return self.y

    def load(self, index: torch.Tensor, workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index], self.y[index]

    def batches(self, index: torch.Tensor | None, batch_size: int, workers: int = 0) -> "Batches":
        return Batches(self, index, batch_size, workers)


class ImageFolderSource:
    """An ImageFolder directory read from disk on demand: only the files asked for are
    opened, through a :class:`torch.utils.data.DataLoader` (``workers`` processes)."""

    streams = True

    def __init__(self, root: Path, preprocess: Preprocess | None = None):
        from torchvision.datasets import ImageFolder

        self.root, self.preprocess, self.name = root, preprocess, str(root)
        try:
            folder = ImageFolder(str(root), is_valid_file=_is_image, allow_empty=False)
        except Exception as err:  # FileNotFoundError (no class folders / no images), permissions, ...
            raise DataError(f"{root} is not an ImageFolder ({_first_line(err)}): use root/<class>/<image> with image files") from err
        self.files = [path for path, _ in folder.samples]
        self.classes = folder.classes
        self._targets = torch.tensor(folder.targets, dtype=torch.int64)
        self._transform = preprocess.transform() if preprocess is not None else None

    def __len__(self) -> int:
        return len(self.files)

    @property
    def targets(self) -> torch.Tensor:
        return self._targets

    def __getitem__(self, i: int) -> tuple[Any, int]:
        """``(tensor, label)``, or ``(None, reason)`` for a file that cannot be read (so the
        error reaches the main process as one line, from any worker)."""
        from PIL import Image
        from torchvision.transforms.functional import to_tensor

        file = self.files[i]
        try:
            with Image.open(file) as image:
                channels = self.preprocess.channels if self.preprocess is not None else None
                gray = image.mode in ("L", "1", "I;16", "I") if channels is None else channels == 1
                image = image.convert("L" if gray else "RGB")
            tensor = self._transform(image) if self._transform is not None else to_tensor(image)
        except Exception as err:  # unreadable or truncated image, decompression bomb, ...
            return None, f"cannot read image {file} ({_first_line(err)}): remove or fix the file"
        return tensor, int(self._targets[i])

    def load(self, index: torch.Tensor, workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The images at ``index`` (and labels) as one tensor batch."""
        xs, ys = [], []
        for xb, yb in Batches(self, index, max(1, min(len(index), 256)), workers):
            xs.append(xb)
            ys.append(yb)
        return torch.cat(xs), torch.cat(ys)

    def batches(self, index: torch.Tensor | None, batch_size: int, workers: int = 0) -> "Batches":
        return Batches(self, index, batch_size, workers)

    def collate(self, items: list[tuple[Any, Any]], shape: tuple[int, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        for tensor, label in items:
            if tensor is None:
                raise DataError(label)
        shapes = sorted({tuple(t.shape) for t, _ in items} | ({shape} if shape is not None else set()))
        if len(shapes) > 1:
            fix = ("pass --preprocess (e.g. resize=256,crop=224 or a weights name like "
                   "ResNet50_Weights.IMAGENET1K_V2) to bring them to one size") if self.preprocess is None or not \
                self.preprocess.resizes else "check the images' channels"
            raise DataError(f"images under {self.root} differ in size/channels {shapes[:3]}: {fix}")
        return torch.stack([t for t, _ in items]), torch.tensor([y for _, y in items], dtype=torch.int64)


def _items(items: list) -> list:
    return items


class Batches:
    """``(x, y)`` batches of ``source`` at ``index`` (all of it when ``None``), in order;
    iterable any number of times. ``labels`` holds the labels without reading any input."""

    def __init__(self, source: TensorSource | ImageFolderSource, index: torch.Tensor | None, batch_size: int,
                 workers: int = 0):
        if batch_size < 1:
            raise DataError(f"batch size must be at least 1, got {batch_size}: raise --batch-size")
        self.source, self.batch_size, self.workers = source, int(batch_size), int(workers)
        self.index = index
        self.labels = source.targets if index is None else source.targets[index]
        self.shape: tuple[int, ...] | None = None  # every sample must have this shape (when set)
        self._loader = None

    def __len__(self) -> int:
        """Number of samples."""
        return len(self.labels)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if isinstance(self.source, TensorSource):  # slices (or gathers one batch at a time)
            x, y = self.source.x, self.source.y
            for start in range(0, len(self.labels), self.batch_size):
                part = slice(start, start + self.batch_size) if self.index is None else self.index[start : start + self.batch_size]
                xb = x[part]
                self._check(tuple(xb.shape[1:]))
                yield xb, y[part]
            return
        if self._loader is None:
            from torch.utils.data import DataLoader, Subset

            data = self.source if self.index is None else Subset(self.source, self.index.tolist())
            self._loader = DataLoader(data, batch_size=self.batch_size, shuffle=False, num_workers=self.workers,
                                      collate_fn=_items, persistent_workers=self.workers > 0)
        for items in self._loader:
            yield self.source.collate(items, self.shape)

    def _check(self, shape: tuple[int, ...]) -> None:
        if self.shape is not None and shape != self.shape:
            raise DataError(f"--eval-data samples have shape {list(shape)} but --data samples have "
                            f"{list(self.shape)}: give evaluation data of the same kind")


def open_source(spec: str | os.PathLike[str], preprocess: Preprocess | None = None,
                option: str = "--data") -> TensorSource | ImageFolderSource:
    """The data of ``spec``: an ImageFolder is opened for streaming (file list only); the
    other forms are loaded (:func:`load_dataset`). ``preprocess`` applies to ImageFolders
    only: with tensor data it is an error."""
    text = os.fspath(spec).strip()
    path = Path(text).expanduser() if text else None
    if path is not None and path.is_dir():
        return ImageFolderSource(path, preprocess)
    if preprocess is not None:
        raise DataError(f"--preprocess applies to ImageFolder directories, but {option} {text} is tensor data "
                        "used as stored: drop --preprocess, or preprocess the tensors before saving them")
    x, y = load_dataset(text)
    return TensorSource(x, y, text)


