"""Exact k-th smallest score over many tensors without sorting or copying them whole.

:func:`keep_masks` prunes exactly ``k`` of the lowest scores of a list of tensors, ties
going to the earlier tensor and then to the lower flat index. The threshold is found by
selection: quantiles of a strided sample bracket it, one counting pass over chunks checks
the bracket (narrowing it when needed), and only the few values inside the bracket are
gathered for ``kthvalue``. Extra memory is a few chunk-sized temporaries plus the bracket
(about ``n / 32`` values at most), instead of a sorted float64 copy of everything.

    >>> keep = keep_masks([torch.tensor([3.0, 1.0, 2.0]), torch.tensor([1.0])], 2)
    >>> [m.tolist() for m in keep]
    [[True, False, True], [False]]
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Transform = Callable[[torch.Tensor], torch.Tensor] | None

CHUNK = 1 << 22
"""Elements per temporary of a counting pass."""
MIN_CAP = 1 << 20
"""Bracket size below which its values are gathered."""
SAMPLE = 1 << 17
"""Values in the sample whose quantiles bracket the threshold."""


def _view(x: torch.Tensor, dtype: torch.dtype, transform: Transform) -> torch.Tensor:
    """A chunk as scores: ``transform`` (e.g. ``torch.abs``) applied per chunk, never to the whole tensor."""
    return (x if transform is None else transform(x)).to(dtype)


def _chunks(flats: list[torch.Tensor], dtype: torch.dtype, transform: Transform = None):
    for x in flats:
        for start in range(0, x.numel(), CHUNK):
            yield _view(x[start:start + CHUNK], dtype, transform)


def _count(flats: list[torch.Tensor], dtype: torch.dtype, lo: torch.Tensor, hi: torch.Tensor,
           transform: Transform = None) -> tuple[int, int]:
    """``(#values < lo, #values <= hi)`` in one pass (one host sync)."""
    below = upto = None
    for c in _chunks(flats, dtype, transform):
        b, u = (c < lo).sum(), (c <= hi).sum()
        below, upto = (b, u) if below is None else (below + b, upto + u)
    both = torch.stack([below, upto]).tolist()
    return int(both[0]), int(both[1])


def kth_smallest(flats: list[torch.Tensor], k: int, dtype: torch.dtype, transform: Transform = None) -> torch.Tensor:
    """The ``k``-th smallest (1-based) of all values of the 1-d ``flats`` (after ``transform``), as a 0-d tensor."""
    n = sum(x.numel() for x in flats)
    device = flats[0].device
    lo = torch.tensor(-math.inf, dtype=dtype, device=device)
    hi = torch.tensor(math.inf, dtype=dtype, device=device)
    below, upto = 0, n  # invariant: below = #(< lo) < k <= upto = #(<= hi)
    cap = max(MIN_CAP, n // 32)
    stride = max(1, n // SAMPLE)
    for _ in range(16):
        if upto - below <= cap or bool(lo == hi):
            break
        sample = torch.cat([_view(x[::stride], dtype, transform) for x in flats])
        sample = sample[(sample >= lo) & (sample <= hi)].sort().values
        if sample.numel() < 16:
            stride = max(1, stride // 16)
            continue
        q, delta = (k - below) / (upto - below), 4.0 / math.sqrt(sample.numel())
        last = sample.numel() - 1
        p_lo = sample[max(0, math.floor((q - delta) * last))]
        p_hi = sample[min(last, math.ceil((q + delta) * last))]
        b, u = _count(flats, dtype, p_lo, p_hi, transform)
        if b < k <= u:
            lo, hi, below, upto = p_lo, p_hi, b, u
        elif k <= b:  # the threshold is below p_lo
            hi, upto = torch.nextafter(p_lo, lo), b
        else:  # above p_hi
            lo, below = torch.nextafter(p_hi, hi), u
    if bool(lo == hi):
        return lo
    inside = torch.cat([c[(c >= lo) & (c <= hi)] for c in _chunks(flats, dtype, transform)])
    return inside.kthvalue(k - below).values


def keep_masks(scores: list[torch.Tensor], k: int, transform: Transform = None) -> list[torch.Tensor]:
    """Boolean keep-masks (shaped like ``scores``) pruning exactly the ``k`` lowest values.

    ``transform`` maps raw tensors to scores chunk by chunk (``torch.abs`` prunes by magnitude
    straight from the weights, with no score copy)."""
    if k <= 0:
        return [torch.ones(s.shape, dtype=torch.bool, device=s.device) for s in scores]
    dtype = torch.promote_types(torch.float32, scores[0].dtype)
    for s in scores[1:]:
        dtype = torch.promote_types(dtype, s.dtype)
    flats = [s.detach().reshape(-1) for s in scores]
    v = kth_smallest(flats, k, dtype, transform)
    counts = torch.stack([torch.stack([(c < v).sum(), (c == v).sum()])
                          for c in _chunks(flats, dtype, transform)]).tolist()
    ties = k - sum(lt for lt, _ in counts)  # values equal to v to prune, earliest first
    masks, chunk = [], 0
    for s, x in zip(scores, flats):
        keep = torch.empty(x.numel(), dtype=torch.bool, device=x.device)
        for start in range(0, x.numel(), CHUNK):
            c = _view(x[start:start + CHUNK], dtype, transform)
            eq = counts[chunk][1]
            chunk += 1
            if ties >= eq:  # every tie in this chunk is pruned
                torch.gt(c, v, out=keep[start:start + CHUNK])
                ties -= eq
            elif ties <= 0:
                torch.ge(c, v, out=keep[start:start + CHUNK])
            else:  # the boundary: the first `ties` equal values are pruned
                part = keep[start:start + CHUNK]
                torch.gt(c, v, out=part)
                part[(c == v).nonzero().flatten()[ties:]] = True
                ties = 0
        masks.append(keep.view(s.shape))
    return masks
