"""Sites found by the measuring pass itself: no separate trace before it.

:class:`Discovery` runs one batch with the hooks of :func:`~.find.trace_calls` (every
conv/linear/norm/attention call, ``F.linear`` on a linear layer's weight), keeps light stand-ins
of the tensors in its records (their shapes; no activation is held) and hands every output
that may be a site to ``measure(key, output, mask)`` while it is computed. Afterwards
:meth:`Discovery.sites` gives exactly the sites :func:`~.find.find_sites` finds on that batch,
and :meth:`Discovery.key` the key each one was measured under.

A producer whose next module (in registration order) is a norm that could take its site is
measured a moment later: at the next hooked call, unless that call is the norm consuming it
(then the norm's output is the site). Where the output changed in place meanwhile, or a site
was reached twice, :attr:`Discovery.complete` is False and the caller measures the usual way
(:func:`~.find.find_sites`, then a measuring pass).

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2))
    >>> seen = {}
    >>> found = Discovery(model, lambda key, y, mask: seen.setdefault(key, tuple(y.shape)))
    >>> _ = found.run(torch.randn(3, 1, 8, 8))
    >>> [(s.fqn, found.key(s) in seen) for s in found.sites()], found.complete
    ([('1', True)], True)
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..producers import PARTS, is_packed_attention, is_producer, out_channels, part_fqn
from ..run.forward import ForwardFn, batch_mask, first_tensor, hooked_pass
from .attention_once import bind, projects_once, recomputed, self_attention
from .find import Selector, Site, _per_channel_norm_dim, sites_of_calls
from .trace import NORM_TYPES, Call, FunctionCall
from .taps import LINEAR_FUNCS, output_mask, warn_unfit_mask
from .watched import Watch

Key = tuple[str, int, str]
"""``(site fqn, channel dim, how it is reached)``: ``"module"``, ``"function"``, ``"attention"`` or ``"block"``."""
Measure = Callable[[Key, torch.Tensor, "torch.Tensor | None"], None]


class Stand:
    """A tensor in the records: its shape (what :func:`~.find.sites_of_calls` reads of it)."""

    __slots__ = ("shape",)

    def __init__(self, shape: torch.Size):
        self.shape = shape

    def dim(self) -> int:
        return len(self.shape)


class Discovery:
    """One batch through ``model``: its calls recorded, every possible site's output measured."""

    def __init__(self, model: nn.Module, measure: Measure, *, extra: Sequence[nn.Module] = (),
                 forward_fn: ForwardFn | None = None):
        self.model, self.measure, self.forward_fn = model, measure, forward_fn
        self.extra = list(extra)
        self.names = {module: name for name, module in model.named_modules()}  # one traversal, reused
        self.calls: list[Call] = []
        self.counts: dict[Key, int] = {}
        self.unfit: dict[Key, tuple[torch.Tensor, torch.Size]] = {}
        self.complete = True
        self._stands: dict[int, tuple[weakref.ref, Stand]] = {}
        self._producer_of: dict[int, tuple[str, int, int]] = {}  # id(stand) -> (fqn, channels, channel dim)
        self._pending: tuple[Key, torch.Tensor, int] | None = None
        self._running: set[int] = set()
        self._mask: torch.Tensor | None = None
        modules = list(self.names)
        self._producers = {id(m): (1 if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) else -1, out_channels(m))
                           for m in modules if is_producer(m)}  # id -> (channel dim, channels): asked once
        self._defer = {id(a) for a, b in zip(modules, modules[1:])
                       if id(a) in self._producers and isinstance(b, NORM_TYPES)}

    # -- bookkeeping --

    def _stand(self, t: torch.Tensor | None) -> Stand | None:
        """The stand-in of a live tensor (the same object for as long as the tensor lives)."""
        if t is None:
            return None
        held = self._stands.get(id(t))
        if held is not None and held[0]() is t:
            return held[1]
        stand = Stand(t.shape)
        self._stands[id(t)] = (weakref.ref(t), stand)
        return stand

    def _take(self, key: Key, y: torch.Tensor) -> None:
        mask, fits = output_mask(self._mask, key[1], y)
        if not fits:
            self.unfit[key] = (self._mask, y.shape)
        try:
            with torch._C.DisableTorchFunction():  # the measurement's own ops skip any torch-function mode
                self.measure(key, y, mask)
        except Exception:  # an output that is no site may not be measurable; a site is measured again
            self.counts[key] = -1
            return
        self.counts[key] = self.counts.get(key, 0) + 1 if self.counts.get(key, 0) >= 0 else -1

    def _flush(self, consumer: nn.Module | None = None, x: torch.Tensor | None = None) -> None:
        """Measure the output waiting for its norm, unless ``consumer`` is that norm, reading it
        as ``x``, and takes the site (then the norm's output is measured instead)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        key, y, version = pending
        if x is y and self._norm_dim(consumer, x) is not None:
            return
        if y._version != version:  # changed in place before it could be measured
            self.complete = False
        else:
            self._take(key, y)

    # -- hooks --

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict | None = None) -> None:
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        self._flush(module, x) if isinstance(module, NORM_TYPES) else self._flush()
        self._running.add(id(module))

    def _post(self, module: nn.Module, inputs: tuple, output: Any) -> None:
        self._flush()
        self._running.discard(id(module))
        fqn = self.names[module]
        x = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
        y = first_tensor(output)
        stand = self._stand(y)
        self.calls.append((fqn, module, self._stand(x), stand))
        if y is None:
            return
        producer = self._producers.get(id(module))
        if producer is not None:
            cdim = producer[0]
            self._producer_of[id(stand)] = (fqn, producer[1], cdim)
            if id(module) in self._defer:
                self._pending = ((fqn, cdim, "module"), y, y._version)
            else:
                self._take((fqn, cdim, "module"), y)
        elif isinstance(module, NORM_TYPES):
            norm_dim = self._norm_dim(module, x)
            if norm_dim is not None:
                self._take((fqn, norm_dim, "module"), y)
        elif isinstance(module, nn.MultiheadAttention):
            out = f"{fqn}.out_proj" if fqn else "out_proj"
            self._take((out, -1, "attention"), _batch_first(y, module))
        if module in self.extra and y.dim() >= 2:
            self._take((fqn, 1 if y.dim() > 3 else -1, "block"), y)

    def _norm_dim(self, norm: nn.Module, x: torch.Tensor | None) -> int | None:
        """The channel dim of ``norm``'s output when it takes the site of the producer output ``x``."""
        held = self._producer_of.get(id(self._stand(x))) if x is not None else None
        return None if held is None else _per_channel_norm_dim(norm, held[1], held[2])

    def _attention_call(self, mha: nn.MultiheadAttention, call: dict[str, Any], run: Callable[[], Any]) -> Any:
        """q, k and v of a packed in-projection: projected once where the call allows it, else recomputed."""
        fqn = self.names[mha]

        def hand(*ys: torch.Tensor) -> tuple[torch.Tensor, ...]:
            for part, y in zip(PARTS, ys):
                self._take((part_fqn(fqn, part), -1, "attention"), y.transpose(0, 1) if y.dim() == 3 else y)
            return ys

        if projects_once(call):
            return self_attention(call, hand)
        hand(*recomputed(call))
        return run()

    def _function_call(self, layer: nn.Linear, x: Any, out: torch.Tensor) -> None:
        fqn = self.names[layer]
        self.calls.append((fqn, FunctionCall(layer), self._stand(x if isinstance(x, torch.Tensor) else None),
                           self._stand(out)))
        if id(layer) in self._running:
            return  # the layer's own forward: its module hook measures the output
        self._flush()
        self._producer_of[id(self._stand(out))] = (fqn, out_channels(layer), -1)
        self._take((fqn, -1, "function"), out)

    # -- the pass --

    def run(self, batch: Any) -> Any:
        """One batch through the model (no grad, eval mode); returns its output (None if stopped)."""
        watched = [m for m in self.names
                   if id(m) in self._producers or isinstance(m, NORM_TYPES + (nn.MultiheadAttention,))]
        watched += [m for m in self.extra if m not in watched]
        linears = {id(m.weight): m for m in self.names if isinstance(m, nn.Linear)}
        attentions = {id(m.in_proj_weight): m for m in watched if is_packed_attention(m)}
        handles = []
        self._mask = batch_mask(batch)
        try:
            for m in watched:
                if isinstance(m, nn.MultiheadAttention):
                    handles.append(m.register_forward_pre_hook(self._pre, with_kwargs=True))
                else:
                    handles.append(m.register_forward_pre_hook(self._pre))
                handles.append(m.register_forward_hook(self._post))
            weights = [m.weight for m in linears.values()] + [m.in_proj_weight for m in attentions.values()]
            calls = Watch(self.model, weights, _Calls(self, linears, attentions))
            with hooked_pass(self.model, forward_fn=self.forward_fn) as forward, calls:
                out = forward(batch)
            self._flush()
            return out
        finally:
            for handle in handles:
                handle.remove()
            self._pending, self._mask = None, None

    # -- results --

    def sites(self, *, select: Selector = None, include_classifier: bool = False) -> list[Site]:
        """:func:`~.find.find_sites`'s sites of the batch run (same selection options)."""
        own = {id(y) for _, m, _, y in self.calls if not isinstance(m, FunctionCall)}
        calls = [c for c in self.calls if not (isinstance(c[1], FunctionCall) and id(c[3]) in own)]
        return sites_of_calls(calls, self.extra, select=select, include_classifier=include_classifier)

    @staticmethod
    def key(site: Site) -> Key:
        """The key ``site``'s output was measured under."""
        return site.fqn, site.channel_dim, "block" if site.kind == "block" else site.call

    def measured_once(self, sites: Sequence[Site]) -> bool:
        """Whether every site's output was measured exactly once (else measure the usual way)."""
        return self.complete and all(self.counts.get(self.key(s)) == 1 for s in sites)

    def warn_unfit_masks(self, sites: Sequence[Site]) -> None:
        """Warn, as the measuring taps do, for each site whose output the batch's mask did not fit."""
        for site in sites:
            if self.key(site) in self.unfit:
                mask, shape = self.unfit[self.key(site)]
                warn_unfit_mask(site.fqn, mask, torch.empty(shape, device="meta"), stacklevel=4)


def _batch_first(y: torch.Tensor, mha: nn.MultiheadAttention) -> torch.Tensor:
    return y if mha.batch_first or y.dim() != 3 else y.transpose(0, 1)


class _Calls:
    """Hands ``F.linear(x, layer.weight, ...)`` calls of the model's linear layers, and the
    attention calls of its packed ``nn.MultiheadAttention`` modules, to the discovery (the
    calls that use those weights, caught by :class:`~.watched.Watch`)."""

    def __init__(self, discovery: Discovery, linears: dict[int, nn.Linear],
                 attentions: dict[int, nn.MultiheadAttention]):
        self.discovery, self.linears, self.attentions = discovery, linears, attentions

    def __call__(self, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        if func is F.multi_head_attention_forward and self.attentions:
            call = bind(args, kwargs)
            mha = self.attentions.get(id(call["in_proj_weight"]))
            if mha is not None:
                return self.discovery._attention_call(mha, call, lambda: func(*args, **kwargs))
        out = func(*args, **kwargs)
        if func in LINEAR_FUNCS and isinstance(out, torch.Tensor):
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            layer = self.linears.get(id(weight))
            if layer is not None:
                self.discovery._function_call(layer, args[0] if args else kwargs.get("input"), out)
        return out
