"""The patch Gram of a stride-1 conv from shifted correlations of its input, without im2col.

For a stride-1, dilation-1 conv over an (already padded) input ``x`` of shape ``(N, C, Hp, Wp)``
with a ``kh x kw`` kernel, the patch column ``(c, a, b)`` at output position ``(i, j)`` is
``x[c, i+a, j+b]``, so one block of the Gram matrix is a correlation at the offset
``(u, v) = (a'-a, b'-b)`` over the window of the tap ``(a, b)``::

    G[(c,a,b), (c',a',b')] = sum_{p in [a, a+Ho), q in [b, b+Wo)} x[c, p, q] x[c', p+u, q+v]

The window edges of all taps cut the rows into a few bands (for 3x3: two single rows at each edge
and the middle) and the columns likewise, so every window is a union of CELLS (a band of rows by a
band of columns). Per offset, each cell's product ``x[cell]^T x[cell + (u, v)]`` is formed once (one
product over a contiguous copy of the column band), and every block is a 0/1 combination of the
cells in its window: one small matrix product. Blocks at the
opposite offset are transposes. Where the input is known to be zero (zero padding, ``inside``),
cells are cut to the positions inside, so padding costs nothing. Exact (the same sums in another
order), and about ``(2k-1)^2 / 2`` products of the map's size instead of ``k^4`` for im2col
(:func:`correlation_cost` counts them).

Example:
    >>> import torch, torch.nn.functional as F
    >>> x = torch.randn(2, 3, 6, 7, dtype=torch.float64)
    >>> G = torch.zeros(1, 27, 27, dtype=torch.float64)
    >>> add_correlation_gram_(G, positions_first(F.pad(x, (1, 1, 1, 1))), (3, 3), inside=((1, 7), (1, 8)))
    >>> X = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 27)          # im2col rows
    >>> torch.allclose(G[0], X.T @ X)
    True
"""

from __future__ import annotations

import torch

PRODUCT_ROWS = 8192
"""Rows a float32 sum of products may run over before it is continued in float64."""
THIN_CHANNELS = 16
"""Products with fewer columns a side are formed in float64: a float32 sum over their rows rounds in step
(8 channels of image-like input: 2.4e-6 of the Gram in float32, at 8,192 rows; 2.9e-7 even at 128 rows)
and such layers are cheap in any precision."""

Span = tuple[int, int]


def _working(xl: torch.Tensor, width: int) -> tuple[torch.Tensor, int | None]:
    """The input in the dtype of the products (float64 for :data:`THIN_CHANNELS`) and the rows of one float32
    sum (``None``: no limit, float64)."""
    if xl.dtype == torch.float64:
        return xl, None
    if width < THIN_CHANNELS:
        return xl.double(), None
    return xl, PRODUCT_ROWS


def positions_first(x: torch.Tensor) -> torch.Tensor:
    """A padded input ``(N, C, Hp, Wp)`` as ``(Hp, Wp, N, C)``: the columns of one row are one slab."""
    return x.permute(2, 3, 0, 1).contiguous()


def _offsets(kh: int, kw: int) -> list[tuple[int, int]]:
    """Offsets ``(u, v)`` of one half plane (the others are transposes)."""
    return [(u, v) for u in range(kh) for v in range(-(kw - 1), kw) if u > 0 or v >= 0]


def _taps(k: int, t: int) -> range:
    """Taps ``a`` whose partner ``a + t`` exists in a kernel of ``k`` taps."""
    return range(max(0, -t), min(k, k - t))


def _reach(k: int, t: int, size: int, inside: Span) -> Span:
    """The positions an offset ``t`` reads on one axis: the union of its taps' windows, cut to where
    both ``p`` and ``p + t`` are ``inside``."""
    taps = _taps(k, t)
    return max(taps[0], inside[0], inside[0] - t), min(taps[-1] + size, inside[1], inside[1] - t)


def _bands(k: int, size: int, reach: Span) -> list[Span]:
    """The reach cut at every window edge ``a`` and ``a + size``: each window is a union of bands."""
    edges = sorted({e for a in range(k) for e in (a, a + size) if reach[0] < e < reach[1]} | set(reach))
    return [(lo, hi) for lo, hi in zip(edges, edges[1:])]


def correlation_cost(out_size: tuple[int, int], kernel: tuple[int, int], zero_pads: tuple[int, int, int, int] = (0,) * 4
                     ) -> int:
    """Multiply-adds of :func:`add_correlation_gram_` per sample and channel pair (im2col: ``(kh kw)^2 Ho Wo``);
    ``zero_pads``: the (top, bottom, left, right) zero padding, which the products skip.

    >>> round(correlation_cost((28, 28), (3, 3), (1, 1, 1, 1)) / (81 * 28 * 28), 2)   # 7x fewer than im2col
    0.15
    """
    (ho, wo), (kh, kw), (top, bottom, left, right) = out_size, kernel, zero_pads
    hp, wp = ho + kh - 1, wo + kw - 1
    total = 0
    for u, v in _offsets(kh, kw):
        rows, cols = _reach(kh, u, ho, (top, hp - bottom)), _reach(kw, v, wo, (left, wp - right))
        total += max(0, rows[1] - rows[0]) * max(0, cols[1] - cols[0])
    return total


def _product(left: torch.Tensor, right: torch.Tensor, g: int, step: int | None = None) -> torch.Tensor:
    """``left^T right`` per group over ``(rows, C)`` and ``(rows, D)``: ``(g, C/g, D/g)``; with ``step``, in
    float64, as the sum of the products of ``step`` rows at a time."""
    m = left.shape[0]
    if step is not None:
        return sum((_product(left[s:s + step], right[s:s + step], g).double() for s in range(0, m, step)),
                   left.new_zeros(g, left.shape[1] // g, right.shape[1] // g, dtype=torch.float64))
    if g == 1:
        return (left.T @ right)[None]
    return torch.bmm(left.view(m, g, -1).permute(1, 2, 0), right.view(m, g, -1).transpose(0, 1))


class _ColumnSlabs:
    """Contiguous copies ``x[:, c0:c1]`` ``(Hp, c1 - c0, N, C)`` of a positions-first input, made once per
    column range: any band of rows of a slab is then one ``(rows, C)`` matrix, a product without copies."""

    def __init__(self, xl: torch.Tensor) -> None:
        self.xl, self.made = xl, {}

    def rows(self, cols: Span, rows: Span) -> torch.Tensor:
        if cols not in self.made:
            self.made[cols] = self.xl[:, cols[0]:cols[1]].contiguous()
        return self.made[cols][rows[0]:rows[1]].reshape(-1, self.xl.shape[3])


def add_correlation_gram_(out: torch.Tensor, xl: torch.Tensor, kernel: tuple[int, int], *,
                          inside: tuple[Span, Span] | None = None,
                          low_rank: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """Add the stride-1 patch Gram of a padded input, given as :func:`positions_first`'s
    ``(Hp, Wp, N, C)``, to ``out`` ``(groups, d, d)`` (``d = C/groups * kh * kw``, columns in
    ``weight.reshape(out, -1)`` order). ``inside``: the ``(rows, cols)`` of ``xl`` outside which it is zero.
    ``low_rank``: float64 factors ``(L, R)`` ``(groups, d, r)``, ``(groups, r, d)`` of a term ``L R`` to add
    as well (in the same pass over ``out``).

    Products are formed in ``x``'s dtype (float64 where they are thin, :data:`THIN_CHANNELS`) and summed in
    it over at most :data:`PRODUCT_ROWS` rows (in float64 beyond), and added to ``out`` (float64) one row tap at
    a time (:func:`_add_by_row_tap_`).
    """
    kh, kw = kernel
    g = out.shape[0]
    hp, wp, n, c = xl.shape
    cg, taps = c // g, kh * kw
    ho, wo = hp - kh + 1, wp - kw + 1
    in_rows, in_cols = inside if inside is not None else ((0, hp), (0, wp))
    xl, step = _working(xl, cg)
    step = step if step is not None and ho * wo * n > step else None
    blocks: dict[tuple[int, int], tuple[torch.Tensor, bool]] = {}  # (tap, tap') -> (block, stored transposed)
    slabs = _ColumnSlabs(xl)
    for u, v in _offsets(kh, kw):
        rows, cols = _reach(kh, u, ho, in_rows), _reach(kw, v, wo, in_cols)
        if rows[1] <= rows[0] or cols[1] <= cols[0]:  # no pair of this offset meets inside: zero blocks
            continue
        pairs = [(a, b) for a in _taps(kh, u) for b in _taps(kw, v)]
        row_bands, col_bands = _bands(kh, ho, rows), _bands(kw, wo, cols)
        cells = torch.stack([_product(slabs.rows((c0, c1), (r0, r1)), slabs.rows((c0 + v, c1 + v), (r0 + u, r1 + u)),
                                      g, step) for r0, r1 in row_bands for c0, c1 in col_bands])  # (cells, g, C/g, C/g)
        member = torch.tensor([[float(a <= r0 and r1 <= a + ho and b <= c0 and c1 <= b + wo)
                                for r0, r1 in row_bands for c0, c1 in col_bands] for a, b in pairs],
                              dtype=cells.dtype, device=xl.device)
        combined = (member @ cells.view(len(cells), -1)).view(len(pairs), g, cg, cg)
        for (a, b), block in zip(pairs, combined):
            tap, partner = a * kw + b, (a + u) * kw + b + v
            blocks[tap, partner] = (block, False)
            if (u, v) != (0, 0):
                blocks[partner, tap] = (block, True)  # the opposite offset: the transpose
    _add_by_row_tap_(out.view(g, cg, taps, cg * taps), blocks, taps, low_rank)


def _add_by_row_tap_(out: torch.Tensor, blocks: dict[tuple[int, int], tuple[torch.Tensor, bool]], taps: int,
                     low_rank: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    """Add the ``(tap, tap')`` blocks ``(g, C/g, C/g)`` (missing: zero) to ``out`` ``(g, C/g, taps, C/g * taps)``
    (the Gram in weight order) one row tap at a time: its blocks are interleaved into one float64 buffer that
    stays in cache (with the tap's rows of ``low_rank``), then added to the tap's rows, each a contiguous row
    of ``out``."""
    g, cg = out.shape[0], out.shape[1]
    row = out.new_empty(g, cg, cg, taps)
    left = low_rank[0].view(g, cg, taps, -1) if low_rank is not None else None
    for tap in range(taps):
        for partner in range(taps):
            block, transposed = blocks.get((tap, partner), (None, False))
            if block is None:
                row[..., partner] = 0
            else:
                row[..., partner] = block.transpose(-1, -2) if transposed else block
        if left is not None:
            row.view(g, cg, cg * taps).baddbmm_(left[:, :, tap], low_rank[1])
        out[:, :, tap] += row.view(g, cg, cg * taps)


def correlation_cross(xl: torch.Tensor, y: torch.Tensor, kernel: tuple[int, int], groups: int, *,
                      inside: tuple[Span, Span] | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``X^T Y`` of a stride-1 conv, ``(groups, d, out/groups)`` float64 (products in ``xl``'s dtype), from the
    :func:`positions_first` input and the targets ``y`` ``(N, out, Ho, Wo)``: per kernel tap, one product over
    its window cut to ``inside`` (contiguous copies of the column bands, shared by the taps), no patch matrix.
    ``out``: a float64 ``(groups, d, out/groups)`` to add the products to (and return), instead of a new one.

    >>> import torch.nn.functional as F
    >>> x, y = torch.randn(2, 4, 5, 6, dtype=torch.float64), torch.randn(2, 6, 3, 4, dtype=torch.float64)
    >>> X = F.unfold(x[:, :2], 3).transpose(1, 2).reshape(-1, 18)       # group 0's patches
    >>> C = correlation_cross(positions_first(x), y, (3, 3), 2)
    >>> torch.allclose(C[0], X.T @ y[:, :3].flatten(2).transpose(1, 2).reshape(-1, 3))
    True
    """
    kh, kw = kernel
    hp, wp, n, c = xl.shape
    ho, wo, m = hp - kh + 1, wp - kw + 1, y.shape[1]
    xl, step = _working(xl, min(c, m) // groups)
    in_rows, in_cols = inside if inside is not None else ((0, hp), (0, wp))
    inputs, targets = _ColumnSlabs(xl), _ColumnSlabs(positions_first(y.to(xl.dtype)))  # (Ho, Wo, N, out)
    if out is None:
        out = xl.new_zeros(groups, c // groups * kh * kw, m // groups, dtype=torch.float64)
    by_tap = out.view(groups, c // groups, kh, kw, m // groups)
    for a in range(kh):
        r0, r1 = max(a, in_rows[0]), min(a + ho, in_rows[1])
        for b in range(kw):
            c0, c1 = max(b, in_cols[0]), min(b + wo, in_cols[1])
            if r1 > r0 and c1 > c0:  # input (r, q) meets target (r - a, q - b) over the window, cut to inside
                window = inputs.rows((c0, c1), (r0, r1))
                by_tap[:, :, a, b] += _product(window, targets.rows((c0 - b, c1 - b), (r0 - a, r1 - a)), groups, step)
    return out
