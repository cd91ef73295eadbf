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

    A float64 sum is finite iff every value is, and costs no temporary mask.
    """
    return not t.is_floating_point() or t.numel() == 0 or bool(torch.isfinite(t.sum(dtype=torch.float64)))


def check_finite(model: nn.Module) -> None:
    """Raise ``ValueError`` naming every parameter/buffer that holds NaN or Inf."""
    bad = [f"{name} ({int((~torch.isfinite(t)).sum())} values)" for name, t in model.state_dict().items() if not is_finite(t)]
    if bad:
        raise ValueError(f"the model holds NaN/Inf in {', '.join(bad)}: repair needs finite weights")


def out_channels(module: nn.Module) -> int:
    """Output channels of a conv/linear layer (rows of its weight; columns of an HF ``Conv1D``)."""
    from .producers import out_channels as producer_out_channels

    return producer_out_channels(module)


def stored_weight(module: nn.Module) -> torch.Tensor:
    """The parameter that holds a layer's weight values: ``weight_orig`` when torch.nn.utils.prune
    masks are attached (corrections written there keep the mask applying), else ``weight``."""
    return module.weight_orig if hasattr(module, "weight_orig") else module.weight
