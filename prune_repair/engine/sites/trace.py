"""One hooked forward that records which layers ran, in what order, on which tensors.

:func:`trace_calls` is the trace the sites, the layer refits and the pruning targets are read
from: every conv / linear / norm / attention call with its input and output, plus ``F.linear``
calls a parent makes on a linear layer's weight (swin's window attention). No per-architecture
tables.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 2))
    >>> [fqn for fqn, *_ in trace_calls(model, torch.randn(3, 4))]
    ['0', '1', '3']
    >>> executed_producers(trace_calls(model, torch.randn(3, 4)))
    ['0', '3']
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..run.forward import ForwardFn, first_tensor, hooked_pass
from ..producers import is_packed_attention, is_producer

NORM_TYPES = (_BatchNorm, nn.GroupNorm, nn.LayerNorm)
"""Norms that can take a site: their per-channel affine (or BatchNorm running stats) holds the fold."""


Call = tuple[str, nn.Module, "torch.Tensor | None", "torch.Tensor | None"]
"""(fqn, module, input tensor, output tensor) of one module call; ``module`` is a
:class:`FunctionCall` when a parent passed a linear layer's weight to ``F.linear``."""


@dataclass(frozen=True, eq=False)
class FunctionCall:
    """A linear layer run as ``F.linear(x, layer.weight, ...)`` by another module."""

    module: nn.Module


def trace_calls(
    model: nn.Module,
    batch: Any,
    *,
    forward_fn: ForwardFn | None = None,
    observe: Callable[[str, nn.Module, torch.Tensor], None] | None = None,
    extra: list[nn.Module] = (),
) -> list[Call]:
    """Run one batch and record every conv/linear/norm/attention call (and the calls of
    ``extra`` modules) in the order they finish, plus ``F.linear`` calls on the weight of a
    linear layer made outside that layer's own forward.

    ``observe(fqn, module, output)`` is called on each recorded module output, so a caller
    can measure statistics in the same pass.
    """
    from torch.overrides import TorchFunctionMode

    names = {module: name for name, module in model.named_modules()}
    calls: list[Call] = []

    def record(module: nn.Module, inputs: tuple, output: Any) -> None:
        x = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
        y = first_tensor(output)
        calls.append((names[module], module, x, y))  # holding the tensors keeps their ids unique
        if observe is not None and y is not None:
            observe(names[module], module, y)

    linears = {id(m.weight): m for m in model.modules() if isinstance(m, nn.Linear)}

    class LinearCalls(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            weight = args[1] if len(args) > 1 else (kwargs or {}).get("weight")
            if func in (F.linear, torch._C._nn.linear) and id(weight) in linears and isinstance(out, torch.Tensor):
                layer = linears[id(weight)]
                calls.append((names[layer], FunctionCall(layer), args[0], out))
            return out

    watched = [m for m in model.modules() if is_producer(m) or isinstance(m, NORM_TYPES + (nn.MultiheadAttention,))]
    watched += [m for m in extra if m not in watched]
    with hooked_pass(model, forward_hooks={m: record for m in watched}, forward_fn=forward_fn) as run, LinearCalls():
        run(batch)
    own = {id(y) for _, m, _, y in calls if not isinstance(m, FunctionCall)}
    return [c for c in calls if not (isinstance(c[1], FunctionCall) and id(c[3]) in own)]


def executed_producers(calls: list[Call]) -> list[str]:
    """FQNs of the layers holding prunable weights, in the order they first ran: conv/linear/
    Conv1D layers, attention modules (their in-projection) and their ``out_proj``."""
    order: list[str] = []
    for fqn, module, _, y in calls:
        if isinstance(module, nn.MultiheadAttention):
            names = ([fqn] if is_packed_attention(module) else []) + [f"{fqn}.out_proj" if fqn else "out_proj"]
        elif is_producer(module) or isinstance(module, FunctionCall):
            names = [fqn]
        else:
            continue
        order += [n for n in names if n not in order]
    return order
