"""The q/k/v of an ``nn.MultiheadAttention`` call, projected once and handed out on the way.

Whatever catches ``F.multi_head_attention_forward`` (the taps and the discovery do, through
the in-projection weight, :class:`~.watched.Watch`; a torch-function mode would too; either
turns off the fused fast path, which would bypass it) gets the call's arguments (:func:`bind`). For packed self-attention without masks or extra key/value rows
(ViT encoders: :func:`projects_once`), :func:`self_attention` computes the in-projection once,
hands q, k and v (each ``(L, N, E)``) to ``parts``, which measures them and returns the ones
to use (corrected, or as they are), and finishes the attention with them: scaled dot-product
attention per head, then the out-projection, as ``F.multi_head_attention_forward`` does.
Other calls keep their own path; :func:`recomputed` gives their q, k and v for measuring.

Example:
    >>> import torch
    >>> from torch import nn
    >>> mha = nn.MultiheadAttention(4, 2, batch_first=True).eval()
    >>> x = torch.randn(3, 5, 4)
    >>> class Once(torch.overrides.TorchFunctionMode):
    ...     def __torch_function__(self, func, types, args=(), kwargs=None):
    ...         call = bind(args, kwargs or {}) if func is F.multi_head_attention_forward else None
    ...         if call is not None and projects_once(call):
    ...             return self_attention(call, lambda q, k, v: (q, k, 2 * v))
    ...         return func(*args, **(kwargs or {}))
    >>> with torch.no_grad(), Once():
    ...     y = mha(x, x, x, need_weights=False)[0]
    >>> with torch.no_grad():
    ...     _ = mha.in_proj_weight[8:].mul_(2), mha.in_proj_bias[8:].mul_(2)  # v doubled in the weights
    ...     torch.allclose(y, mha(x, x, x, need_weights=False)[0], atol=1e-6)
    True
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

Parts = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], "tuple[torch.Tensor, torch.Tensor, torch.Tensor]"]
"""``parts(q, k, v) -> (q, k, v)`` to use: each ``(L, N, E)``, sequence first."""

_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


def bind(args: tuple, kwargs: dict) -> dict[str, Any]:
    """The arguments of an ``F.multi_head_attention_forward`` call by name, defaults filled in."""
    bound = _SIGNATURE.bind(*args, **kwargs)
    bound.apply_defaults()
    return bound.arguments


def projects_once(call: dict[str, Any]) -> bool:
    """Whether :func:`self_attention` runs this call: packed self-attention on a batch, no masks,
    no extra key/value rows, no attention weights asked for, no dropout."""
    q = call["query"]
    return (q is call["key"] and q is call["value"] and q.dim() == 3 and call["in_proj_weight"] is not None
            and not call["use_separate_proj_weight"] and call["bias_k"] is None and call["bias_v"] is None
            and not call["add_zero_attn"] and call["static_k"] is None and call["static_v"] is None
            and call["key_padding_mask"] is None and call["attn_mask"] is None and not call["is_causal"]
            and not call["need_weights"] and not (call["training"] and call["dropout_p"] > 0))


def self_attention(call: dict[str, Any], parts: Parts) -> tuple[torch.Tensor, None]:
    """``F.multi_head_attention_forward`` of a call :func:`projects_once` accepts, its q, k and v
    computed once and passed through ``parts``."""
    x = call["query"]
    length, batch, embed = x.shape
    heads = call["num_heads"]
    q, k, v = parts(*F.linear(x, call["in_proj_weight"], call["in_proj_bias"]).chunk(3, dim=-1))

    def split(t: torch.Tensor) -> torch.Tensor:  # (L, N, E) -> (N, H, L, E / H)
        return t.reshape(length, batch * heads, embed // heads).transpose(0, 1).reshape(batch, heads, length, -1)

    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    out = out.permute(2, 0, 1, 3).reshape(length * batch, embed)
    return F.linear(out, call["out_proj_weight"], call["out_proj_bias"]).view(length, batch, -1), None


def recomputed(call: dict[str, Any]) -> list[torch.Tensor]:
    """q, k and v of any call with a packed in-projection, recomputed from its inputs
    (``x @ W_rows^T + b_rows``; sequence first, as the call has them)."""
    weight, bias = call["in_proj_weight"], call["in_proj_bias"]
    e = weight.shape[0] // 3
    return [F.linear(call[name], weight[i * e:(i + 1) * e], None if bias is None else bias[i * e:(i + 1) * e])
            for i, name in enumerate(("query", "key", "value"))]
