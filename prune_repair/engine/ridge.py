"""Masked ridge least squares from Gram statistics: one solve per output row over its support.

For output row ``j`` with support ``S_j`` (its nonzero weights, plus the bias column
when ``intercept``)::

    w_S = (G[S, S] + lam I)^-1 C[S, j],    lam = damping * mean(diag G)   (weights only;
                                                                           the bias is not damped)

and ``w = 0`` off the support, exactly. Rows with the same support (dense rows, rows of a
structured mask) share one factorization; the others are padded to a few bucket sizes and
solved with batched Cholesky (``torch.linalg.cholesky_ex``) in chunks of bounded memory.
When most weights are kept, the complement formula with one shared ``H = (G + lam I)^-1``
is cheaper: ``w = H c - H[:, Z] H[Z, Z]^-1 (H c)[Z]`` (``Z`` = the zeroed positions); the
cheaper of the two is used. A factorization that fails is retried with 10x the damping
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

MAX_RETRIES = 12
MIN_RETRY_DAMPING = 1e-10
DEFAULT_WORK_BYTES = 256 * 2**20


@dataclass
class RidgeSolution:
    """Solved rows as ``weight`` ``(groups, rows, n)`` float64 (bias last when there is one)."""

    weight: torch.Tensor
    damping: float
    retried: int = 0
    complement_rows: int = 0


def masked_ridge(
    G: torch.Tensor,
    C: torch.Tensor,
    mask: torch.Tensor,
    *,
    damping: float = 1e-2,
    intercept: bool = True,
    prior: torch.Tensor | None = None,
    work_bytes: int = DEFAULT_WORK_BYTES,
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
    """
    g, n, _ = G.shape
    m = C.shape[2]
    d = n - int(intercept)
    if tuple(mask.shape) != (g, m, d):
        raise ValueError(f"mask has shape {list(mask.shape)}, expected {[g, m, d]} for Gram statistics of that size")
    if not damping >= 0 or damping == float("inf"):
        raise ValueError(f"damping must be a finite number >= 0, got {damping}")
    G, C = G.to(torch.float64), C.to(torch.float64)
    diag = G.diagonal(dim1=1, dim2=2)[:, :d]
    scale = diag.mean(1) if d else torch.ones(g, dtype=G.dtype, device=G.device)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    solver = _Solver(G, C, prior, d, scale, float(damping), work_bytes)
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

    comp = [p for p in range(len(sizes)) if n - sizes[p] < sizes[p]]
    direct = [p for p in range(len(sizes)) if n - sizes[p] >= sizes[p]]
    cost_direct = sum(sizes[p] ** 3 / 3 for p in comp)
    cost_comp = len({int(p_group[p]) for p in comp}) * n**3 + sum((n - sizes[p]) ** 3 / 3 + n * (n - sizes[p]) * counts_l[p]
                                                                     for p in comp)
    if comp and cost_comp >= cost_direct:
        direct, comp = direct + comp, []
    out = torch.zeros(g * m, n, dtype=torch.float64, device=G.device)
    if comp:
        failed = solver.complement(comp, p_group, p_support, order, starts, counts_l, sizes, rows % m, out)
        direct += failed
    solver.direct(direct, p_group, p_support, order, starts, counts_l, sizes, rows % m, out)
    out[:, :d] *= support[:, :d]  # exact zeros off the support
    return RidgeSolution(out.view(g, m, n), solver.max_rel, solver.retried,
                         sum(counts_l[p] for p in comp) - solver.comp_failed_rows)


def _bucket(k: int) -> int:
    """Round a support size up so that few distinct batch sizes remain (at most ~6% padding)."""
    q = max(8, 1 << max(0, k.bit_length() - 5))
    return -(-k // q) * q


class _Solver:
    def __init__(self, G, C, prior, d, scale, damping, work_bytes):
        self.G, self.C, self.prior, self.d, self.scale = G, C, prior, d, scale
        self.damping, self.work_bytes = damping, work_bytes
        self.rel = torch.full_like(scale, damping)  # relative damping per group (raised on failure)
        self.max_rel, self.retried, self.comp_failed_rows = damping, 0, 0

    def _batches(self, pats, p_support, order, starts, counts, sizes, complement):
        """Patterns grouped by (bucket size, rows), as padded index tensors in memory-bounded chunks."""
        n = self.G.shape[1]
        keys: dict[tuple[int, int], list[int]] = {}
        for p in pats:
            k = n - sizes[p] if complement else sizes[p]
            if k:
                keys.setdefault((_bucket(k), counts[p]), []).append(p)
        for (K, c), ps in sorted(keys.items()):
            per = 8 * (3 * K * K + 3 * K * c + (n * K + n * c if complement else 0))
            step = max(1, self.work_bytes // per)
            for i in range(0, len(ps), step):
                chunk = torch.tensor(ps[i:i + step], device=self.G.device)
                sup = p_support[chunk]
                sel = ~sup if complement else sup
                idx = torch.argsort((~sel).to(torch.int8), dim=1, stable=True)[:, :K]  # selected positions first
                valid = torch.gather(sel, 1, idx)
                rows = order[starts[chunk][:, None] + torch.arange(c, device=self.G.device)]
                yield chunk, idx, valid, rows

    def _system(self, M, grp, idx, valid, lam):
        A = M[grp[:, None, None], idx[:, :, None], idx[:, None, :]]
        A = A * (valid[:, :, None] & valid[:, None, :])
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
                A = self._system(self.G, g_, i_, v_, lam)
                B = self.C[g_[:, None, None], i_[:, :, None], local[r_][:, None, :]]
                if self.prior is not None:
                    w0 = self.prior.reshape(-1, self.d)[r_[:, None, :], i_.clamp_max(self.d - 1)[:, :, None]]
                    B = B + torch.where(i_ < self.d, lam[:, None], 0)[:, :, None] * w0
                B = B * v_[:, :, None]
                L, info = torch.linalg.cholesky_ex(A)
                ok = info == 0
                sol = torch.cholesky_solve(B, L)
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

    def complement(self, pats, p_group, p_support, order, starts, counts, sizes, local, out):
        G, d, n = self.G, self.d, self.G.shape[1]
        for attempt in range(MAX_RETRIES + 1):
            lam = self.scale * self.rel
            Hf = G.clone()
            Hf.diagonal(dim1=1, dim2=2)[:, :d] += lam[:, None]
            L, info = torch.linalg.cholesky_ex(Hf)
            if bool((info == 0).all()):
                break
            if attempt == MAX_RETRIES:
                raise ValueError("the least-squares system stays singular even with 10^12 times more damping: "
                                 "the Gram statistics hold NaN/Inf or are degenerate")
            self.rel[info != 0] = (self.rel[info != 0] * 10).clamp_min(MIN_RETRY_DAMPING)
        self.max_rel = max(self.max_rel, float(self.rel.max()))
        H = torch.cholesky_inverse(L)
        rhs = self.C.clone()
        if self.prior is not None:
            rhs[:, :d] += lam[:, None, None] * self.prior.transpose(1, 2)
        HC = H @ rhs  # (g, n, m)
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
            V = torch.cholesky_solve(B, Lz) * valid[:, :, None]
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
