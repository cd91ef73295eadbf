"""Weighted averages of state_dicts and models (parameters AND buffers).

Floating tensors are averaged in float64 and cast back; BatchNorm running statistics are
averaged like weights (a repair or reset fixes them afterwards). Integer buffers such as
``num_batches_tracked`` are taken from the first model.

Example:
    >>> import torch
    >>> a, b = {"w": torch.zeros(2)}, {"w": torch.ones(2)}
    >>> lerp_state_dicts([a, b], [0.75, 0.25])["w"]
    tensor([0.2500, 0.2500])
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import nn


class ArchitectureMismatch(ValueError):
    """Models to merge differ in keys or shapes (the message names the first difference)."""


def check_same_architecture(states: Sequence[Mapping[str, torch.Tensor]], names: Sequence[str] | None = None) -> None:
    """Raise :class:`ArchitectureMismatch` naming the first key whose presence or shape differs.

    >>> check_same_architecture([{"w": torch.zeros(2)}, {"w": torch.zeros(3)}], ["a.pt", "b.pt"])
    ... # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    prune_repair.merge.interpolate.ArchitectureMismatch: ...: key 'w' is [2] in a.pt and [3] in b.pt
    """
    names = list(names or [f"model {i}" for i in range(len(states))])
    first = states[0]
    for state, name in zip(states[1:], names[1:]):
        for key, value in first.items():
            if key not in state:
                raise ArchitectureMismatch(f"merge needs checkpoints of the same architecture: key '{key}' is in "
                                           f"{names[0]} but not in {name}")
            if tuple(state[key].shape) != tuple(value.shape):
                raise ArchitectureMismatch(f"merge needs checkpoints of the same architecture: key '{key}' is "
                                           f"{list(value.shape)} in {names[0]} and {list(state[key].shape)} in {name}")
        extra = [k for k in state if k not in first]
        if extra:
            raise ArchitectureMismatch(f"merge needs checkpoints of the same architecture: key '{extra[0]}' is in "
                                       f"{name} but not in {names[0]}")


def _weights(count: int, weights: Sequence[float] | None) -> list[float]:
    if weights is None:
        return [1.0 / count] * count
    w = [float(x) for x in weights]
    if len(w) != count:
        raise ValueError(f"got {len(w)} weights for {count} models: give one weight per model")
    if any(x < 0 or x != x for x in w) or abs(sum(w) - 1.0) > 1e-9:
        raise ValueError(f"merge weights must be non-negative and sum to 1, got {w}")
    return w


def lerp_state_dicts(states: Sequence[Mapping[str, torch.Tensor]],
                     weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """``sum_k weights[k] * states[k]`` key by key (uniform weights by default); inputs unchanged."""
    if len(states) < 1:
        raise ValueError("nothing to interpolate: pass at least one state_dict")
    check_same_architecture(states)
    w = _weights(len(states), weights)
    out = {}
    for key, first in states[0].items():
        if not first.is_floating_point():
            out[key] = first.clone()
            continue
        acc = torch.zeros(first.shape, dtype=torch.float64, device=first.device)
        for state, wk in zip(states, w):
            if wk:
                acc += wk * state[key].to(first.device, torch.float64)
        out[key] = acc.to(first.dtype)
    return out


def interpolate(models: Sequence[nn.Module], weights: Sequence[float] | None = None) -> nn.Module:
    """A new model whose parameters and buffers are the weighted average of ``models``.

    >>> a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    >>> m = interpolate([a, b], [0.5, 0.5])
    >>> torch.allclose(m.weight, (a.weight + b.weight) / 2)
    True
    """
    merged = copy.deepcopy(models[0])
    merged.load_state_dict(lerp_state_dicts([m.state_dict() for m in models], weights))
    return merged
