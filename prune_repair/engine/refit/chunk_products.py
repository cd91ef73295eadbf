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
import torch.nn.functional as F
from torch import nn

from .conv_gram import kernel_of, output_size, pad_input, zero_pads
from .corr_gram import add_correlation_gram_, correlation_cross, positions_first


SYMMETRIC_BLOCK = 384
"""Columns per block of :func:`add_symmetric_gram_`: each block's float64 sum stays in cache."""


def add_centered_products_(G: torch.Tensor, C: torch.Tensor, x: torch.Tensor, y: torch.Tensor, *,
                           with_gram: bool = True) -> None:
    """Add ``X^T X`` to ``G`` ``(g, d+1, d+1)`` and ``X^T Y`` to ``C`` ``(g, d+1, out/g)`` (float64, the
    ones column of ``X`` last) for the rows ``x`` ``(g, m, d)`` (compute dtype; a float32 ``x`` is centred
    IN PLACE) and ``y`` ``(g, m, out/g)``; ``G`` is left alone without ``with_gram``."""
    m, d = x.shape[1], x.shape[2]
    mu = x.mean(1, keepdim=True) if x.dtype != torch.float64 else None  # (g, 1, d): any shift is exact
    if mu is not None:
        x.sub_(mu)
    C[:, :d] += torch.bmm(x.transpose(1, 2), y).double()  # Xc^T Y
    mu64 = mu.double()[:, 0] if mu is not None else x.new_zeros(x.shape[0], d, dtype=torch.float64)
    t = _column_sums(x) if with_gram else None  # (g, d): Xc^T 1
    if t is not None:
        add_symmetric_gram_(G[:, :d, :d], x, (t + (m / 2) * mu64, mu64) if mu is not None else None)
    _add_mean_terms_(G, C, t, mu64, _column_sums(y), m)


def _column_sums(x: torch.Tensor) -> torch.Tensor:
    """``x.sum(-2)`` as float64, summed in ``x``'s dtype: torch sums float32 pairwise (a relative error of
    about 1e-7 of the sum of magnitudes, below the products' own), and a float64 sum of a float32 chunk
    converts it element by element, 5-15x slower."""
    return x.sum(-2).double()


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


def add_correlation_products_(G: torch.Tensor, C: torch.Tensor, module: nn.Conv1d | nn.Conv2d, x: torch.Tensor,
                              y: torch.Tensor, *, with_gram: bool = True) -> None:
    """Add ``X^T X`` to ``G`` and ``X^T Y`` to ``C`` (float64, ones column last) for a stride-1 conv's chunk,
    by the correlation Gram (:mod:`~prune_repair.engine.refit.corr_gram`): ``x`` is the chunk's input in
    the compute dtype, ``y`` the targets ``(N, out, ...)``. A float32 input is centred per channel BEFORE
    padding, so zero padding stays zero and the products skip it (other padding modes repeat the centred
    input), and the means are put back per tap (:func:`_add_patch_means_`)."""
    g, kernel = module.groups, kernel_of(module)
    mu = None if x.dtype == torch.float64 else x.mean([i for i in range(x.dim()) if i != 1])
    padded = pad_input(module, x - mu.view(-1, *[1] * (x.dim() - 2)) if mu is not None else x)
    top, bottom, left, right = zero_pads(module)
    inside = ((top, padded.shape[2] - bottom), (left, padded.shape[3] - right))
    xl = positions_first(padded)
    y4 = y.reshape(y.shape[0], y.shape[1], *output_size(module, padded))
    correlation_cross(xl, y4, kernel, g, inside=inside, out=C[:, :-1])
    low_rank = _add_patch_means_(G if with_gram else None, C, module, x, padded, y4,
                                 mu.double() if mu is not None else None)
    if with_gram:
        add_correlation_gram_(G[:, :-1, :-1], xl, kernel, inside=inside, low_rank=low_rank)


def _add_patch_means_(G: torch.Tensor | None, C: torch.Tensor, module: nn.Conv1d | nn.Conv2d, x: torch.Tensor,
                      padded: torch.Tensor, y: torch.Tensor, mu: torch.Tensor | None
                      ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The terms of the channel means ``mu`` (``None``: not centred) taken out of a conv's input before
    padding, and the ones column. A patch is ``X = X' + M`` with ``M[p, (c, tap)] = mu_c`` where the tap
    reads inside the input, 0 in zero padding (``inside``: the padded map of ones). With ``P`` the
    ``(taps, positions)`` patches of ``inside``, ``U = X'^T P^T`` (box sums of the centred input) and
    ``K = N P P^T`` (``N`` samples), per block of taps ``X^T X = X'^T X' + U mu^T + mu U^T + mu mu^T K``:
    one product of inner size ``2 taps``, returned as its two factors (``None``: nothing to add) for the
    correlation Gram to add while it writes those rows of ``G``. Likewise ``X^T 1 = X'^T 1 + N mu (P 1)`` and
    ``X^T Y = X'^T Y + mu (P Y)`` are added here."""
    g, kernel = module.groups, kernel_of(module)
    taps, out = math.prod(kernel), y.shape[1]
    inside = pad_input(module, x.new_ones(1, 1, *x.shape[2:], dtype=torch.float64))
    P = F.unfold(inside, kernel)[0]                                               # (taps, positions)
    y_sum = y.sum(0).double().reshape(out, -1)                                     # (out, positions)
    C[:, -1] += y_sum.sum(1).view(g, -1)
    patches = F.unfold(padded.sum(0, keepdim=True).double(), kernel)[0]           # (C * taps, positions)
    if mu is not None:
        by_tap = (P @ y_sum.T).view(taps, g, 1, out // g)                          # P Y, (taps, g, 1, out/g)
        C[:, :-1] += (mu.view(g, -1, 1, 1) * by_tap.permute(1, 0, 2, 3).transpose(1, 2)).reshape(g, -1, out // g)
    if G is None:
        return None
    d = patches.shape[0] // g
    n = y.shape[0]
    rows = n * y[0, 0].numel()
    ones = patches.sum(1)
    if mu is not None:
        ones = ones + (mu[:, None] * (n * P.sum(1))[None]).reshape(-1)
    G[:, :-1, -1] += ones.view(g, d)
    G[:, -1, :-1] += ones.view(g, d)
    G[:, -1, -1] += rows
    if mu is None:
        return None
    U = (patches @ P.T).view(g, d, taps)                                          # (g, (c, tap), tap')
    K = n * (P @ P.T)                                                             # both taps inside, all samples
    eye = torch.eye(taps, dtype=torch.float64, device=G.device)
    mu_g = mu.view(g, -1)
    lhs = torch.cat([U, (mu_g[:, :, None, None] * eye).reshape(g, d, taps)], 2)    # (g, d, 2 taps)
    right_mu = (eye[None, :, None, :] * mu_g[:, None, :, None]).reshape(g, taps, d)   # delta(t'', t') mu_c'
    right_u = U.transpose(1, 2) + (K[None, :, None, :] * mu_g[:, None, :, None]).reshape(g, taps, d)
    return lhs, torch.cat([right_mu, right_u], 1)
