"""Batched SPD solves by a float32 Cholesky factor, refined in float64 to float64 accuracy.

The masked ridge systems ``A x = b`` (``A = G[S, S] + lam I``, float64, one per output row) are
factored in float32, about twice as fast as float64, and the solution is refined with float64
residuals from ``A`` itself (mixed-precision iterative refinement, as LAPACK's ``dsposv``)::

    x_0 = A32^-1 b,    x_{i+1} = x_i + A32^-1 (b - A x_i)      (A32^-1: two float32 triangular solves)

Each step shrinks the error by about ``cond(A) * 2^-24``, and the ridge damping (``1e-2`` of the
mean diagonal) bounds ``cond(A)``: two steps on resnet18's layers at 90% sparsity. A system stops
when its normwise backward error is at the level of a float64 solve:
``||b - A x|| <= sqrt(k) * eps64 * ||A||_F * ||x||``. A system whose float32 factorization
fails, or whose residual does not halve in a step, or that has not converged after
``max_steps``, is reported, and the caller solves it in float64.

Example:
    >>> import torch
    >>> _ = torch.manual_seed(0)
    >>> X = torch.randn(3, 300, 40, dtype=torch.float64)
    >>> A = X.mT @ X + 3 * torch.eye(40, dtype=torch.float64)
    >>> b = torch.randn(3, 40, 2, dtype=torch.float64)
    >>> x, ok = refined_solve(A, b)
    >>> bool(ok.all()), torch.allclose(x, torch.linalg.solve(A, b), rtol=1e-12, atol=0)
    (True, True)
"""

from __future__ import annotations

import torch

__all__ = ["cholesky_solve_tri", "refined_solve", "solve_spd"]

MAX_STEPS = 10
EPS64 = torch.finfo(torch.float64).eps


def cholesky_solve_tri(L: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``(L L^T)^-1 B`` by two triangular solves (several times faster than ``torch.cholesky_solve``
    on batches of single right-hand sides, same values up to rounding).

    Example:
        >>> A = torch.tensor([[[4.0, 2.0], [2.0, 3.0]]], dtype=torch.float64)
        >>> cholesky_solve_tri(torch.linalg.cholesky(A), torch.tensor([[[2.0], [1.0]]], dtype=torch.float64)).flatten()
        tensor([0.5000, 0.0000], dtype=torch.float64)
    """
    y = torch.linalg.solve_triangular(L, B, upper=False)
    return torch.linalg.solve_triangular(L.mT, y, upper=True)


def refined_solve(A: torch.Tensor, B: torch.Tensor, *, max_steps: int = MAX_STEPS
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve ``A x = B`` for a batch of float64 SPD ``A`` ``(p, k, k)`` and ``B`` ``(p, k, c)``.

    Returns ``(x, converged)``: ``x`` float64 ``(p, k, c)`` and ``converged`` ``(p,)`` bool
    (False: solve that system in float64; its ``x`` is meaningless)."""
    p, k, _ = A.shape
    L, info = torch.linalg.cholesky_ex(A.to(torch.float32))
    ok = info == 0
    x = cholesky_solve_tri(L, B.to(torch.float32)).to(torch.float64)
    floor = (k ** 0.5 * EPS64) * torch.linalg.vector_norm(A, dim=(1, 2))  # (p,)
    active = ok.clone()
    last = torch.full((p,), float("inf"), dtype=torch.float64, device=A.device)
    converged = torch.zeros(p, dtype=torch.bool, device=A.device)
    for i in range(max_steps + 1):
        R = B - torch.bmm(x.mT, A).mT  # A is symmetric: x^T A is A x, and a faster product
        r_norm = torch.linalg.vector_norm(R, dim=1).amax(1)
        x_norm = torch.linalg.vector_norm(x, dim=1).amax(1)
        done = active & (r_norm <= floor * x_norm)  # NaN compares False
        converged |= done
        active &= ~done & (r_norm <= 0.5 * last)  # stalled or not finite: leave it to float64
        if i == max_steps or not bool(active.any()):
            break
        last = r_norm
        step = cholesky_solve_tri(L, R.to(torch.float32)).to(torch.float64)
        x += step * active[:, None, None]
    return x, converged & ok


def solve_spd(A: torch.Tensor, B: torch.Tensor, *, refine: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(A^-1 B, solved, refined)``: by :func:`refined_solve` where it converges (``refine``), by a
    float64 factorization for the other systems; ``solved`` is False where ``A`` is not positive
    definite in float64 either; ``refined``: right-hand sides solved by the float32 factor."""
    if refine:
        sol, ok = refined_solve(A, B)
        refined = int(ok.sum()) * B.shape[2]
        if bool(ok.all()):
            return sol, ok, refined
        rest = (~ok).nonzero().flatten()
        L, info = torch.linalg.cholesky_ex(A[rest])
        sol[rest] = cholesky_solve_tri(L, B[rest])
        ok[rest] = info == 0
        return sol, ok, refined
    L, info = torch.linalg.cholesky_ex(A)
    return cholesky_solve_tri(L, B), info == 0, 0
