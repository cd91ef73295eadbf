"""Which weights are prunable: the weights of conv, linear and attention layers.

A *target* is one layer whose weight may get zeros: a conv/linear layer, an HF ``Conv1D``
(GPT-2), or the packed ``in_proj_weight`` of an ``nn.MultiheadAttention`` (its ``out_proj``
is a linear layer of its own). By default every such layer is a target; ``skip_first`` /
``skip_classifier`` drop the first and last layer that RAN (found with one traced forward
pass when example inputs are given, else in registration order: a head that never runs
in eval, like googlenet's auxiliary classifiers, is not the classifier), and ``select``
keeps only layers chosen by ``filter_fn(module, fqn)`` or FQN / ``re:`` patterns.

A weight shared with another module (GPT-2's ``lm_head.weight`` IS the token embedding)
is skipped with a warning: pruning it would prune the embedding. ``include_tied=True``
prunes it anyway.

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

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..engine.checks import masked_weight, parameter_holders, stored_weight
from ..engine.producers import is_packed_attention, is_producer
from ..engine.sites.find import Selector, make_filter
from ..engine.sites.trace import executed_producers, trace_calls


class PruneError(ValueError):
    """A pruning request that cannot be carried out; the message says what to change."""


@dataclass(frozen=True)
class Target:
    """One prunable layer: ``fqn`` names the module, ``name`` its weight parameter
    (``"in_proj_weight"`` for attention), ``numel`` counts its weights."""

    fqn: str
    module: nn.Module
    numel: int
    name: str = "weight"

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight (masked when torch.nn.utils.prune reparametrized the layer)."""
        return masked_weight(self.module, self.name)

    @property
    def stored(self) -> nn.Parameter:
        """The parameter that holds the values: ``weight_orig`` under torch prune, else ``weight``."""
        return stored_weight(self.module, self.name)

    @property
    def stored_name(self) -> str:
        """FQN of :attr:`stored` in ``model.named_parameters()``."""
        leaf = self.name + "_orig" if hasattr(self.module, self.name + "_orig") else self.name
        return f"{self.fqn}.{leaf}" if self.fqn else leaf


def find_targets(
    model: nn.Module,
    *,
    select: Selector = None,
    skip_first: bool = False,
    skip_classifier: bool = False,
    example_inputs: Any = None,
    include_tied: bool = False,
) -> list[Target]:
    """Prunable layers of ``model`` in execution order (registration order without inputs).

    Args:
        model: any module.
        select: ``filter_fn(module, fqn) -> bool`` or FQN strings / ``re:`` patterns.
        skip_first: leave the first conv/linear layer that runs dense.
        skip_classifier: leave the classifier dense: the last conv/linear layer that runs.
        example_inputs: one batch; when given, "first" and "last" follow execution order.
        include_tied: also prune weights shared with other modules (tied embeddings).

    Raises:
        PruneError: when no layer is left to prune.

    >>> emb, head = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
    >>> head.weight = emb.weight                       # tied, as GPT-2's lm_head
    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as w:
    ...     warnings.simplefilter("always")
    ...     names = [t.fqn for t in find_targets(nn.ModuleDict({"emb": emb, "head": head, "fc": nn.Linear(4, 4)}))]
    >>> names, "tied" in str(w[0].message)
    (['fc'], True)
    """
    layers = [(fqn, m, "in_proj_weight" if is_packed_attention(m) else "weight") for fqn, m in model.named_modules()
              if is_producer(m) or is_packed_attention(m)]
    unpacked = [fqn for fqn, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)
                and not is_packed_attention(m)]
    if unpacked:
        warnings.warn(f"{len(unpacked)} nn.MultiheadAttention layer(s) keep separate q/k/v weights (kdim or vdim "
                      f"differ from embed_dim) and are neither pruned nor refitted there, only their out_proj: "
                      f"{', '.join(unpacked[:3])}", stacklevel=2)
    ran: list[str] = [fqn for fqn, *_ in layers]
    if example_inputs is not None and layers:
        order = {fqn: i for i, fqn in enumerate(executed_producers(trace_calls(model, example_inputs)))}
        layers.sort(key=lambda item: order.get(item[0], len(order)))
        ran = [fqn for fqn, *_ in layers if fqn in order]
    dropped = set(ran[:1] if skip_first else []) | set(ran[-1:] if skip_classifier else [])
    layers = [item for item in layers if item[0] not in dropped]
    filter_fn = make_filter(select)
    if filter_fn is not None:
        layers = [item for item in layers if filter_fn(item[1], item[0])]
    if not include_tied:
        layers = _drop_tied(model, layers)
    targets = [Target(fqn, m, _weight_numel(m, name), name) for fqn, m, name in layers if _weight_numel(m, name) > 0]
    if not targets:
        what = "after skip_first/skip_classifier/select " if (skip_first or skip_classifier or select) else ""
        raise PruneError(
            f"the model has no prunable layer {what}(pruning needs conv, linear or attention weights): "
            "check the model and the layer selection"
        )
    return targets


def _drop_tied(model: nn.Module, layers: list[tuple[str, nn.Module, str]]) -> list[tuple[str, nn.Module, str]]:
    """``layers`` without those whose weight parameter another module also holds, with a warning."""
    owners = parameter_holders(model)
    kept, tied = [], []
    for fqn, module, name in layers:
        stored = getattr(module, name + "_orig", None)
        stored = getattr(module, name, None) if stored is None else stored
        holders = owners.get(id(stored), [])
        if len(holders) > 1:
            tied.append(f"{' = '.join(holders)}")
        else:
            kept.append((fqn, module, name))
    if tied:
        warnings.warn(f"not pruning {len(tied)} tied weight(s) shared between modules ({'; '.join(tied)}): pruning "
                      "them would also prune the other module (e.g. the token embedding); pass include_tied=True "
                      "to prune them anyway", stacklevel=3)
    return kept


def _weight_numel(module: nn.Module, name: str = "weight") -> int:
    weight = getattr(module, name + "_orig", None)
    weight = getattr(module, name, None) if weight is None else weight
    return int(weight.numel()) if isinstance(weight, torch.Tensor) else 0


def effective_weights(targets: list[Target]) -> dict[str, torch.Tensor]:
    """Detached effective weights keyed by FQN (masked under torch prune)."""
    with torch.no_grad():
        return {t.fqn: t.weight.detach() for t in targets}
