"""Layers whose output channels a per-channel affine folds into, and where those channels live.

Three shapes of "producer" beyond ``nn.Conv*d`` / ``nn.Linear``:

- HF GPT-2 style ``Conv1D`` (found by duck typing, no transformers import): a transposed
  linear, weight ``[in, out]``, ``y = x @ W + b``; its output channels are weight COLUMNS;
- ``nn.MultiheadAttention`` with a packed ``in_proj_weight``: three sites
  ``<fqn>.in_proj:q``, ``:k`` and ``:v``, each a block of rows of ``in_proj_weight`` and
  ``in_proj_bias``; its ``out_proj`` is a plain linear called inside the attention function;
- ``nn.Linear`` layers whose weight is used through ``F.linear`` by a parent (swin_t).

Example:
    >>> import torch
    >>> from torch import nn
    >>> mha = nn.MultiheadAttention(4, 2)
    >>> w, b = output_rows(mha, "k")
    >>> w.shape, b.shape, split_part("blocks.0.attn.in_proj:v")
    (torch.Size([4, 4]), torch.Size([4]), ('blocks.0.attn', 'v'))
"""

from __future__ import annotations

import torch
from torch import nn

CONV_LINEAR = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
PARTS = ("q", "k", "v")
"""The three blocks of rows of a packed attention in-projection, in storage order."""


def is_conv1d(module: object) -> bool:
    """HF ``Conv1D`` (GPT-2): class name ``Conv1D``, an ``nf`` attribute and a 2-D weight ``[in, nf]``.

    >>> is_conv1d(nn.Conv1d(2, 2, 1))
    False
    """
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and hasattr(module, "nf") and isinstance(weight, torch.Tensor)
            and weight.dim() == 2)


def is_producer(module: object) -> bool:
    """A conv/linear/Conv1D layer: one output channel per weight row (column for Conv1D)."""
    return isinstance(module, CONV_LINEAR) or is_conv1d(module)


def is_packed_attention(module: object) -> bool:
    """``nn.MultiheadAttention`` with one packed ``in_proj_weight`` (q, k, v of the same width)."""
    return isinstance(module, nn.MultiheadAttention) and _param(module, "in_proj_weight") is not None


def split_part(fqn: str) -> tuple[str, str | None]:
    """``'a.in_proj:q'`` -> ``('a', 'q')``; any other FQN -> ``(fqn, None)``."""
    head, sep, part = fqn.rpartition(".in_proj:")
    if sep and part in PARTS:
        return head, part
    if fqn.startswith("in_proj:") and fqn[8:] in PARTS:
        return "", fqn[8:]
    return fqn, None


def part_fqn(module_fqn: str, part: str) -> str:
    """The site FQN of one projection of an attention module."""
    return f"{module_fqn}.in_proj:{part}" if module_fqn else f"in_proj:{part}"


def _param(module: nn.Module, name: str) -> torch.Tensor | None:
    """The stored tensor of parameter ``name`` (``name_orig`` under torch.nn.utils.prune)."""
    orig = getattr(module, name + "_orig", None)
    return orig if orig is not None else getattr(module, name, None)


def out_channels(module: nn.Module, part: str | None = None) -> int:
    """Output channels of a producer (one projection of an attention module when ``part``)."""
    if part is not None or isinstance(module, nn.MultiheadAttention):
        return int(module.embed_dim)
    if is_conv1d(module):
        return int(module.nf)
    if isinstance(module, nn.Linear):
        return module.out_features
    return module.out_channels


def output_rows(owner: nn.Module, part: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Views ``(weight, bias)`` of a producer with output channels on dim 0 of the weight.

    Writing into them writes the stored parameters: the transpose of a ``Conv1D`` weight,
    the q/k/v block of an attention in-projection, ``weight_orig`` under torch prune.
    """
    if part is not None:
        e = int(owner.embed_dim)
        i = PARTS.index(part)
        weight, bias = _param(owner, "in_proj_weight"), _param(owner, "in_proj_bias")
        return weight[i * e:(i + 1) * e], (None if bias is None else bias[i * e:(i + 1) * e])
    weight = _param(owner, "weight")
    bias = getattr(owner, "bias", None)
    if is_conv1d(owner):
        return weight.t(), bias
    return weight, bias


def site_owner(model: nn.Module, fqn: "str | object") -> tuple[nn.Module, str | None]:
    """The module named by a site FQN (or a :class:`~prune_repair.engine.sites.find.Site`'s ``fqn``)
    and the projection it names: ``'a.in_proj:q'`` -> ``(model.a, 'q')``.

    Raises ``AttributeError`` when the model has no such module.
    """
    name, part = split_part(fqn if isinstance(fqn, str) else fqn.fqn)
    return model.get_submodule(name), part
