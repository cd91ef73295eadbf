"""Masked ridge least squares from Gram statistics: one solve per output row over its support.

For output row ``j`` with support ``S_j`` (its nonzero weights, plus the bias column
when ``intercept``)::

    w_S = (G[S, S] + lam I)^-1 C[S, j],    lam = damping * mean(diag G)   (weights only;
                                                                           the bias is not damped)

and ``w = 0`` off the support, exactly. Rows with the same support (dense rows, rows of a
structured mask) share one factorization; the others are taken in order of size, padded to the
largest of a few, and solved with batched Cholesky (``torch.linalg.cholesky_ex``) in cache-sized chunks
(``factor``: float64 factors; float32 factors refined in float64, the default on CUDA:
:mod:`~prune_repair.engine.refit.ridge_refine`; or float32 factors alone, for Gram statistics
whose products were float32 anyway, see :func:`masked_ridge`).
When most weights are kept, the complement formula with one shared ``H = (G + lam I)^-1``
is cheaper: ``w = H c - H[:, Z] H[Z, Z]^-1 (H c)[Z]`` (``Z`` = the zeroed positions). Rows
whose supports are large but far from full (around 50% sparsity of a wide layer) are
iterated together by preconditioned conjugate gradients with ``H[S, S]`` as preconditioner
(:mod:`~prune_repair.engine.refit.ridge_cg`), at matrix-multiply speed, to a relative residual of
1e-10; a row that does not converge is solved directly. The cheapest path is chosen per
support pattern from a flop count (:func:`_choose_methods`). A factorization that fails is retried with 10x the damping
(never NaN); :attr:`RidgeSolution.damping` reports the largest damping used.

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

from .ridge_cg import masked_pcg
from .gram_storage import GramStorage
from .ridge_refine import cholesky_solve_tri, solve_spd
from .support_gather import cholesky_in_place_, gather_blocks, support_positions

MAX_RETRIES = 12
MIN_RETRY_DAMPING = 1e-10
DEFAULT_WORK_BYTES = 256 * 2**20
CHUNK_BYTES = 16 * 2**20
"""Batched factorizations go in chunks of about this size (at most ``work_bytes``): the systems
stay in cache from their gather to their solve (measured on resnet18's layers at 90% sparsity,
one core: 30% faster than 256 MiB chunks; 4 MiB chunks lose it again to per-call overhead)."""
METHODS = ("auto", "direct", "complement", "iterative")
FACTORS = ("float64", "refined", "float32")
FLOAT32_DIAGONAL = (1e-30, 1e30)
"""``factor="float32"`` copies ``G`` to float32 only where its largest diagonal entry (which bounds every entry)
lies in this range; elsewhere the factors are float64."""
PAD_FRACTION = 32
"""A chunk of systems holds sizes down to ``1 - 1/32`` of its largest (the padding it solves is bounded)."""


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
        factor: how direct solves factor their systems. ``float64``; ``refined``: in float32,
            refined in float64 to a float64 backward error (:mod:`~prune_repair.engine.refit.ridge_refine`;
            the systems that do not get there are factored in float64); ``float32``: gathered and
            factored in float32 (from a float32 copy of ``G``), for statistics whose products were
            float32: its rounding (about ``k * 2^-24`` of ``||G[S, S]||``) is of the order of theirs, and
            it is about 2x faster on a CPU core (a system whose float32 factor fails is factored in
            float64, and so is a ``G`` outside :data:`FLOAT32_DIAGONAL`). Default: ``refined`` on CUDA, ``float64`` elsewhere (on a CPU core the refinement's
            float64 residuals cost as much as the float32 factor saves: measured break-even).
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
    factor = ("refined" if G.device.type == "cuda" else "float64") if factor is None else factor
    if factor not in FACTORS:
        raise ValueError(f"factor must be one of {', '.join(FACTORS)}, got {factor!r}")
    if factor == "float32" and not FLOAT32_DIAGONAL[0] <= float(G.diagonal(dim1=1, dim2=2).amax()) <= FLOAT32_DIAGONAL[1]:
        factor = "float64"  # G itself would not fit float32
    solver = _Solver(G, C, prior, d, scale, float(damping), work_bytes, factor, storage)
    solver.quad_of = quad_of.reshape(g * m, n).to(device=G.device, dtype=torch.float64) if quad_of is not None else None
    support = torch.ones(g * m, n, dtype=torch.bool, device=G.device)
    support[:, :d] = mask.reshape(g * m, d)
    rows = torch.arange(g * m, device=G.device)
    key = torch.cat([(rows // m)[:, None].to(torch.int32), support.to(torch.int32)], 1) if g > 1 else support.to(torch.int32)
    patterns, inverse, counts = torch.unique(key, dim=0, return_inverse=True, return_counts=True)
    p_group = patterns[:, 0].long() if g > 1 else torch.zeros(len(patterns), dtype=torch.long, device=G.device)
    p_support = patterns[:, -n:].bool()
    order = torch.argsort(inverse, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    sizes, counts_l = p_support.sum(1).tolist(), counts.tolist()

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


class _Solver:
    def __init__(self, G, C, prior, d, scale, damping, work_bytes, factor, storage):
        self.G, self.C, self.prior, self.d, self.scale = G, C, prior, d, scale
        self.damping, self.work_bytes, self.factor, self.refined_rows = damping, work_bytes, factor, 0
        self.storage, self.G32 = storage, None
        self.rel = torch.full_like(scale, damping)  # relative damping per group (raised on failure)
        self.max_rel, self.retried, self.comp_failed_rows = damping, 0, 0
        self.cg_failed_rows, self.cg_iterations = 0, 0
        self._inverse: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.quad_of: torch.Tensor | None = None
        self.quad = torch.zeros(2, dtype=torch.float64, device=G.device)

    def _add_quads(self, system, lam, idx, valid, rows, sol, ok, *, factored, unit=None):
        """Add ``x^T G[S, S] x`` of the solved rows and of ``quad_of``'s rows to :attr:`quad`, for the systems
        solved (``ok``). ``system`` is ``A = G[S, S] + lam I`` (weight diagonal; 1 on the padding, where ``x`` is
        0; symmetric), or with ``factored`` its Cholesky factor ``L`` (``x^T A x = ||x^T L||^2``); both weights go
        through one product. ``unit`` ``(P,)``: ``A`` (and ``lam``) are ``G``'s divided by it."""
        if self.quad_of is None:
            return
        damped = ((idx < self.d) & valid).to(sol.dtype)[:, :, None] * lam[:, None, None]
        c = sol.shape[2]
        x = torch.cat([sol, self.quad_of[rows[:, None, :], idx[:, :, None]] * valid[:, :, None]], 2)
        # x^T L and x^T A: products with the system untransposed run 2.5x faster than L^T x and A x
        xt = x.mT.to(system.dtype)
        forms = (torch.bmm(xt, system).to(x.dtype).square().sum(2) if factored
                 else (x.mT * torch.bmm(xt, system)).sum(2))
        forms = forms - (damped * x.square()).sum(1)  # (P, 2c)
        if unit is not None:
            forms = forms * unit[:, None]
        forms = torch.where(ok[:, None], forms, 0)  # a failed factor is not a factor of A
        self.quad += torch.stack([forms[:, c:].sum(), forms[:, :c].sum()])

    def _batches(self, pats, p_support, order, starts, counts, sizes, complement):
        """Patterns of the same row count as padded index tensors in memory-bounded chunks, largest systems
        first: a chunk is padded to its first system's size, and holds no system smaller by more than
        1/:data:`PAD_FRACTION` (padding of resnet18's wide layers at 90% sparsity, in Cholesky flops: about 1%,
        against 6% with the fixed size buckets this replaced)."""
        n = self.G.shape[1]
        by_count: dict[int, list[tuple[int, int]]] = {}
        for p in pats:
            k = n - sizes[p] if complement else sizes[p]
            if k:
                by_count.setdefault(counts[p], []).append((k, p))
        if not by_count:
            return
        listed = torch.tensor([p for items in by_count.values() for _, p in items], device=self.G.device)
        sel = ~p_support[listed] if complement else p_support[listed]
        positions = support_positions(sel, max(k for items in by_count.values() for k, _ in items))[0]
        row_of = torch.full((len(p_support),), -1, dtype=torch.long, device=self.G.device)
        row_of[listed] = torch.arange(len(listed), device=self.G.device)  # pattern -> its row of positions
        for c, items in sorted(by_count.items()):
            items.sort(reverse=True)
            i = 0
            while i < len(items):
                K = items[i][0]
                per = 8 * (3 * K * K + 3 * K * c + (n * K + n * c if complement else 0))
                step, floor = max(1, min(self.work_bytes, CHUNK_BYTES) // per), K - K // PAD_FRACTION
                end = min(len(items), i + step)
                while end > i + 1 and items[end - 1][0] < floor:  # sizes descend: cut where they fall too far
                    end -= 1
                chunk = torch.tensor([p for _, p in items[i:end]], device=self.G.device)
                sizes_k = torch.tensor([k for k, _ in items[i:end]], device=self.G.device)
                i = end
                idx = positions[row_of[chunk], :K]
                valid = torch.arange(K, device=self.G.device)[None] < sizes_k[:, None]
                rows = order[starts[chunk][:, None] + torch.arange(c, device=self.G.device)]
                yield chunk, idx, valid, rows

    def _system(self, M, grp, idx, valid, lam, lower=True):
        A = gather_blocks(M, grp, idx, valid, lower=lower)
        damp = torch.where(idx < self.d, lam[:, None], torch.zeros_like(lam)[:, None])
        A.diagonal(dim1=1, dim2=2).add_(torch.where(valid, damp, torch.ones_like(damp)))
        return A

    def direct(self, pats, p_group, p_support, order, starts, counts, sizes, local, out):
        for chunk, idx, valid, rows in self._batches(pats, p_support, order, starts, counts, sizes, False):
            grp = p_group[chunk]
            rel = self.rel[grp].clone()
            todo = torch.arange(len(chunk), device=idx.device)
            for attempt in range(MAX_RETRIES + 1):
                g_, i_, v_, r_ = grp[todo], idx[todo], valid[todo], rows[todo]
                lam = self.scale[g_] * rel[todo]
                B = self.C[g_[:, None, None], i_[:, :, None], local[r_][:, None, :]]
                if self.prior is not None:
                    w0 = self.prior.reshape(-1, self.d)[r_[:, None, :], i_.clamp_max(self.d - 1)[:, :, None]]
                    B = B + torch.where(i_ < self.d, lam[:, None], 0)[:, :, None] * w0
                B = B * v_[:, :, None]
                sol, ok = self._solve(g_, i_, v_, r_, lam, B)
                _scatter(out, r_[ok], i_[ok], v_[ok], sol[ok])
                if bool(ok.all()):
                    break
                if attempt == MAX_RETRIES:
                    raise ValueError("the least-squares system stays singular even with 10^12 times more damping: "
                                     "the Gram statistics hold NaN/Inf or are degenerate")
                todo = todo[~ok]
                rel[todo] = (rel[todo] * 10).clamp_min(MIN_RETRY_DAMPING)
                self.retried += int(rows[todo].numel())
            self.max_rel = max(self.max_rel, float(rel.max()))

    def _solve(self, g_, i_, v_, r_, lam, B) -> tuple[torch.Tensor, torch.Tensor]:
        """Solutions ``(P, K, c)`` float64 of one batch of systems, and which were solved (False: the
        float64 factorization failed too); adds their quadratic forms when asked."""
        if self.factor == "refined":  # the refinement needs all of the system
            system = self._system(self.G, g_, i_, v_, lam, lower=False)
            sol, ok, refined = solve_spd(system, B, refine=True)
            self.refined_rows += refined
            self._add_quads(system, lam, i_, v_, r_, sol, ok, factored=False)
            return sol, ok
        if self.factor == "float32":  # in units of each group's mean diagonal: no float32 overflow
            if self.G32 is None:
                self.G32 = (self.storage.empty(self.G.shape, self.G.device, torch.float32) if self.storage is not None
                            else torch.empty(self.G.shape, dtype=torch.float32, device=self.G.device))
                self.G32.copy_(self.G).mul_((1 / self.scale).to(torch.float32)[:, None, None])  # 8x faster than mul(out=)
            unit = self.scale[g_]
            L, info = cholesky_in_place_(self._system(self.G32, g_, i_, v_, (lam / unit).to(torch.float32)))
            sol = cholesky_solve_tri(L, (B / unit[:, None, None]).to(torch.float32)).to(torch.float64)
            ok = (info == 0) & torch.isfinite(sol).flatten(1).all(1)
            self._add_quads(L, lam / unit, i_, v_, r_, sol, ok, factored=True, unit=unit)
            if not bool(ok.all()):  # too ill-conditioned for float32: these systems in float64
                rest = (~ok).nonzero().flatten()
                sol[rest], ok[rest] = self._solve64(g_[rest], i_[rest], v_[rest], r_[rest], lam[rest], B[rest])
            return sol, ok
        return self._solve64(g_, i_, v_, r_, lam, B)

    def _solve64(self, g_, i_, v_, r_, lam, B) -> tuple[torch.Tensor, torch.Tensor]:
        # the factor replaces the system (the Cholesky reads the lower triangle only)
        L, info = cholesky_in_place_(self._system(self.G, g_, i_, v_, lam))
        sol, ok = cholesky_solve_tri(L, B), info == 0
        self._add_quads(L, lam, i_, v_, r_, sol, ok, factored=True)
        return sol, ok

    def inverse(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(A, H, lam)``: ``A = G + lam I`` (weight columns) and ``H = A^-1`` per group, computed
        once and shared by the complement and iterative paths (damping raised where ``A`` fails)."""
        if self._inverse is None:
            G, d = self.G, self.d
            for attempt in range(MAX_RETRIES + 1):
                lam = self.scale * self.rel
                A = G.clone()
                A.diagonal(dim1=1, dim2=2)[:, :d] += lam[:, None]
                L, info = torch.linalg.cholesky_ex(A)
                if bool((info == 0).all()):
                    break
                if attempt == MAX_RETRIES:
                    raise ValueError("the least-squares system stays singular even with 10^12 times more damping: "
                                     "the Gram statistics hold NaN/Inf or are degenerate")
                self.rel[info != 0] = (self.rel[info != 0] * 10).clamp_min(MIN_RETRY_DAMPING)
            self.max_rel = max(self.max_rel, float(self.rel.max()))
            self._inverse = (A, torch.cholesky_inverse(L), lam)
        return self._inverse

    def rhs(self, lam: torch.Tensor) -> torch.Tensor:
        """``C + lam * prior`` (weight rows), ``(groups, n, rows)``."""
        rhs = self.C.clone()
        if self.prior is not None:
            rhs[:, :self.d] += lam[:, None, None] * self.prior.transpose(1, 2)
        return rhs

    def iterative(self, pats, p_group, p_support, order, starts, counts, local, out) -> list[int]:
        """Rows of ``pats`` by :func:`~prune_repair.engine.refit.ridge_cg.masked_pcg`, in chunks of bounded
        memory; returns the patterns with a row that did not converge (to be solved directly)."""
        A, H, lam = self.inverse()
        rhs, n = self.rhs(lam), self.G.shape[1]
        per_group: dict[int, list[int]] = {}
        for p in pats:
            per_group.setdefault(int(p_group[p]), []).append(p)
        failed = []
        step = max(1, self.work_bytes // (8 * 8 * n))
        for grp, ps in per_group.items():
            rows = torch.cat([order[starts[p]:starts[p] + counts[p]] for p in ps])
            owner = torch.cat([torch.full((counts[p],), k) for k, p in enumerate(ps)])
            for i in range(0, len(rows), step):
                r, who = rows[i:i + step], owner[i:i + step].to(rows.device)
                sup = p_support[torch.tensor(ps, device=rows.device)[who]]
                x, ok, iters = masked_pcg(A[grp], H[grp], rhs[grp][:, local[r]].T, sup)
                self.cg_iterations = max(self.cg_iterations, iters)
                out[r[ok]] = x[ok]
                bad = sorted({ps[k] for k in who[~ok].tolist()})
                failed += bad
                self.cg_failed_rows += sum(counts[p] for p in bad)
        return failed

    def complement(self, pats, p_group, p_support, order, starts, counts, sizes, local, out):
        G, n = self.G, self.G.shape[1]
        _, H, lam = self.inverse()
        HC = H @ self.rhs(lam)  # (g, n, m)
        dense = [p for p in pats if sizes[p] == n]
        for p in dense:
            r = order[starts[p]:starts[p] + counts[p]]
            out[r] = HC[p_group[p]][:, local[r]].T
        failed = []
        for chunk, idx, valid, rows in self._batches(pats, p_support, order, starts, counts, sizes, True):
            grp = p_group[chunk]
            A = self._system(H, grp, idx, valid, torch.zeros_like(lam[grp]))
            B = HC[grp[:, None, None], idx[:, :, None], local[rows][:, None, :]] * valid[:, :, None]
            Lz, info = torch.linalg.cholesky_ex(A)
            ok = info == 0
            V = cholesky_solve_tri(Lz, B) * valid[:, :, None]
            full = torch.arange(n, device=G.device)[None, :, None]
            W = HC[grp[:, None, None], full, local[rows][:, None, :]] - H[grp[:, None, None], full, idx[:, None, :]] @ V
            r_ok = rows[ok]
            out[r_ok.reshape(-1)] = W[ok].transpose(1, 2).reshape(-1, n)
            if not bool(ok.all()):
                failed += chunk[~ok].tolist()
                self.comp_failed_rows += int(rows[~ok].numel())
        return failed


def _scatter(out, rows, idx, valid, sol):
    """``out[rows[p, c], idx[p, k]] = sol[p, k, c]`` where ``valid[p, k]``."""
    P, K, c = sol.shape
    r = rows[:, None, :].expand(P, K, c)
    i = idx[:, :, None].expand(P, K, c)
    v = valid[:, :, None].expand(P, K, c)
    out.index_put_((r[v], i[v]), sol[v])
