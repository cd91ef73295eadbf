"""Blocks ``M[S, S]`` of many supports at once (engine/refit/support_gather.py): equal to three-index
indexing, zero on the padding, whether the padding is zeroed system by system or through one mask."""

from __future__ import annotations

import pytest
import torch

from prune_repair.engine.refit import support_gather
from prune_repair.engine.refit.support_gather import gather_blocks, support_positions


@pytest.mark.parametrize("systems", [5, support_gather.LOOP_SYSTEMS + 3])  # by slices, by one mask
def test_blocks_equal_indexing_and_padding_is_zero(systems):
    torch.manual_seed(0)
    M = torch.randn(2, 30, 30, dtype=torch.float64)
    support = torch.rand(systems, 30) < 0.3
    support[0] = False  # an empty support: all padding
    width = int(support.sum(1).max())
    idx, valid = support_positions(support, width)
    group = torch.randint(0, 2, (systems,))
    A = gather_blocks(M, group, idx, valid)
    for p in range(systems):
        S = support[p].nonzero().flatten()
        k = len(S)
        torch.testing.assert_close(A[p, :k, :k], M[group[p]][S][:, S], rtol=0, atol=0)
        assert not A[p, k:].any() and not A[p, :, k:].any()


@pytest.mark.parametrize("systems", [5, support_gather.LOOP_SYSTEMS + 3])
def test_lower_blocks_equal_the_full_ones_on_and_below_the_diagonal(systems):
    """``lower=True`` (what a Cholesky factorization reads) gives the same lower triangle and zero padding."""
    torch.manual_seed(1)
    M = torch.randn(2, 40, 40, dtype=torch.float64)
    M = M + M.mT
    support = torch.rand(systems, 40) < 0.4
    idx, valid = support_positions(support, int(support.sum(1).max()))
    group = torch.randint(0, 2, (systems,))
    full, lower = gather_blocks(M, group, idx, valid), gather_blocks(M, group, idx, valid, lower=True)
    torch.testing.assert_close(lower.tril(), full.tril(), rtol=0, atol=0)
    k = valid.sum(1)
    for p in range(systems):
        assert not lower[p, k[p]:].any() and not lower[p, :, k[p]:].any()
    factor, info = torch.linalg.cholesky_ex(lower + 100 * torch.eye(lower.shape[1], dtype=torch.float64))
    assert torch.equal(factor, torch.linalg.cholesky_ex(full + 100 * torch.eye(full.shape[1], dtype=torch.float64))[0])
