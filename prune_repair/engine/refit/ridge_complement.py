"""Masked ridge rows solved through one shared inverse ``H = (G + lam I)^-1`` per group: the complement
formula for rows that keep most weights, and preconditioned conjugate gradients for wide supports
far from full (:func:`~prune_repair.engine.refit.ridge.masked_ridge` chooses the path per support
pattern; rows these paths cannot solve go to the direct path of
:class:`~prune_repair.engine.refit.ridge_direct.RowSolver`).

Example:
    >>> import torch
    >>> G = torch.tensor([[[4.0, 2.0, 0.0], [2.0, 3.0, 0.0], [0.0, 0.0, 1.0]]], dtype=torch.float64)
    >>> C = torch.tensor([[[2.0], [1.0], [0.0]]], dtype=torch.float64)
    >>> solver = SharedInverseSolver(G, C, None, 3, torch.ones(1, dtype=torch.float64), 0.0, 2**20, "float64", None)
    >>> A, H, lam = solver.inverse()
    >>> (H @ C)[0].flatten()
    tensor([0.5000, 0.0000, 0.0000], dtype=torch.float64)
"""

from __future__ import annotations

import torch

from .ridge_cg import masked_pcg
from .ridge_direct import MAX_RETRIES, MIN_RETRY_DAMPING, SINGULAR, RowSolver
from .ridge_refine import cholesky_solve_tri


class SharedInverseSolver(RowSolver):
    """A :class:`~prune_repair.engine.refit.ridge_direct.RowSolver` that can also solve rows through the
    shared inverse (computed once, on first use)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.comp_failed_rows, self.cg_failed_rows, self.cg_iterations = 0, 0, 0
        self._inverse: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

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
                    raise ValueError(SINGULAR)
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
