"""Direct solves of masked ridge systems, a batch at a time: each row's ``G[S, S] + lam I`` gathered,
factored by Cholesky and solved (:func:`~prune_repair.engine.refit.ridge.masked_ridge`'s default path).

Systems of the same row count are taken in order of size and padded to the largest of a chunk of
about :data:`CHUNK_BYTES`, so a chunk stays in cache from its gather to its solve. ``factor`` (see
:data:`FACTORS`): float64 factors; float32 factors refined to float64 accuracy
(:mod:`~prune_repair.engine.refit.ridge_refine`); or float32 factors alone, gathered from a float32
copy of ``G`` in units of its mean diagonal. A system whose float32 factor fails is factored in float64;
one whose float64 factor fails is retried with 10x the damping.

Example:
    >>> import torch
    >>> G = torch.tensor([[[4.0, 2.0, 0.0], [2.0, 3.0, 0.0], [0.0, 0.0, 1.0]]], dtype=torch.float64)
    >>> C = torch.tensor([[[2.0], [1.0], [0.0]]], dtype=torch.float64)
    >>> solver = RowSolver(G, C, None, 3, torch.ones(1, dtype=torch.float64), 0.0, 2**20, "float64", None)
    >>> out = torch.zeros(1, 3, dtype=torch.float64)
    >>> support = torch.tensor([[True, True, False]])
    >>> solver.direct([0], torch.zeros(1, dtype=torch.long), support, torch.arange(1), torch.zeros(1, dtype=torch.long),
    ...               [1], [2], torch.zeros(1, dtype=torch.long), out)
    >>> out
    tensor([[0.5000, 0.0000, 0.0000]], dtype=torch.float64)
"""

from __future__ import annotations

import torch

from .gram_storage import GramStorage
from .ridge_refine import cholesky_solve_tri, solve_spd
from .support_gather import cholesky_in_place_, gather_blocks, support_positions

MAX_RETRIES = 12
MIN_RETRY_DAMPING = 1e-10
CHUNK_BYTES = 16 * 2**20
"""Batched factorizations go in chunks of about this size (at most ``work_bytes``): the systems
stay in cache from their gather to their solve (measured on resnet18's layers at 90% sparsity,
one core: 30% faster than 256 MiB chunks; 4 MiB chunks lose it again to per-call overhead)."""
FACTORS = ("float64", "refined", "float32")
"""How the direct path factors: ``float64``; ``refined``, float32 factors refined in float64 to a float64
backward error (:mod:`~prune_repair.engine.refit.ridge_refine`; systems that do not get there are factored in
float64), break-even on a CPU core, the default on CUDA; ``float32``, gathered from a float32 copy of ``G`` and
factored in float32, for statistics whose products were float32 (its rounding, about ``k * 2^-24`` of
``||G[S, S]||``, is of the order of theirs), 1.2-1.5x faster on a CPU core."""
FLOAT32_DIAGONAL = (1e-30, 1e30)
"""``factor="float32"`` copies ``G`` to float32 only where its largest diagonal entry (which bounds every entry)
lies in this range; elsewhere the factors are float64."""
PAD_FRACTION = 32
"""A chunk of systems holds sizes down to ``1 - 1/32`` of its largest (the padding it solves is bounded)."""
SINGULAR = ("the least-squares system stays singular even with 10^12 times more damping: "
            "the Gram statistics hold NaN/Inf or are degenerate")


def resolve_factor(factor: str | None, G: torch.Tensor) -> str:
    """The factorization to use: ``factor`` (one of :data:`FACTORS`), by default
    ``refined`` on CUDA and ``float64`` elsewhere; ``float64`` instead of ``float32`` for a ``G`` that float32
    cannot hold (:data:`FLOAT32_DIAGONAL`).

    >>> resolve_factor("float32", torch.eye(2, dtype=torch.float64)[None] * 1e40)
    'float64'
    """
    factor = ("refined" if G.device.type == "cuda" else "float64") if factor is None else factor
    if factor not in FACTORS:
        raise ValueError(f"factor must be one of {', '.join(FACTORS)}, got {factor!r}")
    largest = float(G.diagonal(dim1=-2, dim2=-1).amax()) if factor == "float32" else 0.0
    if factor == "float32" and not FLOAT32_DIAGONAL[0] <= largest <= FLOAT32_DIAGONAL[1]:
        return "float64"
    return factor


class RowSolver:
    """The systems of one :func:`~prune_repair.engine.refit.ridge.masked_ridge` call: ``G``, ``C`` (float64),
    the ``prior``, ``d`` weight columns, each group's ``scale`` (mean diagonal), the relative ``damping``,
    the memory bound, the :data:`FACTORS` entry and the :class:`GramStorage` (or None) to borrow from.
    Also counts what it did (retries, refined rows) and, with :attr:`quad_of`, the quadratic forms."""

    def __init__(self, G: torch.Tensor, C: torch.Tensor, prior: torch.Tensor | None, d: int, scale: torch.Tensor,
                 damping: float, work_bytes: int, factor: str, storage: GramStorage | None):
        self.G, self.C, self.prior, self.d, self.scale = G, C, prior, d, scale
        self.damping, self.work_bytes, self.factor, self.refined_rows = damping, work_bytes, factor, 0
        self.storage, self.G32 = storage, None
        self.rel = torch.full_like(scale, damping)  # relative damping per group (raised on failure)
        self.max_rel, self.retried = damping, 0
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
                    raise ValueError(SINGULAR)
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


def _scatter(out, rows, idx, valid, sol):
    """``out[rows[p, c], idx[p, k]] = sol[p, k, c]`` where ``valid[p, k]``."""
    P, K, c = sol.shape
    r = rows[:, None, :].expand(P, K, c)
    i = idx[:, :, None].expand(P, K, c)
    v = valid[:, :, None].expand(P, K, c)
    out.index_put_((r[v], i[v]), sol[v])
