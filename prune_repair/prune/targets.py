"""Which weights are prunable: the weights of conv and linear layers.

A *target* is one conv/linear layer whose ``weight`` may get zeros. By default
every such layer is a target; ``skip_first`` / ``skip_classifier`` drop the first
and last layer in execution order (found with one traced forward pass when
example inputs are given, else in registration order), and ``select`` keeps only
layers chosen by ``filter_fn(module, fqn)`` or FQN / ``re:`` patterns.

Layers reparametrized by ``torch.nn.utils.prune`` count too: their score is taken
on the masked weight and their stored tensor is ``weight_orig``.

Example:
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> [t.fqn for t in find_targets(model)], [t.fqn for t in find_targets(model, skip_classifier=True)]
    (['0', '2'], ['0'])
    >>> find_targets(model, select="re:^2$")[0].numel
    24
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..engine.sites import PRODUCER_TYPES, Selector, make_filter, trace_calls


class PruneError(ValueError):
    """A pruning request that cannot be carried out; the message says what to change."""


@dataclass(frozen=True)
class Target:
    """One prunable layer: ``fqn`` names a conv/linear module, ``numel`` counts its weights."""

    fqn: str
    module: nn.Module
    numel: int

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight (masked when torch.nn.utils.prune reparametrized the layer)."""
        if hasattr(self.module, "weight_orig"):
            return self.module.weight_orig * self.module.weight_mask
        return self.module.weight

    @property
    def stored(self) -> nn.Parameter:
        """The parameter that holds the values: ``weight_orig`` under torch prune, else ``weight``."""
        return self.module.weight_orig if hasattr(self.module, "weight_orig") else self.module.weight

    @property
    def stored_name(self) -> str:
        """FQN of :attr:`stored` in ``model.named_parameters()``."""
        leaf = "weight_orig" if hasattr(self.module, "weight_orig") else "weight"
        return f"{self.fqn}.{leaf}" if self.fqn else leaf


def find_targets(
    model: nn.Module,
    *,
    select: Selector = None,
    skip_first: bool = False,
    skip_classifier: bool = False,
    example_inputs: Any = None,
) -> list[Target]:
    """Prunable layers of ``model`` in execution order (registration order without inputs).

    Args:
        model: any module.
        select: ``filter_fn(module, fqn) -> bool`` or FQN strings / ``re:`` patterns.
        skip_first: leave the first conv/linear layer dense.
        skip_classifier: leave the last conv/linear layer (the classifier) dense.
        example_inputs: one batch; when given, "first" and "last" follow execution order.

    Raises:
        PruneError: when no layer is left to prune.
    """
    layers = [(fqn, m) for fqn, m in model.named_modules() if isinstance(m, PRODUCER_TYPES)]
    if example_inputs is not None and layers:
        order: dict[str, int] = {}
        for fqn, module, _, _ in trace_calls(model, example_inputs):
            if isinstance(module, PRODUCER_TYPES):
                order.setdefault(fqn, len(order))
        layers.sort(key=lambda item: order.get(item[0], len(order)))
    if skip_first and layers:
        layers = layers[1:]
    if skip_classifier and layers:
        layers = layers[:-1]
    filter_fn = make_filter(select)
    if filter_fn is not None:
        layers = [(fqn, m) for fqn, m in layers if filter_fn(m, fqn)]
    targets = [Target(fqn, m, _weight_numel(m)) for fqn, m in layers if _weight_numel(m) > 0]
    if not targets:
        what = "after skip_first/skip_classifier/select " if (skip_first or skip_classifier or select) else ""
        raise PruneError(
            f"the model has no prunable layer {what}(pruning needs conv or linear weights): "
            "check the model and the layer selection"
        )
    return targets


def _weight_numel(module: nn.Module) -> int:
    weight = module.weight_orig if hasattr(module, "weight_orig") else getattr(module, "weight", None)
    return int(weight.numel()) if isinstance(weight, torch.Tensor) else 0


def effective_weights(targets: list[Target]) -> dict[str, torch.Tensor]:
    """Detached effective weights keyed by FQN (masked under torch prune)."""
    with torch.no_grad():
        return {t.fqn: t.weight.detach() for t in targets}
