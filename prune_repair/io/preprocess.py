"""``--preprocess``: how ImageFolder images become model inputs (a torchvision weights name's
``transforms()``, or explicit resize / crop / mean / std).

Example:
    >>> p = parse_preprocess("resize=36,crop=32,mean=0.5,std=0.25")
    >>> p.to_dict()["crop"]
    [32]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .errors import DataError
from .errors import _first_line


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


