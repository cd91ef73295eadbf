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
