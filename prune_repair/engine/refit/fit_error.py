"""Residual of a linear fit from its Gram statistics: ``||Y - X w||^2 = yy - 2 w.C + w^T G w``.

The quadratic term ``sum_r w_r^T G w_r`` is the expensive part (``2 out n^2`` flops with one
dense product ``W G``). ``G`` is symmetric, so it is split into column blocks and only the
blocks on and above the diagonal are multiplied, the ones above counted twice::

    w^T G w = sum_i w_i^T G_ii w_i + 2 sum_{i<j} w_i^T G_ij w_j

which takes about half the flops for wide layers (6 blocks: 21 of 36 block products) and skips
blocks whose weights are all zero (pruned input channels). Several weights (before / after a
refit) go through the same block products, stacked.

Sparse weights of a wide layer (90% sparsity of resnet18's 4608-wide layers) go by rows instead:
``w_r^T G[S_r, S_r] w_r`` over each row's support ``S_r`` (the union over the stacked weights),
the blocks read by one gather per chunk of rows (:mod:`.support_gather`). That reads about
``rows * |S|^2`` entries instead of ``rows * n^2`` products; it is chosen when the gathered
entries, counted at :data:`GATHER_FLOPS` product flops each, cost less. Everything is float64; the
value differs from the one-product form by summation order only.

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

from .support_gather import gather_blocks, support_positions

__all__ = ["quadratic_forms", "relative_errors"]

MIN_BLOCK = 256
"""Narrowest column block: below it the block products lose the speed of a large matrix product."""
MAX_BLOCKS = 6
GATHER_FLOPS = 280
"""Dense-product flops that cost as much as one gathered float64 entry of ``G`` (measured on one
core: about 7 ns per entry gathered from a Gram matrix larger than the cache, 40 Gflop/s products)."""
CHUNK_BYTES = 16 * 2**20


def _block_size(n: int) -> int:
    return max(MIN_BLOCK, -(-n // MAX_BLOCKS))


def quadratic_forms(weights: torch.Tensor, G: torch.Tensor, *, block: int | None = None,
                    by_rows: bool | None = None) -> torch.Tensor:
    """``sum over groups and rows of w_r^T G_g w_r`` for each of ``k`` weights, float64 ``(k,)``.

    ``weights``: ``(k, groups, rows, n)``; ``G``: ``(groups, n, n)`` symmetric. ``block``: the
    column block (default: at least 256 columns, at most 6 blocks). ``by_rows``: over each row's
    support (True), by block products (False), or whichever costs less (None)."""
    k, g, m, n = weights.shape
    weights = weights.to(device=G.device, dtype=torch.float64)
    support = (weights != 0).any(0)  # (g, m, n): the union over the k weights
    if by_rows is None:
        width = int(support.sum(-1).max()) if support.numel() else 0
        by_rows = m * width * width * GATHER_FLOPS < 1.2 * k * m * n * n  # ~7/12 of 2 k m n^2 (upper blocks)
    if by_rows:
        return _by_rows(weights, G, support)
    W = weights.transpose(0, 1).reshape(g, k * m, n)
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


def relative_errors(weights: torch.Tensor, G: torch.Tensor, C: torch.Tensor, yy: torch.Tensor,
                    quad: torch.Tensor | None = None) -> torch.Tensor:
    """``||Y - X w|| / ||Y||`` for each of ``k`` weights ``(k, groups, rows, n)``, from ``G``
    ``(groups, n, n)``, ``C`` ``(groups, n, rows)`` and ``yy = diag(Y^T Y)``; float64 ``(k,)``.
    ``quad``: the ``(k,)`` quadratic forms where the caller has them already (else from ``G``)."""
    W = weights.to(device=G.device, dtype=torch.float64)
    quad = quadratic_forms(W, G) if quad is None else quad.to(device=G.device, dtype=torch.float64)
    cross = torch.einsum("kgmn,gnm->k", W, C.to(torch.float64))  # 2x faster than a product and a sum
    total = yy.sum()
    return ((total - 2 * cross + quad).clamp_min(0) / total.clamp_min(torch.finfo(torch.float64).tiny)).sqrt()


def _by_rows(weights: torch.Tensor, G: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """``quadratic_forms`` as ``sum_r x_r^T G[S_r, S_r] x_r``, rows in chunks of similar support size."""
    k, g, m, n = weights.shape
    sup, W = support.reshape(g * m, n), weights.reshape(k, g * m, n)
    group = torch.arange(g, device=G.device).repeat_interleave(m)
    sizes = sup.sum(1)
    order = torch.argsort(sizes)
    G, total = G.contiguous(), torch.zeros(k, dtype=torch.float64, device=G.device)
    start = 0
    while start < len(order):
        count = max(1, CHUNK_BYTES // (16 * max(1, int(sizes[order[start]])) ** 2))  # sizes ascend:
        last = int(sizes[order[min(len(order), start + count) - 1]])  # the chunk's widest row is its last
        rows = order[start:start + max(1, min(count, CHUNK_BYTES // (16 * max(1, last) ** 2)))]
        width = max(1, int(sizes[rows[-1]]))
        idx, valid = support_positions(sup[rows], width)
        A = gather_blocks(G, group[rows], idx, valid)
        x = torch.gather(W[:, rows], 2, idx.expand(k, -1, -1)).transpose(0, 1)  # (p, k, width)
        x = x * valid[:, None, :]
        total += (torch.bmm(x, A) * x).sum((0, 2))
        start += len(rows)
    return total
