"""One ``X^T X`` for layers that read the same input (q/k/v projections, gate/up of an MLP).

The patch Gram depends on the input alone (and the layer's geometry), not on the layer's
weights or targets, so layers fed the same tensor need it once. Pass one :class:`SharedInputs`
to the :meth:`~prune_repair.engine.refit.gram.Gram.add` of every layer of a pass: the first layer
that reads a tensor forms its ``X^T X`` and leaves it here; a later layer reading the SAME tensor
object, unchanged (its version counter), with the same geometry, mask and options adds the
stored matrix and forms only its own ``X^T Y``. Entries hold a weak reference to the input (a
freed tensor is never matched) and are dropped oldest first beyond ``max_bytes``. Given the
``readers`` (every layer of the pass), an input's ``X^T X`` is kept only while a layer of the same
geometry has yet to start: a conv net whose layers all differ copies no Gram. :func:`shared_readers`
narrows the readers to the layers a traced forward saw reading one tensor with another.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from prune_repair.engine.refit.gram import Gram
    >>> q, k = nn.Linear(4, 3).double(), nn.Linear(4, 5).double()
    >>> x = torch.randn(10, 4, dtype=torch.float64)
    >>> shared = SharedInputs()
    >>> gq, gk = Gram.for_layer(q), Gram.for_layer(k)
    >>> gq.add(x, q(x).detach(), shared=shared); gk.add(x, k(x).detach(), shared=shared)
    >>> shared.hits, torch.equal(gq.G, gk.G)
    (1, True)
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

DEFAULT_SHARED_BYTES = 2**30


def _geometry(module: nn.Module) -> tuple[Any, ...]:
    """What besides the input decides ``X^T X``: the unfolding of a conv (a linear layer reads rows)."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return (type(module).__name__, module.in_channels, module.kernel_size, module.stride, module.padding,
                module.dilation, module.groups, module.padding_mode)
    return ("rows",)


def _signature(module: nn.Module) -> tuple[Any, ...]:
    """Layers with different signatures never share an ``X^T X`` (a conv's geometry holds its input width)."""
    return _geometry(module), getattr(module, "in_features", None)


def shared_readers(calls: Iterable[tuple[str, Any, Any, Any]], layers: Iterable[tuple[str, Any]],
                   kinds: dict[str, str]) -> list[Any]:
    """The ``layers`` that may share an ``X^T X``: those whose input in the traced ``calls`` (``(fqn,
    module, input, output)``) another of them reads too, and every layer not called as a module
    (attention projections, ``F.linear`` calls: their inputs are reached elsewhere). In resnet18 only
    a stage's first conv and its downsample read one tensor, with different geometries: no Gram is
    copied for a reuse that cannot come (before: 9 copies, 0.19 s of a reconstruction at 112x112).

    Example:
        >>> from torch import nn
        >>> q, k, out = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
        >>> x, h = object(), object()
        >>> calls = [("q", q, x, None), ("k", k, x, None), ("out", out, h, None)]
        >>> shared_readers(calls, [("q", q), ("k", k), ("out", out)], {}) == [q, k]
        True
    """
    read = {id(module): id(x) for _, module, x, _ in calls if x is not None}
    tensors = Counter(read.get(id(module)) for _, module in layers)
    return [module for fqn, module in layers if kinds.get(fqn, "module") != "module"
            or (id(module) in read and tensors[read[id(module)]] > 1)]


class SharedInputs:
    """``X^T X`` of the inputs seen last, keyed by the input tensor (see the module doc)."""

    def __init__(self, max_bytes: int = DEFAULT_SHARED_BYTES, readers: Iterable[nn.Module] | None = None):
        self.max_bytes = max_bytes
        self.hits = 0
        self._entries: list[tuple[tuple, weakref.ref, Any, torch.Tensor]] = []
        readers = list(readers) if readers is not None else None
        self._waiting = Counter(_signature(m) for m in readers) if readers is not None else None
        self._readers = {id(m) for m in readers} if readers is not None else set()
        self._started: set[int] = set()

    def wanted(self, gram: Any) -> bool:
        """Whether a layer that has not started could reuse what ``gram``'s layer forms (always, without
        ``readers``)."""
        return self._waiting is None or (id(gram.module) in self._readers and self._waiting[_signature(gram.module)] > 0)

    def _key(self, gram: Any, x: torch.Tensor, mask: torch.Tensor | None) -> tuple:
        return (id(x), x._version, tuple(x.shape), x.dtype, str(x.device), id(mask), _geometry(gram.module),
                gram.d_in, gram.groups, str(gram.precision), str(gram.method), str(gram.G.device))

    def lookup(self, gram: Any, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
        """The stored ``X^T X`` increment for ``x`` read by ``gram``'s layer, or ``None`` (the layer counts as
        started)."""
        if self._waiting is not None and id(gram.module) in self._readers and id(gram.module) not in self._started:
            self._started.add(id(gram.module))
            self._waiting[_signature(gram.module)] -= 1
        key = self._key(gram, x, mask)
        for k, x_ref, mask_ref, increment in self._entries:
            if k == key and x_ref() is x and (mask_ref is None or mask_ref() is mask):
                self.hits += 1
                return increment
        return None

    def store(self, gram: Any, x: torch.Tensor, mask: torch.Tensor | None, increment: torch.Tensor) -> None:
        """Keep ``increment`` (the ``G`` one ``add`` of ``x`` made) for later layers reading ``x``."""
        mask_ref = weakref.ref(mask) if mask is not None else None
        self._entries.append((self._key(gram, x, mask), weakref.ref(x), mask_ref, increment))
        self._entries = [e for e in self._entries if e[1]() is not None]  # inputs freed since
        while len(self._entries) > 1 and sum(e[3].numel() * e[3].element_size() for e in self._entries) > self.max_bytes:
            self._entries.pop(0)

    def clear(self) -> None:
        """Drop every entry."""
        self._entries.clear()
