"""A context manager for pruning pipelines: record the statistics before a step, repair after it.

Example:
    >>> import torch, torch.nn.utils.prune
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> with preserve_statistics(model, torch.randn(32, 8)) as kept:
    ...     torch.nn.utils.prune.l1_unstructured(model[0], "weight", amount=0.9) and None
    >>> [s.fqn for s in kept.report.sites]
    ['0']
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any

from torch import nn

from .modes import RepairMode
from .repair import repair_
from .report import RepairReport
from ..stats.activation import collect_stats

__all__ = ["preserve_statistics"]


class preserve_statistics(contextlib.AbstractContextManager):
    """Record statistics on enter, repair toward them on exit (when no error was raised).

    >>> import torch, torch.nn.utils.prune
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> batch = torch.randn(32, 8)
    >>> with preserve_statistics(model, batch) as kept:
    ...     torch.nn.utils.prune.l1_unstructured(model[0], "weight", amount=0.9) and None
    >>> kept.report.mode
    'auto'
    """

    def __init__(self, model: nn.Module, data: Any, **repair_kwargs: Any):
        self.model, self.data = model, data
        self.select = repair_kwargs.pop("select", None)
        self.include_classifier = repair_kwargs.pop("include_classifier", False)
        self.repair_kwargs = repair_kwargs
        self.report: RepairReport | None = None

    def __enter__(self) -> "preserve_statistics":
        repair = self.repair_kwargs.get("repair", self.repair_kwargs.get("mode", RepairMode.AUTO))
        if RepairMode.parse(repair, "correction").reconstructs:  # reconstruction fits the layer outputs
            self.reference = copy.deepcopy(self.model)
            return self
        self.reference = collect_stats(
            self.model, self.data, select=self.select, include_classifier=self.include_classifier,
            forward_fn=self.repair_kwargs.get("forward_fn"),
        )
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.report = repair_(self.model, self.reference, self.data, **self.repair_kwargs)
        return None

