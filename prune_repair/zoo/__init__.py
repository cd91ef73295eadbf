"""Pretrained models shipped with the package (``zoo:NAME`` on the CLI).

Each entry names an architecture of :mod:`prune_repair.zoo.models` (or the torchvision
ViT of :mod:`prune_repair.zoo.vit`), its keyword arguments and a float32 state_dict in
``prune_repair/zoo/weights/``. The models expect the normalized MNIST of
:func:`prune_repair.io.data.load_dataset`. The test accuracy and loss of each model
were measured on ``mnist:test`` by ``benchmarks/train_zoo.py`` (the ViTs by
``benchmarks/train_transformers.py``), which write them to ``weights/zoo.json``.
The byte-level language models (HF directories) are listed in :mod:`prune_repair.zoo.lm`.

Example:
    >>> zoo_names()
    ['mnist-cnn', 'mnist-cnn-bn', 'mnist-mlp', 'mnist-mlp6-a', 'mnist-mlp6-b', 'mnist-vit', 'mnist-vit-b']
    >>> model = load("zoo:mnist-mlp")
    >>> arch_spec("mnist-cnn"), arch_kwargs("mnist-cnn")
    ('prune_repair.zoo.models:PlainCNN', {'channels': [16, 32], 'batch_norm': False})
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .lm import lm_names
from .models import MLP, PlainCNN
from .vit import mnist_vit

__all__ = ["ZooEntry", "WEIGHTS_DIR", "zoo_names", "entry", "build", "load", "arch_spec", "arch_kwargs", "weights_path"]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
METRICS_FILE = "zoo.json"
PREFIX = "zoo:"


@dataclass(frozen=True)
class ZooEntry:
    """One pretrained model: architecture ``factory(**kwargs)`` and its weights file.

    ``test_acc`` / ``test_loss`` are read from ``zoo.json`` (``None`` before training).
    """

    name: str
    factory: Callable[..., nn.Module]
    kwargs: dict[str, Any] = field(default_factory=dict)
    weights: str = ""

    @property
    def arch_spec(self) -> str:
        """``"module:Factory"``, the ``--arch`` value that builds this architecture."""
        return f"{self.factory.__module__}:{self.factory.__qualname__}"

    @property
    def metrics(self) -> dict[str, Any]:
        """What the training script recorded for this model (empty before training)."""
        return _recorded_metrics().get(self.name, {})

    @property
    def test_acc(self) -> float | None:
        """Accuracy on mnist:test measured after training, as a fraction."""
        return self.metrics.get("test_acc")

    @property
    def test_loss(self) -> float | None:
        """Mean cross-entropy on mnist:test measured after training."""
        return self.metrics.get("test_loss")


_VIT = {"image_size": 28, "patch_size": 7, "num_layers": 4, "num_heads": 4, "hidden_dim": 64, "mlp_dim": 128}

_REGISTRY: dict[str, ZooEntry] = {
    e.name: e
    for e in (
        ZooEntry("mnist-mlp", MLP, {"widths": [128, 128]}, "mnist-mlp.pt"),
        ZooEntry("mnist-cnn", PlainCNN, {"channels": [16, 32], "batch_norm": False}, "mnist-cnn.pt"),
        ZooEntry("mnist-cnn-bn", PlainCNN, {"channels": [16, 32], "batch_norm": True}, "mnist-cnn-bn.pt"),
        # a pair of deeper MLPs from two seeds, for merging (variance collapse shows at depth)
        ZooEntry("mnist-mlp6-a", MLP, {"widths": [64] * 6}, "mnist-mlp6-a.pt"),
        ZooEntry("mnist-mlp6-b", MLP, {"widths": [64] * 6}, "mnist-mlp6-b.pt"),
        # a torchvision VisionTransformer (7 px patches, 4 layers of width 64), two seeds for merging
        ZooEntry("mnist-vit", mnist_vit, dict(_VIT), "mnist-vit.pt"),
        ZooEntry("mnist-vit-b", mnist_vit, dict(_VIT), "mnist-vit-b.pt"),
    )
}


def zoo_names() -> list[str]:
    """Names of the zoo models, sorted.

    Example:
        >>> "mnist-cnn" in zoo_names()
        True
    """
    return sorted(_REGISTRY)


def entry(name: str) -> ZooEntry:
    """The registry entry for ``name`` (a leading ``zoo:`` is accepted).

    Example:
        >>> entry("zoo:mnist-cnn-bn").kwargs["batch_norm"]
        True
    """
    key = name[len(PREFIX) :] if name.startswith(PREFIX) else name
    if key not in _REGISTRY:
        raise ValueError(f"unknown zoo model {name!r}: known models are {', '.join(zoo_names() + lm_names())}")
    return _REGISTRY[key]


def build(name: str) -> nn.Module:
    """A fresh, untrained instance of the architecture of ``name``.

    Example:
        >>> type(build("mnist-mlp")).__name__
        'MLP'
    """
    item = entry(name)
    return item.factory(**copy.deepcopy(item.kwargs))


def weights_path(name: str) -> Path:
    """Path of the state_dict file of ``name`` (it may not exist before training)."""
    return WEIGHTS_DIR / entry(name).weights


def load(name: str, device: torch.device | str = "cpu") -> nn.Module:
    """The pretrained model ``name`` in eval mode (weights read with ``weights_only=True``).

    Example:
        >>> load("mnist-cnn").training
        False
    """
    path = weights_path(name)
    if not path.is_file():
        raise FileNotFoundError(f"weights of zoo model {name!r} are missing at {path}: run python "
                                "benchmarks/train_zoo.py (the ViTs: benchmarks/train_transformers.py)")
    model = build(name)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return model.to(device).eval()


def arch_spec(name: str) -> str:
    """The ``--arch`` spec of ``name``; pair it with :func:`arch_kwargs` for ``--arch-kwargs``.

    Example:
        >>> arch_spec("zoo:mnist-mlp")
        'prune_repair.zoo.models:MLP'
    """
    return entry(name).arch_spec


def arch_kwargs(name: str) -> dict[str, Any]:
    """A JSON-serializable copy of the keyword arguments of ``name``'s architecture.

    Example:
        >>> arch_kwargs("mnist-mlp")
        {'widths': [128, 128]}
    """
    return copy.deepcopy(entry(name).kwargs)


def _recorded_metrics() -> dict[str, dict[str, Any]]:
    path = WEIGHTS_DIR / METRICS_FILE
    if not path.is_file():
        return {}
    return json.loads(path.read_text())
