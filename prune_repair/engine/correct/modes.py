"""Correction modes: from measured and goal statistics to a per-channel affine.

Pure functions on float64 tensors; the passes over the model live in
:mod:`prune_repair.engine.correct.repair`.

Example:
    >>> import torch
    >>> now = (torch.tensor([1.0, 0.0]), torch.tensor([2.0, 0.0]))   # mean, std (2nd is dead)
    >>> goal = (torch.tensor([0.0, 5.0]), torch.tensor([1.0, 1.0]))
    >>> c = channel_affine(RepairMode.REPAIR, *now, *goal)
    >>> c.scale.tolist(), c.shift.tolist(), c.dead.tolist()
    ([0.5, 1.0], [-0.5, 0.0], [False, True])
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..registry import MethodEnum
from ..sites.fold import Correction


class RepairMode(MethodEnum):
    """How each site is corrected (the registry of correction modes)."""

    AUTO = "auto", "reset at BatchNorm sites, repair elsewhere (the default)"
    REPAIR = "repair", "(x - mean_now) / std_now * goal_std + goal_mean", "Jordan et al. 2022, eq. 3-4"
    RESCALE = "rescale", "x / std_now * goal_std", "Qu & Horvath 2024, sec. 3.3"
    RESCALE_LAYER = "rescale-layer", "like rescale, goal std averaged over the layer (ablation)", "Qu & Horvath 2024"
    RESHIFT = "reshift", "x - mean_now + goal_mean (ablation)", "Qu & Horvath 2024"
    RESET = "reset", "recompute BatchNorm running statistics", "Jordan et al. 2022, sec. 5"
    RECONSTRUCT = ("reconstruct", "least-squares refit of each layer's remaining weights to the reference's "
                   "outputs (zeros kept)", "OBC / AdaPrune layer-wise reconstruction")
    RECONSTRUCT_REPAIR = "reconstruct+repair", "reconstruct, then the statistics correction of auto on top"
    NONE = "none", "measure nothing, change nothing"

    @property
    def reconstructs(self) -> bool:
        """Whether the mode refits weights (it needs the reference MODEL, not only its statistics)."""
        return self in (RepairMode.RECONSTRUCT, RepairMode.RECONSTRUCT_REPAIR)


class Variant(MethodEnum):
    """How the operated network's statistics are obtained."""

    EXACT = "exact", "each site measured with its upstream sites already corrected", "Qu & Horvath 2024, table 9"
    ALL_AT_ONCE = "all-at-once", "all sites measured in one uncorrected pass", "REPAIR reference code"
    CLOSED_FORM = "closed-form", "merging only: predicted from the endpoints' covariances", "Jordan et al. 2022, sec. 4.1"


def site_mode(mode: RepairMode, has_batchnorm: bool) -> RepairMode:
    """The mode a site actually gets: ``auto`` resets BatchNorm sites and repairs the rest;
    ``reset`` leaves sites without a BatchNorm as they are."""
    if mode is RepairMode.AUTO:
        return RepairMode.RESET if has_batchnorm else RepairMode.REPAIR
    if mode is RepairMode.RESET and not has_batchnorm:
        return RepairMode.NONE
    return mode


@dataclass
class ChannelAffine(Correction):
    """A :class:`~prune_repair.engine.sites.fold.Correction` that also says which channels it left alone."""

    dead: torch.Tensor  # bool: zero or non-finite spread, or non-finite statistics


def dead_channels(mean: torch.Tensor, std: torch.Tensor, rel_tol: float) -> torch.Tensor:
    """Channels whose spread is zero up to rounding (``std <= rel_tol * |mean|``) or non-finite."""
    finite = torch.isfinite(mean) & torch.isfinite(std)
    return ~finite | (std <= rel_tol * mean.abs()) | (std == 0)


def channel_affine(
    mode: RepairMode,
    mean_now: torch.Tensor,
    std_now: torch.Tensor,
    goal_mean: torch.Tensor,
    goal_std: torch.Tensor,
    rel_tol: float = 1e-12,
    goal_ok: torch.Tensor | bool | None = None,
) -> ChannelAffine:
    """Per-channel scale/shift that moves (mean_now, std_now) to the goal under ``mode``.

    Dead channels (see :func:`dead_channels`) and channels with a non-finite goal get
    the identity: they are never divided by zero and are reported by the caller.
    ``rel_tol`` should be a few ulps of the activations' dtype. ``goal_ok``: the goal's
    finite channels (:func:`finite_goal`) when already known (``True``: all of them).
    """
    mean_now, std_now, goal_mean, goal_std = (t if t.dtype == torch.float64 else t.to(torch.float64)
                                              for t in (mean_now, std_now, goal_mean, goal_std))
    # dead_channels(mean_now, std_now) in few small ops (this runs at every site during a pass): a NaN
    # anywhere fails the comparisons, so the channel is dead; std == 0 fails std > rel_tol * |mean|
    dead = ~((std_now > rel_tol * mean_now.abs()) & (std_now < math.inf))
    goal_ok = finite_goal(goal_mean, goal_std) if goal_ok is None else goal_ok
    if goal_ok is not True:
        dead = dead | ~goal_ok
    if mode is RepairMode.REPAIR:  # the hot path: dead channels' inf / NaN replaced at once
        scale = torch.where(dead, 1.0, goal_std / std_now)
        return ChannelAffine(scale, torch.where(dead, 0.0, goal_mean - scale * mean_now), dead)
    if mode is RepairMode.RESCALE:
        scale, shift = goal_std / std_now, torch.zeros_like(mean_now)
    elif mode is RepairMode.RESCALE_LAYER:
        layer_std = goal_std[~dead].mean() if bool((~dead).any()) else goal_std.new_tensor(1.0)
        scale, shift = layer_std / std_now, torch.zeros_like(mean_now)
    elif mode is RepairMode.RESHIFT:
        scale, shift = torch.ones_like(mean_now), goal_mean - mean_now
    else:
        raise ValueError(f"mode '{mode}' is not an affine correction")
    return ChannelAffine(torch.where(dead, 1.0, scale), torch.where(dead, 0.0, shift), dead)


def finite_goal(goal_mean: torch.Tensor, goal_std: torch.Tensor) -> torch.Tensor | bool:
    """The channels whose goal mean and std are finite (``True`` when all are).

    >>> finite_goal(torch.tensor([0.0, 1.0]), torch.tensor([1.0, float("nan")])).tolist()
    [True, False]
    """
    ok = torch.isfinite(goal_mean) & torch.isfinite(goal_std)
    return True if bool(ok.all()) else ok
