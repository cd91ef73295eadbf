"""The core renormalization engine: sites, statistics, corrections, folding.

The engine knows nothing of pruning, merging, files or the command line; the front
ends (:mod:`prune_repair.prune`, :mod:`prune_repair.merge`) and :mod:`prune_repair.cli`
build on it.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from prune_repair.engine import collect_stats, repair_
    >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> batch = torch.randn(64, 8)
    >>> report = repair_(model, collect_stats(model, batch), batch)
    >>> [s.fqn for s in report.sites]
    ['0']
"""

from .sites.fold import (Correction, fold_affine, fold_affine_into_bn, fold_corrections, fold_corrections_, fuse_batchnorm,
                   fuse_bn)
from .correct.modes import RepairMode, Variant
from .run.lockstep import Passes
from .checks import check_finite
from .correct.report import RepairReport, SiteReport
from .correct.preserve import preserve_statistics
from .stats.goal import RecordStats, batchnorm_goal
from .refit.reconstruct import ReconstructReport, reconstruct_
from .correct.repair import repair_
from .sites.find import Site, find_sites, make_filter
from .stats.activation import ActivationStats, ChannelStats, collect_stats

__all__ = [
    "ActivationStats",
    "ChannelStats",
    "Correction",
    "Passes",
    "RepairMode",
    "RepairReport",
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
]
