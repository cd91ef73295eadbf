"""Permutation groups: the channels that must be permuted together, found from the graph.

A :class:`PermGroup` lists every tensor axis (``state_dict`` key, dim, positions) that
carries one set of hidden channels: the producing layers' rows and biases, BatchNorm
weights *and* running statistics, LayerNorm/GroupNorm parameters, the consuming layers'
columns, and after a flatten the block of ``H*W`` columns of each channel. Every layer
writing into one residual stream lands in the same group. Groups are found for any
model that runs forward, with torch-pruning's ``DependencyGraph`` on a copy of the model,
and then *checked*: a random permutation of every group must leave the output unchanged.

This module holds the group types and hand-written groups; :mod:`.find_groups` finds
them automatically.

Example:
    >>> import torch
    >>> sd = {"fc1.weight": torch.zeros(4, 3), "fc1.bias": torch.zeros(4), "fc2.weight": torch.zeros(2, 4)}
    >>> [g] = groups_from_spec({"hidden": ["fc1.weight:0", "fc1.bias:0", "fc2.weight:1"]}, sd)
    >>> g.name, g.size, [a.key for a in g.axes]
    ('hidden', 4, ['fc1.weight', 'fc1.bias', 'fc2.weight'])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


HAND_HELP = ("pass groups by hand: groups=groups_from_spec({'name': ['fc1.weight:0', 'fc1.bias:0', "
             "'fc2.weight:1']}, model.state_dict())")


class GroupError(ValueError):
    """Permutation groups cannot be found or do not fit the model (the message says what to do)."""


@dataclass(eq=False)
class Axis:
    """One tensor axis carrying a group's channels.

    ``index[c]`` lists the positions along ``dim`` of ``state_dict[key]`` that belong to
    channel ``c`` (one position normally, a block of ``H*W`` after a flatten).
    """

    key: str
    dim: int
    index: torch.Tensor  # (channels, k) int64

    @classmethod
    def block(cls, key: str, dim: int, channels: int, block: int = 1, offset: int = 0) -> "Axis":
        """Channel ``c`` owns positions ``offset + c*block ... offset + (c+1)*block - 1``.

        >>> Axis.block("fc.weight", 1, channels=2, block=3).index.tolist()
        [[0, 1, 2], [3, 4, 5]]
        """
        index = offset + torch.arange(channels * block, dtype=torch.long).view(channels, block)
        return cls(key, dim, index)

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "dim": self.dim, "index": self.index.tolist()}


@dataclass(eq=False)
class PermGroup:
    """Channels permuted together; ``labels`` (optional) restricts a permutation to map
    each channel onto one with the same label (GroupNorm with several groups).

    Attention heads: ``head_size`` d makes the channels ``heads x d`` units that move as
    whole heads (channel ``h*d + i`` is dim ``i`` of head ``h``); groups sharing a ``tie``
    (q/k and v/out of one attention) move their heads the same way; ``inner`` allows a
    permutation of the d dims inside each head as well (never with rotary embeddings);
    ``head_axes`` hold one entry per head (swin's relative position bias table), moved with
    the heads.
    """

    name: str
    axes: list[Axis]
    labels: torch.Tensor | None = field(default=None)
    head_size: int | None = None
    tie: str | None = None
    inner: bool = False
    head_axes: list[Axis] = field(default_factory=list)  # one row of positions per HEAD (bias tables)

    @property
    def size(self) -> int:
        return int(self.axes[0].index.shape[0])

    def to_dict(self) -> dict[str, Any]:
        labels = None if self.labels is None else self.labels.tolist()
        return {"name": self.name, "size": self.size, "axes": [a.to_dict() for a in self.axes], "labels": labels,
                "head_size": self.head_size, "tie": self.tie, "inner": self.inner,
                "head_axes": [a.to_dict() for a in self.head_axes]}


def groups_from_spec(spec: Mapping[str, Sequence[str]], state_dict: Mapping[str, torch.Tensor]) -> list[PermGroup]:
    """Hand-written groups: ``{"name": ["key:dim", "key:dim:block", ...]}``.

    ``block`` is the number of consecutive positions per channel (``H*W`` for the
    linear layer after a flatten). The size is taken from the first member.

    >>> sd = {"a.weight": torch.zeros(4, 3), "b.weight": torch.zeros(2, 8)}
    >>> g = groups_from_spec({"h": ["a.weight:0", "b.weight:1:2"]}, sd)[0]
    >>> g.size, g.axes[1].index.tolist()
    (4, [[0, 1], [2, 3], [4, 5], [6, 7]])
    """
    groups = []
    for name, members in spec.items():
        if isinstance(members, str) or not members:
            raise GroupError(f"group '{name}' must list members as 'key:dim[:block]' strings")
        axes, size = [], None
        for member in members:
            parts = str(member).split(":")
            try:
                key, dim, block = parts[0], int(parts[1]), int(parts[2]) if len(parts) > 2 else 1
            except (IndexError, ValueError):
                raise GroupError(f"group '{name}' member '{member}' is not 'key:dim[:block]'") from None
            if key not in state_dict:
                raise GroupError(f"group '{name}' names '{key}', which the model's state_dict lacks")
            shape = state_dict[key].shape
            if not -len(shape) <= dim < len(shape) or block < 1 or shape[dim] % block:
                raise GroupError(f"group '{name}': '{member}' does not fit '{key}' of shape {list(shape)}")
            size = shape[dim] // block if size is None else size
            if shape[dim] != size * block:
                raise GroupError(f"group '{name}': '{key}' dim {dim} has {shape[dim]} positions, not {size}x{block}")
            axes.append(Axis.block(key, dim % len(shape), size, block))
        groups.append(PermGroup(str(name), axes))
    check_disjoint(groups)
    return groups


def check_disjoint(groups: Sequence[PermGroup]) -> None:
    """Raise when two groups (or one group twice) claim the same position of a tensor axis."""
    owner: dict[tuple[str, int], torch.Tensor] = {}
    for g in groups:
        for a in g.axes + g.head_axes:
            seen = owner.setdefault((a.key, a.dim), torch.zeros(0, dtype=torch.long))
            pos = a.index.flatten()
            if bool(torch.isin(pos, seen).any()) or pos.unique().numel() != pos.numel():
                raise GroupError(f"'{a.key}' dim {a.dim} is claimed twice (group '{g.name}'): {HAND_HELP}")
            owner[(a.key, a.dim)] = torch.cat([seen, pos])


def _check_fit(groups: Sequence[PermGroup], state_dict: Mapping[str, torch.Tensor]) -> None:
    for g in groups:
        for a in g.axes:
            if a.key not in state_dict:
                raise GroupError(f"group '{g.name}' names '{a.key}', which the model's state_dict lacks")
            if a.index.shape[0] != g.size or int(a.index.max()) >= state_dict[a.key].shape[a.dim]:
                raise GroupError(f"group '{g.name}': '{a.key}' dim {a.dim} does not hold {g.size} channels")
        for a in g.head_axes:
            heads = g.size // int(g.head_size or g.size)
            if (a.key not in state_dict or a.index.shape[0] != heads
                    or int(a.index.max()) >= state_dict[a.key].shape[a.dim]):
                raise GroupError(f"group '{g.name}': '{a.key}' dim {a.dim} does not hold {heads} heads")
    check_disjoint(groups)


