"""Wanda scores: ``|W_ij| * ||X_j||_2``, the weight times the norm of the input it multiplies.

Sun et al. 2023 ("A simple and effective pruning approach for large language models")
score each weight by its magnitude times the L2 norm of its input feature over all
calibration tokens, and compare the scores within each output row (``scope="row"`` in
:func:`~prune_repair.prune.allocate.build_masks`). The input norms come from one hooked
pass over the calibration data (:func:`input_norms`):

- linear layers and HF ``Conv1D``: the feature norm over samples and positions; padded
  tokens of a dict batch (its ``attention_mask``) are left out;
- conv layers: the norm of each column of the im2col patch matrix (``C_in/groups * kH *
  kW`` per output channel), over samples and output positions;
- ``nn.MultiheadAttention``'s packed ``in_proj_weight``: the q, k and v rows each use the
  norm of their own input (query, key, value); its ``out_proj``, whose weight the attention
  uses inside ``F.multi_head_attention_forward`` (or a fused kernel) without calling the
  module, reads the attention's context, recomputed from the same inputs with an identity
  output projection.

A layer whose inputs the pass never sees (its weight handed to ``F.linear`` by a parent)
is scored by magnitude alone, with a warning naming it.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from .targets import find_targets
    >>> layer = nn.Linear(2, 1, bias=False)
    >>> with torch.no_grad():
    ...     _ = layer.weight.copy_(torch.tensor([[1.0, -3.0]]))
    >>> x = torch.tensor([[4.0, 0.0], [3.0, 1.0]])          # column norms 5 and 1
    >>> wanda_scores(layer, find_targets(layer), x)[""].tolist()
    [[5.0, 3.0]]
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.producers import is_conv1d, is_packed_attention
from ..engine.refit.gram import conv_patches
from ..engine.run import distributed
from ..engine.run.forward import ForwardFn, as_batches, hooked_pass
from ..engine.sites.taps import batch_mask
from .targets import Target

PATCH_SAMPLES = 16
"""Samples unfolded at a time for a conv layer's patch norms."""


class _Norms:
    """Running sums of squared inputs per target (float64, on the inputs' device)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.mask: torch.Tensor | None = None

    def add(self, fqn: str, value: torch.Tensor) -> None:
        self.sums[fqn] = value if fqn not in self.sums else self.sums[fqn] + value

    def tokens(self, x: torch.Tensor, batch_first: bool = True) -> torch.Tensor:
        """``x`` (..., d) as rows of features, padded positions dropped when the mask fits."""
        mask = self.mask
        if mask is not None and x.dim() >= 3:
            lead = tuple(x.shape[:2]) if batch_first else tuple(x.shape[:2])[::-1]
            if lead == tuple(mask.shape):
                m = mask.to(x.device)
                x = x[m] if batch_first else x.transpose(0, 1)[m]
        return x.reshape(-1, x.shape[-1])

    def linear_hook(self, fqn: str):
        def hook(module, inputs):
            self.add(fqn, self.tokens(inputs[0].detach()).to(torch.float64).square().sum(0))
        return hook

    def conv_hook(self, fqn: str):
        def hook(module, inputs):
            x = inputs[0].detach()
            total = 0
            for part in x.split(PATCH_SAMPLES):
                total = total + conv_patches(module, part).square().sum(1)  # (groups, d_in)
            self.add(fqn, total)
        return hook

    def attention_hook(self, fqn: str | None, out_fqn: str | None):
        def hook(module, args, kwargs):
            names = ("query", "key", "value")
            parts = [args[i] if i < len(args) else kwargs.get(names[i]) for i in range(3)]
            first = module.batch_first
            if fqn is not None:
                self.add(fqn, torch.stack([self.tokens(p.detach(), first).to(torch.float64).square().sum(0)
                                           for p in parts]))
            if out_fqn is not None:
                extra = {k: v for k, v in kwargs.items() if k in CONTEXT_ARGS}
                extra.update({name: args[i] for i, name in ((3, "key_padding_mask"), (5, "attn_mask"),
                                                            (7, "is_causal")) if i < len(args)})
                context = attention_context(module, *parts, **extra)
                self.add(out_fqn, self.tokens(context, first).to(torch.float64).square().sum(0))
        return hook


CONTEXT_ARGS = ("key_padding_mask", "attn_mask", "is_causal")


def attention_context(mha: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      key_padding_mask: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                      is_causal: bool = False) -> torch.Tensor:
    """What ``mha.out_proj`` reads: the attention's output before its output projection.

    >>> mha = nn.MultiheadAttention(4, 2, batch_first=True).eval()
    >>> x = torch.randn(2, 3, 4)
    >>> torch.allclose(mha.out_proj(attention_context(mha, x, x, x)), mha(x, x, x)[0], atol=1e-6)
    True
    """
    q, k, v = query, key, value
    if mha.batch_first and q.dim() == 3:
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    e = mha.embed_dim
    eye = torch.eye(e, dtype=q.dtype, device=q.device)
    separate = not mha._qkv_same_embed_dim
    with torch.no_grad():
        out, _ = F.multi_head_attention_forward(
            q, k, v, e, mha.num_heads, mha.in_proj_weight, mha.in_proj_bias, mha.bias_k, mha.bias_v,
            mha.add_zero_attn, 0.0, eye, None, training=False, key_padding_mask=key_padding_mask,
            need_weights=False, attn_mask=attn_mask, use_separate_proj_weight=separate,
            q_proj_weight=mha.q_proj_weight if separate else None, k_proj_weight=mha.k_proj_weight if separate else None,
            v_proj_weight=mha.v_proj_weight if separate else None, is_causal=is_causal)
    return out.transpose(0, 1) if mha.batch_first and out.dim() == 3 else out


def input_norms(model: nn.Module, targets: list[Target], data: Any,
                forward_fn: ForwardFn | None = None) -> dict[str, torch.Tensor]:
    """``||X_j||_2`` of every input column of each target, from one pass over ``data``:
    ``(d_in,)`` for linear/Conv1D, ``(groups, d_in)`` for convs, ``(3, embed_dim)`` for
    packed attention. Targets whose inputs were never seen are missing from the result."""
    norms = _Norms()
    by_module = {t.module: t.fqn for t in targets}
    attention = {m: (by_module.get(m) if is_packed_attention(m) else None, by_module.get(m.out_proj))
                 for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    attention = {m: fqns for m, fqns in attention.items() if fqns != (None, None)}
    inside = {fqns[1] for fqns in attention.values()}  # out_proj: measured by its attention
    pre_hooks = {}
    for t in targets:
        if is_packed_attention(t.module) or t.fqn in inside:
            continue
        if isinstance(t.module, (nn.Conv1d, nn.Conv2d)):
            pre_hooks[t.module] = norms.conv_hook(t.fqn)
        else:
            pre_hooks[t.module] = norms.linear_hook(t.fqn)
    handles = [m.register_forward_pre_hook(norms.attention_hook(*fqns), with_kwargs=True)
               for m, fqns in attention.items()]
    try:
        with hooked_pass(model, pre_hooks=pre_hooks, forward_fn=forward_fn) as run:
            for batch in as_batches(data):
                norms.mask = batch_mask(batch)
                run(batch)
    finally:
        for handle in handles:
            handle.remove()
    sums = norms.sums
    if distributed.is_distributed():
        sums = {f: distributed.all_reduce_sum_(s.clone()) for f, s in sums.items()}
    return {f: s.sqrt() for f, s in sums.items()}


def wanda_scores(model: nn.Module, targets: list[Target], data: Any,
                 forward_fn: ForwardFn | None = None) -> dict[str, torch.Tensor]:
    """Weight-shaped float32 scores ``|W_ij| * ||X_j||_2`` keyed by FQN (see the module doc)."""
    norms = input_norms(model, targets, data, forward_fn)
    unseen = [t.fqn for t in targets if t.fqn not in norms]
    if unseen:
        warnings.warn(f"wanda saw no inputs of {len(unseen)} layer(s) ({', '.join(unseen[:3])}): they are called "
                      "through a parent (e.g. F.linear) or never ran; scored by |w| alone", stacklevel=2)
    scores = {}
    with torch.no_grad():
        for t in targets:
            w = t.weight.detach().abs()
            norm = norms.get(t.fqn)
            scores[t.fqn] = w.float() if norm is None else (w.to(torch.float64) * _spread(t, norm)).float()
    return scores


def _spread(target: Target, norm: torch.Tensor) -> torch.Tensor:
    """The input norms broadcast to the layout of the target's weight."""
    module, w = target.module, target.weight
    norm = norm.to(w.device)
    if is_packed_attention(module):
        e = module.embed_dim
        return norm.repeat_interleave(e, dim=0)  # (3E, E): rows of q, k, v read query, key, value
    if is_conv1d(module):
        return norm[:, None]  # weight (in, out)
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        g, out = module.groups, w.shape[0]
        rows = norm[:, None, :].expand(g, out // g, norm.shape[1])
        return rows.reshape(w.shape)
    return norm[None, :]
