"""``PruneSettings``: which weights a pruning run may zero, as one small object.

:func:`~prune_repair.prune.pipeline.prune_and_repair` takes the layer choice as one
:class:`PruneSettings` (the method's own options travel in :class:`~prune_repair.prune.methods.
FisherOptions` / :class:`~prune_repair.prune.obs.ObsOptions`, the correction's in
:class:`~prune_repair.engine.correct.settings.RepairSettings`).

Example:
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> [t.fqn for t in PruneSettings(skip_classifier=True).targets(model)]
    ['0']
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ..engine.sites.find import Selector
from .targets import Target, find_targets


@dataclass
class PruneSettings:
    """Which layers are pruned and how a global sparsity is shared.

    select, skip_first, skip_classifier, include_tied: see :func:`~prune_repair.prune.find_targets`.
    sparsity_config: layer FQN or ``re:`` pattern -> sparsity for the layers it names.
    prune_head: also prune a language model's output head (dense by default).
    floor: global thresholds keep every output row's best weight.
    """

    select: Selector = None
    skip_first: bool = False
    skip_classifier: bool = False
    include_tied: bool = False
    sparsity_config: dict[str, float] | None = None
    prune_head: bool = False
    floor: bool = True

    def prune_kwargs(self) -> dict[str, Any]:
        """The keywords of :func:`~prune_repair.prune.prune_` these settings stand for."""
        return {"select": self.select, "skip_first": self.skip_first, "skip_classifier": self.skip_classifier,
                "include_tied": self.include_tied, "sparsity_config": self.sparsity_config,
                "prune_head": self.prune_head, "floor": self.floor}

    def targets(self, model: nn.Module, example_inputs: Any = None, select: Selector = None) -> list[Target]:
        """The prunable layers of ``model`` (``select`` in place of the settings' own, e.g. the head left out)."""
        return find_targets(model, select=select if select is not None else self.select, skip_first=self.skip_first,
                            skip_classifier=self.skip_classifier, example_inputs=example_inputs,
                            include_tied=self.include_tied)
