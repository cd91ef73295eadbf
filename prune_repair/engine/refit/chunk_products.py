"""Float32 products of one chunk of rows, about the chunk's column means, shifted back in float64.

The rows ``X`` of a chunk (the ones column LAST) often share a large common part: an image
background, a positive post-ReLU mean. A float32 sum of many alike products rounds coherently
(100k rows of upsampled MNIST digits: 1e-6 of the largest entry). So the products are formed
from ``Xc = X - 1 mu^T`` (``mu``: the column means, rounded to float32, so ``Xc`` is the centred
data up to one rounding per entry), whose terms have both signs, and the shift is put back in
float64::

    X^T X = Xc^T Xc + t mu^T + mu t^T + m mu mu^T,   t = Xc^T 1
    X^T 1 = t + m mu,      X^T Y = Xc^T Y + mu (1^T Y)     (1^T Y summed in float64)

``Xc^T Xc`` is symmetric: only its blocks on and above the diagonal are multiplied, each shifted and
added in float64 while it is in cache, then mirrored (:func:`add_symmetric_gram_`).

Example:
    >>> import torch
    >>> x = torch.rand(1, 5000, 3) + 100.0                       # a large common part
    >>> buf = torch.cat([x, torch.ones(1, 5000, 1)], 2)           # X with its ones column
    >>> X = buf.double()[0]
    >>> exact, plain = X.T @ X, (buf[0].T @ buf[0]).double()   # plain: one float32 product
    >>> G, C = torch.zeros(1, 4, 4, dtype=torch.float64), torch.zeros(1, 4, 2, dtype=torch.float64)
    >>> add_centered_products_(G, C, x.clone(), torch.randn(1, 5000, 2))
    >>> bool((G[0] - exact).norm() < 0.1 * (plain - exact).norm())
    True
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .conv_gram import kernel_of, output_size, patch_sums
from .corr_gram import add_correlation_gram_, correlation_cross, positions_first


SYMMETRIC_BLOCK = 384
"""Columns per block of :func:`add_symmetric_gram_`: each block's float64 sum stays in cache."""


def add_centered_products_(G: torch.Tensor, C: torch.Tensor, x: torch.Tensor, y: torch.Tensor, *,
                           with_gram: bool = True) -> None:
    """Add ``X^T X`` to ``G`` ``(g, d+1, d+1)`` and ``X^T Y`` to ``C`` ``(g, d+1, out/g)`` (float64, the
    ones column of ``X`` last) for the rows ``x`` ``(g, m, d)`` (compute dtype; a float32 ``x`` is centred
    IN PLACE) and ``y`` ``(g, m, out/g)``; ``G`` is left alone without ``with_gram``."""
    m, d = x.shape[1], x.shape[2]
    centre = x.dtype != torch.float64
    mu = x.mean(1, keepdim=True, dtype=torch.float64).to(x.dtype) if centre else None  # (g, 1, d), representable
    if mu is not None:
        x.sub_(mu)
    C[:, :d] += torch.bmm(x.transpose(1, 2), y).double()  # Xc^T Y
    mu64 = mu.double()[:, 0] if mu is not None else x.new_zeros(x.shape[0], d, dtype=torch.float64)
    t = x.sum(1, dtype=torch.float64) if with_gram else None  # (g, d): Xc^T 1
    if t is not None:
        add_symmetric_gram_(G[:, :d, :d], x, (t + (m / 2) * mu64, mu64) if mu is not None else None)
    _add_mean_terms_(G, C, t, mu64, y.sum(1, dtype=torch.float64), m)


def _add_mean_terms_(G: torch.Tensor, C: torch.Tensor, t: torch.Tensor | None, mu: torch.Tensor, y_sum: torch.Tensor,
                     m: int) -> None:
    """The terms of the subtracted means ``mu`` ``(g, d)`` outside ``Xc^T Xc`` and ``Xc^T Y``: ``mu (1^T Y)`` in
    ``C``, and the ones column ``X^T 1 = t + m mu`` (``t = Xc^T 1``; ``None``: ``G`` is left alone) and ``m``."""
    d = mu.shape[1]
    C[:, :d] += mu[:, :, None] * y_sum[:, None, :]
    C[:, d] += y_sum
    if t is not None:
        ones = t + m * mu
        G[:, :d, d] += ones
        G[:, d, :d] += ones
        G[:, d, d] += m


def add_symmetric_gram_(G: torch.Tensor, x: torch.Tensor, shift: tuple[torch.Tensor, torch.Tensor] | None = None
                        ) -> None:
    """``G += x^T x (+ u mu^T + mu u^T)`` for ``G`` ``(g, d, d)`` float64, ``x`` ``(g, m, d)`` in the
    compute dtype and ``shift = (u, mu)`` ``(g, d)`` float64: the products of the blocks on and above the
    diagonal only (about half of ``x^T x``'s multiplications), each added in float64 with its shift and
    mirrored below the diagonal, so no ``d x d`` temporary is formed.

    >>> x = torch.randn(1, 50, 700)
    >>> G = torch.zeros(1, 700, 700, dtype=torch.float64)
    >>> add_symmetric_gram_(G, x)
    >>> bool(torch.allclose(G, (x.double().transpose(1, 2) @ x.double()), atol=1e-4))
    True
    """
    d = x.shape[2]
    blocks = max(1, math.ceil(d / SYMMETRIC_BLOCK))
    edges = [round(i * d / blocks) for i in range(blocks + 1)]
    xt = x.transpose(1, 2)
    for bi in range(blocks):
        rows = slice(edges[bi], edges[bi + 1])
        for bj in range(bi, blocks):
            cols = slice(edges[bj], edges[bj + 1])
            inc = torch.bmm(xt[:, rows], x[:, :, cols]).to(G.dtype)
            if shift is not None:
                u, mu = shift  # u mu^T + mu u^T on this block: one product of inner size 2
                inc.baddbmm_(torch.stack([u[:, rows], mu[:, rows]], 2), torch.stack([mu[:, cols], u[:, cols]], 1))
            G[:, rows, cols] += inc
            if bj != bi:
                G[:, cols, rows] += inc.transpose(1, 2)


def add_mean_shift_(block: torch.Tensor, t: torch.Tensor, mu: torch.Tensor, m: float) -> None:
    """``block += t mu^T + mu t^T + m mu mu^T`` in place (``block`` ``(g, d, d)``, ``t`` ``(g, d, 1)``, ``mu``
    ``(g, 1, d)``), as the symmetric rank-2 update ``u mu^T + mu u^T`` with ``u = t + m mu / 2``: one product
    of inner size 2, one pass over the block and no ``d x d`` temporary.

    >>> g, t = torch.zeros(1, 2, 2, dtype=torch.float64), torch.tensor([[[1.0], [0.0]]], dtype=torch.float64)
    >>> mu = torch.tensor([[[0.0, 2.0]]], dtype=torch.float64)
    >>> add_mean_shift_(g, t, mu, 3.0)
    >>> g
    tensor([[[ 0.,  2.],
             [ 2., 12.]]], dtype=torch.float64)
    """
    mu_t = mu.transpose(1, 2)
    u = t + (m / 2) * mu_t
    block.baddbmm_(torch.cat([u, mu_t], 2), torch.cat([mu, u.transpose(1, 2)], 1))  # one pass over the block


def add_correlation_products_(G: torch.Tensor, C: torch.Tensor, module: nn.Conv1d | nn.Conv2d, padded: torch.Tensor,
                              y: torch.Tensor, *, with_gram: bool = True) -> None:
    """Add ``X^T X`` to ``G`` and ``X^T Y`` to ``C`` (float64, ones column last) for a stride-1 conv's chunk,
    by the correlation Gram (:mod:`~prune_repair.engine.refit.corr_gram`): ``padded`` is the padded input
    in the compute dtype, ``y`` the targets ``(N, out, ...)``. A float32 input is centred per channel first
    (padding included, so the patches shift by the repeated channel means) and shifted back as above."""
    g, kernel = module.groups, kernel_of(module)
    rows = y.shape[0] * math.prod(y.shape[2:])
    mu = torch.zeros(padded.shape[1], dtype=torch.float64, device=padded.device)
    if padded.dtype != torch.float64:
        mu32 = padded.mean((0, 2, 3), dtype=torch.float64).to(padded.dtype)
        padded, mu = padded - mu32[None, :, None, None], mu32.double()
    mu = mu.view(g, -1, 1).expand(-1, -1, math.prod(kernel)).reshape(g, 1, -1)  # (g, 1, d): per patch column
    xl = positions_first(padded)
    y4 = y.reshape(y.shape[0], y.shape[1], *output_size(module, padded))
    y_sum = y.sum([i for i in range(y.dim()) if i != 1], dtype=torch.float64).view(g, -1)
    d = mu.shape[2]
    C[:, :d] += correlation_cross(xl, y4, kernel, g)
    t = None
    if with_gram:
        add_correlation_gram_(G[:, :d, :d], xl, kernel)
        t = patch_sums(module, padded)  # (g, d): Xc^T 1 in float64
        add_mean_shift_(G[:, :d, :d], t[:, :, None], mu, rows)
    _add_mean_terms_(G, C, t, mu[:, 0], y_sum, rows)
