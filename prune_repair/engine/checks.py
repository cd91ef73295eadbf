"""Checks on tensors and models shared by the engine and the front ends.

Example:
    >>> import torch
    >>> is_finite(torch.tensor([1.0, 2.0])), is_finite(torch.tensor([1.0, float("nan")]))
    (True, False)
"""

from __future__ import annotations

import torch
from torch import nn


def is_finite(t: torch.Tensor) -> bool:
    """Whether every value of a floating tensor is finite (integer tensors always are).

    A sum is finite only if every value is (NaN and Inf propagate), so a finite sum in the
    tensor's own dtype settles it with no temporary; a sum that overflowed is checked value by value.
    """
    if not t.is_floating_point() or t.numel() == 0 or bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def check_finite(model: nn.Module, what: str = "the model", needs: str = "repair") -> None:
    """Raise ``ValueError`` naming every parameter/buffer that holds NaN or Inf (``what`` holds them;
    ``needs`` finite weights)."""
    bad = [f"{name} ({int((~torch.isfinite(t)).sum())} values)" for name, t in model.state_dict().items() if not is_finite(t)]
    if bad:
        raise ValueError(f"{what} holds NaN/Inf in {', '.join(bad)}: {needs} needs finite weights")


def stored_weight(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """The parameter that holds a layer's weight values: ``weight_orig`` when torch.nn.utils.prune
    masks are attached (corrections written there keep the mask applying), else ``weight``.

    >>> import torch.nn.utils.prune as tp
    >>> layer = tp.l1_unstructured(nn.Linear(4, 2), "weight", amount=0.5)
    >>> stored_weight(layer) is layer.weight_orig, stored_weight(nn.Linear(4, 2)).shape
    (True, torch.Size([2, 4]))
    """
    return getattr(module, name + "_orig") if hasattr(module, name + "_orig") else getattr(module, name)


def masked_weight(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """The weight a layer computes with: ``weight_orig * weight_mask`` under torch.nn.utils.prune."""
    if hasattr(module, name + "_orig"):
        return getattr(module, name + "_orig") * getattr(module, name + "_mask")
    return getattr(module, name)


def parameter_holders(model: nn.Module) -> dict[int, list[str]]:
    """``id(parameter)`` -> every ``module.name`` that holds it; more than one name means a tied
    weight (GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``).

    >>> a = nn.Linear(2, 2); b = nn.Linear(2, 2); b.weight = a.weight
    >>> sorted(parameter_holders(nn.Sequential(a, b))[id(a.weight)])
    ['0.weight', '1.weight']
    """
    owners: dict[int, list[str]] = {}
    for fqn, module in model.named_modules(remove_duplicate=False):
        for name, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), []).append(f"{fqn}.{name}" if fqn else name)
    return {key: sorted(set(names)) for key, names in owners.items()}
