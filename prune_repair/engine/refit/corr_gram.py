"""The patch Gram of a stride-1 conv from shifted correlations of its input, without im2col.

For a stride-1, dilation-1 conv over an (already padded) input ``x`` of shape ``(N, C, Hp, Wp)``
with a ``kh x kw`` kernel, the patch column ``(c, a, b)`` at output position ``(i, j)`` is
``x[c, i+a, j+b]``, so one block of the Gram matrix is a correlation at the offset
``(u, v) = (a'-a, b'-b)``::

    G[(c,a,b), (c',a',b')] = sum_{p in [a, a+Ho), q in [b, b+Wo)} x[c, p, q] x[c', p+u, q+v]

All blocks with the same offset share the sum over the CORE rectangle (the positions every
one of them covers); each block adds the thin L-shaped rest of its own rectangle (at most
``kh-1`` rows and ``kw-1`` columns). Blocks at the opposite offset are transposes. So the
products are ``(2k-1)^2 / 2`` core correlations plus border strips instead of ``k^4`` full
ones: exact (the same sums, in another order), and for a 3x3 kernel on maps of 14x14 and
more about 3x fewer multiplications (:func:`correlation_cost` counts them).

Example:
    >>> import torch, torch.nn.functional as F
    >>> x = torch.randn(2, 3, 6, 7, dtype=torch.float64)
    >>> G = torch.zeros(1, 27, 27, dtype=torch.float64)
    >>> add_correlation_gram_(G, positions_first(x), (3, 3))
    >>> X = F.unfold(x, 3).transpose(1, 2).reshape(-1, 27)          # im2col rows
    >>> torch.allclose(G[0], X.T @ X)
    True
"""

from __future__ import annotations

import functools

import torch


PRODUCT_ROWS = 8192
"""Rows per float32 product (partial products are added in float64)."""
THIN_PRODUCT_ROWS, THIN_CHANNELS = 1024, 16
"""Products with fewer than ``THIN_CHANNELS`` columns a side sum their rows one after another, and their
rounding grows with the rows (8 channels of image-like input over 128 x 28 x 28 rows: 1.1e-6 of the Gram
in chunks of 1,024 rows, 5.6e-6 in chunks of 8,192); from 16 channels on it does not (1e-7 either way),
so wider products take long chunks, with fewer float64 partial sums (the 4x4 maps of resnet18's last
stage: 0.2 s of conversions and sums per layer)."""


def product_rows(width: int) -> int:
    """Rows per float32 product whose narrower side has ``width`` columns."""
    return PRODUCT_ROWS if width >= THIN_CHANNELS else THIN_PRODUCT_ROWS


def _offsets(kh: int, kw: int) -> list[tuple[int, int]]:
    """Offsets ``(u, v)`` of one half plane (the others are transposes)."""
    return [(u, v) for u in range(kh) for v in range(-(kw - 1), kw) if u > 0 or v >= 0]


def _span(k: int, t: int, size: int) -> tuple[range, int, int]:
    """For a kernel of ``k`` taps, offset ``t`` and ``size`` outputs: the first taps ``a`` whose
    partner ``a + t`` exists, and the core ``[lo, hi)`` that every window ``[a, a + size)`` covers."""
    first, last = max(0, -t), min(k - 1, k - 1 - t)
    return range(first, last + 1), last, first + size


def supports(out_size: tuple[int, int], kernel: tuple[int, int]) -> bool:
    """Whether the core decomposition applies: every output dim at least ``kernel - 1``."""
    return all(o >= k - 1 for o, k in zip(out_size, kernel))


def correlation_cost(out_size: tuple[int, int], kernel: tuple[int, int]) -> int:
    """Multiply-adds of :func:`add_correlation_gram_` per sample and channel pair (im2col: ``(kh kw)^2 Ho Wo``).

    >>> round(correlation_cost((28, 28), (3, 3)) / (81 * 28 * 28), 2)   # 5x fewer than im2col
    0.2
    """
    (ho, wo), (kh, kw) = out_size, kernel
    total = 0
    for u, v in _offsets(kh, kw):
        taps_a, p0, p1 = _span(kh, u, ho)
        taps_b, q0, q1 = _span(kw, v, wo)
        core = (p1 - p0) * (q1 - q0)
        total += core + len(taps_a) * len(taps_b) * (ho * wo - core)
    return total


def positions_first(x: torch.Tensor) -> torch.Tensor:
    """A padded input ``(N, C, Hp, Wp)`` as ``(Hp, Wp, N, C)``: a window of positions is one strided slice."""
    return x.permute(2, 3, 0, 1).contiguous()


def add_correlation_gram_(out: torch.Tensor, xl: torch.Tensor, kernel: tuple[int, int]) -> None:
    """Add the stride-1 patch Gram of a padded input, given as :func:`positions_first`'s
    ``(Hp, Wp, N, C)``, to ``out`` ``(groups, d, d)`` (``d = C/groups * kh * kw``, columns in
    ``weight.reshape(out, -1)`` order).

    Products are formed in ``x``'s dtype, assembled into one matrix and added to ``out`` (float64) once.
    """
    kh, kw = kernel
    g = out.shape[0]
    hp, wp, n, c = xl.shape
    cg = c // g
    ho, wo = hp - kh + 1, wp - kw + 1
    if not supports((ho, wo), kernel):
        raise ValueError(f"the correlation Gram needs outputs of at least {kh - 1}x{kw - 1}, got {ho}x{wo}: use im2col")
    full = xl.new_empty(g, kh, kw, cg, kh, kw, cg)  # tap-major: a block is a slice of rows, written whole
    flat = xl.view(hp * wp, n, c)
    for u, v in _offsets(kh, kw):
        taps_a, p0, p1 = _span(kh, u, ho)
        taps_b, q0, q1 = _span(kw, v, wo)
        blocks = _product(xl[p0:p1, q0:q1].reshape(-1, c), xl[p0 + u:p1 + u, q0 + v:q1 + v].reshape(-1, c), g)[None]
        pairs = [(a, b) for a in taps_a for b in taps_b]
        border = _borders(tuple(pairs), p0, p1, q0, q1, ho, wo, wp).to(xl.device)
        if border.shape[1]:  # every block of this offset has as many border positions: one batched product
            left = flat.index_select(0, border.reshape(-1)).view(len(pairs), -1, c)
            right = flat.index_select(0, border.reshape(-1) + (u * wp + v)).view(len(pairs), -1, c)
            blocks = blocks + _product(left, right, g)
        ia, ib = torch.tensor([a for a, _ in pairs]), torch.tensor([b for _, b in pairs])
        blocks = blocks.to(full.dtype).expand(len(pairs), -1, -1, -1)
        full[:, ia, ib, :, ia + u, ib + v] = blocks
        if (u, v) != (0, 0):  # the blocks at the opposite offset are the transposes
            full[:, ia + u, ib + v, :, ia, ib] = blocks.transpose(-1, -2)
    out.view(g, cg, kh, kw, cg, kh, kw).add_(full.permute(0, 3, 1, 2, 6, 4, 5))


def correlation_cross(xl: torch.Tensor, y: torch.Tensor, kernel: tuple[int, int], groups: int) -> torch.Tensor:
    """``X^T Y`` of a stride-1 conv, ``(groups, d, out/groups)`` float64 (products in ``xl``'s dtype), from the
    :func:`positions_first` input and the targets ``y`` ``(N, out, Ho, Wo)``: one product per
    kernel tap over the shifted window, no patch matrix.

    >>> import torch.nn.functional as F
    >>> x, y = torch.randn(2, 4, 5, 6, dtype=torch.float64), torch.randn(2, 6, 3, 4, dtype=torch.float64)
    >>> X = F.unfold(x[:, :2], 3).transpose(1, 2).reshape(-1, 18)       # group 0's patches
    >>> C = correlation_cross(positions_first(x), y, (3, 3), 2)
    >>> torch.allclose(C[0], X.T @ y[:, :3].flatten(2).transpose(1, 2).reshape(-1, 3))
    True
    """
    kh, kw = kernel
    hp, wp, n, c = xl.shape
    ho, wo = hp - kh + 1, wp - kw + 1
    out = y.shape[1]
    targets = y.to(xl.dtype).permute(2, 3, 0, 1).reshape(-1, groups, out // groups).transpose(0, 1)  # (g, M, o)
    cross = xl.new_empty(groups, c // groups, kh, kw, out // groups, dtype=torch.float64)
    step = product_rows(min(c, out) // groups)
    for a in range(kh):
        for b in range(kw):
            window = xl[a:a + ho, b:b + wo].reshape(-1, groups, c // groups).transpose(0, 1)  # (g, M, C/g)
            cross[:, :, a, b] = sum(torch.bmm(window[:, s:s + step].transpose(1, 2), targets[:, s:s + step]).double()
                                    for s in range(0, window.shape[1], step))
    return cross.view(groups, -1, out // groups)


def _product(left: torch.Tensor, right: torch.Tensor, g: int) -> torch.Tensor:
    """``left^T right`` per group over rows of positions and samples: ``(..., rows, C)`` pairs give
    ``(..., g, C/g, C/g)``."""
    *batch, m, c = left.shape
    step = product_rows(c // g)
    if left.dtype != torch.float64 and m > step:  # float32 partial sums, added in float64
        return sum(_product(left[..., s:s + step, :], right[..., s:s + step, :], g).double() for s in range(0, m, step))
    if g == 1:
        return torch.matmul(left.transpose(-1, -2), right).unsqueeze(-3)
    lhs = left.reshape(-1, m, g, c // g).permute(0, 2, 3, 1).reshape(-1, c // g, m)
    rhs = right.reshape(-1, m, g, c // g).permute(0, 2, 1, 3).reshape(-1, m, c // g)
    return torch.bmm(lhs, rhs).view(*batch, g, c // g, c // g)


@functools.lru_cache(maxsize=256)
def _borders(pairs: tuple[tuple[int, int], ...], p0: int, p1: int, q0: int, q1: int, ho: int, wo: int, wp: int
             ) -> torch.Tensor:
    """:func:`_border` of every tap pair of one offset, stacked (the same for every chunk of a layer: cached)."""
    return torch.stack([_border(a, b, p0, p1, q0, q1, ho, wo, wp) for a, b in pairs])


def _border(a: int, b: int, p0: int, p1: int, q0: int, q1: int, ho: int, wo: int, wp: int) -> torch.Tensor:
    """Flat positions ``p * Wp + q`` of the window ``[a, a+Ho) x [b, b+Wo)`` outside the core
    ``[p0, p1) x [q0, q1)``: full-width rows above and below, then the columns beside it."""
    rows = torch.cat([torch.arange(a, p0), torch.arange(p1, a + ho)])
    cols = torch.cat([torch.arange(b, q0), torch.arange(q1, b + wo)])
    strips = (rows[:, None] * wp + torch.arange(b, b + wo)[None]).reshape(-1)
    sides = (torch.arange(p0, p1)[:, None] * wp + cols[None]).reshape(-1)
    return torch.cat([strips, sides])
