"""Accuracy and mean cross-entropy of a classifier on ``(x, y)`` tensors.

Example:
    >>> import torch
    >>> from prune_repair.zoo.models import MLP
    >>> model = MLP(widths=(8,))
    >>> x, y = torch.randn(20, 1, 28, 28), torch.randint(0, 10, (20,))
    >>> metrics = evaluate(model, x, y, batch_size=8)
    >>> sorted(metrics), 0.0 <= metrics["acc"] <= 1.0
    (['acc', 'loss'], True)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.run.forward import eval_mode
from ..io.data import batches
from ..io.errors import DataError


__all__ = ["evaluate"]


def evaluate(
    model: nn.Module,
    x: torch.Tensor | Iterable[tuple[torch.Tensor, torch.Tensor]],
    y: torch.Tensor | None = None,
    batch_size: int = 1000,
    forward_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """``{"acc": fraction correct in [0, 1], "loss": mean cross-entropy}`` of ``model`` on ``(x, y)``.

    Runs in eval mode under ``torch.no_grad()`` and restores every submodule's
    train/eval flag afterwards. Batches go to ``device`` (default: where the model's
    parameters are) and floating inputs are cast to the model's dtype.
    ``forward_fn(model, x_batch) -> logits`` replaces ``model(x_batch)``.

    ``x`` may also be an iterable of ``(x_batch, y_batch)`` pairs (a DataLoader, a list),
    read once, batch by batch, so the data never has to fit in memory (``batch_size`` is
    then the iterable's); ``y``, if given, is the labels it must yield, checked by count.

    Example:
        >>> from prune_repair.zoo.models import MLP
        >>> model = MLP(widths=(8,))
        >>> pairs = [(torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))) for _ in range(3)]
        >>> 0.0 <= evaluate(model, pairs)["acc"] <= 1.0
        True
    """
    if not isinstance(x, torch.Tensor):
        return _evaluate_batches(model, x, y, forward_fn, device)
    if y is None:
        raise DataError("evaluate(model, x, y) needs labels y for a tensor x (or pass an iterable of (x, y) batches)")
    if len(x) != len(y):
        raise DataError(f"x has {len(x)} samples but y has {len(y)}: give one label per sample")
    if len(x) == 0:
        raise DataError("cannot evaluate on empty data: give at least one sample")
    param = next(iter(model.parameters()), None)
    target_device = torch.device(device) if device is not None else (param.device if param is not None else x.device)
    dtype = param.dtype if param is not None and param.is_floating_point() else None
    correct, loss_sum = 0, 0.0
    with eval_mode(model), torch.no_grad():
        for xb, yb in batches(x, y, batch_size):
            xb = xb.to(target_device, dtype=dtype if dtype is not None and xb.is_floating_point() else None)
            yb = yb.to(target_device)
            logits = forward_fn(model, xb) if forward_fn is not None else model(xb)
            loss_sum += float(F.cross_entropy(logits.double(), yb, reduction="sum"))
            correct += int((logits.argmax(dim=1) == yb).sum())
    return {"acc": correct / len(x), "loss": loss_sum / len(x)}


def _evaluate_batches(model: nn.Module, data: Iterable[tuple[torch.Tensor, torch.Tensor]], y: torch.Tensor | None,
                      forward_fn: Callable[[nn.Module, Any], torch.Tensor] | None,
                      device: torch.device | str | None) -> dict[str, float]:
    param = next(iter(model.parameters()), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else None
    count, correct, loss_sum = 0, 0, 0.0
    with eval_mode(model), torch.no_grad():
        for batch in data:
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise DataError(f"evaluation batches must be (x, y) pairs, got a {type(batch).__name__}")
            xb, yb = batch
            target = torch.device(device) if device is not None else (param.device if param is not None else xb.device)
            xb = xb.to(target, dtype=dtype if dtype is not None and xb.is_floating_point() else None)
            yb = yb.to(target)
            if len(xb) != len(yb):
                raise DataError(f"a batch has {len(xb)} samples but {len(yb)} labels: give one label per sample")
            logits = forward_fn(model, xb) if forward_fn is not None else model(xb)
            loss_sum += float(F.cross_entropy(logits.double(), yb, reduction="sum"))
            correct += int((logits.argmax(dim=1) == yb).sum())
            count += len(yb)
    if count == 0:
        raise DataError("cannot evaluate on empty data: give at least one sample")
    if y is not None and len(y) != count:
        raise DataError(f"the evaluation batches held {count} samples but {len(y)} labels were expected")
    return {"acc": correct / count, "loss": loss_sum / count}
