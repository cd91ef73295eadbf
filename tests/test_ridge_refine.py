"""Float32 Cholesky + float64 refinement (ridge_refine) against float64 direct solves.

Margins measured over seeds 0-29 (OMP_NUM_THREADS=1): masked_ridge refine vs float64, worst
relative row gap 6.0e-13 (bound 1e-10); refined_solve at cond 1e4 vs torch.linalg.solve,
worst 3.3e-12 (bound 1e-10, float64's own error at that condition is ~1e-12).
"""

from __future__ import annotations

import pytest
import torch

from prune_repair.engine.refit.ridge import masked_ridge
from prune_repair.engine.refit.ridge_refine import cholesky_solve_tri, refined_solve


def _spd(seed: int, decades: float, batch: int = 6, k: int = 50) -> torch.Tensor:
    torch.manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(batch, k, k, dtype=torch.float64))
    ev = torch.logspace(0, decades, k, dtype=torch.float64)
    A = Q @ torch.diag_embed(ev.expand(batch, k)) @ Q.mT
    return (A + A.mT) / 2


@pytest.mark.parametrize("seed", range(4))
def test_refined_solve_equals_the_float64_solve(seed):
    A = _spd(seed, 4.0)  # cond 1e4, beyond the ridge systems' usual 1e2-1e4
    B = torch.randn(len(A), A.shape[1], 2, dtype=torch.float64)
    x, ok = refined_solve(A, B)
    assert bool(ok.all())
    ref = torch.linalg.solve(A, B)
    assert float(((x - ref).norm(dim=1) / ref.norm(dim=1)).max()) < 1e-10


def test_refined_solve_reports_what_float32_cannot_do():
    A = _spd(0, 9.0)  # cond 1e9: float32 (eps 6e-8) cannot factor or refine it
    x, ok = refined_solve(A, torch.randn(len(A), A.shape[1], 1, dtype=torch.float64))
    assert not bool(ok.any())


def test_two_triangular_solves_equal_cholesky_solve():
    A = _spd(1, 3.0)
    L, B = torch.linalg.cholesky(A), torch.randn(len(A), A.shape[1], 3, dtype=torch.float64)
    torch.testing.assert_close(cholesky_solve_tri(L, B), torch.cholesky_solve(B, L), rtol=1e-12, atol=1e-14)


def _problem(seed: int, sparsity: float, groups: int = 1, d: int = 60, m: int = 40):
    torch.manual_seed(seed)
    X = torch.relu(torch.randn(groups, 500, d, dtype=torch.float64) @ torch.randn(groups, d, d, dtype=torch.float64))
    Xe = torch.cat([X, torch.ones(groups, 500, 1, dtype=torch.float64)], 2)
    G = Xe.transpose(1, 2) @ Xe
    C = Xe.transpose(1, 2) @ torch.randn(groups, 500, m, dtype=torch.float64)
    return G, C, torch.rand(groups, m, d) >= sparsity


@pytest.mark.parametrize("seed,sparsity,groups", [(0, 0.7, 1), (1, 0.9, 1), (2, 0.5, 2), (3, 0.8, 3)])
def test_masked_ridge_refined_equals_float64(seed, sparsity, groups):
    G, C, mask = _problem(seed, sparsity, groups)
    prior = torch.randn(mask.shape, dtype=torch.float64)
    exact = masked_ridge(G, C, mask, prior=prior, method="direct", factor="float64")
    sol = masked_ridge(G, C, mask, prior=prior, method="direct", factor="refined")
    assert sol.refined_rows == mask.shape[0] * mask.shape[1] and exact.refined_rows == 0
    gap = (sol.weight - exact.weight).norm(dim=-1) / exact.weight.norm(dim=-1).clamp_min(1e-300)
    assert float(gap.max()) < 1e-10
    assert bool((sol.weight[..., :-1][~mask] == 0).all())


def test_refine_falls_back_to_float64_and_raises_the_damping_as_before():
    x = torch.randn(50, 3, dtype=torch.float64)
    x = torch.cat([x, x[:, :1], torch.zeros(50, 2, dtype=torch.float64)], 1)  # singular without damping
    Xe = torch.cat([x, torch.ones(50, 1, dtype=torch.float64)], 1)
    G, C = (Xe.T @ Xe)[None], (Xe.T @ torch.randn(50, 4, dtype=torch.float64))[None]
    G = (G + G.mT) / 2  # exactly symmetric: the two paths read different triangles, and at the edge of
    mask = torch.ones(1, 4, 6, dtype=torch.bool)  # singularity their rounding would decide the retries
    exact = masked_ridge(G, C, mask, damping=0.0, factor="float64")
    sol = masked_ridge(G, C, mask, damping=0.0, factor="refined")
    assert bool(torch.isfinite(sol.weight).all()) and sol.retried > 0
    assert sol.damping == exact.damping
    torch.testing.assert_close(sol.weight, exact.weight, rtol=1e-9, atol=1e-9)


def test_small_chunks_give_the_same_weights():
    G, C, mask = _problem(4, 0.8)
    one = masked_ridge(G, C, mask, method="direct", factor="float64")
    many = masked_ridge(G, C, mask, method="direct", factor="float64", work_bytes=1)  # one system per chunk
    torch.testing.assert_close(many.weight, one.weight, rtol=1e-12, atol=1e-15)


def test_cpu_default_is_the_float64_factorization():
    G, C, mask = _problem(5, 0.8)
    default = masked_ridge(G, C, mask, method="direct")
    assert default.refined_rows == 0  # factor=None: refined float32 factors on CUDA only (break-even on a CPU core)
    assert torch.equal(default.weight, masked_ridge(G, C, mask, method="direct", factor="float64").weight)


@pytest.mark.parametrize("seed,sparsity,groups", [(0, 0.7, 1), (1, 0.9, 1), (2, 0.5, 2), (3, 0.8, 3)])
def test_float32_factor_rounds_like_float32_statistics(seed, sparsity, groups):
    # measured over seeds 0-29: worst relative row gap 9.6e-6 (the damping bounds the condition)
    G, C, mask = _problem(seed, sparsity, groups)
    prior, current = torch.randn(mask.shape, dtype=torch.float64), torch.randn(groups, mask.shape[1], G.shape[1])
    current[..., :-1] *= mask
    exact = masked_ridge(G, C, mask, prior=prior, method="direct", factor="float64", quad_of=current)
    sol = masked_ridge(G, C, mask, prior=prior, method="direct", factor="float32", quad_of=current)
    gap = (sol.weight - exact.weight).norm(dim=-1) / exact.weight.norm(dim=-1)
    assert float(gap.max()) < 1e-4
    assert bool((sol.weight[..., :-1][~mask] == 0).all())
    torch.testing.assert_close(sol.quad, exact.quad, rtol=1e-5, atol=0)


def test_float32_factor_leaves_what_float32_cannot_factor_to_float64():
    A = _spd(0, 9.0, batch=1)  # cond 1e9: no float32 Cholesky
    C = torch.randn(1, A.shape[1], 3, dtype=torch.float64)
    mask = torch.ones(1, 3, A.shape[1], dtype=torch.bool)
    exact = masked_ridge(A, C, mask, damping=0.0, intercept=False, factor="float64")
    sol = masked_ridge(A, C, mask, damping=0.0, intercept=False, factor="float32")
    assert sol.retried == exact.retried == 0
    torch.testing.assert_close(sol.weight, exact.weight, rtol=1e-12, atol=0)


def test_unknown_factor_is_refused():
    G, C, mask = _problem(6, 0.8)
    with pytest.raises(ValueError, match="factor must be one of"):
        masked_ridge(G, C, mask, factor="float16")


@pytest.mark.parametrize("magnitude", [1e-30, 1e36])
def test_float32_factor_works_at_any_scale_float64_can_hold(magnitude):
    # G of 1e36 * ... overflows float32 (3.4e38) unless the systems are solved in units of their diagonal
    G, C, mask = _problem(7, 0.8)
    G, C = G * magnitude, C * magnitude
    current = torch.randn(1, mask.shape[1], G.shape[1], dtype=torch.float64)
    current[..., :-1] *= mask
    exact = masked_ridge(G, C, mask, method="direct", factor="float64", quad_of=current)
    sol = masked_ridge(G, C, mask, method="direct", factor="float32", quad_of=current)
    gap = (sol.weight - exact.weight).norm(dim=-1) / exact.weight.norm(dim=-1)
    assert float(gap.max()) < 1e-4
    torch.testing.assert_close(sol.quad, exact.quad, rtol=1e-5, atol=0)
