"""Magnitude scores: ``|w|``, ranked globally or per layer (Han et al.'s one-shot pruning).

Global magnitude uses one threshold over all prunable weights; layerwise magnitude
prunes the same fraction of every layer. Both use the scores below; the scope is
chosen by :mod:`prune_repair.prune.methods`.

Example:
    >>> from torch import nn
    >>> from .targets import find_targets
    >>> layer = nn.Linear(3, 1)
    >>> scores = magnitude_scores(find_targets(layer))
    >>> bool((scores[""] == layer.weight.abs()).all())
    True
"""

from __future__ import annotations

import torch

from .targets import Target, effective_weights


def magnitude_scores(targets: list[Target]) -> dict[str, torch.Tensor]:
    """``|w|`` of each target's effective weight, keyed by FQN (already-masked weights score 0)."""
    return {fqn: w.abs() for fqn, w in effective_weights(targets).items()}
