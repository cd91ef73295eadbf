"""Capturing the tensors activation matching observes, however a layer is called.

A probe reads the input or the output of a module. Three ways a module's tensors are
reached:

- forward (pre-)hooks, for modules called as modules;
- the packed q/k/v projections of an ``nn.MultiheadAttention`` (``side="proj"``), computed
  inside the attention function out of reach of hooks: a pre-hook recomputes them;
- an ``nn.Linear`` whose weight a parent passes to ``F.linear`` (swin_t's window attention),
  so its hooks never fire: a :class:`~torch.overrides.TorchFunctionMode` catches the call
  by the weight's identity. :func:`function_linears` finds such layers after a first pass.

Example:
    >>> import torch
    >>> from torch import nn
    >>> lin = nn.Linear(3, 2)
    >>> class Parent(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.lin = lin
    ...     def forward(self, x):
    ...         return torch.nn.functional.linear(x, self.lin.weight, self.lin.bias)
    >>> model, spec, called = Parent(), {lin: [("k", "out")]}, set()
    >>> seen = capture(model, torch.randn(4, 3), spec, None, called)
    >>> "k" in seen, function_linears(spec, seen, called)
    (False, True)
    >>> capture(model, torch.randn(4, 3), spec, None, called)["k"].shape
    torch.Size([4, 2])
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..engine.run.forward import ForwardFn, first_tensor, hooked_pass
from ..engine.sites.taps import LINEAR_FUNCS

Spec = dict[nn.Module, list]
"""``{module: [(key, side), ...]}``: what to capture of each module."""


class _WeightCalls(TorchFunctionMode):
    """Stores the input/output of ``F.linear`` calls whose weight is a watched tensor."""

    def __init__(self, wanted: dict[int, list], seen: dict):
        super().__init__()
        self.wanted, self.seen = wanted, seen

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in LINEAR_FUNCS:
            keys = self.wanted.get(id(args[1] if len(args) > 1 else kwargs.get("weight")))
            if keys:
                x = args[0] if args else kwargs.get("input")
                self.seen.update({k: x if side == "in" else out for k, side in keys})
        return out


def capture(model: nn.Module, batch: Any, probes: Spec, forward_fn: ForwardFn | None, called: set) -> dict:
    """Run one batch, returning {probe key: tensor}; the linears in ``called`` are caught at
    ``F.linear`` instead of by hooks."""
    seen: dict[Any, torch.Tensor] = {}
    pre, post, by_weight = {}, {}, {}
    for module, wanted in probes.items():
        if module in called:
            by_weight[id(module.weight)] = [(k, s) for k, s in wanted if s in ("in", "out")]
            continue
        if any(side == "in" for _, side in wanted):
            pre[module] = lambda m, inputs, w=wanted: seen.update({k: inputs[0] for k, s in w if s == "in"})
        if any(side == "out" for _, side in wanted):
            post[module] = lambda m, i, out, w=wanted: seen.update({k: first_tensor(out) for k, s in w if s == "out"})
    handles = [module.register_forward_pre_hook(_projections(module, wanted, seen), with_kwargs=True)
               for module, wanted in probes.items() if any(side == "proj" for _, side in wanted)]
    mode = _WeightCalls(by_weight, seen) if by_weight else contextlib.nullcontext()
    try:
        with hooked_pass(model, forward_hooks=post, pre_hooks=pre, forward_fn=forward_fn) as run, mode:
            run(batch)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def function_linears(probes: Spec, seen: dict, called: set) -> bool:
    """Add to ``called`` the ``nn.Linear`` probes whose hooks did not fire; True when any was added."""
    missing = {m for m, wanted in probes.items() if isinstance(m, nn.Linear) and m not in called
               and any(k not in seen for k, _ in wanted)}
    called |= missing
    return bool(missing)


def _projections(mha: nn.MultiheadAttention, wanted: list, seen: dict) -> Any:
    """Pre-hook storing the packed q/k/v projections (N, T, 3E) of an ``nn.MultiheadAttention``,
    recomputed from its inputs (the attention function runs them out of reach of hooks)."""
    def pre(module, args, kwargs):
        inputs = list(args[:3]) + [kwargs.get(k) for k in ("query", "key", "value")[len(args):]]
        e, w, b = mha.embed_dim, mha.in_proj_weight, mha.in_proj_bias
        parts = [F.linear(x, w[i * e:(i + 1) * e], None if b is None else b[i * e:(i + 1) * e])
                 for i, x in enumerate(inputs)]
        y = torch.cat(parts, -1)
        y = y if mha.batch_first or y.dim() != 3 else y.transpose(0, 1)
        seen.update({k: y for k, side in wanted if side == "proj"})
        return None
    return pre
