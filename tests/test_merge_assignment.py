"""Matching's speed paths give the old answers: the sparse proven assignment equals scipy's dense one,
and float32 paired moments equal the float64 ones to float32 rounding (measured)."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from prune_repair.merge import activation_matching
from prune_repair.merge.assignment import DENSE_UP_TO, max_assignment
from prune_repair.merge.cross_moments import CrossMoments
from prune_repair.merge.find_groups import find_groups
from prune_repair.zoo.models import MLP

assignment = importlib.import_module("prune_repair.merge.assignment")


def dense(s: np.ndarray) -> np.ndarray:
    return linear_sum_assignment(s, maximize=True)[1]


def score(s: np.ndarray, cols: np.ndarray) -> float:
    return float(s[np.arange(s.shape[0]), cols].sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sparse_proven_assignment_equals_the_dense_solver(seed):
    rng = np.random.default_rng(seed)
    n = DENSE_UP_TO + 100
    noise = rng.standard_normal((n, n))
    planted = np.eye(n)[rng.permutation(n)] * 3.0 + noise  # a clear optimum, as between trained models
    for s in (noise, planted, np.abs(noise) ** 3):  # near ties everywhere / one clear answer / heavy tail
        found = assignment._sparse_proven(s)
        assert found is not None  # answered sparse (no fallback) and proven
        assert np.array_equal(found, dense(s))


@pytest.mark.parametrize("seed", [0, 1])
def test_sparse_assignment_exact_on_near_ties_and_odd_widths(seed):
    """Widths that leave a short last block of columns; near-tied entries (a 1e-9 spread around a few
    values, as correlations of units that barely differ); rows of tie-breakers only (dead units, 1e-6)."""
    rng = np.random.default_rng(10 + seed)
    n = DENSE_UP_TO + 1 + 7 * seed + assignment.BLOCK // 2
    near_ties = np.round(rng.standard_normal((n, n)), 1) + 1e-9 * rng.standard_normal((n, n))
    dead = rng.standard_normal((n, n))
    dead[rng.choice(n, n // 10, replace=False)] *= 1e-6
    for s in (rng.standard_normal((n, n)), near_ties, dead):
        found = max_assignment(s)
        assert sorted(found) == list(range(n))
        assert score(s, found) >= score(s, dense(s)) - 1e-9 * n * np.ptp(s) * assignment.TOLERANCE
        if s is not near_ties:  # a unique optimum: the very same permutation
            assert np.array_equal(found, dense(s))


def test_potentials_bound_every_candidate_and_the_proof_finds_a_broken_bound():
    rng = np.random.default_rng(5)
    n = DENSE_UP_TO + 40
    s = rng.standard_normal((n, n))
    blocks = assignment._block_maxima(s)
    keys = assignment._initial_candidates(s, blocks)
    rows, cols = keys // n, keys % n
    assert np.all(np.diff(keys) > 0) and np.all(np.bincount(rows, minlength=n) >= assignment.CANDIDATES)
    matched = assignment._sparse_matching(s, rows, cols, blocks.max(1), np.zeros(n))
    row_of_col = np.empty(n, dtype=np.int64)
    row_of_col[matched] = np.arange(n)
    u = assignment._potentials(s, rows, cols, row_of_col, np.zeros(n), 0.0)
    v = s[row_of_col, np.arange(n)] - u[row_of_col]
    assert np.all(u[rows] + v[cols] >= s[rows, cols] - 1e-12)  # dual feasible on the candidates
    assert np.allclose(u + v[matched], s[np.arange(n), matched], atol=1e-12, rtol=0)  # tight on the matching
    slack = s - u[:, None] - v[None, :]
    off = np.ones((n, n), dtype=bool)
    off[rows, cols] = False
    found = assignment._near_bound(s, blocks, u, v, keys, 1e-8, 1e-8)
    assert np.array_equal(found, np.flatnonzero(off.ravel() & (slack.ravel() > -1e-8)))
    i, j = np.argwhere(off)[rng.integers(off.sum())]  # break the bound at one entry off the candidates
    s[i, j] = u[i] + v[j] + 1e-3
    assert int(i) * n + int(j) in assignment._near_bound(s, assignment._block_maxima(s), u, v, keys, 1e-8, 1e-8)


def test_sparse_assignment_falls_back_when_the_candidates_hold_no_matching(monkeypatch):
    rng = np.random.default_rng(3)
    n = DENSE_UP_TO + 20
    s = -np.arange(n)[None, :] * 1.0 + 1e-3 * rng.standard_normal((n, n))  # every row prefers the same columns
    monkeypatch.setattr(assignment, "CANDIDATES", 1)
    assert np.array_equal(max_assignment(s), dense(s))
    monkeypatch.setattr(assignment, "ROUNDS", 0)  # no sparse round at all: the dense solver answers
    assert np.array_equal(max_assignment(s), dense(s))


def test_float32_paired_moments_equal_float64_over_batches():
    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(30, 30, generator=gen, dtype=torch.float64)
    batches = []
    for k in range(4):  # a large common part that moves between batches
        a = 40.0 + k + torch.randn(500, 30, generator=gen, dtype=torch.float64)
        b = (a - 40.0) @ mix + 7.0 + 0.1 * torch.randn(500, 30, generator=gen, dtype=torch.float64)
        batches.append((a.float().double(), b.float().double()))  # values both paths hold exactly
    acc32, acc64 = CrossMoments(), CrossMoments()
    for a, b in batches:
        acc32.add_pair(a.float(), b.float())
        acc64.add_pair(a.clone(), b.clone())
    a, b = torch.cat([p[0] for p in batches]), torch.cat([p[1] for p in batches])
    ac, bc = a - a.mean(0), b - b.mean(0)
    exact = torch.cat([ac.T @ bc, (ac * ac).sum(0)[None], (bc * bc).sum(0)[None]])
    scale = exact.abs().max()
    assert acc64.n == acc32.n == 2000
    acc32.settle()
    acc64.settle()
    assert float((acc64.m2 - exact).abs().max() / scale) < 1e-12
    # float32 products of the centred blocks: measured 6.1e-9 of the largest entry here (float64: 3.8e-16)
    assert float((acc32.m2 - exact).abs().max() / scale) < 1e-7
    assert float((acc32.mean - torch.stack([a.mean(0), b.mean(0)])).abs().max()) < 1e-13 * 50



def test_conv_samples_copied_unit_by_unit_give_the_row_major_moments():
    """A conv output (N, C, H, W) with H x W >= UNITS_FIRST is copied as (C, samples) and handed on column-major:
    the same samples as the (samples, C) copy, and the same paired moments to float32 rounding."""
    gen = torch.Generator().manual_seed(5)
    ya = 2.0 + torch.randn(6, 24, 9, 8, generator=gen)
    yb = torch.relu(ya.roll(3, 1) - 1.0 + 0.3 * torch.randn(6, 24, 9, 8, generator=gen))
    index = torch.arange(4, 20)[:, None]
    samples = importlib.import_module("prune_repair.merge.activation_matching")._samples
    by_units = [samples(y, 1, index) for y in (ya, yb)]
    by_rows = [y.movedim(1, -1)[..., 4:20].reshape(-1, 16) for y in (ya, yb)]
    assert by_units[0].T.is_contiguous() and all(torch.equal(u, r) for u, r in zip(by_units, by_rows))
    column_major, row_major = CrossMoments(), CrossMoments()
    for half in (slice(0, 200), slice(200, None)):
        column_major.add_pair(*[u[half].T.contiguous().T for u in by_units])
        row_major.add_pair(*[r[half].contiguous() for r in by_rows])
    column_major.settle()
    row_major.settle()
    assert float((column_major.m2 - row_major.m2).abs().max() / row_major.m2.abs().max()) < 1e-6
    assert torch.allclose(column_major.mean, row_major.mean, rtol=1e-12, atol=1e-12)

def test_one_batch_kept_in_float32_reads_as_the_float64_copy():
    """A single batch's float32 product is kept as it is; read (variances, correlations, with a second probe
    added in) it gives the float64 copy's numbers bit for bit, and the correlation to float32 rounding."""
    gen = torch.Generator().manual_seed(1)
    a = 3.0 + torch.randn(400, 150, generator=gen)
    b = a @ torch.randn(150, 150, generator=gen) / 12 - 1.0
    kept, widened = CrossMoments(), CrossMoments({})
    kept.add_pair(a.clone(), b.clone(), last=True)
    widened.add_pair(a.clone(), b.clone())
    assert kept.m2.dtype == torch.float32 and widened.m2.dtype == torch.float64
    outs = []
    for m in (kept, widened):
        var_a, var_b = m.variances()
        out = torch.full((150, 150), torch.nan, dtype=torch.float64)
        m.scale_into_(out, 1 / var_a.sqrt(), 1 / var_b.sqrt(), add=False)
        m.scale_into_(out, 1e-6 / var_a.sqrt(), 1 / var_b.sqrt(), add=True)
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    exact = torch.corrcoef(torch.cat([a.double().T, b.double().T]))[:150, 150:] * (1 + 1e-6)
    assert float((outs[0] - exact).abs().max()) < 1e-5  # float32 products (measured 1.3e-7 here)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_float32_matching_finds_the_float64_permutations(seed):
    torch.manual_seed(seed)
    a, b = MLP(widths=(32, 32, 32)).double().eval(), MLP(widths=(32, 32, 32)).double().eval()
    x = torch.randn(256, 1, 28, 28, dtype=torch.float64)
    groups = find_groups(a, x)
    exact = activation_matching(a, b, [x[:100], x[100:]], groups)
    fast = activation_matching(a.float(), b.float(), [x[:100].float(), x[100:].float()], groups)
    for g in groups:
        assert torch.equal(fast.perms[g.name], exact.perms[g.name]), g.name


def test_heavily_tied_candidates_go_to_the_dense_solver():
    """Ties make scipy's sparse solver loop for minutes: a matrix whose candidates mostly tie is left to the
    dense solver (and still gets an optimal assignment); a few dead rows do not send it there."""
    rng = np.random.default_rng(3)
    n = DENSE_UP_TO + 9
    tied = np.round(rng.standard_normal((n, n)), 1) + 1e-9 * rng.standard_normal((n, n))
    assert assignment._sparse_proven(tied) is None
    assert score(tied, max_assignment(tied)) >= score(tied, dense(tied)) - 1e-9 * n * np.ptp(tied) * assignment.TOLERANCE
    few_dead = rng.standard_normal((n, n))
    few_dead[: n // 10] *= 1e-6
    assert np.array_equal(assignment._sparse_proven(few_dead), dense(few_dead))


@pytest.mark.parametrize("long_row", [False, True])
def test_tied_share_counts_each_rows_neighbours_within_the_tolerance(long_row):
    """The share of candidates within ``tol`` of the next larger value of their row, by its definition (one
    sort by row, then value), whether rows are sorted padded side by side or (one long row) all together."""
    rng = np.random.default_rng(4)
    n = 200
    s = np.round(rng.standard_normal((n, n)), 2)
    keys = np.sort(rng.choice(n * n, 20 * n, replace=False))
    if long_row:
        keys = np.union1d(keys, np.arange(n))  # row 0 whole: over PADDED_SORT times the mean
    rows, values = keys // n, s.ravel()[keys]
    order = np.lexsort((values, rows))
    same_row = rows[order][1:] == rows[order][:-1]
    for tol in (0.0, 0.01, 0.1):
        expected = ((np.diff(values[order]) <= tol) & same_row).sum() / keys.size
        assert assignment._tied_share(s, keys, tol) == pytest.approx(expected, abs=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_only_pair_scaled_before_its_product_gives_the_scaled_moments(dtype):
    """A probe's only batch read at once with its units scaled before the product: the scales see the very
    variance sums of ``add_pair`` (dead units alike), and the block equals ``scale_into_``'s to the product's
    rounding, written or added (a dead unit: zero row). 250 x 300: the squares are summed by row blocks."""
    gen = torch.Generator().manual_seed(2)
    a = 3.0 + torch.randn(250, 300, generator=gen, dtype=dtype)
    a[:, 7] = 0.1234567  # a dead unit (constant, not exactly representable)
    b = a[:, torch.randperm(300, generator=gen)] + 0.5 * torch.randn(250, 300, generator=gen, dtype=dtype)
    seen = []

    def scales(var_a, var_b):
        seen.append((var_a, var_b))
        return torch.where(var_a > 1e-20, 1e-6 / var_a.clamp_min(1e-300).sqrt(), 0.0), 1.0 / var_b.sqrt()

    reference = CrossMoments({})
    reference.add_pair(a.clone(), b.clone(), last=True)
    row, col = scales(*reference.variances())
    start = torch.randn(300, 300, generator=gen, dtype=torch.float64)
    for add in (False, True):
        expected, found = start.clone(), start.clone()
        reference.scale_into_(expected, row, col, add)
        CrossMoments({}).scale_only_pair_into_(a.clone(), b.clone(), scales, found, add)
        assert all(torch.equal(x, y) for x, y in zip(seen[0], seen[-1]))
        assert torch.equal(found[7] - start[7] * add, torch.zeros(300, dtype=torch.float64))
        tolerance = 1e-12 if dtype == torch.float64 else 1e-12 + 1e-6 * 1e-6  # (correlations of weight 1e-6)
        assert float((found - expected).abs().max()) < tolerance
