"""The residual from Gram statistics by block products equals the one-product form and the direct residual."""

import pytest
import torch
from torch import nn

from prune_repair.engine.refit.fit_error import quadratic_forms, relative_errors
from prune_repair.engine.refit.gram import Gram
from prune_repair.engine.refit.ridge import masked_ridge


def _one_product(w: torch.Tensor, G: torch.Tensor, C: torch.Tensor, yy: torch.Tensor) -> torch.Tensor:
    """The form used before the block products: one dense ``W G``."""
    quad, cross, total = (torch.bmm(w, G) * w).sum(), (w * C.transpose(1, 2)).sum(), yy.sum()
    return ((total - 2 * cross + quad).clamp_min(0) / total).sqrt()


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("groups,block", [(1, 7), (1, 64), (2, 16), (1, None)])
def test_block_products_equal_one_product(seed, groups, block):
    gen = torch.Generator().manual_seed(seed)
    n, m, rows = 70, 5, 400
    X = torch.randn(groups, rows, n, generator=gen, dtype=torch.float64) + 0.5
    Y = torch.randn(groups, rows, m, generator=gen, dtype=torch.float64)
    G, C = X.transpose(1, 2) @ X, X.transpose(1, 2) @ Y
    yy = Y.square().sum(1).reshape(-1)
    W = torch.randn(3, groups, m, n, generator=gen, dtype=torch.float64)
    W *= torch.rand(W.shape, generator=gen) < 0.3
    W[1, :, :, 10:40] = 0  # whole column blocks without weights are skipped
    W[2] = torch.linalg.lstsq(X, Y).solution.transpose(1, 2)  # a good fit: a small residual
    quad = quadratic_forms(W, G, block=block)
    for k in range(3):
        direct = torch.stack([(X[g] @ W[k, g].T).square().sum() for g in range(groups)]).sum()
        torch.testing.assert_close(quad[k], direct, rtol=1e-12, atol=0)
    errs = relative_errors(W, G, C, yy)
    for k in range(3):
        old = _one_product(W[k], G, C, yy)
        assert abs(float(errs[k] - old)) <= 1e-9 * float(old)
        direct = (Y - X @ W[k].transpose(1, 2)).norm() / Y.norm()
        assert abs(float(errs[k] - direct)) <= 1e-9 * float(direct)


def test_gram_relative_errors_matches_relative_error_with_and_without_bias():
    torch.manual_seed(0)
    layer = nn.Conv2d(4, 6, 3, padding=1, groups=2).double()
    x = torch.randn(5, 4, 8, 8, dtype=torch.float64)
    gram = Gram.for_layer(layer)
    gram.add(x, layer(x).detach() + 0.1 * torch.randn(5, 6, 8, 8, dtype=torch.float64))
    a, b = torch.randn(2, 3, gram.d_in + 1, dtype=torch.float64), torch.randn(2, 3, gram.d_in + 1, dtype=torch.float64)
    both = gram.relative_errors(a, b)
    assert both.shape == (2,)
    torch.testing.assert_close(both, torch.stack([gram.relative_error(a), gram.relative_error(b)]), rtol=1e-12, atol=0)
    no_bias = gram.relative_errors(a[..., :-1], intercept=False)[0]
    old = _one_product(a[..., :-1], gram.G[:, :-1, :-1], gram.C[:, :-1], gram.yy)
    assert abs(float(no_bias - old)) <= 1e-9 * float(old)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("groups,density", [(1, 0.1), (2, 0.5), (1, 1.0), (3, 0.0)])
def test_quadratic_forms_by_rows_equal_the_direct_products(seed, groups, density):
    """Over each row's support (gathered blocks of G) = block products = X w summed directly."""
    gen = torch.Generator().manual_seed(seed)
    n, m, rows = 90, 7, 300
    X = torch.relu(torch.randn(groups, rows, n, generator=gen, dtype=torch.float64))
    G = X.transpose(1, 2) @ X
    W = torch.randn(2, groups, m, n, generator=gen, dtype=torch.float64)
    W *= torch.rand(groups, m, n, generator=gen) < density  # both weights on the same support (before / after)
    W[1, :, 0, :5] = 1.0  # ... and a row whose supports differ: the union is used
    by_rows = quadratic_forms(W, G, by_rows=True)
    blocks = quadratic_forms(W, G, by_rows=False)
    for k in range(2):
        direct = torch.stack([(X[g] @ W[k, g].T).square().sum() for g in range(groups)]).sum()
        torch.testing.assert_close(by_rows[k], direct, rtol=1e-12, atol=0)
    torch.testing.assert_close(by_rows, blocks, rtol=1e-12, atol=0)
    torch.testing.assert_close(quadratic_forms(W, G), blocks, rtol=1e-12, atol=0)


@pytest.mark.parametrize("groups,keep,intercept", [(1, 0.3, True), (2, 0.6, True), (1, 1.0, True), (3, 0.5, False)])
def test_ridge_quadratic_forms_from_the_systems_equal_the_ones_from_g(groups, keep, intercept):
    """The solver's ``w^T G w`` of the weights before and after (read from each row's ``G[S, S]`` while it
    is solved) equals the forms from ``G``; paths that do not solve every row directly give None."""
    torch.manual_seed(groups)
    d, m = 24, 6
    n = d + int(intercept)
    X = torch.randn(groups, 300, n, dtype=torch.float64)
    if intercept:
        X[..., -1] = 1
    G, C = X.transpose(1, 2) @ X, X.transpose(1, 2) @ torch.randn(groups, 300, m, dtype=torch.float64)
    mask = torch.rand(groups, m, d) < keep
    before = torch.randn(groups, m, n, dtype=torch.float64)
    before[..., :d] *= mask
    sol = masked_ridge(G, C, mask, intercept=intercept, prior=before[..., :d], quad_of=before)
    expected = quadratic_forms(torch.stack([before, sol.weight]), G)
    assert torch.allclose(sol.quad, expected, rtol=1e-12, atol=0)
    errors = relative_errors(torch.stack([before, sol.weight]), G, C, torch.ones(groups * m, dtype=torch.float64) * 1e4,
                             quad=sol.quad)
    assert torch.allclose(errors, relative_errors(torch.stack([before, sol.weight]), G, C,
                                                  torch.ones(groups * m, dtype=torch.float64) * 1e4), rtol=1e-10)
    assert masked_ridge(G, C, mask, intercept=intercept, quad_of=before, method="complement").quad is None


def test_ridge_quadratic_forms_survive_raised_damping():
    """A singular system solved with more damping after a failed factorization still gets the forms of ``G``."""
    torch.manual_seed(0)
    X = torch.randn(1, 5, 13, dtype=torch.float64)  # 5 rows, 12 weights + bias: G is singular
    X[..., -1] = 1
    G, C = X.transpose(1, 2) @ X, X.transpose(1, 2) @ torch.randn(1, 5, 3, dtype=torch.float64)
    mask = torch.ones(1, 3, 12, dtype=torch.bool)
    before = torch.randn(1, 3, 13, dtype=torch.float64)
    sol = masked_ridge(G, C, mask, damping=0.0, quad_of=before, method="direct")
    assert sol.retried > 0
    assert torch.allclose(sol.quad, quadratic_forms(torch.stack([before, sol.weight]), G), rtol=1e-9, atol=1e-9)
