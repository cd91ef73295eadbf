"""One layer's OBS step: candidate masks, each refitted exactly, the lowest output error kept.

For a layer with Gram statistics ``G = X^T X``, ``C = X^T Y`` (``X``: its inputs in the model
as pruned so far, ``Y``: the target), every candidate proposes a mask with the layer's budget
of zeros; the kept weights of each are solved exactly for that mask by
:func:`~prune_repair.engine.refit.ridge.masked_ridge` (ridge ``damping``, pulled toward the
current weights), and the candidate whose refit has the lowest ``||Y - X w|| / ||Y||`` is
written. The candidates (:class:`MaskCandidate`):

- ``obs``: the OBS sweep (:func:`~prune_repair.prune.obs_sweep.obs_rows`) from ``W*``, the
  ridge optimum of the current layer with ``H = G + lam I``, ``lam = damping * mean(diag G)``;
- ``obs-damped``: the same sweep with ten times the damping: its saliency leans toward
  magnitude and its compensations are smaller. At high sparsity the plain sweep's greedy
  choice can drift (measured on the zoo's ViT at 90%: the damped sweep's masks refit to a
  lower error in 25 of 26 layers);
- ``magnitude``: the ``|w|`` mask of the current weights (per group of M for N:M), the mask
  of magnitude pruning with the same per-layer budget.

Since the lowest refit is kept, a layer's error is never above any candidate's on the same
inputs: with ``magnitude`` among them, never above magnitude pruning + reconstruction's.

Example:
    >>> MaskCandidate.choices()
    ['obs', 'obs-damped', 'magnitude']
    >>> parse_candidates("obs, magnitude")
    (<MaskCandidate.OBS: 'obs'>, <MaskCandidate.MAGNITUDE: 'magnitude'>)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..engine.refit.gram import Gram
from ..engine.refit.layer_rows import check_gram, current_rows, intercept_kind, write_rows_
from ..engine.refit.ridge import masked_ridge
from ..engine.registry import MethodEnum
from .nm import NMPattern, nm_keep_rows
from .obs_sweep import damped, obs_rows
from .targets import PruneError

__all__ = ["DAMPED_FACTOR", "DEFAULT_CANDIDATES", "LayerResult", "MaskCandidate", "parse_candidates", "prune_layer_"]

DAMPED_FACTOR = 10.0  # obs-damped: the sweep's damping relative to the refit's


class MaskCandidate(MethodEnum):
    """Masks an OBS layer step may keep (the one whose exact refit has the lowest error wins)."""

    OBS = "obs", "OBS sweep from the layer's ridge optimum (damping as given)", "SparseGPT, Frantar & Alistarh 2023"
    OBS_DAMPED = "obs-damped", "the same sweep with 10x damping (saliency closer to magnitude)"
    MAGNITUDE = "magnitude", "|w| of the current weights, the mask of magnitude pruning with the same budget"


DEFAULT_CANDIDATES = (MaskCandidate.OBS, MaskCandidate.OBS_DAMPED, MaskCandidate.MAGNITUDE)


def parse_candidates(value: str | Iterable[MaskCandidate | str]) -> tuple[MaskCandidate, ...]:
    """Candidates from ``"obs,magnitude"`` or a sequence; at least one, none repeated."""
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else [str(v) for v in value]
    try:
        found = tuple(MaskCandidate.parse(v, "obs mask candidate") for v in items if v)
    except ValueError as error:
        raise PruneError(str(error)) from None
    if not found or len(set(found)) != len(found):
        raise PruneError(f"obs mask candidates must name at least one of {', '.join(MaskCandidate.choices())}, "
                         f"each once; got {value!r}")
    return found


@dataclass
class LayerResult:
    """What one layer step did: the mask kept, the damping of its refit, the errors and the winning candidate."""

    keep: torch.Tensor
    damping: float
    error_before: float
    error_after: float
    mask: str


def prune_layer_(module: nn.Module, gram: Gram, bn: _BatchNorm | None, budget: int, damping: float,
                 block_size: int, pattern: NMPattern | None, refit: bool,
                 candidates: tuple[MaskCandidate, ...] = DEFAULT_CANDIDATES) -> LayerResult:
    """Prune one layer to ``budget`` zeros (or ``pattern``) and write it (see the module doc).

    ``refit=False``: each candidate keeps its sweep's own weights (magnitude: the current ones) instead
    of the exact refit, and the lowest error among those wins.
    """
    check_gram(gram)
    kind = intercept_kind(module, bn)
    fit = kind != "none"
    G, C = (gram.G, gram.C) if fit else (gram.G[:, :-1, :-1], gram.C[:, :-1])
    current, mask = current_rows(module, gram, fit)
    systems = {1.0: damped(G, gram.d_in, damping)}  # damping factor -> (H, lam, rel, Cholesky factor)
    used = systems[1.0][2]  # the refit's damping (raised where G + lam I does not factor)
    best: tuple[float, str, torch.Tensor, torch.Tensor] | None = None
    for candidate in candidates:
        scale = DAMPED_FACTOR if candidate is MaskCandidate.OBS_DAMPED else 1.0
        if candidate is not MaskCandidate.MAGNITUDE and scale not in systems:
            systems[scale] = damped(G, gram.d_in, damping * scale)
        weights, keep = _candidate(candidate, current, mask, C, gram.d_in, budget, block_size, pattern,
                                   systems.get(scale))
        if refit:
            weights = masked_ridge(G, C, keep, damping=used, intercept=fit,
                                   prior=current[..., :gram.d_in] * keep).weight
        error = float(gram.relative_error(weights, intercept=fit))
        if best is None or error < best[0]:
            best = (error, candidate.value, keep, weights)
    error, name, keep, weights = best
    before = float(gram.relative_error(current, intercept=fit))
    write_rows_(module, bn, kind, weights)
    if hasattr(module, "weight_mask"):
        module.weight_mask.copy_(keep.reshape(module.weight_mask.shape).to(module.weight_mask.dtype))
    return LayerResult(keep, used, before, error, name)


def _candidate(candidate: MaskCandidate, current: torch.Tensor, mask: torch.Tensor, C: torch.Tensor, d: int,
               budget: int, block_size: int, pattern: NMPattern | None, system: tuple | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One candidate's ``(weights, keep)``: the sweep's weights (or the current ones, masked) before any refit;
    ``system``: :func:`~prune_repair.prune.obs_sweep.damped` at the candidate's damping (the sweeps')."""
    if candidate is MaskCandidate.MAGNITUDE:
        keep = magnitude_keep(current[..., :d], budget, ~mask, pattern)
        weights = current.clone()
        weights[..., :d] *= keep
        return weights, keep
    H, lam, _, L = system
    rhs = C.clone()
    rhs[:, :d] += lam[:, None, None] * current[..., :d].transpose(1, 2)
    start = torch.cholesky_solve(rhs, L).transpose(1, 2)  # W*, (g, m, n)
    return obs_rows(start, H, budget, d, block_size, forced=~mask, nm=pattern, factor=L)


def magnitude_keep(W: torch.Tensor, k: int, forced: torch.Tensor, pattern: NMPattern | None = None) -> torch.Tensor:
    """Keep-mask ``(groups, rows, d)`` of the largest ``|W|``: ``k`` zeros over the whole layer (the ``forced``
    ones first, all of them even past ``k``), or with ``pattern`` the ``n`` largest of each group of ``m``.

    >>> W = torch.tensor([[[3.0, -1.0, 0.5, 2.0]]])
    >>> magnitude_keep(W, 2, torch.zeros(1, 1, 4, dtype=torch.bool)).int().tolist()
    [[[1, 0, 0, 1]]]
    """
    score = W.abs().masked_fill(forced, -1.0)
    if pattern is not None:
        keep = nm_keep_rows(score.reshape(-1, W.shape[-1]), pattern).reshape(W.shape)
        return keep & ~forced
    keep = torch.ones(W.numel(), dtype=torch.bool, device=W.device)
    keep[torch.sort(score.reshape(-1), stable=True).indices[:k]] = False
    return keep.reshape(W.shape) & ~forced
