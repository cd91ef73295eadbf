"""Pruning front end: one-shot unstructured pruners and the torch-pruning integration.

- :func:`prune_` prunes a model in place with a :class:`PruneMethod`
  (global-magnitude, layer-magnitude, fisher, woodfisher, obs, wanda) to a sparsity or an
  N:M pattern (:class:`NMPattern`, ``"2:4"``) and returns a :class:`PruneReport`;
  :func:`score_weights` scores once for several sparsities; per-layer sparsities come from
  a config (:func:`load_sparsity_config`).
- :func:`find_targets` says which weights are prunable (conv + linear weights).
- :func:`apply_masks_` / :func:`remove_reparametrization_` write masks as zeros or
  through ``torch.nn.utils.prune``; :func:`measure_sparsity` counts zeros.
- :mod:`.structured` maps reference statistics onto the channels torch-pruning keeps;
  :func:`structured_prune` makes a physically smaller model (transformer MLP units and
  LLaMA heads by :func:`prune_mlps_`, CNN channel groups by :func:`prune_channels_`).

Example:
    >>> import torch, prune_repair as pr
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    >>> batch = torch.randn(64, 8)
    >>> ref = pr.collect_stats(model, batch)
    >>> prune_(model, 0.75).achieved_sparsity
    0.75
    >>> _ = pr.repair_(model, ref, batch)
    >>> round(measure_sparsity(find_targets(model)).fraction, 6)
    0.75
"""

from .fisher import fisher_scores, gradient_chunks, labeled_data
from .magnitude import magnitude_scores
from .nm import NMPattern, parse_pattern
from .sparsity_config import load_sparsity_config
from .wanda import input_norms, wanda_scores
from .masks import (
    MaskStyle,
    Sparsity,
    apply_masks_,
    check_sparsity,
    masks_from_scores,
    measure_sparsity,
    remove_reparametrization_,
)
from .obs import ObsOptions, ObsReport, obs_prune_
from .methods import FisherOptions, PruneMethod, PruneReport, PruneScores, parse_method, prune_, score_weights
from .structured import (
    StructuredReport,
    kept_channels,
    load_structured_,
    repair_structured_,
    replay_history_,
    save_structured,
)
from .structured_channels import prune_channels_
from .structured_mlp import prune_mlps_
from .structured_run import StructuredResult, structured_prune
from .targets import PruneError, Target, find_targets
from .woodfisher import InverseFisher, inverse_fisher, woodfisher_memory, woodfisher_scores

__all__ = [
    "FisherOptions",
    "ObsOptions",
    "ObsReport",
    "obs_prune_",
    "InverseFisher",
    "MaskStyle",
    "NMPattern",
    "PruneError",
    "PruneMethod",
    "PruneReport",
    "PruneScores",
    "Sparsity",
    "StructuredReport",
    "StructuredResult",
    "prune_channels_",
    "prune_mlps_",
    "structured_prune",
    "Target",
    "apply_masks_",
    "check_sparsity",
    "find_targets",
    "fisher_scores",
    "gradient_chunks",
    "input_norms",
    "inverse_fisher",
    "kept_channels",
    "load_structured_",
    "labeled_data",
    "load_sparsity_config",
    "magnitude_scores",
    "masks_from_scores",
    "measure_sparsity",
    "parse_method",
    "parse_pattern",
    "prune_",
    "remove_reparametrization_",
    "repair_structured_",
    "replay_history_",
    "save_structured",
    "score_weights",
    "wanda_scores",
    "woodfisher_memory",
    "woodfisher_scores",
]
