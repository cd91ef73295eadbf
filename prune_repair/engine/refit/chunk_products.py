"""Float32 products of one chunk of rows, about the chunk's column means, shifted back in float64.

The rows ``X`` of a chunk (the ones column LAST) often share a large common part: an image
background, a positive post-ReLU mean. A float32 sum of many alike products rounds coherently
(100k rows of upsampled MNIST digits: 1e-6 of the largest entry). So the products are formed
from ``Xc = X - 1 mu^T`` (``mu``: the column means, rounded to float32, so ``Xc`` is the centred
data up to one rounding per entry), whose terms have both signs, and the shift is put back in
float64::

    X^T X = Xc^T Xc + t mu^T + mu t^T + m mu mu^T,   t = Xc^T 1
    X^T 1 = t + m mu,      X^T Y = Xc^T Y + mu (1^T Y)     (1^T Y summed in float64)

Example:
    >>> import torch
    >>> x = torch.rand(1, 5000, 3) + 100.0                       # a large common part
    >>> buf = torch.cat([x, torch.ones(1, 5000, 1)], 2)
    >>> X = buf.double()[0]
    >>> exact, plain = X.T @ X, (buf[0].T @ buf[0]).double()   # plain: one float32 product
    >>> dG, dC = centered_products(buf, torch.randn(1, 5000, 2))
    >>> bool((dG[0] - exact).norm() < 0.1 * (plain - exact).norm())
    True
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .conv_gram import kernel_of, output_size, patch_sums
from .corr_gram import add_correlation_gram_, correlation_cross, positions_first


def centered_products(buf: torch.Tensor, y: torch.Tensor, *, with_gram: bool = True
                      ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(X^T X, X^T Y)`` in float64 of ``buf`` ``(g, m, d+1)`` (float32 rows, ones column last;
    centred IN PLACE) and ``y`` ``(g, m, out/g)``; ``X^T X`` is ``None`` without ``with_gram``."""
    g, m, n = buf.shape
    d = n - 1
    x = buf[..., :d]
    mu = x.mean(1, keepdim=True, dtype=torch.float64).to(buf.dtype)  # (g, 1, d), representable
    x.sub_(mu)
    mu = mu.double()
    cross = torch.bmm(buf.transpose(1, 2), y).double()  # (g, d+1, o): [Xc^T Y ; 1^T Y (float32)]
    y_sum = y.sum(1, dtype=torch.float64)  # (g, o)
    cross[:, :d] += mu.transpose(1, 2) * y_sum[:, None, :]
    cross[:, d] = y_sum
    if not with_gram:
        return None, cross
    gram = torch.bmm(buf.transpose(1, 2), buf).double()  # [[Xc^T Xc, t], [t^T, m]]
    t = gram[:, :d, d:].clone()  # (g, d, 1)
    mu_t = mu.transpose(1, 2)  # (g, d, 1)
    add_mean_shift_(gram[:, :d, :d], t, mu, m)
    gram[:, :d, d:] = t + m * mu_t
    gram[:, d:, :d] = gram[:, :d, d:].transpose(1, 2)
    gram[:, d, d] = m
    return gram, cross


def add_mean_shift_(block: torch.Tensor, t: torch.Tensor, mu: torch.Tensor, m: float) -> None:
    """``block += t mu^T + mu t^T + m mu mu^T`` in place (``block`` ``(g, d, d)``, ``t`` ``(g, d, 1)``, ``mu``
    ``(g, 1, d)``), as the symmetric rank-2 update ``u mu^T + mu u^T`` with ``u = t + m mu / 2``: two passes
    over the block and no ``d x d`` temporaries (for ``d = 4608`` about 5x faster than the three outer products).

    >>> g, t = torch.zeros(1, 2, 2, dtype=torch.float64), torch.tensor([[[1.0], [0.0]]], dtype=torch.float64)
    >>> mu = torch.tensor([[[0.0, 2.0]]], dtype=torch.float64)
    >>> add_mean_shift_(g, t, mu, 3.0)
    >>> g
    tensor([[[ 0.,  2.],
             [ 2., 12.]]], dtype=torch.float64)
    """
    mu_t = mu.transpose(1, 2)
    u = t + (m / 2) * mu_t
    block.baddbmm_(u, mu).baddbmm_(mu_t, u.transpose(1, 2))


def correlation_products(module: nn.Conv1d | nn.Conv2d, padded: torch.Tensor, y: torch.Tensor, *,
                         with_gram: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(X^T X, X^T Y)`` in float64, ones column last, of a stride-1 conv's chunk by the correlation
    Gram (:mod:`~prune_repair.engine.refit.corr_gram`): ``padded`` is the padded input in the compute
    dtype, ``y`` the targets ``(N, out, ...)``. A float32 input is centred per channel first (padding
    included, so the patches shift by the repeated channel means) and shifted back as above."""
    g, kernel = module.groups, kernel_of(module)
    rows = y.shape[0] * math.prod(y.shape[2:])
    mu = torch.zeros(padded.shape[1], dtype=torch.float64, device=padded.device)
    if padded.dtype != torch.float64:
        mu32 = padded.mean((0, 2, 3), dtype=torch.float64).to(padded.dtype)
        padded, mu = padded - mu32[None, :, None, None], mu32.double()
    mu = mu.view(g, -1, 1).expand(-1, -1, math.prod(kernel)).reshape(g, 1, -1)  # (g, 1, d): per patch column
    xl = positions_first(padded)
    y4 = y.reshape(y.shape[0], y.shape[1], *output_size(module, padded))
    y_sum = y.sum([i for i in range(y.dim()) if i != 1], dtype=torch.float64).view(g, 1, -1)
    d = mu.shape[2]
    cross = padded.new_zeros(g, d + 1, y.shape[1] // g, dtype=torch.float64)
    cross[:, :d] = correlation_cross(xl, y4, kernel, g).double() + mu.transpose(1, 2) * y_sum
    cross[:, d] = y_sum[:, 0]
    if not with_gram:
        return None, cross
    gram = padded.new_zeros(g, d + 1, d + 1, dtype=torch.float64)
    add_correlation_gram_(gram[:, :d, :d], xl, kernel)
    t = patch_sums(module, padded)[:, :, None]  # (g, d, 1): Xc^T 1 in float64
    mu_t = mu.transpose(1, 2)
    add_mean_shift_(gram[:, :d, :d], t, mu, rows)
    gram[:, :d, d:] = t + rows * mu_t
    gram[:, d:, :d] = gram[:, :d, d:].transpose(1, 2)
    gram[:, d, d] = rows
    return gram, cross
