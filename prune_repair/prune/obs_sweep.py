"""The OBS sweep of one layer: blocked, lazily updated removals against ``H = G + lam I`` (SparseGPT).

:func:`obs_rows` prunes ``k`` columns of a layer's rows (or an N:M pattern) choosing by the
saliency ``w_q^2 / [H^-1]_qq`` and compensating the survivors; :func:`damped` builds ``H``.
Used by :mod:`~prune_repair.prune.obs_layer`, one sweep per OBS mask candidate.

Example:
    >>> import torch
    >>> H = torch.eye(3)[None] * 2.0
    >>> W, keep = obs_rows(torch.tensor([[[3.0, -1.0, 2.0]]]), H, 1, 3)
    >>> W.tolist(), keep.tolist()
    ([[[3.0, 0.0, 2.0]]], [[[True, False, True]]])
"""

from __future__ import annotations

import torch

from .nm import NMPattern
from .targets import PruneError

__all__ = ["damped", "obs_rows"]


def obs_rows(W: torch.Tensor, H: torch.Tensor, k: int, d: int, block_size: int = 128,
             forced: torch.Tensor | None = None, nm: NMPattern | None = None, factor: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``k`` of the first ``d`` columns of ``W`` ``(groups, rows, n)`` against ``H``
    ``(groups, n, n)`` with blocked, lazily updated OBS steps. Returns ``(W', keep)``,
    ``keep`` ``(groups, rows, d)`` bool; ``forced`` (True = must go) entries are pruned first.
    With ``nm`` (``k`` ignored), each group of ``nm.m`` columns loses, per row, its
    ``m - n`` weights of least saliency at the moment the sweep reaches the group. ``factor``: the
    Cholesky factor of ``H`` when the caller has it (not formed again).
    """
    if nm is not None:
        block_size = -(-block_size // nm.m) * nm.m  # groups never straddle a block
    g, m, n = W.shape
    L = torch.linalg.cholesky(H) if factor is None else factor
    U = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    W = W.clone()
    keep = torch.ones(g, m, d, dtype=torch.bool, device=W.device)
    done = 0
    for b0 in range(0, d, block_size):
        b1 = min(b0 + block_size, d)
        W1, U1 = W[:, :, b0:b1].clone(), U[:, b0:b1, b0:b1]
        diag = U1.diagonal(dim1=1, dim2=2)
        score = W1.square() / diag[:, None, :].square()
        must = forced[:, :, b0:b1] if forced is not None else torch.zeros_like(score, dtype=torch.bool)
        quota = max(0, round(k * b1 / d) - done - int(must.sum()))
        score = score.masked_fill(must, float("inf"))
        drop = must.clone(memory_format=torch.contiguous_format)
        if quota:
            lowest = torch.sort(score.reshape(-1), stable=True).indices[:quota]
            drop.view(-1)[lowest] = True
        if nm is not None:
            drop = must.clone(memory_format=torch.contiguous_format)
        err = torch.zeros_like(W1)
        for i in range(b1 - b0):
            if nm is not None and i % nm.m == 0:
                _drop_group_(drop[:, :, i:i + nm.m], W1[:, :, i:i + nm.m], diag[:, i:i + nm.m], nm)
            w = W1[:, :, i]
            e = torch.where(drop[:, :, i], w, torch.zeros_like(w)) / diag[:, None, i]
            W1[:, :, i:] -= e[:, :, None] * U1[:, None, i, i:]
            W1[:, :, i] = torch.where(drop[:, :, i], torch.zeros_like(w), W1[:, :, i])
            err[:, :, i] = e
        W[:, :, b0:b1] = W1
        W[:, :, b1:] -= torch.bmm(err, U[:, b0:b1, b1:])
        keep[:, :, b0:b1] = ~drop
        done += int(drop.sum())
    return W, keep


def _drop_group_(drop: torch.Tensor, W: torch.Tensor, diag: torch.Tensor, nm: NMPattern) -> None:
    """Mark, per row, the ``m - n`` columns of a group with the least saliency ``w^2 / d^2``
    (weights that must go count first) in ``drop`` ``(groups, rows, m)``."""
    score = (W.square() / diag[:, None, :].square()).masked_fill(drop, -float("inf"))
    lowest = torch.argsort(score, dim=-1, stable=True)[..., :nm.m - nm.n]
    drop.scatter_(-1, lowest, True)


def damped(G: torch.Tensor, d: int, damping: float) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor]:
    """``(H, lam, rel, L)``: ``H = G + lam I`` on the weight columns, with damping raised 10x until it factors,
    and its Cholesky factor ``L`` (kept: the callers solve with it)."""
    scale = G.diagonal(dim1=1, dim2=2)[:, :d].mean(1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    rel = damping
    for _ in range(13):
        H = G.clone()
        H.diagonal(dim1=1, dim2=2)[:, :d] += (rel * scale)[:, None]
        L, info = torch.linalg.cholesky_ex(H)
        if bool((info == 0).all()):
            return H, rel * scale, rel, L
        rel = max(rel * 10, 1e-10)
    raise PruneError("the Gram matrix stays singular even with much more damping: the data hold NaN/Inf")
