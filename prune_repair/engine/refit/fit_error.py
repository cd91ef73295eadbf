"""Residual of a linear fit from its Gram statistics: ``||Y - X w||^2 = yy - 2 w.C + w^T G w``.

The quadratic term ``sum_r w_r^T G w_r`` is the expensive part (``2 out n^2`` flops with one
dense product ``W G``). ``G`` is symmetric, so it is split into column blocks and only the
blocks on and above the diagonal are multiplied, the ones above counted twice::

    w^T G w = sum_i w_i^T G_ii w_i + 2 sum_{i<j} w_i^T G_ij w_j

which takes about half the flops for wide layers (6 blocks: 21 of 36 block products) and skips
blocks whose weights are all zero (pruned input channels). Several weights (before / after a
refit) go through the same block products, stacked. Everything is float64; the value differs from
the one-product form by summation order only.

Example:
    >>> import torch
    >>> X, w = torch.randn(200, 600, dtype=torch.float64), torch.randn(2, 1, 3, 600, dtype=torch.float64)
    >>> G = (X.T @ X)[None]
    >>> q = quadratic_forms(w, G, block=128)
    >>> direct = torch.stack([(X @ w[k, 0].T).square().sum() for k in range(2)])
    >>> bool(torch.allclose(q, direct, rtol=1e-12))
    True
"""

from __future__ import annotations

import torch

__all__ = ["quadratic_forms", "relative_errors"]

MIN_BLOCK = 256
"""Narrowest column block: below it the block products lose the speed of a large matrix product."""
MAX_BLOCKS = 6


def _block_size(n: int) -> int:
    return max(MIN_BLOCK, -(-n // MAX_BLOCKS))


def quadratic_forms(weights: torch.Tensor, G: torch.Tensor, *, block: int | None = None) -> torch.Tensor:
    """``sum over groups and rows of w_r^T G_g w_r`` for each of ``k`` weights, float64 ``(k,)``.

    ``weights``: ``(k, groups, rows, n)``; ``G``: ``(groups, n, n)`` symmetric. ``block``: the
    column block (default: at least 256 columns, at most 6 blocks)."""
    k, g, m, n = weights.shape
    W = weights.to(device=G.device, dtype=torch.float64).transpose(0, 1).reshape(g, k * m, n)
    b = block or _block_size(n)
    edges = list(range(0, n, b)) + [n]
    spans = [(lo, hi) for lo, hi in zip(edges[:-1], edges[1:])]
    parts = [W[:, :, lo:hi].contiguous() for lo, hi in spans]  # contiguous: faster products
    used = [bool(p.any()) for p in parts]
    total = torch.zeros(g, k * m, dtype=torch.float64, device=G.device)
    for i, (lo, hi) in enumerate(spans):
        for j in range(i, len(spans)):
            if used[i] and used[j]:
                part = (torch.bmm(parts[i], G[:, lo:hi, spans[j][0]:spans[j][1]]) * parts[j]).sum(2)
                total += part if i == j else 2 * part
    return total.view(g, k, m).sum((0, 2))


def relative_errors(weights: torch.Tensor, G: torch.Tensor, C: torch.Tensor, yy: torch.Tensor) -> torch.Tensor:
    """``||Y - X w|| / ||Y||`` for each of ``k`` weights ``(k, groups, rows, n)``, from ``G``
    ``(groups, n, n)``, ``C`` ``(groups, n, rows)`` and ``yy = diag(Y^T Y)``; float64 ``(k,)``."""
    W = weights.to(device=G.device, dtype=torch.float64)
    quad = quadratic_forms(W, G)
    cross = (W * C.transpose(1, 2)[None]).sum((1, 2, 3))
    total = yy.sum()
    return ((total - 2 * cross + quad).clamp_min(0) / total.clamp_min(torch.finfo(torch.float64).tiny)).sqrt()
