"""Memory handed from one layer's finished Gram statistics (and solve) to the next layer's.

A layer-by-layer refit holds one Gram at a time and drops it once the layer is solved. A fresh
``d x d`` matrix costs more than its zeroing: the operating system maps and clears every page on
first touch (resnet18's 4609-wide layers: 170 MB float64, about 75 ms fresh vs 10 ms to zero a
reused one, one CPU core). :class:`GramStorage` keeps the largest finished buffer of each dtype
(float64 ``G``; the float32 copy a float32 solve factors from) and lends it to the next tensor
that fits; only memory nobody holds any more may be given back.

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
    """One spare buffer per dtype (the largest given back), lent out as tensors of a shape."""

    def __init__(self) -> None:
        self._spare: dict[torch.dtype, torch.Tensor] = {}
        self._lent: dict[torch.dtype, torch.Tensor] = {}

    def empty(self, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """A tensor of ``shape`` with unspecified values: the spare buffer's memory when it is large enough."""
        n, spare = math.prod(shape), self._spare.get(dtype)
        if spare is None or spare.device != device or spare.numel() < n:
            return torch.empty(shape, dtype=dtype, device=device)
        del self._spare[dtype]
        self._lent[dtype] = spare
        return spare[:n].view(shape)

    def zeros(self, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """A zero tensor of ``shape``: the spare buffer's memory when it is large enough."""
        return self.empty(shape, device, dtype).zero_()

    def give_back(self, tensor: torch.Tensor) -> None:
        """Return ``tensor`` (from :meth:`empty` / :meth:`zeros`, or any contiguous floating tensor no one uses
        any more)."""
        if not tensor.is_floating_point() or not tensor.is_contiguous():
            return
        dtype, lent = tensor.dtype, self._lent.pop(tensor.dtype, None)
        whole = lent if lent is not None and lent.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr() \
            else tensor.view(-1)
        spare = self._spare.get(dtype)
        if spare is None or whole.numel() > spare.numel():
            self._spare[dtype] = whole
