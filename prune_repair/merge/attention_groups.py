"""Permutation groups of transformers: heads as units, the residual stream, MLP hidden units.

The dependency graph cannot see that attention's channels come in heads, so transformer
groups are read from the model's blocks, then checked like any traced group (a random
permutation of every group must leave the output unchanged, see
:func:`~prune_repair.merge.find_groups.find_groups`):

- the residual stream: the patch/token embedding, class token and positional embedding,
  every LayerNorm/RMSNorm weight and bias, the input columns of every block's q/k/v and
  MLP input projection and the rows of its attention-output and MLP-output projection,
  the final norm and the classifier's input columns: one group;
- per attention, two head groups tied together (:mod:`.heads`): the q and k rows of each
  head, and the v rows with the out-projection's input columns; heads move as units, and
  the dims inside a head may be permuted too (never with rotary embeddings);
- per block, the MLP hidden units.

Supported: torchvision ``VisionTransformer`` (subclasses included); see :data:`SUPPORTED`.

Example:
    >>> import torch
    >>> from torchvision.models import VisionTransformer
    >>> vit = VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16)
    >>> [(g.name, g.size, g.head_size) for g in transformer_groups(vit)]  # doctest: +NORMALIZE_WHITESPACE
    [('residual', 8, None), ('encoder.layers.encoder_layer_0.self_attention:qk', 8, 4),
     ('encoder.layers.encoder_layer_0.self_attention:vo', 8, 4), ('encoder.layers.encoder_layer_0.mlp', 16, None)]
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .groups import Axis, GroupError, PermGroup

SUPPORTED = "torchvision VisionTransformer"
"""The transformers whose head-aware groups are built here (named in refusals)."""


def _block(key: str, dim: int, channels: int, offset: int = 0) -> Axis:
    return Axis.block(key, dim, channels, 1, offset)


def _vit_attention(name: str, mha: nn.MultiheadAttention, inner: bool) -> list[PermGroup]:
    """The tied q/k and v/out head groups of one torchvision ``MultiheadAttention``."""
    e, h = mha.embed_dim, mha.num_heads
    if not mha._qkv_same_embed_dim or mha.in_proj_weight is None:
        raise GroupError(f"attention '{name}' has separate q/k/v weights of different widths: head groups are "
                         "built for a packed in_proj_weight; align='none'")
    if mha.bias_k is not None or mha.add_zero_attn:
        raise GroupError(f"attention '{name}' adds learned key/value biases (add_bias_kv) or zero attention, "
                         "which head groups do not cover: align='none'")
    w, b = f"{name}.in_proj_weight", f"{name}.in_proj_bias"
    biased = mha.in_proj_bias is not None
    qk = [_block(w, 0, e, 0), _block(w, 0, e, e)] + ([_block(b, 0, e, 0), _block(b, 0, e, e)] if biased else [])
    vo = [_block(w, 0, e, 2 * e)] + ([_block(b, 0, e, 2 * e)] if biased else []) + [
        _block(f"{name}.out_proj.weight", 1, e)]
    d = e // h
    return [PermGroup(f"{name}:qk", qk, head_size=d, tie=name, inner=inner),
            PermGroup(f"{name}:vo", vo, head_size=d, tie=name, inner=inner)]


def vit_groups(model: nn.Module, *, inner: bool = True) -> list[PermGroup]:
    """Groups of a torchvision ``VisionTransformer`` (``inner``: also permute the dims inside heads)."""
    e = model.hidden_dim
    stream = [_block("conv_proj.weight", 0, e), _block("class_token", 2, e),
              _block("encoder.pos_embedding", 2, e)]
    if model.conv_proj.bias is not None:
        stream.insert(1, _block("conv_proj.bias", 0, e))
    blocks: list[PermGroup] = []
    for name, layer in model.encoder.layers.named_children():
        p = f"encoder.layers.{name}"
        stream += [_block(f"{p}.ln_1.weight", 0, e), _block(f"{p}.ln_1.bias", 0, e),
                   _block(f"{p}.self_attention.in_proj_weight", 1, e),
                   _block(f"{p}.self_attention.out_proj.weight", 0, e),
                   _block(f"{p}.self_attention.out_proj.bias", 0, e),
                   _block(f"{p}.ln_2.weight", 0, e), _block(f"{p}.ln_2.bias", 0, e),
                   _block(f"{p}.mlp.0.weight", 1, e), _block(f"{p}.mlp.3.weight", 0, e),
                   _block(f"{p}.mlp.3.bias", 0, e)]
        hidden = layer.mlp[0].out_features
        blocks += _vit_attention(f"{p}.self_attention", layer.self_attention, inner)
        blocks.append(PermGroup(f"{p}.mlp", [_block(f"{p}.mlp.0.weight", 0, hidden),
                                             _block(f"{p}.mlp.0.bias", 0, hidden),
                                             _block(f"{p}.mlp.3.weight", 1, hidden)]))
    stream += [_block("encoder.ln.weight", 0, e), _block("encoder.ln.bias", 0, e)]
    heads = dict(model.heads.named_children())
    if "pre_logits" in heads:
        rep = heads["pre_logits"].out_features
        stream.append(_block("heads.pre_logits.weight", 1, e))
        blocks.append(PermGroup("heads.pre_logits", [_block("heads.pre_logits.weight", 0, rep),
                                                     _block("heads.pre_logits.bias", 0, rep),
                                                     _block("heads.head.weight", 1, rep)]))
    else:
        stream.append(_block("heads.head.weight", 1, e))
    return [PermGroup("residual", stream)] + blocks


def transformer_groups(model: nn.Module, *, inner: bool = True) -> list[PermGroup] | None:
    """Head-aware groups of a supported transformer, or None when ``model`` is not one
    (the caller then traces the graph, which refuses attention in one line)."""
    from torchvision.models.vision_transformer import VisionTransformer

    if isinstance(model, VisionTransformer):
        return vit_groups(model, inner=inner)
    return None


def check_same_heads(models: Sequence[nn.Module], names: Sequence[str]) -> None:
    """Raise ``ValueError`` naming the first attention whose head count differs between models
    (same weight shapes, different heads: the heads would not line up)."""
    first = {n: getattr(m, "num_heads", None) for n, m in models[0].named_modules()
             if isinstance(m, nn.MultiheadAttention)}
    for model, name in zip(models[1:], names[1:]):
        for n, m in model.named_modules():
            if n in first and getattr(m, "num_heads", None) != first[n]:
                raise ValueError(f"attention '{n}' has {first[n]} heads in {names[0]} and {m.num_heads} in {name}: "
                                 "merge models with the same heads")
