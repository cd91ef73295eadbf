"""prune-repair: repair networks after weight surgery.

Measure per-channel activation statistics of a reference network on one
calibration batch, correct the operated (pruned or merged) network toward them
with a per-channel affine, and fold the correction into the weights.

Example:
    >>> import torch, torch.nn.utils.prune, prune_repair as pr
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    >>> batch = torch.randn(64, 8)
    >>> ref = pr.collect_stats(model, batch)
    >>> _ = torch.nn.utils.prune.l1_unstructured(model[0], "weight", amount=0.9)
    >>> report = pr.repair_(model, ref, batch)
    >>> [s.fqn for s in report.sites]
    ['0']
"""

__version__ = "0.1.0"

# the engine: sites, statistics, corrections, folding
from .engine.sites.fold import (Correction, fold_affine, fold_affine_into_bn, fold_corrections, fold_corrections_, fuse_batchnorm,
                          fuse_bn)
from .engine.correct.modes import RepairMode, Variant
from .engine.run.lockstep import Passes
from .engine.checks import check_finite
from .engine.correct.report import RepairReport, SiteReport
from .engine.correct.preserve import preserve_statistics
from .engine.stats.goal import RecordStats, batchnorm_goal
from .engine.refit.reconstruct import ReconstructReport, reconstruct_
from .engine.correct.repair import repair_
from .engine.correct.settings import RepairSettings
from .engine.sites.find import Site, find_sites, make_filter
from .engine.stats.activation import ActivationStats, ChannelStats, collect_stats

# front end: pruning
from .prune.pipeline import PruneRun, prune_and_repair
from .prune.settings import PruneSettings
from .prune import FisherOptions, PruneError, PruneMethod, PruneReport, find_targets, measure_sparsity, prune_, score_weights
from .prune.structured import kept_channels, load_structured_, repair_structured_, save_structured

# front end: merging
from .merge.find_groups import find_groups
from .merge.groups import GroupError, PermGroup, groups_from_spec
from .merge import Align, barrier_curve, merge, merge_many, prepare_merge

__all__ = [
    # engine
    "ActivationStats",
    "ChannelStats",
    "Correction",
    "Passes",
    "RepairMode",
    "RepairReport",
    "RepairSettings",
    "Site",
    "SiteReport",
    "Variant",
    "check_finite",
    "collect_stats",
    "find_sites",
    "fold_affine",
    "fold_affine_into_bn",
    "fold_corrections",
    "fold_corrections_",
    "fuse_batchnorm",
    "fuse_bn",
    "make_filter",
    "preserve_statistics",
    "RecordStats",
    "batchnorm_goal",
    "ReconstructReport",
    "reconstruct_",
    "repair_",
    # pruning
    "FisherOptions",
    "PruneError",
    "PruneMethod",
    "PruneReport",
    "PruneRun",
    "PruneSettings",
    "find_targets",
    "kept_channels",
    "load_structured_",
    "measure_sparsity",
    "prune_",
    "prune_and_repair",
    "repair_structured_",
    "save_structured",
    "score_weights",
    # merging
    "Align",
    "GroupError",
    "PermGroup",
    "barrier_curve",
    "find_groups",
    "groups_from_spec",
    "merge",
    "merge_many",
    "prepare_merge",
]
