"""Square blocks ``M[S, S]`` of a shared matrix for many supports ``S`` at once (padded, batched).

Masked ridge solves and quadratic forms of sparse weights both need, for each output row, the
block of a Gram matrix on the row's support. The supports are padded to one width ``K`` (the
selected positions first, in order), and all blocks of a batch are read by ONE flat gather
(about 2x faster than three-index advanced indexing; int32 positions where they fit, half the
index traffic); padded rows and columns are zero.

Example:
    >>> import torch
    >>> M = torch.arange(16.0).view(1, 4, 4)
    >>> idx, valid = support_positions(torch.tensor([[True, False, True, False], [False, True, False, False]]), 2)
    >>> idx.tolist(), valid.tolist()
    ([[0, 2], [1, 0]], [[True, True], [True, False]])
    >>> gather_blocks(M, torch.zeros(2, dtype=torch.long), idx, valid).tolist()
    [[[0.0, 2.0], [8.0, 10.0]], [[5.0, 0.0], [0.0, 0.0]]]
"""

from __future__ import annotations

import torch

__all__ = ["cholesky_in_place_", "gather_blocks", "support_positions"]


def support_positions(support: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(idx, valid)`` ``(p, width)``: each row's selected positions first (ascending), then
    padding (position 0, ``valid`` False). ``support``: ``(p, n)`` bool with at most ``width`` True per row."""
    counts = support.sum(1)
    rows, cols = support.nonzero(as_tuple=True)  # row by row, ascending
    rank = torch.arange(len(cols), device=support.device) - (torch.cumsum(counts, 0) - counts)[rows]
    idx = torch.zeros(support.shape[0], width, dtype=torch.long, device=support.device)
    idx[rows, rank] = cols
    return idx, torch.arange(width, device=support.device)[None] < counts[:, None]


def gather_blocks(M: torch.Tensor, group: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor, *,
                  lower: bool = False) -> torch.Tensor:
    """``A[p] = M[group[p]][idx[p]][:, idx[p]]`` ``(p, K, K)``, zero where ``valid`` is False
    (row or column). ``M``: ``(groups, n, n)``. ``lower``: only the lower triangle (diagonal included)
    is read for a symmetric ``M`` that a Cholesky factorization will take; the entries above the
    diagonal are left unspecified, and the blocks are column-major (``A.mT`` is contiguous), the
    layout LAPACK factors in place (:func:`cholesky_in_place_`). Half the memory traffic of the
    gather, the part of its time that is not in cache (resnet18's layers at 90% sparsity, one core:
    4609 wide 365 -> 210 ms, 2305 wide 189 -> 127 ms)."""
    n, (p, k) = M.shape[1], idx.shape
    pos = idx.to(torch.int32) if M.shape[0] * n * n < 2**31 else idx
    row_starts = (group.to(pos.dtype)[:, None] * n + pos) * n
    # lower, gathered as the upper triangle of A^T = A row by row: entry (a, b < a) of a row reads
    # (a, a), which is in cache, so a row reads M's row from its diagonal on
    cols = torch.maximum(pos[:, None, :], pos[:, :, None]) if lower else pos[:, None, :]
    flat = row_starts[:, :, None] + cols
    A = M.contiguous().view(-1).index_select(0, flat.view(-1)).view(p, k, k)
    if not bool(valid.all()):
        _zero_padding_(A, valid)
    return A.mT if lower else A


def cholesky_in_place_(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L, info)`` of :func:`torch.linalg.cholesky_ex`, the factor written over ``A`` when ``A`` is
    column-major (``lower`` blocks of :func:`gather_blocks`): no copy of the systems (15-20% faster on
    batches of 240 x 240 systems, one core); otherwise into new memory.

    Example:
        >>> A = torch.tensor([[[4.0, 2.0], [2.0, 5.0]]]).mT.contiguous().mT   # column-major
        >>> L, info = cholesky_in_place_(A)
        >>> L.tolist(), info.tolist(), L.data_ptr() == A.data_ptr()
        ([[[2.0, 0.0], [1.0, 2.0]]], [0], True)
    """
    if A.dim() == 3 and A.mT.is_contiguous():
        info = torch.empty(A.shape[0], dtype=torch.int32, device=A.device)
        return torch.linalg.cholesky_ex(A, out=(A, info))
    return torch.linalg.cholesky_ex(A)


LOOP_SYSTEMS = 64
"""Up to this many systems on a CPU, the padding is zeroed system by system: each system's valid
positions are a prefix, so two slices (8x faster than a masked fill through a ``(p, K, K)`` mask)."""


def _zero_padding_(A: torch.Tensor, valid: torch.Tensor) -> None:
    """Zero the rows and columns of ``A`` ``(p, K, K)`` where ``valid`` ``(p, K)`` (a prefix per row) is False."""
    if A.device.type == "cpu" and len(A) <= LOOP_SYSTEMS:
        for block, k in zip(A, valid.sum(1).tolist()):
            block[k:].zero_()
            block[:, k:].zero_()
        return
    A.masked_fill_(~(valid[:, :, None] & valid[:, None, :]), 0)
