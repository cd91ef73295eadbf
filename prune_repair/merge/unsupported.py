"""Fail fast, naming the layer, on models whose permutation groups cannot be traced yet.

Attention outside the transformers of :mod:`.attention_groups` is the case today:
``nn.MultiheadAttention`` in other models and layers whose weights a parent passes to
``F.linear`` (window attention of other layouts than torchvision's Swin v1). Heads must be
permuted as units, which the traced groups do not do; tracing swin_t for groups also ran
for minutes. One traced forward pass (about the cost of one forward) finds them.

Example:
    >>> import torch
    >>> from torch import nn
    >>> check_traceable(nn.Sequential(nn.Linear(4, 4)), torch.randn(2, 4))
    >>> mha = nn.Sequential(nn.Linear(4, 4))
    >>> mha.append(nn.TransformerEncoderLayer(4, 2, 8, batch_first=True))
    Sequential(...)
    >>> check_traceable(mha, torch.randn(2, 3, 4))
    Traceback (most recent call last):
    ...
    prune_repair.merge.groups.GroupError: layer '1.self_attn' (MultiheadAttention) is attention: ...
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..engine.run.forward import ForwardFn
from ..engine.sites.trace import FunctionCall, trace_calls
from .attention_groups import SUPPORTED
from .groups import HAND_HELP, GroupError


def check_traceable(model: nn.Module, batch: Any, forward_fn: ForwardFn | None = None) -> None:
    """Raise :class:`GroupError` naming the first attention layer of ``model`` that runs on ``batch``.

    A model that does not run is left to the group tracing, which names the layer that failed."""
    try:
        calls = trace_calls(model, batch, forward_fn=forward_fn)
    except Exception:
        return
    for fqn, module, _, _ in calls:
        if isinstance(module, nn.MultiheadAttention):
            where = f"layer '{fqn}' (MultiheadAttention)"
        elif isinstance(module, FunctionCall):
            parent = fqn.rpartition(".")[0]
            kind = type(model.get_submodule(parent)).__name__ if parent else type(model).__name__
            where = f"layer '{parent}' ({kind}), which runs '{fqn}' through F.linear,"
        else:
            continue
        raise GroupError(f"{where} is attention: head-aware permutation groups are built for {SUPPORTED} "
                         f"only, not for {type(model).__name__}; align='none', or {HAND_HELP}")
