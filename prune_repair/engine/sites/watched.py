"""Calls that use given parameters, caught without a torch-function mode.

A parent module may hand a child's weight to a function (swin_t passes its ``qkv`` linear's
weight to ``F.linear``; ``nn.MultiheadAttention`` its in-projection to
``F.multi_head_attention_forward``), so the child's hooks never see the call. A
:class:`~torch.overrides.TorchFunctionMode` would catch it, but it runs Python code for
EVERY torch call of the pass (swin_t: about 2,600 per forward, 2% of it). Instead, while
:class:`Watch` is entered, each watched parameter's slot in its module(s) holds a stand-in,
a tensor subclass sharing the parameter's storage, so only the calls that use a watched
parameter run Python code: the handler gets them with the parameters themselves in place of
the stand-ins (autograd and in-place changes reach the parameters as usual).

Entering is counted, so the threads of a lockstep pass (which take turns) may enter and
leave in any order; the slots are restored when the last one leaves, also on errors.

Example:
    >>> import torch
    >>> from torch import nn
    >>> import torch.nn.functional as F
    >>> layer = nn.Linear(3, 2)
    >>> seen = []
    >>> def handler(func, args, kwargs):
    ...     seen.append(func.__name__)
    ...     return func(*args, **kwargs)
    >>> with Watch(layer, [layer.weight], handler):
    ...     y = F.relu(layer(torch.randn(4, 3)))   # relu never reaches the handler
    >>> seen, type(layer.weight).__name__
    (['linear'], 'Parameter')
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.parameter import is_lazy

Handler = Callable[[Callable[..., Any], tuple, dict], Any]
"""``handler(func, args, kwargs)``: run the call (``func(*args, **kwargs)``) and return its result."""


class _Stand(torch.Tensor):
    """A watched parameter's stand-in during a pass: every call it takes part in goes to its handler."""

    _param: torch.Tensor
    _handler: Handler

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        handlers: list[Handler] = []
        args = tuple(_unwrap(a, handlers) for a in args)
        kwargs = {k: _unwrap(v, handlers) for k, v in kwargs.items()} if kwargs else {}
        return handlers[0](func, args, kwargs)


def _unwrap(value: Any, handlers: list[Handler]) -> Any:
    """``value`` with its stand-ins (itself, or items of a list or tuple: ``torch.cat([w, ...])``)
    replaced by their parameters; each stand-in's handler appended to ``handlers``."""
    if isinstance(value, _Stand):
        handlers.append(value._handler)
        return value._param
    if isinstance(value, (list, tuple)) and any(isinstance(v, _Stand) for v in value):
        return type(value)(_unwrap(v, handlers) for v in value)
    return value


class Watch:
    """Context manager: the calls of ``model`` that use one of ``params`` go to ``handler``."""

    def __init__(self, model: nn.Module, params: Iterable[torch.Tensor], handler: Handler):
        self.model, self.handler = model, handler
        self.params = {id(p): p for p in params}
        self._lock = threading.Lock()
        self._entered = 0
        self._slots: list[tuple[dict, str, torch.Tensor]] = []

    def __enter__(self) -> "Watch":
        with self._lock:
            self._entered += 1
            if self._entered == 1 and self.params:
                self._swap()
        return self

    def __exit__(self, *exc: Any) -> None:
        with self._lock:
            self._entered -= 1
            if self._entered == 0:
                self._restore()

    def _swap(self) -> None:
        stands: dict[int, _Stand] = {}
        try:
            for module in self.model.modules():
                for name, param in module._parameters.items():
                    if param is None or id(param) not in self.params or is_lazy(param):
                        continue  # a lazy module's weight is materialized in place by its first call
                    if id(param) not in stands:
                        stand = torch.Tensor._make_subclass(_Stand, param, param.requires_grad)
                        stand._param, stand._handler = param, self.handler
                        stands[id(param)] = stand
                    self._slots.append((module._parameters, name, param))
                    module._parameters[name] = stands[id(param)]
        except BaseException:
            self._restore()
            raise

    def _restore(self) -> None:
        while self._slots:
            slots, name, param = self._slots.pop()
            slots[name] = param
