"""Greedy OBS unit elimination: one step is the best single removal (exact least squares)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prune_repair.engine.refit.gram import Gram
from prune_repair.engine.refit.ridge import masked_ridge
from prune_repair.prune.unit_select import obs_keep


def _refit_error(gram: Gram, kept_cols: torch.Tensor, width: int) -> float:
    idx = torch.cat([kept_cols, torch.tensor([width])])
    G, C = gram.G[0][idx][:, idx], gram.C[0][idx]
    mask = torch.ones(1, C.shape[1], len(kept_cols), dtype=torch.bool)
    w = masked_ridge(G[None], C[None], mask, damping=0.0).weight[0]
    full = torch.zeros(C.shape[1], width + 1, dtype=torch.float64)
    full[:, kept_cols], full[:, -1] = w[:, :-1], w[:, -1]
    return float(gram.relative_error(full[None]))


@pytest.mark.parametrize("seed,unit_size", [(0, 1), (1, 1), (2, 3), (3, 2)])
def test_one_obs_step_is_the_best_single_removal(seed, unit_size):
    torch.manual_seed(seed)
    units = 6
    width = units * unit_size
    layer = nn.Linear(width, 4).double()
    x = torch.randn(300, width, dtype=torch.float64) @ torch.randn(width, width, dtype=torch.float64)  # correlated
    y = layer(x).detach() + 0.1 * torch.randn(300, 4, dtype=torch.float64)
    gram = Gram.for_layer(layer)
    gram.add(x, y)
    kept = obs_keep(gram, units, unit_size, 1, damping=1e-12)
    removed = sorted(set(range(units)) - set(kept.tolist()))
    assert len(removed) == 1

    def cols(unit_list):
        return torch.tensor([u * unit_size + k for u in unit_list for k in range(unit_size)])
    errors = {u: _refit_error(gram, cols([v for v in range(units) if v != u]), width) for u in range(units)}
    assert errors[removed[0]] <= min(errors.values()) * (1 + 1e-6)
