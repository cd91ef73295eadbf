"""Merging models: align to a reference, interpolate, and REPAIR toward interpolated statistics.

:func:`merge` is the one-call API; :func:`prepare_merge` does the expensive, alpha-free part
once (groups, alignment, endpoint statistics) and returns a :class:`MergePlan` whose
:meth:`MergePlan.merged` builds the merged model for any weights, e.g. along a barrier
curve. Nothing here changes the models passed in.

Repair variants: ``exact`` (default; one pass over the merged net with upstream corrections
applied), ``all-at-once`` (measured in one uncorrected pass) and ``closed-form`` (REPAIR
sec. 4.1: the std of each merged unit predicted from the endpoints' variances and
cross-covariances, no pass over the merged net; ``auto`` means ``repair`` there).

Example:
    >>> import torch
    >>> from prune_repair.zoo.models import MLP
    >>> _ = torch.manual_seed(0)
    >>> a, b, x = MLP(widths=(32, 32)), MLP(widths=(32, 32)), torch.randn(128, 1, 28, 28)
    >>> merged = merge(a, b, x, alpha=0.5, align="weight", repair="repair")
    >>> plan = prepare_merge([a, b], x, align="activation")
    >>> model, report = plan.merged([0.5, 0.5], repair="rescale", variant="closed-form")
    >>> report.variant, len(report.sites)
    ('closed-form', 2)
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..engine.run.forward import ForwardFn, as_batches, batch_size_of
from ..engine.sites.fold import can_shift, fold_correction_
from .find_groups import find_groups
from .groups import PermGroup
from ..engine.registry import MethodEnum
from ..engine.correct.modes import RepairMode, Variant, channel_affine
from ..engine.checks import check_finite
from ..engine.correct.report import RepairReport, SiteReport
from ..engine.correct.repair import repair_
from ..engine.sites.find import Selector, find_sites
from .activation_matching import SiteMoments, activation_matching, site_moments
from .interpolate import _weights, check_same_architecture, interpolate
from .permute import Alignment, identity_perms, permute
from .weight_matching import weight_matching


class Align(MethodEnum):
    """How models are aligned before averaging (the registry of alignment methods)."""

    ACTIVATION = "activation", "match units by the correlation of their activations", "Jordan et al. 2022, sec. 2"
    WEIGHT = "weight", "weight matching by coordinate descent, no data needed", "Ainsworth et al. 2023 (git re-basin)"
    NONE = "none", "average the models as they are"




def _check_mergeable(mode: RepairMode) -> None:
    if mode.reconstructs:
        raise ValueError(f"'{mode.value}' refits a pruned model toward its dense reference; merging has two "
                         "references and no such target yet: use repair='repair', 'rescale' or 'auto'")


def check_alpha(alpha: float) -> float:
    """``alpha`` as a float in [0, 1], else ``ValueError``.

    >>> check_alpha(1.5)
    Traceback (most recent call last):
    ...
    ValueError: alpha must be a number in [0, 1], got 1.5: 0 gives the first model, 1 the second
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha}: 0 gives the first model, 1 the second")
    return float(alpha)


def find_alignment(reference: nn.Module, model: nn.Module, groups: Sequence[PermGroup], data: Any = None, *,
                   method: Align | str = Align.ACTIVATION, forward_fn: ForwardFn | None = None, seed: int = 0,
                   max_sweeps: int = 100) -> Alignment:
    """Permutations that align ``model`` to ``reference`` (``permute(model, groups, perms)``)."""
    method = Align.parse(method, "alignment")
    if method is Align.WEIGHT:
        return weight_matching(reference, model, groups, seed=seed, max_sweeps=max_sweeps)
    if method is Align.ACTIVATION:
        if data is None:
            raise ValueError("activation matching needs calibration data: pass data or use align='weight'")
        return activation_matching(reference, model, data, groups, forward_fn=forward_fn)
    return Alignment(identity_perms(groups), "none")


@dataclass
class MergePlan:
    """Aligned copies of the models (``models[0]`` is the reference) and what merging needs."""

    models: list[nn.Module]
    groups: list[PermGroup]
    alignments: list[Alignment]
    data: Any
    forward_fn: ForwardFn | None = None
    select: Selector = None
    include_classifier: bool = False
    seconds: dict[str, float] = field(default_factory=dict)
    _moments: SiteMoments | None = field(default=None, repr=False)

    def moments(self) -> SiteMoments:
        """Per-site means and between-model covariances (one pass over the data, cached)."""
        if self._moments is None:
            start = time.perf_counter()
            sites = find_sites(self.models[0], as_batches(self.data)[0], select=self.select,
                               include_classifier=self.include_classifier, forward_fn=self.forward_fn)
            self._moments = site_moments(self.models, self.data, sites, forward_fn=self.forward_fn)
            self.seconds["stats"] = time.perf_counter() - start
        return self._moments

    def merged(self, weights: Sequence[float] | None = None, *, repair: RepairMode | str = RepairMode.AUTO,
               variant: Variant | str = Variant.EXACT) -> tuple[nn.Module, RepairReport | None]:
        """The merged model for ``weights`` (uniform by default) and the repair report (None
        when ``repair='none'``)."""
        mode, variant = RepairMode.parse(repair, "correction"), Variant.parse(variant, "variant")
        _check_mergeable(mode)
        w = _weights(len(self.models), weights)
        model = interpolate(self.models, w)
        if mode is RepairMode.NONE:
            return model, None
        moments = self.moments()
        if variant is Variant.CLOSED_FORM:
            return model, _closed_form_(model, moments, w, mode)
        report = repair_(model, moments.goal(w), self.data, repair=mode, variant=variant,
                         forward_fn=self.forward_fn)
        return model, report


def _closed_form_(model: nn.Module, moments: SiteMoments, weights: Sequence[float], mode: RepairMode) -> RepairReport:
    """Fold closed-form corrections (REPAIR sec. 4.1) into ``model`` in place."""
    if mode is RepairMode.RESET:
        raise ValueError("reset recomputes BatchNorm statistics with a pass over the merged network: "
                         "use variant='exact' for it")
    start = time.perf_counter()
    mode = RepairMode.REPAIR if mode is RepairMode.AUTO else mode
    predicted, goal = moments.predicted(weights), moments.goal(weights)
    dtype = next(model.parameters()).dtype
    rel_tol = 4 * torch.finfo(dtype).eps if dtype.is_floating_point else 1e-12
    reports, corrections = [], {}
    for site in moments.sites:
        mean_now, std_now = predicted[site.fqn]
        affine = channel_affine(mode, mean_now, std_now, goal[site.fqn].mean, goal[site.fqn].std, rel_tol)
        report = SiteReport(site.fqn, mode.value, site.channels, affine.dead.nonzero().flatten().tolist())
        if not can_shift(model, site) and bool((affine.shift != 0).any()):
            affine.shift, report.shift_dropped = torch.zeros_like(affine.shift), True
        corrections[site.fqn] = affine
        fold_correction_(model, site, corrections[site.fqn])
        reports.append(report)
    return RepairReport(mode.value, Variant.CLOSED_FORM.value, 0, time.perf_counter() - start, reports,
                        corrections)


def prepare_merge(models: Sequence[nn.Module], data: Any, *, align: Align | str = Align.ACTIVATION,
                  groups: Sequence[PermGroup] | Mapping[str, Sequence[str]] | None = None,
                  forward_fn: ForwardFn | None = None, seed: int = 0, max_sweeps: int = 100,
                  select: Selector = None, include_classifier: bool = False,
                  names: Sequence[str] | None = None, align_data: Any = None) -> MergePlan:
    """Check, find groups, align ``models[1:]`` to ``models[0]``; inputs are not changed.

    Args:
        models: two or more models of one architecture.
        data: calibration data (one batch or an iterable of batches).
        align: ``activation``, ``weight`` or ``none``.
        groups: hand-written permutation groups replacing the automatic ones.
        forward_fn: ``forward_fn(model, batch)`` for batches that are not plain tensors.
        seed: seed of weight matching's group order.
        select, include_classifier: which sites are repaired (see :func:`~prune_repair.find_sites`).
        names: how the models are called in error messages (e.g. file names).
        align_data: data for activation matching in place of ``data`` (which then serves
            repair only): an iterable of batches (a DataLoader) is read batch by batch, and
            the matching's memory does not grow with its length.
    """
    align = Align.parse(align, "alignment")
    models = list(models)
    if len(models) < 2:
        raise ValueError(f"merging needs at least two models, got {len(models)}")
    names = list(names) if names is not None else [f"model {i}" for i in range(len(models))]
    check_same_architecture([m.state_dict() for m in models], names)
    for name, m in zip(names, models):
        try:
            check_finite(m)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
    batches = as_batches(data)
    if sum(batch_size_of(b) for b in batches) < 2:
        raise ValueError("calibration needs at least 2 samples to measure a spread: pass a larger batch")
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    found = [] if align is Align.NONE else find_groups(models[0], batches[0], groups=groups, forward_fn=forward_fn)
    seconds["groups"] = time.perf_counter() - start
    start = time.perf_counter()
    alignments, aligned = [Alignment(identity_perms(found), "reference")], [models[0]]
    for m in models[1:]:
        al = find_alignment(models[0], m, found, batches if align_data is None else align_data, method=align, forward_fn=forward_fn, seed=seed,
                            max_sweeps=max_sweeps)
        alignments.append(al)
        aligned.append(permute(m, found, al.perms))
    seconds["align"] = time.perf_counter() - start
    return MergePlan(aligned, found, alignments, batches, forward_fn, select, include_classifier, seconds)



def merge_many(models: Sequence[nn.Module], data: Any, weights: Sequence[float] | None = None, *,
               align: Align | str = Align.ACTIVATION, repair: RepairMode | str = RepairMode.AUTO,
               variant: Variant | str = Variant.EXACT, **kwargs: Any) -> nn.Module:
    """Align every model to ``models[0]``, average with ``weights`` (uniform by default) and
    repair toward the weighted endpoint statistics. ``kwargs`` go to :func:`prepare_merge`."""
    model, _ = prepare_merge(models, data, align=align, **kwargs).merged(weights, repair=repair, variant=variant)
    return model


def merge(a: nn.Module, b: nn.Module, data: Any, alpha: float = 0.5, *, align: Align | str = Align.ACTIVATION,
          repair: RepairMode | str = RepairMode.AUTO, variant: Variant | str = Variant.EXACT,
          **kwargs: Any) -> nn.Module:
    """A new model ``(1 - alpha) * a + alpha * P(b)`` after aligning ``b`` to ``a``, repaired.

    Args:
        a, b: models of one architecture (not changed).
        data: calibration data (one batch of 64-128 samples is usually enough).
        alpha: 0 gives ``a``, 1 gives the aligned ``b``.
        align: ``activation`` | ``weight`` | ``none``.
        repair: a :class:`~prune_repair.RepairMode` (``auto`` resets BatchNorm sites, repairs others).
        variant: ``exact`` | ``all-at-once`` | ``closed-form``.
        kwargs: ``groups``, ``forward_fn``, ``seed``, ``select``, ``include_classifier`` (see
            :func:`prepare_merge`).
    """
    alpha = check_alpha(alpha)
    _check_mergeable(RepairMode.parse(repair, "correction"))  # bad names fail before any work
    Variant.parse(variant, "variant")
    Align.parse(align, "alignment")
    return merge_many([a, b], data, [1.0 - alpha, alpha], align=align, repair=repair, variant=variant, **kwargs)
