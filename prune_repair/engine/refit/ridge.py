"""Masked ridge least squares from Gram statistics: one solve per output row over its support.

For output row ``j`` with support ``S_j`` (its nonzero weights, plus the bias column
when ``intercept``)::

    w_S = (G[S, S] + lam I)^-1 C[S, j],    lam = damping * mean(diag G)   (weights only;
                                                                           the bias is not damped)

and ``w = 0`` off the support, exactly. Rows with the same support (dense rows, rows of a
structured mask) share one factorization; the others are taken in order of size, padded to the
largest of a few, and solved with batched Cholesky in cache-sized chunks
(:mod:`~prune_repair.engine.refit.ridge_direct`; ``factor``: float64 factors, float32 factors
refined in float64, or float32 factors alone for Gram statistics whose products were float32
anyway). When most weights are kept, the complement formula with one shared
``H = (G + lam I)^-1`` is cheaper: ``w = H c - H[:, Z] H[Z, Z]^-1 (H c)[Z]`` (``Z`` = the zeroed
positions). Rows whose supports are large but far from full (around 50% sparsity of a wide layer)
are iterated together by preconditioned conjugate gradients with ``H[S, S]`` as preconditioner
(:mod:`~prune_repair.engine.refit.ridge_cg`), at matrix-multiply speed, to a relative residual of
1e-10; a row that does not converge is solved directly (both:
:mod:`~prune_repair.engine.refit.ridge_complement`). The cheapest path is chosen per support
pattern from a flop count (:func:`_choose_methods`). A factorization that fails is retried with
10x the damping (never NaN); :attr:`RidgeSolution.damping` reports the largest damping used.

Example:
    >>> import torch
    >>> _ = torch.manual_seed(0)
    >>> X = torch.randn(100, 4, dtype=torch.float64)
    >>> Y = X @ torch.tensor([[1.0, 0.0, 2.0, 0.0]], dtype=torch.float64).T + 3.0
    >>> Xe = torch.cat([X, torch.ones(100, 1, dtype=torch.float64)], 1)     # bias column last
    >>> mask = torch.tensor([[[True, False, True, False]]])
    >>> sol = masked_ridge((Xe.T @ Xe)[None], (Xe.T @ Y)[None], mask, damping=1e-12)
    >>> sol.weight.round(decimals=6)
    tensor([[[1., 0., 2., 0., 3.]]], dtype=torch.float64)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .gram_storage import GramStorage
from .ridge_complement import SharedInverseSolver
from .ridge_direct import resolve_factor

DEFAULT_WORK_BYTES = 256 * 2**20
METHODS = ("auto", "direct", "complement", "iterative")


@dataclass
class RidgeSolution:
    """Solved rows as ``weight`` ``(groups, rows, n)`` float64 (bias last when there is one)."""

    weight: torch.Tensor
    damping: float
    retried: int = 0
    complement_rows: int = 0
    iterative_rows: int = 0
    iterations: int = 0
    refined_rows: int = 0
    quad: torch.Tensor | None = None
    """``(2,)`` float64: ``sum_r w_r^T G w_r`` of ``quad_of`` and of the solution, taken from the solved
    systems (None when ``quad_of`` was not given or some rows were not solved directly)."""


def masked_ridge(
    G: torch.Tensor,
    C: torch.Tensor,
    mask: torch.Tensor,
    *,
    damping: float = 1e-2,
    intercept: bool = True,
    prior: torch.Tensor | None = None,
    work_bytes: int = DEFAULT_WORK_BYTES,
    method: str = "auto",
    factor: str | None = None,
    quad_of: torch.Tensor | None = None,
    storage: GramStorage | None = None,
) -> RidgeSolution:
    """Solve every row of ``mask`` over its support (see the module doc).

    Args:
        G: ``(groups, n, n)`` Gram matrices, ``n = d + 1`` with the ones column last when
            ``intercept``, else ``n = d``.
        C: ``(groups, n, rows)`` cross terms ``X^T Y``.
        mask: ``(groups, rows, d)`` bool, True where a weight may be nonzero.
        damping: ``lam / mean(diag G)`` (per group; over the weight columns).
        prior: optional ``(groups, rows, d)`` weights the ridge term pulls toward
            (``lam ||w - prior||^2``) instead of toward zero.
        work_bytes: memory bound of one batched solve.
        method: ``auto`` (cheapest by flop count), or force ``direct``, ``complement`` or
            ``iterative`` for every row (rows that fail still fall back to ``direct``).
        factor: how direct solves factor their systems, one of
            :data:`~prune_repair.engine.refit.ridge_direct.FACTORS` (default: ``refined`` on CUDA,
            ``float64`` elsewhere; :func:`~prune_repair.engine.refit.ridge_direct.resolve_factor`).
        quad_of: optional ``(groups, rows, n)`` weights zero off the mask (the layer before the
            refit): :attr:`RidgeSolution.quad` then holds the sums of ``w^T G w`` of these and of
            the solution, read from each system ``G[S, S]`` while it is in memory, where every row
            is solved directly (a residual from ``G`` alone would gather the same blocks again).
        storage: lends the memory of the float32 copy of ``G`` (``factor="float32"``) and takes it back
            (:class:`~prune_repair.engine.refit.gram_storage.GramStorage`; a fresh copy's pages cost
            about as much as converting into reused ones).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    g, n, _ = G.shape
    m = C.shape[2]
    d = n - int(intercept)
    if tuple(mask.shape) != (g, m, d):
        raise ValueError(f"mask has shape {list(mask.shape)}, expected {[g, m, d]} for Gram statistics of that size")
    if not damping >= 0 or damping == float("inf"):
        raise ValueError(f"damping must be a finite number >= 0, got {damping}")
    G, C = G.to(torch.float64).contiguous(), C.to(torch.float64)
    diag = G.diagonal(dim1=1, dim2=2)[:, :d]
    scale = diag.mean(1) if d else torch.ones(g, dtype=G.dtype, device=G.device)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    solver = SharedInverseSolver(G, C, prior, d, scale, float(damping), work_bytes, resolve_factor(factor, G), storage)
    solver.quad_of = quad_of.reshape(g * m, n).to(device=G.device, dtype=torch.float64) if quad_of is not None else None
    support = torch.ones(g * m, n, dtype=torch.bool, device=G.device)
    support[:, :d] = mask.reshape(g * m, d)
    rows = torch.arange(g * m, device=G.device)
    p_group, p_support, order, starts, counts_l = _patterns(support, rows // m, g)
    sizes = p_support.sum(1).tolist()
    methods = _choose_methods(sizes, counts_l, p_group, n) if method == "auto" else [method] * len(sizes)
    direct = [p for p, how in enumerate(methods) if how == "direct"]
    comp = [p for p, how in enumerate(methods) if how == "complement"]
    iterative = [p for p, how in enumerate(methods) if how == "iterative"]
    out = torch.zeros(g * m, n, dtype=torch.float64, device=G.device)
    if comp:
        direct += solver.complement(comp, p_group, p_support, order, starts, counts_l, sizes, rows % m, out)
    if iterative:
        direct += solver.iterative(iterative, p_group, p_support, order, starts, counts_l, rows % m, out)
    solver.direct(direct, p_group, p_support, order, starts, counts_l, sizes, rows % m, out)
    if storage is not None and solver.G32 is not None:
        storage.give_back(solver.G32)
    out[:, :d] *= support[:, :d]  # exact zeros off the support
    quad = solver.quad if quad_of is not None and not comp and not iterative else None
    return RidgeSolution(out.view(g, m, n), solver.max_rel, solver.retried,
                         sum(counts_l[p] for p in comp) - solver.comp_failed_rows,
                         sum(counts_l[p] for p in iterative) - solver.cg_failed_rows, solver.cg_iterations,
                         solver.refined_rows, quad)


CG_ITERATIONS_ESTIMATE = 25  # for the cost model; measured 10-20 on post-ReLU conv Grams


def _patterns(support: torch.Tensor, group: torch.Tensor, groups: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """The distinct ``(group, support)`` patterns of the rows: each one's group and support, the rows in
    pattern order, where each pattern's rows start in that order, and how many rows each has."""
    key = support.to(torch.int32)
    if groups > 1:
        key = torch.cat([group[:, None].to(torch.int32), key], 1)
    patterns, inverse, counts = torch.unique(key, dim=0, return_inverse=True, return_counts=True)
    p_group = patterns[:, 0].long() if groups > 1 else torch.zeros(len(patterns), dtype=torch.long,
                                                                   device=support.device)
    order = torch.argsort(inverse, stable=True)
    return p_group, patterns[:, -support.shape[1]:].bool(), order, torch.cumsum(counts, 0) - counts, counts.tolist()


def _choose_methods(sizes: list[int], counts: list[int], p_group: torch.Tensor, n: int) -> list[str]:
    """Per support pattern, the cheapest of ``direct`` (``k^3/3`` per pattern), ``complement``
    (``(n-k)^3/3`` per pattern + ``2 n (n-k)`` per row) and ``iterative`` (CG: about
    ``4 n^2`` per row and iteration), in flops; the last two share one ``n^3`` inverse per
    group, paid only when it saves more than it costs."""
    direct = [k**3 / 3 + k * k * c for k, c in zip(sizes, counts)]
    comp = [(n - k) ** 3 / 3 + 2 * n * (n - k) * c for k, c in zip(sizes, counts)]
    cg = [4 * n * n * c * CG_ITERATIONS_ESTIMATE for c in counts]
    methods = ["direct" if d <= min(a, b) else ("complement" if a <= b else "iterative")
               for d, a, b in zip(direct, comp, cg)]
    shared = len({int(p_group[p]) for p, how in enumerate(methods) if how != "direct"}) * n**3
    saved = sum(d - min(a, b) for d, a, b, how in zip(direct, comp, cg, methods) if how != "direct")
    return methods if saved > shared else ["direct"] * len(sizes)
