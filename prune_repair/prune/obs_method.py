"""``prune_(method="obs")``: :func:`~prune_repair.prune.obs.obs_prune_` behind the common report.

The layers obs cannot prune yet among those selected are named in a warning (never a
silent skip), and a layer left all zero is warned about, as for every method.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from ..engine.refit.attention_layers import covered_owners, layer_module
from ..engine.run.forward import as_batches
from ..engine.checks import parameter_holders
from ..engine.sites.find import Selector, make_filter
from .allocate import warn_empty
from .masks import MaskStyle, sparsity_all_params
from .nm import NMPattern
from .obs import ObsOptions, obs_prune_
from .report import PruneReport, example_of, inputs_of
from .targets import PruneError, Target, find_targets


def prune_with_obs(model: nn.Module, sparsity: float | NMPattern, data: Any, obs: ObsOptions, select: Selector,
                   skip_first: bool, skip_classifier: bool, style: MaskStyle, config: dict[str, float] | None,
                   floor: bool, passes: dict[str, Any] | None = None, include_tied: bool = False) -> PruneReport:
    """Prune ``model`` in place with obs (see :func:`~prune_repair.prune.prune_` for the arguments; ``passes``:
    its ``obs_passes``). A weight tied to another module is left out unless ``include_tied``, as for every method."""
    select = select if include_tied else _untied(model, select)
    if data is None:
        raise PruneError("obs pruning reconstructs each layer on calibration data: pass data=x (or (x, y))")
    if style is not MaskStyle.ZEROS:
        raise PruneError("obs pruning writes plain zeros (it updates the kept weights too): use style='zeros'")
    result = obs_prune_(model, inputs_of(data), sparsity, allocation=obs.allocation, damping=obs.damping,
                        block_size=obs.block_size, target=obs.target, candidates=obs.candidates,
                        steps=obs.steps, select=select, skip_first=skip_first,
                        skip_classifier=skip_classifier, sparsity_config=config, floor=floor, **(passes or {}))
    modules = {la.fqn: layer_module(model, la.fqn) for la in result.layers}  # in_proj:q|k|v: rows of in_proj_weight
    warn_empty([Target(la.fqn, modules[la.fqn], la.weights) for la in result.layers])
    pruned = {la.fqn for la in result.layers}
    _warn_left_dense(model, pruned | covered_owners(pruned), select, skip_first, skip_classifier, data)
    masks = {la.fqn: modules[la.fqn].weight.detach() != 0 for la in result.layers}
    zeros = sum(int((~m).sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    pattern = str(sparsity) if isinstance(sparsity, NMPattern) else "unstructured"
    asked = sparsity.sparsity if isinstance(sparsity, NMPattern) else sparsity
    return PruneReport("obs", asked, zeros / max(total, 1), zeros, total,
                       {la.fqn: la.sparsity for la in result.layers}, {"score": 0.0, "mask": sum(result.seconds.values())},
                       masks, sparsity_all_params(model), [{**la.to_dict(), "pattern": pattern} for la in result.layers],
                       pattern)


def _untied(model: nn.Module, select: Selector) -> Selector:
    """``select`` without the layers whose weight another module also holds (GPT-2's lm_head is the embedding)."""
    holders = parameter_holders(model)
    tied = {fqn for fqn, m in model.named_modules()
            if isinstance(getattr(m, "weight", None), nn.Parameter) and len(holders.get(id(m.weight), [])) > 1}
    if not tied:
        return select
    base = make_filter(select)
    return lambda module, fqn: fqn not in tied and (base is None or base(module, fqn))


def _warn_left_dense(model: nn.Module, pruned: set[str], select: Selector, skip_first: bool, skip_classifier: bool,
                     data: Any) -> None:
    """Name the selected prunable layers obs could not prune (never a silent skip)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # find_targets' own tied-weight warning was given already
        targets = find_targets(model, select=select, skip_first=skip_first, skip_classifier=skip_classifier,
                               example_inputs=example_of(as_batches(inputs_of(data))[0]))
    dense = [t.fqn for t in targets if t.fqn not in pruned]
    if dense:
        warnings.warn(f"obs left {len(dense)} selected layer(s) dense, which it cannot prune yet ({', '.join(dense[:4])}"
                      f"{', ...' if len(dense) > 4 else ''}): prune them with another method or leave them out",
                      stacklevel=4)
