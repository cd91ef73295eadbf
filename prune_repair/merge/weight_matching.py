"""Weight matching (git re-basin): permutations that make B's weights closest to A's.

Coordinate descent: each sweep visits the groups in a random order and solves, for one
group with all others fixed, the linear assignment that maximizes ``<W_A, P W_B>`` summed
over every tensor axis of the group (``scipy.optimize.linear_sum_assignment``). Sweeps stop
when the objective, computed in float64, improves by no more than ``rel_tol`` relative to
its size, or after ``max_sweeps``.

Example:
    >>> import torch
    >>> from prune_repair.zoo.models import MLP
    >>> from prune_repair.merge.find_groups import find_groups
    >>> from prune_repair.merge.permute import permute, random_perms
    >>> a = MLP(widths=(16, 16))
    >>> groups = find_groups(a, a.example_inputs(2))
    >>> b = permute(a, groups, random_perms(groups, torch.Generator().manual_seed(1)))
    >>> al = weight_matching(a, b, groups)
    >>> all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
    ...                                       permute(b, groups, al.perms).state_dict().values()))
    True
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .groups import Axis, PermGroup
from .assignment import max_assignment
from .attention_groups import check_same_heads
from .heads import assign_heads, head_order, units
from .permute import Alignment, Perms, _check_perms, identity_perms, permute_state_dict


def _state(model_or_state: nn.Module | Mapping[str, torch.Tensor], keys: set[str]) -> dict[str, torch.Tensor]:
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    missing = sorted(k for k in keys if k not in state)
    if missing:
        raise ValueError(f"weight matching: key '{missing[0]}' of the groups is missing from a model: "
                         "find the groups on the same architecture")
    return {k: state[k].detach().to("cpu", torch.float64) for k in keys}


def _rows(t: torch.Tensor, axis: Axis) -> torch.Tensor:
    """``t`` as (channels, everything else) along the group axis (blocks included)."""
    moved = t.movedim(axis.dim, 0)
    return moved[axis.index.flatten()].reshape(axis.index.shape[0], -1)


def assign(similarity: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Permutation ``q`` maximizing ``sum_i similarity[i, q[i]]`` (within equal labels), exact at
    every width (:func:`~prune_repair.merge.assignment.max_assignment`).

    >>> assign(torch.tensor([[0.0, 1.0], [1.0, 0.0]])).tolist()
    [1, 0]
    """
    s = similarity.detach().to("cpu", torch.float64).numpy()
    size = s.shape[0]
    if labels is None:
        return torch.from_numpy(max_assignment(s).astype(np.int64))
    q = torch.arange(size)
    for value in labels.unique():
        where = (labels == value).nonzero().flatten()
        cols = max_assignment(s[np.ix_(where.numpy(), where.numpy())])
        q[where] = where[torch.from_numpy(cols.astype(np.int64))]
    return q


def _similarity(sa: Mapping[str, torch.Tensor], sb: Mapping[str, torch.Tensor], g: PermGroup) -> torch.Tensor:
    """(channels, channels) inner products of A's and B's channels over every axis of ``g``."""
    sim = torch.zeros(g.size, g.size, dtype=torch.float64)
    for axis in g.axes:
        sim += _rows(sa[axis.key], axis) @ _rows(sb[axis.key], axis).T
    return sim


def _objective(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    return float(sum((a[k] * b[k]).sum() for k in a))


def weight_matching(
    a: nn.Module | Mapping[str, torch.Tensor],
    b: nn.Module | Mapping[str, torch.Tensor],
    groups: Sequence[PermGroup],
    *,
    max_sweeps: int = 100,
    rel_tol: float = 1e-10,
    seed: int = 0,
    init: Perms | None = None,
) -> Alignment:
    """Permutations aligning ``b`` to ``a`` by weight matching (neither input is changed).

    Args:
        a, b: models (or state_dicts) of the same architecture; ``b`` gets permuted.
        groups: permutation groups (see :func:`prune_repair.merge.groups.find_groups`).
        max_sweeps: at most this many passes over all groups.
        rel_tol: stop when a sweep raises the objective by at most ``rel_tol * |objective|``.
        seed: seed of the random group order of each sweep.
        init: starting permutations (default: identity).

    Returns:
        an :class:`Alignment`; ``permute(b, groups, alignment.perms)`` is aligned to ``a``.
    """
    if max_sweeps < 1:
        raise ValueError(f"max_sweeps must be at least 1, got {max_sweeps}")
    start = time.perf_counter()
    if isinstance(a, nn.Module) and isinstance(b, nn.Module):
        check_same_heads([a, b], ["the reference", "the model to align"])
    keys = {axis.key for g in groups for axis in g.axes + g.head_axes}
    sa, sb = _state(a, keys), _state(b, keys)
    for k in keys:
        if sa[k].shape != sb[k].shape:
            raise ValueError(f"weight matching: key '{k}' is {list(sa[k].shape)} in one model and "
                             f"{list(sb[k].shape)} in the other: merge models of the same architecture")
    perms = {k: v.clone() for k, v in (init or identity_perms(groups)).items()}
    _check_perms(groups, perms)
    current = permute_state_dict(sb, groups, perms)
    generator = torch.Generator().manual_seed(seed)
    objective, sweeps = _objective(sa, current), 0
    solve = units(groups)  # attention heads: the groups of one attention are solved together
    for sweeps in range(1, max_sweeps + 1):
        changed = False
        for ui in torch.randperm(len(solve), generator=generator).tolist():
            unit = solve[ui]
            sims = [_similarity(sa, current, g) for g in unit]
            if unit[0].head_size is None:
                qs, extra = [assign(sims[0], unit[0].labels)], 0.0
            else:  # heads as units; per-head tensors (bias tables) score whole heads
                head_sim = sum((_rows(sa[a.key], a) @ _rows(current[a.key], a).T for g in unit for a in g.head_axes),
                               torch.zeros(()))
                qs = assign_heads(sims, unit, head_sim if head_sim.dim() else None)
                sigma = head_order(unit[0], qs[0])
                extra = float(head_sim[torch.arange(sigma.numel()), sigma].sum() - head_sim.diagonal().sum()
                              ) if head_sim.dim() else 0.0
            gain = extra + sum(float(s[torch.arange(s.shape[0]), q].sum() - s.diagonal().sum())
                               for s, q in zip(sims, qs))
            if gain > 0:
                changed = True
                for g, q in zip(unit, qs):
                    perms[g.name] = perms[g.name][q]
                current = permute_state_dict(current, unit, {g.name: q for g, q in zip(unit, qs)})
        new = _objective(sa, current)
        improvement, objective = new - objective, new
        if not changed or improvement <= rel_tol * abs(new):
            break
    return Alignment(perms, "weight", time.perf_counter() - start, sweeps, objective)
