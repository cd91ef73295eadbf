"""A conv/linear layer's weights as rows of its Gram problem: read them, write solved rows back.

Reconstruction (:mod:`~prune_repair.engine.refit.reconstruct`) and OBS pruning
(:mod:`~prune_repair.prune.obs`) solve per output row over the layer's unfolded inputs
(:mod:`~prune_repair.engine.refit.gram`); these helpers move between that row view and the module:
the effective weights with their keep-mask, where the intercept lives (bias, the running mean
of a following BatchNorm, or nowhere), and the in-place write that keeps pruned zeros zero.

Example:
    >>> import torch
    >>> from torch import nn
    >>> conv = nn.Conv2d(2, 4, 3, bias=False)
    >>> intercept_kind(conv, nn.BatchNorm2d(4)), intercept_kind(nn.Linear(3, 2), None)
    ('batchnorm', 'bias')
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..checks import stored_weight
from .gram import Gram, row_view, rows_to_weight


def check_gram(gram: Gram) -> None:
    """``ValueError`` naming the layer when its statistics hold NaN/Inf."""
    if not gram.is_finite():
        raise ValueError(f"the inputs or targets of layer '{gram.name}' hold NaN/Inf on the calibration data: "
                         "check the data and the upstream layers")


def intercept_kind(module: nn.Module, bn: _BatchNorm | None) -> str:
    """Where a layer's intercept goes: ``bias``, ``batchnorm``, ``absorbed`` or ``none``."""
    if module.bias is not None:
        return "bias"
    if bn is not None:
        return "batchnorm" if bn.running_mean is not None else "absorbed"
    return "none"


def current_rows(module: nn.Module, gram: Gram, intercept: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's effective weights as ``(groups, out/groups, d_in [+1 bias])`` float64, and its
    keep-mask ``(groups, out/groups, d_in)`` (``weight_mask`` under torch prune, else the nonzeros)."""
    g, d, out = gram.groups, gram.d_in, gram.out
    reparam, stored = hasattr(module, "weight_orig"), stored_weight(module)
    keep = (module.weight_mask != 0) if reparam else (stored != 0)
    mask = row_view(module, keep).reshape(g, out // g, d)
    current = (row_view(module, stored.detach()).reshape(g, out // g, d) * mask).to(torch.float64)
    if intercept:
        b = module.bias.detach().to(torch.float64) if module.bias is not None else current.new_zeros(out)
        current = torch.cat([current, b.reshape(g, out // g, 1)], 2)
    return current, mask


def write_rows_(module: nn.Module, bn: _BatchNorm | None, intercept: str, rows: torch.Tensor) -> None:
    """Write solved rows (``(groups, out/groups, d_in [+1])``, bias last) into the layer, in place:
    ``weight_orig`` only where ``weight_mask`` keeps under torch prune; the intercept into the bias,
    or subtracted from the running_mean of the BatchNorm that follows."""
    reparam, stored = hasattr(module, "weight_orig"), stored_weight(module)
    d = row_view(module, stored).shape[1]
    with torch.no_grad():
        new_w = rows_to_weight(module, rows[..., :d].reshape(-1, d), stored).to(stored.dtype)
        stored.copy_(torch.where(module.weight_mask != 0, new_w, stored) if reparam else new_w)
        if intercept in ("bias", "batchnorm"):
            shift = rows[..., d].reshape(-1)
            if intercept == "bias":
                module.bias.copy_(shift.to(module.bias.dtype))
            else:
                bn.running_mean.sub_(shift.to(bn.running_mean.dtype))
