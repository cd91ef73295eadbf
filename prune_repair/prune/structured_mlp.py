"""Remove a fraction of every MLP's hidden units, block by block, and refit the consumer.

For each MLP in module order (:func:`~prune_repair.prune.mlp_units.find_mlps`), one pass
over the calibration data accumulates the float64 Gram statistics of its consumer layer
(``fc2`` / ``c_proj`` / ``down_proj``): ``X`` = the hidden units as the model being pruned
computes them (the MLPs before it already pruned and refitted), ``Y`` = the DENSE model's
consumer output on the same samples. From ``G = X^T X`` alone:

- unit ``j`` is scored ``sqrt(E[x_j^2]) * ||W[:, j]||`` (activation energy times the norm of
  its outgoing weights) and the lowest-scored units are removed (the same count in every MLP
  of one width);
- the consumer is then refitted (``refit``):

  ``ridge``  closed-form ridge over the kept units plus the bias, toward the dense outputs
             (:func:`~prune_repair.engine.refit.ridge.masked_ridge`), its penalty
             ``lam ||w - w_kept||^2`` pulling toward the kept weights as they are; the
             intercept absorbs the removed units' mean contribution, and the target being the
             dense model's output also undoes the drift of the blocks before;
  ``bias``   only the removed units' mean contribution ``W[:, removed] @ E[x_removed]`` is
             folded into the bias (FLAP-style compensation; nothing without a bias);
  ``none``   the units are dropped.

With ``heads``, whole attention heads of LLaMA-style attention go the same way, in module
order with the MLPs (:mod:`.structured_heads`: the unit is a key/value group, ``o_proj`` is
its consumer). The relative output error of every consumer before (units dropped) and after
the refit is reported, computed from the same statistics. Since the kept weights as they are
(the drop) are a candidate of the ridge problem with no penalty, the refit's error on the
calibration data is never above the drop's, whatever the damping.

Example:
    >>> import copy, torch
    >>> from prune_repair.zoo.models import TokenMLP
    >>> _ = torch.manual_seed(0)
    >>> dense = TokenMLP(dim=8, depth=2).eval()
    >>> model, x = copy.deepcopy(dense), torch.randn(64, 1, 28, 28)
    >>> result = prune_mlps_(model, dense, x, 0.25)
    >>> model.blocks[0].fc1.out_features, [r["kept"] for r in result.layers]
    (12, [12, 12])
    >>> all(r["error"] <= r["error_dropped"] for r in result.layers)
    True
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..engine.refit.gram import Gram
from ..engine.refit.ridge import masked_ridge
from ..engine.registry import MethodEnum
from ..engine.run.forward import ForwardFn, StopForward, as_batches, first_tensor, hooked_pass
from .mlp_units import MLPUnits, consumer_rows, find_mlps, set_config_width_, units_to_remove
from .unit_select import SELECT, obs_keep
from .structured_heads import HeadUnits, find_heads, heads_to_remove, set_config_heads_
from .targets import PruneError


class Refit(MethodEnum):
    """How the consumer of the removed units is corrected."""

    RIDGE = "ridge", "closed-form ridge over the kept units toward the dense outputs", "CORP"
    BIAS = "bias", "the removed units' mean contribution folded into the bias", "FLAP (An et al. 2024)"
    NONE = "none", "units dropped, nothing corrected"


@dataclass
class StructuredMLPResult:
    """Kept unit indices per producer layer, per-MLP report rows, seconds."""

    kept: dict[str, torch.Tensor]
    layers: list[dict[str, Any]]
    seconds: float
    config_key: str | None = None
    history: list[tuple[str, bool, list[int]]] = field(default_factory=list)


def _mask_of(batch: Any) -> torch.Tensor | None:
    return batch.get("attention_mask") if isinstance(batch, dict) else None


def consumer_gram(model: nn.Module, reference: nn.Module, unit: MLPUnits | HeadUnits, data: Any,
                  forward_fn: ForwardFn | None = None) -> Gram:
    """Gram statistics of the consumer of ``unit``: inputs from ``model``, targets from ``reference``."""
    mine, theirs = model.get_submodule(unit.consumer), reference.get_submodule(unit.consumer)
    gram = Gram.for_layer(mine, name=unit.consumer)
    seen: dict[str, torch.Tensor] = {}

    def take_output(_m, _inp, out):
        seen["y"] = first_tensor(out)
        raise StopForward

    def take_input(_m, inp):
        seen["x"] = inp[0]
        raise StopForward

    with hooked_pass(reference, forward_hooks={theirs: take_output}, forward_fn=forward_fn) as run_ref, \
            hooked_pass(model, pre_hooks={mine: take_input}, forward_fn=forward_fn) as run:
        for batch in as_batches(data):
            run_ref(batch)
            run(batch)
            gram.add(seen.pop("x"), seen.pop("y"), mask=_mask_of(batch))
    return gram


def unit_scores(gram: Gram, consumer: nn.Module) -> torch.Tensor:
    """``sqrt(E[x_j^2]) * ||W[:, j]||`` per hidden unit (float64)."""
    energy = gram.G[0].diagonal()[:-1] / max(gram.rows, 1)
    norms = consumer_rows(consumer).detach().to(torch.float64).norm(dim=0).to(energy.device)
    return energy.clamp_min(0).sqrt() * norms


def _full_weight(rows: torch.Tensor, bias: torch.Tensor | None, kept: torch.Tensor, width: int) -> torch.Tensor:
    """``(1, out, width + 1)``: ``rows`` on the kept columns, zeros elsewhere, the bias last."""
    full = torch.zeros(rows.shape[0], width + 1, dtype=torch.float64, device=rows.device)
    full[:, kept.to(rows.device)] = rows.to(torch.float64)
    if bias is not None:
        full[:, -1] = bias.to(torch.float64)
    return full[None]


def refit_consumer(gram: Gram, consumer: nn.Module, kept: torch.Tensor, refit: Refit,
                   damping: float) -> tuple[torch.Tensor, torch.Tensor | None, float, float]:
    """New consumer rows ``(out, len(kept))`` and bias, and the relative output errors with the
    units dropped and after the refit."""
    W = consumer_rows(consumer).detach().to(torch.float64).to(gram.G.device)
    b = consumer.bias.detach().to(torch.float64).to(gram.G.device) if consumer.bias is not None else None
    width, kept = W.shape[1], kept.to(gram.G.device)
    err = lambda r, bb: float(gram.relative_error(_full_weight(r, bb, kept, width)))  # noqa: E731
    rows, bias = W[:, kept], b
    dropped = err(rows, b)
    if refit is Refit.RIDGE:
        idx = torch.cat([kept, kept.new_tensor([width])]) if b is not None else kept
        G, C = gram.G[0][idx][:, idx], gram.C[0][idx]
        mask = torch.ones(1, W.shape[0], len(kept), dtype=torch.bool, device=G.device)
        prior = rows[None]  # the ridge term pulls toward the kept weights as they are, not toward zero
        sol = masked_ridge(G[None], C[None], mask, damping=damping, intercept=b is not None, prior=prior).weight[0]
        rows, bias = sol[:, :len(kept)], (sol[:, -1] if b is not None else None)
    elif refit is Refit.BIAS and b is not None:
        removed = torch.ones(width, dtype=torch.bool, device=W.device)
        removed[kept] = False
        mean = gram.G[0][:width, -1] / max(gram.rows, 1)  # X^T 1 / n
        bias = b + W[:, removed] @ mean[removed]
    return rows, bias, dropped, err(rows, bias)


def _steps(model: nn.Module, ratio: float, heads: float) -> list[tuple[Any, int]]:
    """(unit group, units to remove) for every MLP and (with ``heads``) attention module, in
    module order of their consumers."""
    if not 0 <= ratio < 1:
        raise PruneError(f"--structured {ratio} is outside [0, 1): give the fraction of MLP units to remove, e.g. 0.25")
    mlps = find_mlps(model)
    if not mlps:
        raise PruneError("no recognizable MLP (fc1/fc2, c_fc/c_proj, gate/up/down_proj, intermediate/output.dense, "
                         "torchvision MLPBlock) in the model: --structured on transformer MLPs needs one")
    steps: list[tuple[Any, int]] = [(m, units_to_remove(m.width, ratio)) for m in mlps]
    if heads:
        attention = find_heads(model)
        n_heads = heads_to_remove(attention, heads)  # refuses no attention / uneven counts
        steps += [(h, n_heads) for h in attention]
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return sorted(steps, key=lambda step: order[step[0].consumer])


def prune_mlps_(
    model: nn.Module,
    reference: nn.Module,
    data: Any,
    ratio: float,
    *,
    heads: float = 0.0,
    refit: Refit | str = Refit.RIDGE,
    select: str = "energy",
    damping: float = 1e-2,
    kept: dict[str, torch.Tensor] | None = None,
    forward_fn: ForwardFn | None = None,
) -> StructuredMLPResult:
    """Remove ``ratio`` of every MLP's hidden units of ``model`` in place (see the module doc),
    and ``heads`` of every LLaMA-style attention's heads (:mod:`.structured_heads`: units are
    key/value groups, scored by the sum of their columns' squared scores, ``o_proj`` refitted).

    ``reference`` is the dense model (same architecture, not changed); ``model`` starts as
    its copy. ``kept`` (MLP / attention FQN -> kept unit indices) replaces the scoring, e.g.
    to drop the units another run chose. ``select``: ``energy`` (the score above) or ``obs``
    (greedy least-squares elimination, :mod:`.unit_select`). Raises :class:`PruneError` when ``model`` has no
    recognizable MLP, a ratio is outside [0, 1) or heads do not divide evenly.
    """
    start = time.perf_counter()
    refit = Refit.parse(refit, "refit")
    if select not in SELECT:
        raise PruneError(f"unit selection must be one of {', '.join(SELECT)}, got {select!r}")
    steps = _steps(model, ratio, heads)
    chosen, layers, history = {}, [], []
    for unit, n_remove in steps:
        if kept is None and n_remove == 0:  # nothing removed: the layers stay exactly as they are
            chosen[unit.fqn] = torch.arange(unit.units)
            layers.append({"fqn": unit.fqn, "kind": unit.kind, "width": unit.units, "kept": unit.units})
            continue
        consumer = model.get_submodule(unit.consumer)
        gram = consumer_gram(model, reference, unit, data, forward_fn) if refit is not Refit.NONE or kept is None else None
        if kept is not None:
            idx = torch.as_tensor(kept[unit.fqn], dtype=torch.long)
        elif select == "obs":
            idx = obs_keep(gram, unit.units, unit.unit_size, n_remove, damping=max(damping, 1e-8),
                           intercept=consumer.bias is not None)
        else:
            scores = unit_scores(gram, consumer).square().view(unit.units, unit.unit_size).sum(1)
            idx = torch.topk(scores, unit.units - n_remove).indices.sort().values.cpu()
        row = {"fqn": unit.fqn, "kind": unit.kind, "width": unit.units, "kept": int(idx.numel())}
        if gram is not None:
            rows, bias, row["error_dropped"], row["error"] = refit_consumer(gram, consumer, unit.columns(idx), refit,
                                                                            damping)
            unit.shrink_(model, idx, rows, bias)
        else:
            unit.shrink_(model, idx)
        chosen[unit.fqn] = idx
        removed = sorted(set(range(unit.units)) - set(idx.tolist()))
        if removed and unit.kind == "mlp":  # torch-pruning's history: replaying it shrinks a fresh model the same way
            history.append((unit.producers[0], True, removed))
        layers.append(row)
    mlps = [u for u, _ in steps if u.kind == "mlp"]
    widths = {(m.width, int(chosen[m.fqn].numel())) for m in mlps}
    key = set_config_width_(model, *widths.pop()) if len(widths) == 1 else None
    attention = [u for u, _ in steps if u.kind == "heads"]
    if attention and any(int(chosen[a.fqn].numel()) < a.units for a in attention):
        set_config_heads_(model, attention[0], int(chosen[attention[0].fqn].numel()))
    kept_layers = {p: r for u, _ in steps for p, r in u.kept_rows(chosen[u.fqn]).items()}
    return StructuredMLPResult(kept_layers | {u.fqn: chosen[u.fqn] for u, _ in steps}, layers,
                               time.perf_counter() - start, key, history)
