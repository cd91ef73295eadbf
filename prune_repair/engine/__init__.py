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

from .evaluate import DataError, evaluate
from .fold import (Correction, fold_affine, fold_affine_into_bn, fold_corrections, fold_corrections_, fuse_batchnorm,
                   fuse_bn)
from .renorm import RepairMode, Variant
from .lockstep import Passes
from .checks import check_finite
from .report import RepairReport, SiteReport
from .preserve import preserve_statistics
from .goal_stats import RecordStats, batchnorm_goal
from .reconstruct import ReconstructReport, reconstruct_
from .repair import repair_
from .sites import Site, find_sites, make_filter
from .stats import ActivationStats, ChannelStats, collect_stats

__all__ = [
    "ActivationStats",
    "ChannelStats",
    "Correction",
    "DataError",
    "Passes",
    "RepairMode",
    "RepairReport",
    "Site",
    "SiteReport",
    "Variant",
    "check_finite",
    "collect_stats",
    "evaluate",
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
