"""Permutation groups of torchvision's Swin Transformer (v1: ``swin_t``, ``swin_s``, ``swin_b``).

One residual-stream group per stage: the patch embedding (or the previous patch merging's
reduction rows), every block's LayerNorms, the q/k/v input columns and the output
projection's rows, the MLP's input columns and output rows; a patch merging reads four
shifted copies of the stream, so each channel owns four positions of its LayerNorm and of
its reduction's input columns. Per block, tied head groups for the window attention (the
q/k rows of each head, with the head's column of the relative position bias table; the
v rows with the output projection's columns) and the MLP hidden units. The attention's
linears are run through ``F.linear`` by their parent; activation matching catches them
there (:mod:`.capture`).

Example:
    >>> from torchvision.models.swin_transformer import SwinTransformer
    >>> swin = SwinTransformer([4, 4], 8, [1, 1], [2, 2], [2, 2], num_classes=10)
    >>> [(g.name, g.size) for g in swin_groups(swin)][:4]  # doctest: +NORMALIZE_WHITESPACE
    [('residual:features.0', 8), ('residual:features.2', 16), ('features.1.0.attn:qk', 8),
     ('features.1.0.attn:vo', 8)]
"""

from __future__ import annotations

import torch
from torch import nn

from .groups import Axis, GroupError, PermGroup


def _axes(state: dict, prefix: str, keys_dims: list[tuple[str, int]], channels: int) -> list[Axis]:
    """``Axis.block`` for each ``(key, dim)`` under ``prefix`` that the state_dict holds."""
    return [Axis.block(f"{prefix}.{k}", d, channels) for k, d in keys_dims if f"{prefix}.{k}" in state]


def _block_groups(p: str, block: nn.Module, state: dict, c: int, inner: bool) -> tuple[list[Axis], list[PermGroup]]:
    """Stream axes and groups of one ``SwinTransformerBlock`` at ``p``."""
    a = f"{p}.attn"
    heads = block.attn.num_heads
    stream = _axes(state, p, [("norm1.weight", 0), ("norm1.bias", 0), ("attn.qkv.weight", 1), ("attn.proj.weight", 0),
                              ("attn.proj.bias", 0), ("norm2.weight", 0), ("norm2.bias", 0), ("mlp.0.weight", 1),
                              ("mlp.3.weight", 0), ("mlp.3.bias", 0)], c)
    w, b = f"{a}.qkv.weight", f"{a}.qkv.bias"
    biased = b in state
    qk = [Axis.block(w, 0, c, 1, 0), Axis.block(w, 0, c, 1, c)] + (
        [Axis.block(b, 0, c, 1, 0), Axis.block(b, 0, c, 1, c)] if biased else [])
    vo = [Axis.block(w, 0, c, 1, 2 * c)] + ([Axis.block(b, 0, c, 1, 2 * c)] if biased else []) + [
        Axis.block(f"{a}.proj.weight", 1, c)]
    table = [Axis.block(f"{a}.relative_position_bias_table", 1, heads)]
    hidden = state[f"{p}.mlp.0.weight"].shape[0]
    groups = [PermGroup(f"{a}:qk", qk, head_size=c // heads, tie=a, inner=inner, head_axes=table),
              PermGroup(f"{a}:vo", vo, head_size=c // heads, tie=a, inner=inner),
              PermGroup(f"{p}.mlp", _axes(state, f"{p}.mlp", [("0.weight", 0), ("0.bias", 0), ("3.weight", 1)],
                                          hidden))]
    return stream, groups


def swin_groups(model: nn.Module, *, inner: bool = True) -> list[PermGroup]:
    """Groups of a torchvision ``SwinTransformer`` with v1 blocks and patch merging."""
    state = model.state_dict()
    embed = model.features[0][0]
    c = embed.out_channels
    name = "residual:features.0"
    stream = _axes(state, "features.0", [("0.weight", 0), ("0.bias", 0), ("2.weight", 0), ("2.bias", 0)], c)
    groups: list[PermGroup] = []
    residuals: list[PermGroup] = []  # one stream per stage
    for i, stage in enumerate(model.features):
        if i == 0:
            continue
        kind = type(stage).__name__
        if kind == "PatchMerging":
            four = torch.arange(c)[:, None] + c * torch.arange(4)[None, :]  # channel c in each shifted copy
            stream += [Axis(f"features.{i}.norm.{k}", 0, four) for k in ("weight", "bias")]
            stream.append(Axis(f"features.{i}.reduction.weight", 1, four))
            residuals.append(PermGroup(name, stream))
            c, name = stage.reduction.out_features, f"residual:features.{i}"
            stream = _axes(state, f"features.{i}", [("reduction.weight", 0), ("reduction.bias", 0)], c)
            continue
        for j, block in enumerate(stage):
            if type(block).__name__ != "SwinTransformerBlock" or type(block.attn).__name__ != "ShiftedWindowAttention":
                raise GroupError(f"'features.{i}.{j}' is a {type(block).__name__} with {type(block.attn).__name__}: "
                                 "head-aware groups are built for Swin v1 blocks only (swin_t/s/b, not swin_v2); "
                                 "align='none'")
            axes, block_groups = _block_groups(f"features.{i}.{j}", block, state, c, inner)
            stream += axes
            groups += block_groups
        if kind not in ("Sequential",):
            raise GroupError(f"'features.{i}' is a {kind}: head-aware groups are built for torchvision's Swin v1 "
                             "layout only; align='none'")
    stream += _axes(state, "norm", [("weight", 0), ("bias", 0)], c) + [Axis.block("head.weight", 1, c)]
    return residuals + [PermGroup(name, stream)] + groups
