"""Which weights go: keep-masks from scores for each way of sharing the sparsity among layers.

:func:`build_masks` turns weight-shaped scores (lowest pruned first) into keep-masks:

- ``global``: one threshold over all layers, pruning exactly ``round(sparsity * N)``
  weights, with a per-layer floor (``floor=True``, the default): every output row keeps at
  least its highest-scored weight, so no layer (and no output channel) is emptied. Layers
  the plain threshold would empty a row of are protected and the threshold is taken again,
  so the total stays exact; :func:`empty_layers` names layers that ended all zero anyway.
- ``layer``: the same fraction in every layer (``round(sparsity * n)`` each).
- ``row``: the same fraction in every output row (Wanda's comparison group): each row loses
  its lowest scores, ``round(sparsity * n)`` in the layer spread evenly over the rows.
- an :class:`~prune_repair.prune.nm.NMPattern`: N of every M inputs of each row stay.

``overrides`` (layer FQN -> sparsity, from a sparsity config) prune the named layers to
their own sparsity, each on its own (by row for ``row``); the others share ``sparsity``.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from .targets import find_targets
    >>> model = nn.Sequential(nn.Linear(4, 2), nn.Linear(2, 2))
    >>> with torch.no_grad():
    ...     _ = model[1].weight.mul_(1e-3)            # tiny: a plain threshold empties it
    >>> targets = find_targets(model)
    >>> masks = build_masks(targets, {t.fqn: t.weight.detach().abs() for t in targets}, 0.5)
    >>> [int(m.sum()) for m in masks.values()], masks["1"].any(1).tolist()
    ([4, 2], [True, True])
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

from ..engine.refit.gram import row_view, rows_to_weight
from .masks import check_sparsity
from .nm import NMPattern, nm_keep_mask
from .select import keep_masks
from .targets import PruneError, Target

Transform = Callable[[torch.Tensor], torch.Tensor] | None


def build_masks(targets: list[Target], scores: dict[str, torch.Tensor], sparsity: float | NMPattern,
                scope: str = "global", transform: Transform = None, overrides: dict[str, float] | None = None,
                floor: bool = True) -> dict[str, torch.Tensor]:
    """Keep-masks (True = kept) keyed by FQN, in target order (see the module doc)."""
    for fqn, s in scores.items():
        if not bool(torch.isfinite(s).all()):
            raise PruneError(f"the scores of layer '{fqn}' hold NaN/Inf: check the model weights and the data")
    modules = {t.fqn: t.module for t in targets}
    if isinstance(sparsity, NMPattern):
        return {t.fqn: nm_keep_mask(t.module, _scored(scores[t.fqn], transform), sparsity) for t in targets}
    overrides = overrides or {}
    masks: dict[str, torch.Tensor] = {}
    shared = [t.fqn for t in targets if t.fqn not in overrides]
    for fqn in overrides:
        if scope == "row":
            masks[fqn] = row_keep_mask(modules[fqn], scores[fqn], overrides[fqn])
        else:
            masks[fqn] = keep_masks([scores[fqn]], round(overrides[fqn] * scores[fqn].numel()), transform)[0]
    if scope == "row":
        masks.update({f: row_keep_mask(modules[f], scores[f], sparsity) for f in shared})
    elif scope == "layer":
        masks.update({f: keep_masks([scores[f]], round(sparsity * scores[f].numel()), transform)[0] for f in shared})
    elif scope == "global":
        if shared:
            part = {f: scores[f] for f in shared}
            k = round(sparsity * sum(s.numel() for s in part.values()))
            masks.update(global_keep_masks(part, k, {f: modules[f] for f in shared}, transform, floor))
    else:
        raise PruneError(f"unknown pruning scope {scope!r}: use 'global', 'layer' or 'row'")
    return {t.fqn: masks[t.fqn] for t in targets}


def _scored(score: torch.Tensor, transform: Transform) -> torch.Tensor:
    return score if transform is None else transform(score)


def row_keep_mask(module: nn.Module, score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask pruning the lowest scores of every output row: ``round(sparsity * n)`` in the
    layer, spread evenly (rows differ by at most one pruned weight, the first rows take the extra).

    >>> row_keep_mask(nn.Linear(4, 3), torch.arange(12.0).reshape(3, 4), 0.5).sum(1).tolist()
    [2, 2, 2]
    >>> row_keep_mask(nn.Linear(3, 2), torch.ones(2, 3), 0.5).sum(1).tolist()   # 3 of 6 pruned
    [1, 2]
    """
    rows = row_view(module, score.detach())
    out, d = rows.shape
    total = round(check_sparsity(sparsity) * out * d)
    per_row = torch.full((out, 1), total // out, device=rows.device)
    per_row[: total % out] += 1
    rank = torch.argsort(torch.argsort(rows, dim=1, stable=True), dim=1)  # 0 = the row's lowest score
    return rows_to_weight(module, rank >= per_row, score)


def global_keep_masks(scores: dict[str, torch.Tensor], k: int, modules: dict[str, nn.Module],
                      transform: Transform = None, floor: bool = True) -> dict[str, torch.Tensor]:
    """Prune exactly the ``k`` lowest scores over all layers; with ``floor`` every output row
    keeps its highest-scored weight (layers that would lose a row are protected, then the
    threshold is taken again)."""
    current, protected = dict(scores), set()
    capacity = sum(s.numel() for s in scores.values())
    for _ in range(len(scores) + 1):
        masks = dict(zip(current, keep_masks(list(current.values()), k, transform)))
        if not floor:
            return masks
        emptied = [f for f, m in masks.items() if f not in protected and _loses_a_row(modules[f], current[f], m, transform)]
        if not emptied:
            return masks
        for fqn in emptied:
            current[fqn] = _protect_row_best(modules[fqn], scores[fqn], transform)
            protected.add(fqn)
            capacity -= int(row_view(modules[fqn], _scored(scores[fqn], transform)).ne(0).any(1).sum())
        if k > capacity:
            raise PruneError(f"pruning {k} weights would empty output rows even with every layer's best weight per "
                             "row kept: lower the sparsity (or pass floor=False / --no-row-floor)")
    return masks


def _loses_a_row(module: nn.Module, score: torch.Tensor, keep: torch.Tensor, transform: Transform) -> bool:
    """Whether a row with a nonzero score (a row of zeros has nothing to keep) keeps nothing."""
    alive = row_view(module, _scored(score.detach(), transform)).ne(0).any(1)
    return bool((alive & ~row_view(module, keep).any(1)).any())


def _protect_row_best(module: nn.Module, score: torch.Tensor, transform: Transform) -> torch.Tensor:
    """A copy of ``score`` whose highest entry (after ``transform``) in each output row with a
    nonzero score is +inf."""
    rows = row_view(module, _scored(score.detach(), transform))
    best = torch.zeros(rows.shape, dtype=torch.bool, device=rows.device)
    best.scatter_(1, rows.argmax(1, keepdim=True), True)
    best &= rows.ne(0).any(1, keepdim=True)
    copy = score.detach().clone()
    copy[rows_to_weight(module, best, score)] = float("inf")
    return copy


def empty_layers(targets: list[Target]) -> list[str]:
    """FQNs of target layers whose weight is all zero."""
    with torch.no_grad():
        return [t.fqn for t in targets if not bool(t.weight.any())]


def warn_empty(targets: list[Target]) -> list[str]:
    """Warn (naming them) about layers left all zero; returns their FQNs."""
    empty = empty_layers(targets)
    if empty:
        warnings.warn(f"{len(empty)} pruned layer(s) are all zero ({', '.join(empty[:5])}"
                      f"{', ...' if len(empty) > 5 else ''}): their outputs no longer depend on their inputs; "
                      "lower the sparsity or keep the per-layer floor", stacklevel=3)
    return empty
