"""Inputs and outputs of layers that are not called as modules: attention projections and ``F.linear`` sites.

A layer-by-layer refit needs, per layer, what it reads ``x`` and its output ``y``
(:mod:`~prune_repair.engine.refit.attention_layers` names the kinds):

- ``in_proj`` (q/k/v rows of a packed ``nn.MultiheadAttention``): a forward pre-hook on the
  attention module reads the query / key / value inputs; the output is exactly
  ``x @ W_rows^T + b_rows``. Self-attention passes one tensor three times, so q, k and v share
  one ``X^T X`` (:class:`~prune_repair.engine.refit.shared_gram.SharedInputs`);
- ``out_proj``: its input is the attention output before the projection. A
  :class:`~torch.overrides.TorchFunctionMode` catches ``F.multi_head_attention_forward``
  (the mode also turns off the fused fast path, which would bypass it) and calls it once
  with an identity out-projection: exactly the context, computed with q/k/v as they are NOW;
  the module's output is then ``F.linear(context, W_out, b_out)`` with ``out_proj`` as
  refitted. The attention output itself is the reference's target;
- ``function``: the same mode catches ``F.linear(x, layer.weight, b)``.

Tensors are handed over batch first (``(N, T, E)``), so padding masks apply.

Example:
    >>> import torch
    >>> from torch import nn
    >>> mha = nn.MultiheadAttention(4, 2, batch_first=True)
    >>> x = torch.randn(3, 5, 4)
    >>> seen = []
    >>> capture = ReferenceCapture({"in_proj:v": "in_proj", "out_proj": "out_proj"})
    >>> with capture(mha, ["in_proj:v", "out_proj"], lambda n, m, y: seen.append((n, tuple(y.shape)))) as within:
    ...     _ = within(lambda: mha(x, x, x))
    >>> seen
    [('in_proj:v', (3, 5, 4)), ('out_proj', (3, 5, 4))]
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
import torch.nn.utils.prune as torch_prune
from torch import nn
from torch.overrides import TorchFunctionMode

from ..producers import PARTS, split_part
from ..run.forward import first_tensor
from .attention_layers import layer_module

LINEAR_FUNCS = (F.linear, torch._C._nn.linear)
MHA_FUNCS = (F.multi_head_attention_forward,)
Emit = Callable[[str, nn.Module, torch.Tensor], None]


def batch_first(t: torch.Tensor, mha: nn.MultiheadAttention) -> torch.Tensor:
    """An attention module's (L, N, E) tensor as (N, L, E); batch-first or unbatched ones as they are."""
    return t if mha.batch_first or t.dim() != 3 else t.transpose(0, 1)


def attention_inputs(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """``[query, key, value]`` of an ``nn.MultiheadAttention`` call."""
    return list(args[:3]) + [kwargs.get(k) for k in ("query", "key", "value")[len(args):]]


def part_rows(mha: nn.MultiheadAttention, part: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight and bias rows of one projection as the attention computes with them."""
    e, i = int(mha.embed_dim), PARTS.index(part)
    bias = mha.in_proj_bias
    return mha.in_proj_weight[i * e:(i + 1) * e], None if bias is None else bias[i * e:(i + 1) * e]


def context_and_output(func: Callable, args: tuple, kwargs: dict) -> tuple[torch.Tensor, Any]:
    """Run ``F.multi_head_attention_forward`` with an identity out-projection: ``(context, rest)``,
    ``context`` the attention output before ``out_proj`` ((L, N, E) as the function returns it)."""
    args = list(args)
    weight = args[11] if len(args) > 11 else kwargs["out_proj_weight"]
    eye = torch.eye(weight.shape[1], dtype=weight.dtype, device=weight.device)
    if len(args) > 12:
        args[11], args[12] = eye, None
    else:
        kwargs = {**kwargs, "out_proj_weight": eye, "out_proj_bias": None}
    result = func(*args, **kwargs)
    return result[0], result[1:]


class CallCatcher(TorchFunctionMode):
    """Calls ``on_linear(weight_id, func, args, kwargs)`` for ``F.linear`` on a watched weight and
    ``on_attention(out_weight_id, func, args, kwargs)`` for ``F.multi_head_attention_forward``
    with a watched out-projection weight; each returns the call's result."""

    def __init__(self, linears: set[int], attentions: set[int], on_linear: Callable, on_attention: Callable):
        super().__init__()
        self.linears, self.attentions = linears, attentions
        self.on_linear, self.on_attention = on_linear, on_attention

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in LINEAR_FUNCS:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            if id(weight) in self.linears:
                return self.on_linear(id(weight), func, args, kwargs)
        elif func in MHA_FUNCS:
            weight = args[11] if len(args) > 11 else kwargs.get("out_proj_weight")
            if id(weight) in self.attentions:
                return self.on_attention(id(weight), func, args, kwargs)
        return func(*args, **kwargs)


def owner_of(model: nn.Module, fqn: str) -> nn.Module:
    """The attention module of an ``in_proj:q|k|v`` or ``out_proj`` layer FQN."""
    name, part = split_part(fqn)
    return model.get_submodule(name if part is not None else fqn.rpartition(".")[0])


class ReferenceCapture:
    """Outputs of named layers of the reference model of any kind (``kinds``: FQN -> kind; the
    others are modules): a :data:`~prune_repair.engine.run.reference.Capture`."""

    def __init__(self, kinds: dict[str, str]):
        self.kinds = dict(kinds)

    @contextlib.contextmanager
    def __call__(self, model: nn.Module, names: Sequence[str], emit: Emit) -> Iterator[Callable[[Callable], Any]]:
        handles, linears = [], {}
        by_owner: dict[int, tuple[nn.Module, list[str], str | None]] = {}
        try:
            for name in names:
                kind = self.kinds.get(name, "module")
                if kind == "module":
                    module = model.get_submodule(name)
                    handles.append(module.register_forward_hook(
                        lambda m, a, o, n=name: emit(n, m, first_tensor(o))))
                elif kind == "function":
                    linears[id(model.get_submodule(name).weight)] = (name, model.get_submodule(name))
                else:
                    mha = owner_of(model, name)
                    entry = by_owner.setdefault(id(mha), (mha, [], None))
                    if kind == "in_proj":
                        entry[1].append(name)
                    else:
                        by_owner[id(mha)] = (mha, entry[1], name)
            for mha, parts, out in by_owner.values():
                handles.append(mha.register_forward_pre_hook(_reference_parts(mha, parts, emit), with_kwargs=True))
                if out is not None:
                    handles.append(mha.register_forward_hook(
                        lambda m, a, o, n=out: emit(n, m.out_proj, batch_first(o[0], m))))

            def on_linear(key: int, func: Callable, args: tuple, kwargs: dict) -> Any:
                y = func(*args, **kwargs)
                emit(linears[key][0], linears[key][1], y)
                return y

            mode = CallCatcher(set(linears), set(), on_linear, lambda *a: None)
            yield lambda fn: _within(mode if linears else None, fn)
        finally:
            for handle in handles:
                handle.remove()


def _reference_parts(mha: nn.MultiheadAttention, parts: list[str], emit: Emit) -> Callable:
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        inputs = attention_inputs(args, kwargs)
        for name in parts:
            part = split_part(name)[1]
            weight, bias = part_rows(mha, part)
            emit(name, _part_module(mha, part), batch_first(F.linear(inputs[PARTS.index(part)], weight, bias), mha))
    return hook


def _part_module(mha: nn.MultiheadAttention, part: str) -> nn.Module:
    """A Linear-shaped stand-in for one projection (what ``keep`` functions look at)."""
    return layer_module(mha, f"in_proj:{part}")


def _within(mode: TorchFunctionMode | None, fn: Callable[[], Any]) -> Any:
    if mode is None:
        return fn()
    with mode:
        return fn()


@contextlib.contextmanager
def attach_calls(steps: Sequence[Any], active: Sequence[int], arrive: Callable, context: Any, own_output: bool
                 ) -> Iterator[Callable[[Callable[[], Any]], Any]]:
    """Hook the ``active`` steps of kind ``in_proj``, ``out_proj`` and ``function`` (each step has
    ``kind``, ``owner`` (the attention module), ``module`` and ``add(x, y, mask)``); yields
    ``within(fn)`` that runs one forward under the mode catching the functional calls.
    Targets: the reference's (``context.reference(k)``), or with ``own_output`` the layer's own
    output before its step."""
    parts: dict[int, tuple[nn.Module, list[int]]] = {}
    linears, attentions = {}, {}
    for k in active:
        step = steps[k]
        if step.kind == "in_proj":
            parts.setdefault(id(step.owner), (step.owner, []))[1].append(k)
        elif step.kind == "out_proj":
            attentions[id(step.module.weight)] = k
        elif step.kind == "function":
            linears[id(step.module.weight)] = k

    def target(k: int, own: Callable[[], torch.Tensor]) -> torch.Tensor:
        return own() if own_output else context.reference(k)

    def on_linear(key: int, func: Callable, args: tuple, kwargs: dict) -> Any:
        k, module = linears[key], steps[linears[key]].module
        x = args[0] if args else kwargs["input"]
        if arrive(k, lambda: steps[k].add(x, target(k, lambda: func(*args, **kwargs)), context.mask)):
            refresh_pruned_weight(module, ())  # torch prune: the parent reads ``weight``, which no hook renews
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        return F.linear(x, masked(module), bias)  # the weight as refitted (in place)

    def on_attention(key: int, func: Callable, args: tuple, kwargs: dict) -> Any:
        k = attentions[key]
        step = steps[k]
        ctx, rest = context_and_output(func, args, kwargs)
        x = ctx.transpose(0, 1) if ctx.dim() == 3 else ctx  # the function is sequence-first
        if arrive(k, lambda: step.add(x, target(k, lambda: F.linear(x, masked(step.module), step.module.bias)),
                                      context.mask)):
            refresh_pruned_weight(step.module, ())  # torch prune: out_proj's own forward never renews ``weight``
        return (F.linear(ctx, masked(step.module), step.module.bias), *rest)

    handles = [mha.register_forward_pre_hook(_model_parts(mha, ks, steps, arrive, context, target), with_kwargs=True)
               for mha, ks in parts.values()]
    mode = CallCatcher(set(linears), set(attentions), on_linear, on_attention) if linears or attentions else None
    try:
        yield lambda fn: _within(mode, fn)
    finally:
        for handle in handles:
            handle.remove()


def masked(module: nn.Module) -> torch.Tensor:
    """A layer's effective weight (``weight_orig * weight_mask`` under torch prune)."""
    return module.weight_orig * module.weight_mask if hasattr(module, "weight_orig") else module.weight


def _model_parts(mha: nn.MultiheadAttention, ks: list[int], steps: Sequence[Any], arrive: Callable, context: Any,
                 target: Callable) -> Callable:
    """The pre-hook that hands q/k/v inputs to their steps; one batch-first view per distinct input
    tensor, so self-attention's three projections share one ``X^T X``."""
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        inputs = attention_inputs(args, kwargs)
        views: dict[int, torch.Tensor] = {}
        decided = False
        for k in ks:
            i = PARTS.index(steps[k].module.part)
            x = views.setdefault(id(inputs[i]), batch_first(inputs[i], mha))

            def own(i: int = i) -> torch.Tensor:
                return batch_first(F.linear(inputs[i], *part_rows(mha, PARTS[i])), mha)

            decided |= arrive(k, lambda k=k, x=x, own=own: steps[k].add(x, target(k, own), context.mask))
        if decided:
            refresh_pruned_weight(mha, args)
    return hook


def refresh_pruned_weight(module: nn.Module, inputs: tuple) -> None:
    """Recompute ``weight`` from ``weight_orig * weight_mask`` (torch prune) after ``weight_orig`` changed."""
    for hook in list(module._forward_pre_hooks.values()):
        if isinstance(hook, torch_prune.BasePruningMethod):
            hook(module, inputs)
