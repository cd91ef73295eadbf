"""Per-layer budgets of OBS pruning: how many weights each layer loses, at each step.

``uniform``: ``round(sparsity * n)`` of every layer; ``global``: the counts per layer of the
``round(sparsity * N)`` smallest ``|w|`` over the layers (the global magnitude profile, every
output row keeping its largest weight with ``floor``); a sparsity config's layers get their
own; an N:M pattern its fraction. :func:`step_sparsities`: the schedule of gradual pruning.

Example:
    >>> from torch import nn
    >>> layers = [("a", nn.Linear(4, 4)), ("b", nn.Linear(4, 2))]
    >>> budgets_of(layers, [16, 8], 0.5, None, "uniform", None, True)
    [8, 4]
"""

from __future__ import annotations

import torch
from torch import nn

from ..engine.checks import masked_weight
from .allocate import global_keep_masks
from .nm import NMPattern
from .sparsity_config import layer_sparsities
from .targets import Target

__all__ = ["budgets_of", "step_sparsities"]


def step_sparsities(sparsity: float, steps: int) -> list[float]:
    """The sparsity after each of ``steps`` steps: the same fraction of the remaining weights goes each time.

    >>> [round(s, 3) for s in step_sparsities(0.9, 4)]
    [0.438, 0.684, 0.822, 0.9]
    """
    return [1 - (1 - sparsity) ** (k / steps) for k in range(1, steps)] + [sparsity]


def budgets_of(layers: list[tuple[str, nn.Module]], numels: list[int], sparsity: float | NMPattern,
               pattern: NMPattern | None, allocation: str, sparsity_config: dict[str, float] | None,
               floor: bool) -> list[int]:
    """Weights to prune per layer (see the module doc)."""
    overrides = layer_sparsities([Target(f, m, n) for (f, m), n in zip(layers, numels)],
                                 sparsity_config) if sparsity_config is not None else {}
    if pattern is not None:
        return [round(pattern.sparsity * n) for n in numels]
    if allocation == "uniform":
        return [round(overrides.get(f, sparsity) * n) for (f, _), n in zip(layers, numels)]
    return _global_budgets(layers, sparsity, overrides, floor)


def _global_budgets(layers, sparsity: float, overrides: dict[str, float], floor: bool) -> list[int]:
    """Per-layer prune counts from one threshold on ``w^2`` over the layers the config does
    not name (module doc); with ``floor`` every output row keeps its largest weight's place."""
    shared = {f: m for f, m in layers if f not in overrides}
    with torch.no_grad():
        scores = {f: masked_weight(m).detach().to(torch.float64).square() for f, m in shared.items()}
    k = round(sparsity * sum(s.numel() for s in scores.values()))
    keep = global_keep_masks(scores, k, shared, floor=floor) if scores else {}
    return [round(overrides[f] * m.weight.numel()) if f in overrides else int((~keep[f]).sum()) for f, m in layers]
