"""From scores to masks, masks onto a model, and sparsity accounting.

Scores are keyed by layer FQN; the lowest scores are pruned. :func:`masks_from_scores`
prunes exactly ``round(sparsity * n)`` weights (over all layers for ``global``, in
each layer for ``layer``), breaking ties by position: layer order first, then the
flat index inside a layer, so the result is deterministic. The threshold is found by
selection on chunks (:mod:`~prune_repair.prune.select`), not by sorting a copy. :func:`apply_masks_`
writes the masks as plain zeros or through ``torch.nn.utils.prune`` (keeping
``weight_orig`` / ``weight_mask``). Sparsity is zeros / prunable weights.

Example:
    >>> import torch
    >>> scores = {"a": torch.tensor([3.0, 1.0, 2.0]), "b": torch.tensor([1.0])}
    >>> {k: v.tolist() for k, v in masks_from_scores(scores, 0.5).items()}
    {'a': [True, False, True], 'b': [False]}
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

import torch
import torch.nn.utils.prune as torch_prune
from torch import nn

from .select import keep_masks
from .targets import PruneError, Target


class MaskStyle(str, Enum):
    """How masks are written into a model."""

    ZEROS = "zeros"  # multiply the weights by the mask: a plain model
    TORCH = "torch"  # torch.nn.utils.prune.custom_from_mask: weight_orig + weight_mask

    def __str__(self) -> str:
        return self.value


def check_sparsity(sparsity: float) -> float:
    """``sparsity`` as a float in [0, 1), else :class:`PruneError`.

    >>> check_sparsity(0.9)
    0.9
    """
    try:
        value = float(sparsity)
    except (TypeError, ValueError):
        raise PruneError(f"sparsity must be a number in [0, 1), got {sparsity!r}") from None
    if not (0.0 <= value < 1.0):  # also rejects NaN
        raise PruneError(f"sparsity must be in [0, 1), got {sparsity}: e.g. 0.9 prunes 90% of the weights")
    return value


def masks_from_scores(scores: dict[str, torch.Tensor], sparsity: float, scope: str = "global",
                      transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Boolean keep-masks pruning the ``round(sparsity * n)`` lowest scores.

    ``scope="global"`` ranks all weights together; ``scope="layer"`` prunes the same
    fraction of every layer. Ties go to the earlier position (see module doc).
    ``transform`` is applied to ``scores`` chunk by chunk (``torch.abs``: magnitude pruning
    straight from the weights, without a score copy of them).
    """
    sparsity = check_sparsity(sparsity)
    for fqn, s in scores.items():
        if not bool(torch.isfinite(s).all()):
            raise PruneError(f"the scores of layer '{fqn}' hold NaN/Inf: check the model weights and the data")
    if scope == "global":
        total = sum(s.numel() for s in scores.values())
        return dict(zip(scores, keep_masks(list(scores.values()), round(sparsity * total), transform)))
    if scope == "layer":
        return {fqn: keep_masks([s], round(sparsity * s.numel()), transform)[0] for fqn, s in scores.items()}
    raise PruneError(f"unknown pruning scope {scope!r}: use 'global' or 'layer'")


def apply_masks_(targets: list[Target], masks: dict[str, torch.Tensor], style: MaskStyle | str = MaskStyle.ZEROS) -> None:
    """Write ``masks`` (True = keep) into the target layers, in place.

    ``zeros`` multiplies the stored weights; ``torch`` goes through
    ``torch.nn.utils.prune.custom_from_mask`` (combined with any mask already there).
    """
    style = MaskStyle(style)
    for target in targets:
        mask = masks.get(target.fqn)
        if mask is None:
            continue
        if tuple(mask.shape) != tuple(target.stored.shape):
            raise PruneError(
                f"the mask of layer '{target.fqn}' has shape {list(mask.shape)} but its weight has "
                f"{list(target.stored.shape)}: masks must come from the same architecture"
            )
        mask = mask.to(device=target.stored.device, dtype=torch.bool)
        with torch.no_grad():
            if style is MaskStyle.TORCH:
                torch_prune.custom_from_mask(target.module, target.name, mask)
            else:
                target.stored.masked_fill_(~mask, 0)  # a 1-byte temporary, not a float copy
            if hasattr(target.module, target.name + "_orig"):
                # the cached masked weight, current and a graph leaf (so the model can be deep-copied);
                # torch's pre-forward hook recomputes it on every forward anyway
                setattr(target.module, target.name, target.weight)


def remove_reparametrization_(model: nn.Module) -> int:
    """``torch.nn.utils.prune.remove`` on every pruned weight: plain zeros remain. Returns the count."""
    count = 0
    for module in model.modules():
        for name in [n[: -len("_orig")] for n, _ in module.named_parameters(recurse=False) if n.endswith("_orig")]:
            torch_prune.remove(module, name)
            count += 1
    return count


@dataclass
class Sparsity:
    """Zeros / prunable weights, overall and per layer."""

    zeros: int
    total: int
    per_layer: dict[str, float] = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        return self.zeros / self.total if self.total else math.nan


def measure_sparsity(targets: list[Target]) -> Sparsity:
    """Count the zeros of the effective weights of ``targets``.

    >>> from torch import nn
    >>> from .targets import find_targets
    >>> layer = nn.Linear(2, 2)
    >>> with torch.no_grad():
    ...     _ = layer.weight.copy_(torch.tensor([[0.0, 1.0], [2.0, 0.0]]))
    >>> measure_sparsity(find_targets(layer)).fraction
    0.5
    """
    zeros, total, per_layer = 0, 0, {}
    with torch.no_grad():
        for target in targets:
            z = int((target.weight == 0).sum())
            zeros, total = zeros + z, total + target.numel
            per_layer[target.fqn] = z / target.numel
    return Sparsity(zeros, total, per_layer)


def sparsity_all_params(model: nn.Module) -> float:
    """Zeros / ALL parameters of ``model`` (embeddings, norms, biases included), counting
    the effective (masked) weights of torch.nn.utils.prune layers and each shared tensor once.

    >>> model = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
    >>> with torch.no_grad():
    ...     _ = model[0].weight.zero_()
    >>> sparsity_all_params(model)   # 4 weight zeros + the LayerNorm's 2 zero biases, of 10
    0.6
    """
    zeros = total = 0
    seen: set[int] = set()
    with torch.no_grad():
        for module in model.modules():
            for name, param in module.named_parameters(recurse=False):
                if id(param) in seen:
                    continue
                seen.add(id(param))
                mask = getattr(module, name[: -len("_orig")] + "_mask", None) if name.endswith("_orig") else None
                value = param if mask is None else param * mask
                zeros, total = zeros + int((value == 0).sum()), total + value.numel()
    return zeros / total if total else math.nan
