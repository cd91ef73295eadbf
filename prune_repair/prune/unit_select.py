"""Which hidden units to remove: by score, or by greedy least-squares elimination (OBS).

``energy`` ranks unit ``j`` by ``sqrt(E[x_j^2]) * ||W[:, j]||`` (its activation energy times
the norm of its outgoing weights). ``obs`` removes units one group at a time, each time the
one whose removal raises the refitted consumer's squared error least, from the same Gram
statistics: with ``W`` the ridge solution over the units still there (toward the dense
outputs) and ``Hinv = (G + lam I)^-1``, removing the columns ``S`` of a unit costs
``trace(W_S Hinv_SS^-1 W_S^T)`` and leaves ``W - W_S Hinv_SS^-1 Hinv_S`` (and ``Hinv``
shrinks by the same Schur complement), exact for the damped quadratic (Optimal Brain
Surgeon applied to whole columns, as in ZipLM / OBC's structured variant). The bias column,
when there is one, is never removed.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from prune_repair.engine.refit.gram import Gram
    >>> _ = torch.manual_seed(0)
    >>> layer = nn.Linear(6, 3).double()
    >>> x = torch.randn(200, 6, dtype=torch.float64)
    >>> x[:, 2] *= 1e-3                                     # unit 2 carries almost nothing
    >>> gram = Gram.for_layer(layer); gram.add(x, layer(x).detach())
    >>> obs_keep(gram, 6, 1, 1, damping=1e-6).tolist()
    [0, 1, 3, 4, 5]
"""

from __future__ import annotations

import torch

from .targets import PruneError

SELECT = ("energy", "obs")


def obs_keep(gram, units: int, unit_size: int, n_remove: int, *, damping: float = 1e-2,
             intercept: bool = True) -> torch.Tensor:
    """Indices of the ``units - n_remove`` units greedy OBS elimination keeps (sorted)."""
    d = units * unit_size
    cols = list(range(d)) + ([d] if intercept else [])
    G = gram.G[0][cols][:, cols].clone()
    C = gram.C[0][cols]
    diag = G.diagonal()[:d]
    G.diagonal()[:d] += damping * float(diag.mean().clamp_min(1e-12))
    L, info = torch.linalg.cholesky_ex(G)
    if int(info):
        raise PruneError("the Gram statistics of a consumer layer are not positive definite even with damping: "
                         "use more calibration data or a larger damping")
    Hinv = torch.cholesky_inverse(L)
    W = (Hinv @ C).T  # (out, n): the ridge solution over every unit
    alive = torch.ones(units, dtype=torch.bool, device=G.device)
    block = torch.arange(unit_size, device=G.device)
    for _ in range(n_remove):
        idx = torch.nonzero(alive).squeeze(1)
        S = (idx[:, None] * unit_size + block).reshape(-1)
        if unit_size == 1:
            costs = W[:, S].square().sum(0) / Hinv.diagonal()[S].clamp_min(1e-300)
        else:
            Hs = Hinv[S][:, S].view(len(idx), unit_size, len(idx), unit_size).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
            Ws = W[:, S].view(-1, len(idx), unit_size).transpose(0, 1)  # (U, out, s)
            costs = (Ws @ torch.linalg.inv(Hs) * Ws).sum((1, 2))
        u = int(idx[int(torch.argmin(costs))])
        s = torch.arange(u * unit_size, (u + 1) * unit_size, device=G.device)
        inv_ss = torch.linalg.inv(Hinv[s][:, s])
        W = W - W[:, s] @ inv_ss @ Hinv[s]
        Hinv = Hinv - Hinv[:, s] @ inv_ss @ Hinv[s]
        W[:, s] = 0
        alive[u] = False
    return torch.nonzero(alive).squeeze(1).cpu()
