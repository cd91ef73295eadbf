"""Cross co-moments of two models' paired units, streamed in float32 products and kept in float64.

:class:`CrossMoments` holds, for one probe of a permutation group, the count, both models' means
and the ``(C + 2, C)`` co-moment: A's units (rows) against B's (columns), both variances as two
extra rows. Each batch is one GEMM (float32 for float32 activations, centred first); everything
that is exact but cheap to state, the float32 centre's offset from the float64 mean and Chan's
term between batches, is a rank-1 update kept aside as vectors and applied when the co-moment is
read, row block by row block together with the correlation's scaling (one pass over the matrix in
cache-sized blocks instead of one full pass each). When there is only one batch its product is
kept as it is (float32 and exact; no fresh C x C memory when it is read before the next product),
or, read at once as a correlation (:meth:`CrossMoments.scale_only_pair_into_`), each side's units are
scaled before the product, which then needs no scaling pass of its own.

Example:
    >>> import torch
    >>> x = torch.randn(500, 3, dtype=torch.float64)
    >>> y = x @ torch.randn(3, 3, dtype=torch.float64)
    >>> m = CrossMoments()
    >>> m.add_pair(x[:200].clone(), y[:200].clone())
    >>> m.add_pair(x[200:].clone(), y[200:].clone())
    >>> xc, yc = x - x.mean(0), y - y.mean(0)
    >>> m.settle()
    >>> torch.allclose(m.m2[:-2], xc.T @ yc) and torch.allclose(m.m2[-2], (xc * xc).sum(0))
    True
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .moments import _Moments

ROWS_PER_BLOCK = 64
"""Rows of the co-moment read at once when it is scaled into a correlation (a block stays in cache)."""

SUM_BLOCK = 1 << 16
"""Values of a float32 block widened to float64 at once to sum its columns (a 512 KiB buffer)."""

UNIT_BLOCK = 1 << 18
"""Values of a column-major block's units summed (or squared and summed) at once, each unit's samples whole
(a 2 MiB float64 buffer: 20-30% faster than :data:`SUM_BLOCK` on resnet18's units, the same sums)."""

Scales = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""``scales(var_a, var_b) -> (row_scale, col_scale)``: float64 factors of A's and B's units from their variance sums."""

Update = tuple[float, torch.Tensor, torch.Tensor]
"""``(coef, a, b)``: the co-moment gains ``coef * a b^T`` (and the variance rows ``coef * a^2``, ``coef * b^2``)."""


class CrossMoments(_Moments):
    """Count, means ``(2, C)`` and co-moment ``(C + 2, C)`` of two models' units, merged exactly.
    ``workspace``: product buffers by shape, shared by the probes of one matching (a fresh C x C
    buffer per probe and batch adds its page faults)."""

    def __init__(self, workspace: dict | None = None):
        super().__init__()
        self.workspace = workspace
        self.pending: list[Update] = []

    def add_pair(self, ya: torch.Tensor, yb: torch.Tensor, last: bool = False) -> None:
        """``ya``, ``yb``: (n, C) copies, row- or column-major (centred in place). Float32 blocks are centred on the
        float32 rounding of their float64 mean and multiplied in float32 (one GEMM), the product
        added into the float64 co-moment (one pass), or kept as it is when the first batch is also
        the ``last`` (in the shared ``workspace`` when there is one: read it before the next pair of
        this width); the centre's offset and Chan's term are kept as rank-1 updates (:attr:`pending`)."""
        n, mean = self._centre(ya, yb)
        only = self.mean is None and last
        product = self._comoment((ya, yb), self._buffer(ya, yb))
        if self.mean is None:  # one batch: its product as it is (exact; widened when read), else in float64
            self.n, self.mean = n, mean
            self.m2 = product if only else product.to(torch.float64, copy=True)  # (never the workspace)
            return
        total, delta = self.n + n, mean - self.mean
        self.pending.append((self.n * n / total, delta[0], delta[1]))
        self.m2 = self.m2.to(torch.float64)  # (a co-moment kept as one batch's, if more came after all)
        self.m2.add_(product)
        self.n, self.mean = total, self.mean + delta * (n / total)

    def scale_only_pair_into_(self, ya: torch.Tensor, yb: torch.Tensor, scales: Scales, out: torch.Tensor,
                              add: bool) -> None:
        """The probe's one and only batch (nothing added before), read at once: ``out = diag(r) M diag(c)``
        (``out +=`` when ``add``) as :meth:`scale_into_` after ``add_pair(ya, yb, last=True)`` gives it, ``(r, c)`` =
        ``scales(var_a, var_b)`` of the variance rows, but with each side's units multiplied by its factor before
        the one product: the product is the scaled block (float32 for float32 samples), widened into ``out`` with
        the centre's rank-1 term and no pass of scaling (the same numbers to float32 rounding). The moments are not
        kept."""
        n, _ = self._centre(ya, yb)
        squares = torch.stack([_column_squares(y).to(y.dtype) for y in (ya, yb)]).to(torch.float64)  # (add_pair's)
        row_scale, col_scale = scales(*(squares + self._variance_terms() if self.pending else squares))
        ya.mul_(row_scale.to(ya.dtype))
        yb.mul_(col_scale.to(yb.dtype))
        product = self._buffer(ya, yb)
        product = torch.mm(ya.T, yb, out=None if product is None else product[:-2])
        left, right = self._factors() if self.pending else (None, None)
        _scaled_into(out, product, None if left is None else (left * row_scale[:, None], right * col_scale),
                     None, None, add)
        self.pending = []

    def _centre(self, ya: torch.Tensor, yb: torch.Tensor) -> tuple[int, torch.Tensor]:
        """Centre ``ya``, ``yb`` in place on (the float32 rounding of) their float64 column means: ``(n, means)``; the
        offset of a float32 centre is kept as a rank-1 update."""
        n = ya.shape[0]
        mean = torch.stack([_column_sums(ya), _column_sums(yb)]) / n
        centre = mean.to(ya.dtype)
        ya.sub_(centre[0])
        yb.sub_(centre[1])
        if ya.dtype != torch.float64:  # moments about `centre`, not about `mean`: shift them back
            e = centre.to(torch.float64) - mean
            self.pending.append((-n, e[0], e[1]))
        return n, mean

    def _buffer(self, ya: torch.Tensor, yb: torch.Tensor) -> torch.Tensor | None:
        if self.workspace is None:
            return None
        key = ((ya.shape[-1] + 2, yb.shape[-1]), ya.dtype, ya.device)
        if key not in self.workspace:
            self.workspace[key] = torch.empty(key[0], dtype=ya.dtype, device=ya.device)
        return self.workspace[key]

    def settle(self) -> None:
        """Apply the pending updates to :attr:`m2`, float64 (before pooling it over ranks)."""
        self.m2 = self.m2.to(torch.float64)
        if self.pending:
            left, right = self._factors()
            self.m2[:-2].addmm_(left, right)
            self.m2[-2:] += self._variance_terms()
            self.pending = []

    def variances(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The two variance rows (sums of squared deviations), pending updates included."""
        rows = self.m2[-2:].to(torch.float64)
        rows = rows + self._variance_terms() if self.pending else rows
        return rows[0], rows[1]

    def scale_into_(self, out: torch.Tensor, row_scale: torch.Tensor, col_scale: torch.Tensor, add: bool
                    ) -> torch.Tensor:
        """``out = diag(row_scale) M diag(col_scale)`` (``out +=`` when ``add``), M the cross block with its
        pending updates, into a float64 ``out``: block by block (:attr:`m2` itself is left as it is)."""
        return _scaled_into(out, self.m2[:-2], self._factors() if self.pending else None, row_scale, col_scale, add)

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(C, r)`` and ``(r, C)``: the pending updates as one rank-r product."""
        return (torch.stack([coef * a for coef, a, _ in self.pending], 1),
                torch.stack([b for _, _, b in self.pending]))

    def _variance_terms(self) -> torch.Tensor:
        return torch.stack([sum(coef * a * a for coef, a, _ in self.pending),
                            sum(coef * b * b for coef, _, b in self.pending)])

    @staticmethod
    def _comoment(c, out: torch.Tensor | None = None) -> torch.Tensor:  # (2, n, C) -> (C + 2, C), into `out`
        a, b = c[0], c[1]
        if out is None:
            out = torch.empty(a.shape[-1] + 2, b.shape[-1], dtype=a.dtype, device=a.device)
        torch.mm(a.T, b, out=out[:-2])
        out[-2] = _column_squares(a)
        out[-1] = _column_squares(b)
        return out


def _scaled_into(out: torch.Tensor, cross: torch.Tensor, factors: tuple[torch.Tensor, torch.Tensor] | None,
                 row_scale: torch.Tensor | None, col_scale: torch.Tensor | None, add: bool) -> torch.Tensor:
    """``out = diag(row_scale) (cross + left right) diag(col_scale)`` (``out +=`` when ``add``; a missing scale: none,
    missing ``factors``: no update) into a float64 ``out``, :data:`ROWS_PER_BLOCK` rows at a time (each block stays in
    cache through its passes)."""
    left, right = factors if factors is not None else (None, None)
    scratch = torch.empty(min(ROWS_PER_BLOCK, cross.shape[0]), cross.shape[1], dtype=torch.float64,
                          device=cross.device) if add else None
    for i in range(0, cross.shape[0], ROWS_PER_BLOCK):
        part = cross[i:i + ROWS_PER_BLOCK]
        block = scratch[:part.shape[0]] if add else out[i:i + ROWS_PER_BLOCK]
        block.copy_(part)
        if left is not None:
            block.addmm_(left[i:i + ROWS_PER_BLOCK], right)
        if row_scale is not None:
            block.mul_(row_scale[i:i + ROWS_PER_BLOCK, None])
        if add and col_scale is not None:
            out[i:i + ROWS_PER_BLOCK].addcmul_(block, col_scale)
        elif add:
            out[i:i + ROWS_PER_BLOCK].add_(block)
        elif col_scale is not None:
            block.mul_(col_scale)
    return out


def _column_squares(y: torch.Tensor) -> torch.Tensor:
    """Column sums of squares of ``y`` (n, C), on the CPU block by block through one small buffer (rows of a
    row-major ``y``, the blocks' sums added in float64; units of a column-major one, see :func:`_unit_rows`):
    ``torch.linalg.vecdot`` of a tall block writes an (n, C) temporary, a pass over memory; here each block is
    squared where it stays in cache.

    >>> y = torch.randn(5000, 3)
    >>> expected = (y.double() ** 2).sum(0)
    >>> all(torch.allclose(_column_squares(x).double(), expected, rtol=1e-6, atol=0) for x in (y, y.T.contiguous().T))
    True
    """
    units = _unit_rows(y)
    if units is not None and y.device.type == "cpu":
        per_block = max(1, UNIT_BLOCK // max(1, units.shape[1]))
        block = torch.empty(min(per_block, units.shape[0]), units.shape[1], dtype=y.dtype)
        return torch.cat([torch.mul(part, part, out=block[:part.shape[0]]).sum(1)
                          for part in units.split(per_block)])
    rows = max(1, SUM_BLOCK // max(1, y.shape[1]))
    if y.device.type != "cpu" or y.shape[0] <= rows:
        return torch.linalg.vecdot(y, y, dim=0)
    block = torch.empty(rows, y.shape[1], dtype=y.dtype)
    total = torch.zeros(y.shape[1], dtype=torch.float64)
    for i in range(0, y.shape[0], rows):
        part = y[i:i + rows]
        total += torch.mul(part, part, out=block[:part.shape[0]]).sum(0)
    return total


def _unit_rows(y: torch.Tensor) -> torch.Tensor | None:
    """``y.T`` when ``y`` (n, C) is column-major (each unit's samples contiguous: a conv's channels copied
    channel by channel), else ``None``."""
    return y.T if y.dim() == 2 and y.shape[0] > 1 and y.T.is_contiguous() else None


def _column_sums(y: torch.Tensor) -> torch.Tensor:
    """Float64 column sums of ``y`` (n, C), on the CPU widened row block by row block into one small buffer
    (``y.sum(0, dtype=torch.float64)`` of a tall float32 block is about 10x slower there); a column-major ``y``
    by its units' rows.

    >>> y = torch.randn(5000, 3)
    >>> all(torch.allclose(_column_sums(x), y.double().sum(0), rtol=1e-15, atol=0) for x in (y, y.T.contiguous().T))
    True
    """
    units = _unit_rows(y)
    if units is not None and y.dtype != torch.float64 and y.device.type == "cpu":  # by units, widened block by block
        per_block = max(1, UNIT_BLOCK // max(1, units.shape[1]))
        block = torch.empty(min(per_block, units.shape[0]), units.shape[1], dtype=torch.float64)
        return torch.cat([block[:part.shape[0]].copy_(part).sum(1) for part in units.split(per_block)])
    rows = max(1, SUM_BLOCK // max(1, y.shape[1]))
    if y.dtype == torch.float64 or y.device.type != "cpu" or y.shape[0] <= rows:
        return y.sum(0, dtype=torch.float64)
    block = torch.empty(rows, y.shape[1], dtype=torch.float64)
    total = torch.zeros(y.shape[1], dtype=torch.float64)
    for i in range(0, y.shape[0], rows):
        part = y[i:i + rows]
        total += block[:part.shape[0]].copy_(part).sum(0)
    return total
