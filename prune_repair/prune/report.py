"""What :func:`~prune_repair.prune.prune_` reports, and the calibration-data views pruners share.

Example:
    >>> import torch
    >>> layer_rows({"fc": 0.5}, "2:4")
    [{'fqn': 'fc', 'sparsity': 0.5, 'pattern': '2:4'}]
    >>> x, y = torch.zeros(4, 3), torch.zeros(4)
    >>> example_of((x, y)).shape, inputs_of((x, y)) is x
    (torch.Size([2, 3]), True)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class PruneReport:
    """What :func:`~prune_repair.prune.prune_` did; ``masks`` (True = kept) are keyed by layer FQN."""

    method: str
    sparsity: float
    achieved_sparsity: float
    zeros: int
    prunable: int
    per_layer: dict[str, float]
    seconds: dict[str, float]
    masks: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    sparsity_all_params: float = float("nan")  # zeros / every parameter of the model
    layers: list[dict[str, Any]] = field(default_factory=list)  # {"fqn", "sparsity", "pattern"} (+ obs errors)
    pattern: str = "unstructured"  # or "N:M"

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "masks"}


def example_of(data: Any) -> Any:
    """Two samples of calibration data (a tensor, ``(x, y)`` or ``(dict, y)``): enough to trace the model."""
    if isinstance(data, torch.Tensor):
        return data[:2]
    if isinstance(data, (tuple, list)) and data and isinstance(data[0], torch.Tensor):
        return data[0][:2]
    if isinstance(data, (tuple, list)) and data and isinstance(data[0], dict):  # (model-input dict, labels)
        return {k: v[:2] if isinstance(v, torch.Tensor) and v.dim() else v for k, v in data[0].items()}
    return data


def inputs_of(data: Any) -> Any:
    """Model inputs of calibration data: ``x`` of an ``(x, y)`` pair (y a tensor or None), else ``data``."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and (data[1] is None or torch.is_tensor(data[1])):
        return data[0]
    return data


def layer_rows(per_layer: dict[str, float], pattern: str) -> list[dict[str, Any]]:
    """The report's per-layer list: ``{"fqn", "sparsity", "pattern"}`` for each pruned layer."""
    return [{"fqn": fqn, "sparsity": value, "pattern": pattern} for fqn, value in per_layer.items()]
