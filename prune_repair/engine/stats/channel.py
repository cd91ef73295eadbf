"""Per-channel moments of one tensor: float64, streaming and mergeable (Chan's parallel update).

:class:`ChannelStats` is what every statistic of the package is made of: a site's mean and
variance per channel over the values seen, merged batch by batch (and across ranks by
:func:`~prune_repair.engine.run.distributed.pool_moments`) without float32 global sums.

Example:
    >>> import torch
    >>> y = torch.tensor([[1.0, 10.0], [3.0, 30.0]])
    >>> s = ChannelStats.of(y[:1], -1).merge(ChannelStats.of(y[1:], -1))
    >>> s.count, s.mean.tolist(), s.std.tolist()
    (2, [2.0, 20.0], [1.0, 10.0])
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["ChannelStats", "merge_moments"]


def merge_moments(a: tuple, b: tuple, comoment: Callable[[torch.Tensor], torch.Tensor] = torch.square) -> tuple:
    """Pooled ``(count, mean, m2)`` of two parts (Chan's parallel update); ``comoment(delta)``
    squares the mean difference (an outer product for cross-moments).

    >>> x = torch.tensor([1.0, 2.0, 3.0, 10.0], dtype=torch.float64)
    >>> part = lambda v: (len(v), v.mean(), v.var(correction=0) * len(v))
    >>> n, mean, m2 = merge_moments(part(x[:1]), part(x[1:]))
    >>> n, float(mean), torch.isclose(m2 / n, x.var(correction=0)).item()
    (4, 4.0, True)
    """
    (na, mean_a, m2_a), (nb, mean_b, m2_b) = a, b
    n = na + nb
    delta = mean_b - mean_a
    return n, mean_a + delta * (nb / n), m2_a + m2_b + comoment(delta) * (na * nb / n)


@dataclass
class ChannelStats:
    """Mean and variance of each channel over ``count`` values per channel (float64).

    Batches merge with Chan's parallel update, which gives the exact pooled
    mean/variance of everything seen, without float32 global sums.
    """

    count: int
    mean: torch.Tensor
    m2: torch.Tensor  # sum of squared deviations from the mean

    @classmethod
    def of(cls, y: torch.Tensor, channel_dim: int, mask: torch.Tensor | None = None) -> "ChannelStats":
        """Statistics of one output tensor; ``channel_dim`` is 1 or -1.

        ``mask`` (bool, shaped like the leading dims of ``y``, e.g. an (N, T) attention mask
        for an (N, T, C) output) keeps only the positions where it is True; it needs the
        channels on the last dim.

        >>> y = torch.tensor([[[1.0], [3.0], [100.0]]])           # (N=1, T=3, C=1)
        >>> ChannelStats.of(y, -1, mask=torch.tensor([[True, True, False]])).mean
        tensor([2.], dtype=torch.float64)

        Floating outputs below float64 are reduced by :func:`_shifted_moments` (float32 sums
        of small chunks about a first estimate of the mean, float64 across chunks: no float64
        copy of the activations and a temporary of at most one chunk); float64 and integer
        outputs in float64 directly.
        """
        y = y.detach()
        if mask is not None:
            if channel_dim % y.dim() != y.dim() - 1 or tuple(mask.shape) != tuple(y.shape[:mask.dim()]):
                raise ValueError(f"a mask of shape {list(mask.shape)} does not fit an output of shape "
                                 f"{list(y.shape)} with channels on dim {channel_dim}")
            y = y[mask.to(device=y.device, dtype=torch.bool)]
        cdim = channel_dim % y.dim()
        channels = y.shape[cdim]
        if y.dim() == 1:  # a (C,) output: one value per channel
            return cls(1, y.to(torch.float64), torch.zeros_like(y, dtype=torch.float64))
        if y.dtype in (torch.float32, torch.float16, torch.bfloat16) and y.numel() > 0:
            if cdim == y.dim() - 1 or (cdim == 1 and y.movedim(1, -1).is_contiguous()):
                last = y if cdim == y.dim() - 1 else y.movedim(cdim, -1)
                rows = last.reshape(-1, channels)  # a view when contiguous
                return cls(rows.shape[0], *_shifted_moments(rows, rows=True))
            if cdim == 1:
                maps = y.reshape(y.shape[0], channels, -1)
                return cls(maps.shape[0] * maps.shape[2], *_shifted_moments(maps, rows=False))
        y = y.to(torch.float64)
        dims = [d for d in range(y.dim()) if d != cdim]
        count = y.numel() // max(channels, 1)
        var, mean = torch.var_mean(y, dim=dims, correction=0)
        return cls(count, mean, var * count)

    def merge(self, other: "ChannelStats") -> "ChannelStats":
        """Pooled statistics of both (order does not matter)."""
        return ChannelStats(*merge_moments((self.count, self.mean, self.m2), (other.count, other.mean, other.m2)))

    @property
    def var(self) -> torch.Tensor:
        """Population variance (divides by count)."""
        return self.m2 / self.count

    @property
    def std(self) -> torch.Tensor:
        return self.var.clamp_min(0).sqrt()

    @classmethod
    def from_moments(cls, mean: torch.Tensor, std: torch.Tensor, count: int = 1) -> "ChannelStats":
        mean = mean.to(torch.float64)
        return cls(count, mean, std.to(torch.float64).square() * count)

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ChannelStats":
        return cls(int(d["count"]), d["mean"].to(torch.float64), d["m2"].to(torch.float64))


CHUNK_ELEMENTS = {"cpu": 1 << 18, "cuda": 1 << 24}
"""Elements per temporary in :func:`_shifted_moments`: a small part of a large activation
(little added to the peak memory; on the CPU 1 MiB, so a centred chunk stays in cache for its
reductions), yet few enough chunks that per-op costs stay small (4 MiB chunks measured faster
on outputs alone, but not inside a pass, where the forward evicts the buffer between sites)."""

SHORT_MAPS = 32
"""Feature maps with fewer values than this are centred into channel-last rows (reductions over
a handful of values per map are slow; a column reduction over rows is not)."""

_HELD = threading.local()


def _scratch(numel: int, device: torch.device) -> torch.Tensor:
    """A float32 buffer of ``numel`` elements; on the CPU one per thread, kept between calls (a
    fresh large allocation costs a page fault per 4 KiB on first touch, more than the reduction)."""
    if device.type != "cpu":
        return torch.empty(numel, dtype=torch.float32, device=device)
    held = getattr(_HELD, "buffer", None)
    if held is None or held.numel() < numel:
        held = _HELD.buffer = torch.empty(numel, dtype=torch.float32)
    return held[:numel]


def _shifted_moments(x: torch.Tensor, rows: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 ``(mean, m2)`` per channel of ``(R, C)`` rows (``rows=True``) or ``(N, C, S)`` maps.

    Values are centred, one chunk along dim 0 at a time, about the float32 rounding of the
    first chunk's mean (exact near the mean, Sterbenz) into a reused float32 buffer (the first
    chunk is copied there, its mean taken and subtracted in place: the activations are read
    once, which matters when they come from memory rather than cache), squared in place; each
    chunk is reduced in float32 (torch's cascaded sums: each map's ``S`` values, or a chunk's
    rows per channel), everything across chunks (and maps) in float64, and the shift is
    corrected exactly. So large offsets cause no cancellation and the
    activations are never copied whole (the temporary is one chunk).
    """
    c, items = x.shape[1], x.shape[0]
    count = x.numel() // max(c, 1)
    short = not rows and x.shape[2] < SHORT_MAPS
    per_item = c * (1 if rows else x.shape[2])
    step = max(1, CHUNK_ELEMENTS.get(x.device.type, 1 << 22) // max(per_item, 1))
    buffer = _scratch(min(step, items) * per_item, x.device)
    shift = s1 = s2 = None  # few small ops per chunk: they cost more than the sums on small outputs
    for start in range(0, items, step):
        chunk = x if step >= items else x[start:start + step]
        n = chunk.shape[0]
        out = buffer if n == min(step, items) else buffer[:n * per_item]
        if rows or short:  # centred channel-last rows (R, C): column sums
            src = chunk if rows else chunk.transpose(1, 2)
            if shift is None:  # the first chunk copied, its mean taken in the buffer, centred there
                d = out.view(src.shape).copy_(src).view(-1, c)
                shift = d.sum(0).div_(d.shape[0])
                d.sub_(shift)
            else:
                d = torch.sub(src, shift, out=out.view(src.shape)).view(-1, c)
            p1, p2 = d.sum(0), d.mul_(d).sum(0)
        else:  # centred maps (n, C, S): float32 over each map, float64 across maps
            if shift is None:
                d = out.view(chunk.shape).copy_(chunk)
                shift = d.sum(2).sum(0).div_(n * d.shape[2])
                d.sub_(shift.view(c, 1))
            else:
                d = torch.sub(chunk, shift.view(c, 1), out=out.view(chunk.shape))
            p1, p2 = d.sum(2).sum(0, dtype=torch.float64), d.mul_(d).sum(2).sum(0, dtype=torch.float64)
        if s1 is None:
            s1, s2 = p1.to(torch.float64), p2.to(torch.float64)
        else:
            s1, s2 = s1.add_(p1), s2.add_(p2)
    offset = s1 / count
    m2 = s2.sub_(s1 * offset).clamp_min_(0)
    return offset.add_(shift), m2
