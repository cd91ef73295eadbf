"""Folding per-channel affine corrections into weights; fusing BatchNorm into convs.

"Fold" puts a correction into the weights of the original architecture (the checkpoint
keeps its keys); "fuse" keeps torch's meaning, conv + BatchNorm -> one conv. Two levels,
like ``torch.nn.utils.fusion``: pure tensor functions (:func:`fold_affine`,
:func:`fold_affine_into_bn`, :func:`fuse_bn`) and module-level wrappers
(:func:`fold_correction_`, :func:`fold_corrections_`, :func:`fold_corrections`,
:func:`fuse_batchnorm`). Folding scales weight rows, so zeros stay zeros and sparsity is
preserved exactly.

Example:
    >>> import torch
    >>> w, b = torch.ones(2, 3), torch.zeros(2)
    >>> fold_affine(w, b, torch.tensor([2.0, 0.5]), torch.tensor([1.0, 0.0]))
    (tensor([[2.0000, 2.0000, 2.0000],
            [0.5000, 0.5000, 0.5000]]), tensor([1., 0.]))
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..checks import stored_weight
from ..producers import output_rows, site_owner
from .find import Site, find_sites


@dataclass
class Correction:
    """Per-channel affine ``y -> scale * y + shift`` for one site (float64)."""

    scale: torch.Tensor
    shift: torch.Tensor


def fold_affine(
    weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor, shift: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``scale * (W x + b) + shift`` as one layer: ``W' = scale[:, None] * W``,
    ``b' = scale * b + shift``. Output channels are dim 0 of ``weight``.

    With ``bias=None`` the new bias is ``shift`` (``None`` when there is no shift).
    Computed in float64, returned in the weight's dtype.
    """
    view = (-1,) + (1,) * (weight.dim() - 1)
    s = scale.to(torch.float64)
    new_w = (weight.to(torch.float64) * s.view(view)).to(weight.dtype)
    if bias is None:
        new_b = None if shift is None else shift.to(torch.float64)
    else:
        new_b = bias.to(torch.float64) * s + (0 if shift is None else shift.to(torch.float64))
    dtype = bias.dtype if bias is not None else weight.dtype
    return new_w, (None if new_b is None else new_b.to(dtype))


def fold_affine_into_bn(
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
    scale: torch.Tensor,
    shift: torch.Tensor,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """``scale * BN(x) + shift`` as one eval-mode BatchNorm.

    Returns ``(weight, bias, running_mean, running_var)``. An affine BN takes the
    correction in its weight and bias; a BN without affine parameters takes it in
    its running statistics, which needs ``scale > 0``.
    """
    s, t = scale.to(torch.float64), shift.to(torch.float64)
    if weight is not None and bias is not None:
        new_w = (weight.to(torch.float64) * s).to(weight.dtype)
        new_b = (bias.to(torch.float64) * s + t).to(bias.dtype)
        return new_w, new_b, running_mean, running_var
    if (s <= 0).any():
        raise ValueError("a BatchNorm without affine parameters can only take positive scales")
    sigma = (running_var.to(torch.float64) + eps).sqrt()
    new_mean = running_mean.to(torch.float64) - t * sigma / s
    new_var = (sigma / s).square() - eps
    return weight, bias, new_mean.to(running_mean.dtype), new_var.to(running_var.dtype)


def fuse_bn(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    bn_mean: torch.Tensor,
    bn_var: torch.Tensor,
    bn_eps: float,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Conv/linear followed by eval-mode BN as one layer:
    ``W' = W * g / sqrt(var + eps)``, ``b' = beta + g / sqrt(var + eps) * (b - mean)``."""
    inv = (bn_var.to(torch.float64) + bn_eps).rsqrt()
    g = inv if bn_weight is None else bn_weight.to(torch.float64) * inv
    beta = torch.zeros_like(g) if bn_bias is None else bn_bias.to(torch.float64)
    b = torch.zeros_like(g) if bias is None else bias.to(torch.float64)
    new_w, _ = fold_affine(weight, None, g, None)
    return new_w, (beta + g * (b - bn_mean.to(torch.float64))).to(weight.dtype)


def can_shift(model: nn.Module, site: Site) -> bool:
    """Whether the architecture can hold a per-channel shift at ``site``."""
    return holds_shift(*site_owner(model, site))


def holds_shift(module: nn.Module, part: str | None = None) -> bool:
    """Whether a site's module (``part``: the projection of an attention module) can hold a shift."""
    if isinstance(module, _BatchNorm):
        return True
    if part is not None:
        return module.in_proj_bias is not None
    return getattr(module, "bias", None) is not None


def fold_correction_(model: nn.Module, site: Site, correction: Correction) -> None:
    """Fold one site's correction into the model, in place: into the weight rows and bias of
    a conv/linear layer, the weight COLUMNS of an HF ``Conv1D``, the q/k/v rows of an
    attention in-projection, or the affine (else running statistics) of a BatchNorm.

    The shift is folded only where the architecture holds one (see :func:`can_shift`);
    callers decide beforehand and pass a zero shift otherwise.
    """
    module, part = site_owner(model, site)
    with torch.no_grad():
        if isinstance(module, _BatchNorm):
            w, b, rm, rv = fold_affine_into_bn(
                module.weight, module.bias, module.running_mean, module.running_var, module.eps,
                correction.scale, correction.shift,
            )
            for name, value in (("weight", w), ("bias", b), ("running_mean", rm), ("running_var", rv)):
                target = getattr(module, name)
                if target is not None and value is not target:
                    target.copy_(value)
            return
        weight, bias = output_rows(module, part)  # views: rows of W (columns of a Conv1D), q/k/v blocks
        if bias is None and bool((correction.shift != 0).any()):
            raise ValueError(f"layer '{site.fqn}' has no bias to hold a shift: apply the scale only")
        scale_rows_(weight, correction.scale)
        if bias is not None:  # b' = s b + t in float64, as fold_affine (copy_ rounds once to the bias dtype)
            s, t = (c.to(device=bias.device, dtype=torch.float64) for c in (correction.scale, correction.shift))
            bias.copy_(bias.to(torch.float64).mul_(s).add_(t))


FOLD_CHUNK = 1 << 18
"""Weight elements scaled per float64 temporary by :func:`scale_rows_` (a cache-sized buffer)."""


def scale_rows_(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``weight[i] *= scale[i]`` in place, each product in float64 rounded once to the weight's dtype
    (the values :func:`fold_affine` gives).

    Where that product is the weight dtype's own (float64 weights; float32 weights with scales that
    float32 holds exactly, as :func:`~prune_repair.engine.correct.repair.repair_` decides them for
    float32 activations: two 24-bit significands multiply exactly in float64), the weight is
    multiplied in place, one read and one write (convnext_tiny's 28M weights: about 5 ms instead
    of 17-25 ms, 1 thread); otherwise through one float64 buffer of a few rows at a time instead
    of a float64 copy of the whole weight.

    >>> w = torch.ones(3, 2)
    >>> scale_rows_(w, torch.tensor([1.0, 2.0, 1 / 3], dtype=torch.float64))[2]
    tensor([0.3333, 0.3333])
    """
    s = scale.to(device=weight.device, dtype=torch.float64)
    if weight.dtype == torch.float64 or (weight.dtype == torch.float32 and _float32_exact(s)):
        return weight.mul_(s.to(weight.dtype).view((-1,) + (1,) * (weight.dim() - 1)))
    if weight.dim() == 2 or weight.is_contiguous():
        rows = weight if weight.dim() == 2 else weight.view(weight.shape[0], -1)  # strided rows are fine
    else:  # e.g. a channels-last conv weight: one float64 product of the whole weight
        view = (-1,) + (1,) * (weight.dim() - 1)
        return weight.copy_((weight.to(torch.float64) * s.view(view)).to(weight.dtype))
    per_row = max(rows.shape[1], 1)
    step = max(1, FOLD_CHUNK // per_row)
    buffer = torch.empty(min(step, rows.shape[0]) * per_row, dtype=torch.float64, device=weight.device)
    for start in range(0, rows.shape[0], step):
        block = rows[start:start + step]
        work = buffer[:block.numel()].view(block.shape).copy_(block)
        block.copy_(work.mul_(s[start:start + step, None]))
    return weight


def _float32_exact(values: torch.Tensor) -> bool:
    """Whether float32 holds every value exactly (NaN never compares equal: False)."""
    return torch.equal(values.to(torch.float32).to(torch.float64), values)


def fold_corrections_(model: nn.Module, corrections: dict[str, Correction], sites: list[Site]) -> nn.Module:
    """Fold every correction into ``model`` in place and return it."""
    by_fqn = {s.fqn: s for s in sites}
    for fqn, correction in corrections.items():
        fold_correction_(model, by_fqn[fqn], correction)
    return model


def fold_corrections(model: nn.Module, corrections: dict[str, Correction], sites: list[Site]) -> nn.Module:
    """Like :func:`fold_corrections_` but returns a corrected copy; ``model`` is left unchanged."""
    return fold_corrections_(copy.deepcopy(model), corrections, sites)


def fuse_batchnorm(model: nn.Module, example_inputs: Any, forward_fn=None) -> nn.Module:
    """A copy of ``model`` with every BatchNorm that directly follows a conv/linear
    folded into it and replaced by ``nn.Identity`` (state_dict keys change).

    >>> m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)).eval()
    >>> fused = fuse_batchnorm(m, torch.randn(2, 1, 5, 5))
    >>> type(fused[1]).__name__
    'Identity'
    """
    fused = copy.deepcopy(model)
    for site in find_sites(fused, example_inputs, include_classifier=True, forward_fn=forward_fn):
        if site.norm is None or not isinstance(fused.get_submodule(site.norm), _BatchNorm):
            continue
        layer, bn = fused.get_submodule(site.producer), fused.get_submodule(site.norm)
        if bn.running_mean is None:  # batch statistics at eval time: nothing fixed to fuse
            warnings.warn(f"BatchNorm '{site.norm}' keeps no running statistics, so it is left in place")
            continue
        w, b = fuse_bn(stored_weight(layer), layer.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
        with torch.no_grad():
            stored_weight(layer).copy_(w)
            if layer.bias is None:
                layer.bias = nn.Parameter(b)
            else:
                layer.bias.copy_(b)
        parent_name, _, child = site.norm.rpartition(".")
        setattr(fused.get_submodule(parent_name) if parent_name else fused, child, nn.Identity())
    return fused
