"""Find the permutation groups of any model that runs forward, and check them.

Groups come from torch-pruning's ``DependencyGraph`` on a copy of the model and are then
*checked*: a random permutation of every group must leave the output unchanged.

Example:
    >>> import torch
    >>> from prune_repair.zoo.models import MLP
    >>> groups = find_groups(MLP(widths=(8, 8)), torch.randn(2, 1, 28, 28))
    >>> [(g.name, g.size) for g in groups]
    [('features.fc1', 8), ('features.fc2', 8)]
    >>> [a.key for a in groups[0].axes]
    ['features.fc1.weight', 'features.fc1.bias', 'features.fc2.weight']
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..engine.run.forward import ForwardFn, as_batches, default_forward
from .attention_groups import transformer_groups
from .groups import HAND_HELP, Axis, GroupError, PermGroup, _check_fit, check_disjoint, groups_from_spec
from .permute import check_function_preserved
from .unsupported import check_traceable

__all__ = ["find_groups"]


def find_groups(
    model: nn.Module,
    example_inputs: Any,
    *,
    groups: Sequence[PermGroup] | Mapping[str, Sequence[str]] | None = None,
    forward_fn: ForwardFn | None = None,
    check: bool = True,
) -> list[PermGroup]:
    """Permutation groups of ``model``, traced on ``example_inputs`` (the model is not changed).

    Args:
        model: any module that runs forward.
        example_inputs: one batch (or data whose first batch is used).
        groups: hand-written groups (``PermGroup`` list or a :func:`groups_from_spec` dict)
            that replace the automatic ones.
        forward_fn: ``forward_fn(model, batch)`` for batches that are not plain tensors.
        check: verify that a random permutation of the groups leaves the output unchanged.

    Raises:
        GroupError: naming the layer where tracing stopped or whose output a permutation changes.
    """
    batch = as_batches(example_inputs)[0]
    if groups is None:
        found = transformer_groups(model)  # heads as units: read from the blocks, checked below
        if found is not None:
            _check_fit(found, model.state_dict())
        else:
            check_traceable(model, batch, forward_fn)  # other attention: one clear line in seconds
            found = _trace_groups(model, batch, forward_fn)
    elif isinstance(groups, Mapping):
        found = groups_from_spec(groups, model.state_dict())
    else:
        found = list(groups)
        _check_fit(found, model.state_dict())
    if check and found:
        check_function_preserved(model, found, batch, forward_fn=forward_fn)
    return found


# --- automatic groups from torch-pruning's dependency graph ---------------------------


def _trace_groups(model: nn.Module, batch: Any, forward_fn: ForwardFn | None) -> list[PermGroup]:
    import torch_pruning as tp

    traced = copy.deepcopy(model).eval()
    for p in traced.parameters():
        if p.is_floating_point():
            p.requires_grad_(True)
    names = {m: n for n, m in traced.named_modules()}
    names.update({p: n for n, p in traced.named_parameters()})
    fwd = forward_fn or default_forward
    graph = tp.DependencyGraph()
    with _active_layer(traced) as where, warnings.catch_warnings(), torch.enable_grad():
        warnings.simplefilter("ignore")
        try:
            graph.build_dependency(traced, batch, forward_fn=fwd, verbose=False)
            tp_groups = list(graph.get_all_groups(root_module_types=(nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear,
                                                                      nn.Embedding)))
        except Exception as err:  # any failure inside tracing is reported with the layer it hit
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise GroupError(f"tracing for permutation groups stopped at {where()} ({first}): {HAND_HELP}") from None
    groups = []
    for tp_group in tp_groups:
        if any(graph.is_out_channel_pruning_fn(item.dep.handler) and not item.dep.target.outputs
               for item in tp_group.items):
            continue  # its channels reach the model output, which must keep its order
        group = _convert(tp_group, graph, names)
        if group is not None:
            groups.append(group)
    check_disjoint(groups)
    order = {name: i for i, name in enumerate(model.state_dict())}
    return sorted(groups, key=lambda g: min(order.get(a.key, len(order)) for a in g.axes))


class _active_layer:
    """Context manager tracking the innermost module running, for error messages."""

    def __init__(self, model: nn.Module):
        self.model, self.stack, self.handles, self.last = model, [], [], None

    def __enter__(self):
        names = {m: n for n, m in self.model.named_modules()}

        def pre(module, inputs):
            self.stack.append(module)

        def post(module, inputs, output):
            if self.stack:
                self.stack.pop()

        for m in self.model.modules():
            self.handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
        return lambda: (f"layer '{names[self.stack[-1]]}' ({type(self.stack[-1]).__name__})"
                        if self.stack and names[self.stack[-1]] else "the model's forward (outside any layer)")

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        return False


def _positions(idxs: Sequence[int], root_idxs: Sequence[int], size: int, where: str) -> torch.Tensor:
    """(size, k) positions per root channel from torch-pruning's (idx, root_idx) pairs."""
    per: list[list[int]] = [[] for _ in range(size)]
    for i, r in zip(idxs, root_idxs):
        per[int(r)].append(int(i))
    counts = {len(p) for p in per}
    if len(counts) != 1 or 0 in counts:
        raise GroupError(f"channels of {where} map to uneven blocks of positions: {HAND_HELP}")
    return torch.tensor([sorted(p) for p in per], dtype=torch.long)


def _convert(tp_group, graph, names: dict) -> PermGroup | None:
    """One torch-pruning group -> PermGroup (None when it touches no tensor)."""
    from torch_pruning import ops

    T = ops.OPTYPE
    root = tp_group.items[0].dep.target.module
    size = len(tp_group.items[0].idxs)
    axes: dict[tuple[str, int], Axis] = {}
    labels: list[torch.Tensor] = []

    def add(key: str, dim: int, index: torch.Tensor) -> None:
        prev = axes.get((key, dim))
        if prev is not None and not torch.equal(prev.index, index):
            raise GroupError(f"'{key}' dim {dim} is reached twice with different channel maps: {HAND_HELP}")
        axes[(key, dim)] = Axis(key, dim, index)

    for item in tp_group.items:
        node, out = item.dep.target, graph.is_out_channel_pruning_fn(item.dep.handler)
        m, kind = node.module, node.type
        if kind in (T.ELEMENTWISE, T.RESHAPE, T.CONCAT, T.SPLIT, T.UNBIND, T.EXPAND, T.SLICE, T.OUTPUT):
            continue
        name = names.get(m, type(m).__name__)
        index = _positions(item.idxs, item.root_idxs, size, f"'{name}'")
        prefix = f"{name}." if kind is not T.PARAMETER else ""
        if kind in (T.CONV, T.DEPTHWISE_CONV):
            transposed = getattr(m, "transposed", False)
            depthwise = kind is T.DEPTHWISE_CONV
            if depthwise or m.groups == 1:
                add(prefix + "weight", 0 if depthwise or out != transposed else 1, index)
                if (out or depthwise) and m.bias is not None:
                    add(prefix + "bias", 0, index)
                continue
        elif kind is T.LINEAR:
            add(prefix + "weight", 0 if out else 1, index)
            if out and m.bias is not None:
                add(prefix + "bias", 0, index)
            continue
        elif kind in (T.BN, T.IN, T.GN):
            for p in ("weight", "bias", "running_mean", "running_var"):
                if getattr(m, p, None) is not None:
                    add(prefix + p, 0, index)
            if kind is T.GN and 1 < m.num_groups < m.num_channels:
                labels.append(index[:, 0] // (m.num_channels // m.num_groups))
            continue
        elif kind is T.LN and len(m.normalized_shape) == 1:
            for p in ("weight", "bias"):
                if getattr(m, p, None) is not None:
                    add(prefix + p, 0, index)
            continue
        elif kind is T.PRELU:
            if m.num_parameters > 1:
                add(prefix + "weight", 0, index)
            continue
        elif kind is T.EMBED:
            add(prefix + "weight", 1, index)
            continue
        elif kind is T.PARAMETER:
            add(name, node.pruning_dim % m.dim(), index)
            continue
        raise GroupError(f"layer '{name}' ({type(m).__name__}) in the group of '{names.get(root)}' cannot be "
                         f"permuted automatically: {HAND_HELP}")
    if not axes:
        return None
    label = None
    if labels:
        label = torch.zeros(size, dtype=torch.long)
        for lab in labels:
            label = label * (int(lab.max()) + 1) + lab
    return PermGroup(names.get(root, "group"), list(axes.values()), label)
