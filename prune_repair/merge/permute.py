"""Applying channel permutations to state_dicts and models.

A permutation ``p`` of a group means: new channel ``c`` is old channel ``p[c]``. It moves
every axis of the group (rows, columns, biases, norm parameters, BN running statistics,
blocks of flattened columns), so a permuted model computes the same function.

Example:
    >>> import torch
    >>> from prune_repair.zoo.models import MLP
    >>> from prune_repair.merge.find_groups import find_groups
    >>> model = MLP(widths=(8,)).double()
    >>> x = model.example_inputs(3)
    >>> groups = find_groups(model, x)
    >>> perms = random_perms(groups, torch.Generator().manual_seed(0))
    >>> torch.allclose(permute(model, groups, perms)(x), model(x))
    True
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..engine.run.forward import ForwardFn, first_tensor, hooked_pass
from .groups import HAND_HELP, Axis, GroupError, PermGroup
from .heads import check_unit, head_order, random_unit, units

Perms = dict[str, torch.Tensor]
"""Group name -> permutation (int64 tensor): new channel ``c`` is old channel ``perm[c]``."""


@dataclass
class Alignment:
    """Permutations that align a model to a reference, and how they were found."""

    perms: Perms
    method: str
    seconds: float = 0.0
    sweeps: int = 0
    objective: float | None = None
    dead_units: dict[str, int] = field(default_factory=dict)
    assign_seconds: float = 0.0  # of ``seconds``: solving the assignment problems (not data-dependent)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "seconds": self.seconds, "assign_seconds": self.assign_seconds,
                "sweeps": self.sweeps,
                "objective": self.objective, "dead_units": dict(self.dead_units),
                "perms": {k: v.tolist() for k, v in self.perms.items()}}


def identity_perms(groups: Sequence[PermGroup]) -> Perms:
    """The permutations that change nothing."""
    return {g.name: torch.arange(g.size) for g in groups}


def random_perms(groups: Sequence[PermGroup], generator: torch.Generator | None = None) -> Perms:
    """A random permutation per group, never the identity when a non-trivial one exists;
    channels stay within their label (GroupNorm groups); attention heads move as units."""
    perms = {}
    for unit in units(groups):
        if unit[0].head_size is not None:
            perms.update(random_unit(unit, generator))
            continue
        g = unit[0]
        labels = g.labels if g.labels is not None else torch.zeros(g.size, dtype=torch.long)
        perm = torch.arange(g.size)
        for value in labels.unique():
            where = (labels == value).nonzero().flatten()
            shuffled = where[torch.randperm(where.numel(), generator=generator)]
            if where.numel() > 1 and torch.equal(shuffled, where):
                shuffled = where.roll(1)
            perm[where] = shuffled
        perms[g.name] = perm
    return perms


def invert(perm: torch.Tensor) -> torch.Tensor:
    """The inverse permutation: ``invert(p)[p] == arange``."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


def axis_gather(axis: Axis, perm: torch.Tensor, length: int) -> torch.Tensor:
    """Index ``g`` with ``new = old.index_select(axis.dim, g)`` for ``perm`` on this axis."""
    g = torch.arange(length)
    g[axis.index.flatten()] = axis.index[perm.cpu()].flatten()
    return g


def _check_perms(groups: Sequence[PermGroup], perms: Mapping[str, torch.Tensor]) -> None:
    for g in groups:
        p = perms.get(g.name)
        if p is None:
            continue
        if p.numel() != g.size or not torch.equal(p.sort().values.cpu(), torch.arange(g.size)):
            raise ValueError(f"the permutation for group '{g.name}' is not a permutation of {g.size} channels")
    for unit in units(groups):
        if unit[0].head_size is not None:
            check_unit(unit, perms)


def permute_state_dict(state: Mapping[str, torch.Tensor], groups: Sequence[PermGroup],
                       perms: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A new state_dict with ``perms`` applied (``state`` is not changed; groups without a
    permutation are left as they are)."""
    _check_perms(groups, perms)
    out = dict(state)
    for g in groups:
        if g.name not in perms:
            continue
        for axis in g.axes:
            t = out[axis.key]
            index = axis_gather(axis, perms[g.name], t.shape[axis.dim]).to(t.device)
            out[axis.key] = t.index_select(axis.dim, index)
        for axis in g.head_axes:  # per-head tensors follow the heads
            t = out[axis.key]
            index = axis_gather(axis, head_order(g, perms[g.name]), t.shape[axis.dim]).to(t.device)
            out[axis.key] = t.index_select(axis.dim, index)
    return out


def permute(model: nn.Module, groups: Sequence[PermGroup], perms: Mapping[str, torch.Tensor]) -> nn.Module:
    """A permuted copy of ``model`` (same function, ``model`` unchanged)."""
    new = copy.deepcopy(model)
    new.load_state_dict(permute_state_dict(model.state_dict(), groups, perms))
    return new


def _to_double(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.double() if batch.is_floating_point() else batch
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_double(b) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_double(v) for k, v in batch.items()}
    return batch


def _tensors(obj: Any) -> list[torch.Tensor]:
    """Every tensor in a (nested) model output."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (tuple, list)):
        return [t for v in obj for t in _tensors(v)]
    return []


def _close(a: Any, b: Any, rtol: float = 1e-9) -> bool:
    if isinstance(a, list) or isinstance(b, list):
        return (isinstance(a, list) and isinstance(b, list) and len(a) == len(b)
                and all(_close(x, y, rtol) for x, y in zip(a, b)))
    if a is None or b is None:
        return a is b
    if a.shape != b.shape:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    a, b = a.double(), b.double()
    return bool(((a - b).abs().max() <= rtol * (1 + b.abs().max())).item()) if a.numel() else True


def _outputs(model: nn.Module, batch: Any, forward_fn: ForwardFn | None, record: bool):
    calls: list[tuple[str, torch.Tensor | None]] = []
    names = {m: n for n, m in model.named_modules()}

    def hook(module, inputs, output):
        y = first_tensor(output)
        calls.append((names[module], None if y is None else y.detach().clone()))

    hooks = {m: hook for m in model.modules() if m is not model} if record else {}
    try:
        with hooked_pass(model, forward_hooks=hooks, forward_fn=forward_fn) as run:
            out = _tensors(run(batch))
    except RuntimeError as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise GroupError(f"checking the permutation groups runs a float64 copy of the model, which failed "
                         f"({first}): make the model run in float64 or call find_groups(..., check=False)") from None
    return out, calls


def _permuted_like(y: torch.Tensor, ref: torch.Tensor, perm: torch.Tensor, rtol: float) -> bool:
    """Whether ``y`` is ``ref`` with ``perm`` applied to one channel dim (or blocks of one)."""
    c = perm.numel()
    for d in range(1, ref.dim()):
        n = ref.shape[d]
        if n % c == 0:
            k = n // c
            idx = (perm[:, None] * k + torch.arange(k)).flatten().to(ref.device)
            if _close(y, ref.index_select(d, idx), rtol):
                return True
    return False


def check_function_preserved(model: nn.Module, groups: Sequence[PermGroup], batch: Any,
                             forward_fn: ForwardFn | None = None, seed: int = 0, rtol: float | None = None) -> None:
    """Raise :class:`GroupError` unless random permutations of ``groups`` leave the output of
    ``model`` unchanged (float64 copy, eval mode); the message names the first layer whose
    output the permutation breaks. ``rtol`` (relative to the output's size) defaults to 1e-9,
    and to 1e-5 for models with norms that compute in float32 whatever the model's dtype
    (HF ``*RMSNorm``: a permuted sum rounds differently in float32)."""
    if rtol is None:
        rtol = 1e-5 if any(type(m).__name__.endswith("RMSNorm") for m in model.modules()) else 1e-9
    ref = copy.deepcopy(model).double()
    x = _to_double(batch)
    perms = random_perms(groups, torch.Generator().manual_seed(seed))
    out_ref, calls_ref = _outputs(ref, x, forward_fn, record=False)
    out_all, _ = _outputs(permute(ref, groups, perms), x, forward_fn, record=False)
    if _close(out_all, out_ref, rtol):
        return
    _, calls_ref = _outputs(ref, x, forward_fn, record=True)
    for g in groups:
        permuted = permute(ref, [g], {g.name: perms[g.name]})
        out_g, calls_g = _outputs(permuted, x, forward_fn, record=True)
        if _close(out_g, out_ref, rtol):
            continue
        where = "the model output"
        for (name, y_ref), (_, y) in zip(calls_ref, calls_g):
            if y_ref is not None and not (_close(y, y_ref, rtol) or _permuted_like(y, y_ref, perms[g.name], rtol)):
                where = f"layer '{name}' ({type(ref.get_submodule(name)).__name__})"
                break
        raise GroupError(f"permuting the channels of group '{g.name}' changes the output of {where}, so the "
                         f"traced groups do not fit this model: {HAND_HELP}")
    raise GroupError(f"permuting all groups together changes the model output: {HAND_HELP}")
