"""Float64 memory handed from one layer's finished Gram statistics to the next layer's.

A layer-by-layer refit holds one Gram at a time and drops it once the layer is solved. A fresh
``d x d`` float64 matrix costs more than its zeroing: the operating system maps and clears every
page on first touch (resnet18's 4609-wide layers: 170 MB, about 75 ms fresh vs 10 ms to zero a
reused one, one CPU core). :class:`GramStorage` keeps the largest finished buffer and zeroes it for
the next Gram that fits; only statistics nobody holds any more may be given back.

Example:
    >>> storage = GramStorage()
    >>> a = storage.zeros((1, 3, 3), torch.device("cpu"))
    >>> a += 1
    >>> storage.give_back(a)
    >>> b = storage.zeros((1, 2, 2), torch.device("cpu"))       # the same memory, zeroed
    >>> b.data_ptr() == a.data_ptr(), float(b.sum())
    (True, 0.0)
"""

from __future__ import annotations

import math

import torch

__all__ = ["GramStorage"]


class GramStorage:
    """One spare float64 buffer (the largest given back), lent out as zeroed tensors."""

    def __init__(self) -> None:
        self._spare: torch.Tensor | None = None
        self._lent: torch.Tensor | None = None

    def zeros(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """A zero float64 tensor of ``shape``: the spare buffer's memory when it is large enough."""
        n, spare = math.prod(shape), self._spare
        if spare is None or spare.device != device or spare.numel() < n:
            return torch.zeros(shape, dtype=torch.float64, device=device)
        self._spare, self._lent = None, spare
        return spare[:n].view(shape).zero_()

    def give_back(self, tensor: torch.Tensor) -> None:
        """Return ``tensor`` (from :meth:`zeros` or any contiguous float64 tensor no one uses any more)."""
        if tensor.dtype != torch.float64 or not tensor.is_contiguous():
            return
        lent, self._lent = self._lent, None
        whole = lent if lent is not None and lent.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr() \
            else tensor.view(-1)
        if self._spare is None or whole.numel() > self._spare.numel():
            self._spare = whole
