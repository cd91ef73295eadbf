"""Merging front end: align (weight / activation matching), permute, interpolate, repair.

Example:
    >>> import torch
    >>> from prune_repair.zoo.models import MLP
    >>> from prune_repair.merge import merge
    >>> a, b = MLP(widths=(16,)), MLP(widths=(16,))
    >>> merged = merge(a, b, torch.randn(64, 1, 28, 28), alpha=0.5)
    >>> type(merged).__name__
    'MLP'
"""

from .activation_matching import Probe, SiteMoments, activation_matching, probes_of, site_moments
from .attention_groups import transformer_groups
from .find_groups import find_groups
from .groups import GroupError, PermGroup, groups_from_spec
from .barrier import BarrierCurve, CurvePoint, PlotError, alpha_grid, barrier, barrier_curve, plot_curve
from .interpolate import ArchitectureMismatch, check_same_architecture, interpolate, lerp_state_dicts
from .merge import Align, MergePlan, check_alpha, find_alignment, merge, merge_many, prepare_merge
from .permute import (Alignment, Perms, check_function_preserved, identity_perms, invert, permute,
                      permute_state_dict, random_perms)
from .weight_matching import assign, weight_matching

__all__ = [
    "Align", "Alignment", "ArchitectureMismatch", "BarrierCurve", "CurvePoint", "GroupError", "MergePlan",
    "PermGroup", "find_groups", "groups_from_spec",
    "Perms", "PlotError", "Probe", "SiteMoments", "activation_matching", "alpha_grid", "assign", "barrier",
    "barrier_curve", "check_alpha", "check_function_preserved", "check_same_architecture", "find_alignment",
    "identity_perms", "interpolate", "invert", "lerp_state_dicts", "merge", "merge_many", "permute",
    "permute_state_dict", "plot_curve", "prepare_merge", "probes_of", "random_perms", "site_moments",
    "transformer_groups", "weight_matching",
]
