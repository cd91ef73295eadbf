"""WoodFisher against a brute-force inverse of the blockwise empirical Fisher (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prune_repair.prune import (
    FisherOptions,
    PruneError,
    find_targets,
    inverse_fisher,
    prune_,
    score_weights,
    woodfisher_scores,
)


def tiny_linear(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    x = torch.randn(24, 5, dtype=torch.float64)
    y = torch.randint(0, 2, (24,))
    return model, x, y


def per_sample_grads(model, x, y, group_size=1):
    """Flat gradients of the two weight matrices, one row per group, by plain autograd."""
    weights = [model[0].weight, model[2].weight]
    rows = []
    for xs, ys in zip(x.split(group_size), y.split(group_size)):
        grads = torch.autograd.grad(F.cross_entropy(model(xs), ys), weights)
        rows.append(grads)
    return [torch.stack([r[i].reshape(-1) for r in rows]) for i in range(2)]


def brute_inverse_diag(g: torch.Tensor, block: int, damp: float):
    """Per-layer blockwise inverse of damp*I + G^T G / N, from torch.linalg.inv."""
    n, d = g.shape
    invs = []
    for start in range(0, d, block):
        gb = g[:, start:start + block]
        fisher = damp * torch.eye(gb.shape[1], dtype=g.dtype) + gb.T @ gb / n
        invs.append(torch.linalg.inv(fisher))
    return invs


@pytest.mark.parametrize("rank", [1, 5, 32])
@pytest.mark.parametrize("group_size", [1, 3])
def test_inverse_matches_brute_force(rank, group_size):
    model, x, y = tiny_linear()
    damp, block = 1e-2, 4
    targets = find_targets(model)
    n = len(x) // group_size
    # the gradient order used by inverse_fisher is a seeded permutation; the Fisher sum is order-free
    inv = inverse_fisher(model, targets, (x, y), num_grads=n, group_size=group_size, damp=damp,
                         block_size=block, rank=rank, dtype=torch.float64, seed=3)
    generator = torch.Generator().manual_seed(3)
    order = torch.randperm(len(x), generator=generator)[: n * group_size]
    g_layers = per_sample_grads(model, x[order], y[order], group_size)
    expected = [b for g in g_layers for b in brute_inverse_diag(g, block, damp)]
    assert inv.blocks.shape[0] == len(expected)
    for got, want in zip(inv.blocks, expected):
        k = want.shape[0]
        torch.testing.assert_close(got[:k, :k], want, rtol=1e-9, atol=1e-9)
        # padding rows stay I / damp and uncoupled
        torch.testing.assert_close(got[k:, k:], torch.eye(block - k, dtype=torch.float64) / damp)

    scores = woodfisher_scores(inv, targets)
    diag0 = torch.cat([torch.diagonal(b) for b in brute_inverse_diag(g_layers[0], block, damp)])
    torch.testing.assert_close(scores["0"].reshape(-1), model[0].weight.detach().reshape(-1) ** 2 / (2 * diag0))


def test_obs_update_matches_formula():
    model, x, y = tiny_linear(1)
    damp, block = 1e-1, 15  # one block per layer
    options = FisherOptions(num_grads=len(x), damp=damp, block_size=block, dtype=torch.float64, obs_update=True)
    scores = score_weights(model, "woodfisher", (x, y), options=options)
    w0 = model[0].weight.detach().clone().reshape(-1)
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(x), generator=generator)
    finv = brute_inverse_diag(per_sample_grads(model, x[order], y[order])[0], block, damp)[0]
    report = prune_(model, 0.5, "woodfisher", (x, y), options=options, scores=scores)
    pruned = ~report.masks["0"].reshape(-1)
    dw = -(finv[:, pruned] @ (w0[pruned] / torch.diagonal(finv)[pruned]))
    expected = torch.where(pruned, torch.zeros_like(w0), w0 + dw)
    torch.testing.assert_close(model[0].weight.detach().reshape(-1), expected)
    assert report.zeros == round(0.5 * report.prunable)


def test_memory_refused_before_allocating():
    model = nn.Sequential(nn.Linear(1000, 1000), nn.ReLU(), nn.Linear(1000, 10))
    x, y = torch.randn(4, 1000), torch.randint(0, 10, (4,))
    with pytest.raises(PruneError, match=r"WoodFisher with block size 100000 needs .* GiB .*block size of at most"):
        prune_(model, 0.5, "woodfisher", (x, y), options=FisherOptions(block_size=100_000, max_memory_gb=1.0))
    assert not bool((model[0].weight == 0).any())  # nothing changed


def test_woodfisher_needs_labels():
    model, x, _ = tiny_linear()
    with pytest.raises(PruneError, match="needs labelled calibration data"):
        prune_(model, 0.5, "woodfisher", x)


def test_bad_damping_and_rank():
    model, x, y = tiny_linear()
    with pytest.raises(PruneError, match="damping"):
        prune_(model, 0.5, "woodfisher", (x, y), options=FisherOptions(damp=0.0))
    with pytest.raises(PruneError, match="rank"):
        prune_(model, 0.5, "woodfisher", (x, y), options=FisherOptions(rank=0))
