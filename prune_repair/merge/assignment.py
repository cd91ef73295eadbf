"""The linear assignment of a matching, exact at every width: dense when small, sparse with a proof when wide.

Up to :data:`DENSE_UP_TO` units scipy's dense ``linear_sum_assignment`` is solved. A wider
problem (convnext_tiny's 3072-unit MLP groups: 0.84 s dense, 0.19 s this way, one core, random-init
models whose correlations are near ties everywhere) is solved on a sparse set of
candidate entries (each row's :data:`CANDIDATES` largest, plus the largest of any column none of
them reaches) by scipy's ``min_weight_full_bipartite_matching``, and the matching is then proven
optimal for the dense problem by LP duality: potentials ``u``, ``v`` with ``u_i + v_j >= s_ij`` on
every candidate and equality on the matching are found by shortest paths (Bellman-Ford on the
matching's exchange graph), and every entry of the dense matrix is checked against them. Entries
that break the bound, or come within ``TOLERANCE`` of the entries' range of it, join the
candidates and the sparse problem is solved again. When the check passes, no permutation scores
more than the matching, so it is the dense solver's answer whenever the optimum is unique up to
that tolerance (two assignments tying closer than it may come out either way); when the
candidates cannot hold a full matching (a few columns every row prefers: then scipy's sparse
solver can also be very slow, seconds at 256 units, so it is not asked again with more), or the
rounds run out, the dense solver answers.

Example:
    >>> import numpy as np
    >>> s = np.random.default_rng(0).standard_normal((1200, 1200))
    >>> from scipy.optimize import linear_sum_assignment
    >>> bool((max_assignment(s) == linear_sum_assignment(s, maximize=True)[1]).all())
    True
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import min_weight_full_bipartite_matching

DENSE_UP_TO = 1024
"""Widths up to this are solved dense, wider ones sparse and proven (convnext_tiny's correlations, one core:
768 units 0.02-0.03 s dense against 0.03-0.05 s sparse, 1536 units 0.14 s against 0.07 s)."""

CANDIDATES = 16
"""Candidate entries per row of the sparse problem (the best ones of the row)."""

TOLERANCE = 1e-8
"""Entries within this fraction of the matrix's range of the dual bound join the candidates (far above
the rounding of the potentials, sums of a few hundred float64 differences)."""

REACH = 0.02
"""When an entry breaks the bound, every entry within this fraction of the range of it joins the candidates."""

ROUNDS = 8
"""Sparse solves before the dense solver takes over."""

_ROWS_PER_CHUNK = 64  # dense passes go by row chunks (a few MB each: cache-friendly)


def max_assignment(similarity: np.ndarray) -> np.ndarray:
    """Columns ``q`` maximizing ``sum_i similarity[i, q[i]]`` (a square float64 array)."""
    n = similarity.shape[0]
    if n <= DENSE_UP_TO:
        return linear_sum_assignment(similarity, maximize=True)[1]
    s = torch.from_numpy(np.ascontiguousarray(similarity, dtype=np.float64))
    found = _sparse_proven(s)
    return found if found is not None else linear_sum_assignment(similarity, maximize=True)[1]


def _sparse_proven(s: torch.Tensor) -> np.ndarray | None:
    """The sparse solve and its dense proof (module docstring); ``None`` where the dense solver must answer."""
    n = s.shape[0]
    spread = max(float(s.max() - s.min()), 1e-300)
    tol = TOLERANCE * spread
    keys = _initial_candidates(s)
    u = torch.zeros(n, dtype=torch.float64)
    for _ in range(ROUNDS):
        rows, cols = keys // n, keys % n
        cols_of_rows = _sparse_matching(s, rows, cols)
        if cols_of_rows is None:
            return None
        row_of_col = torch.empty(n, dtype=torch.long)
        row_of_col[cols_of_rows] = torch.arange(n)
        u = _potentials(s, rows, cols, row_of_col, u)
        if u is None:
            return None
        v = s[row_of_col, torch.arange(n)] - u[row_of_col]
        new = _near_bound(s, u, v, keys, tol, max(REACH * spread, tol))
        if new.numel() == 0:
            return cols_of_rows.numpy()
        keys = torch.cat([keys, new]).unique()
    return None


def _initial_candidates(s: torch.Tensor) -> torch.Tensor:
    """Sorted flat keys ``i * n + j`` of each row's best entries and of the best of every column none reaches."""
    n = s.shape[0]
    k = min(CANDIDATES, n)
    best = torch.cat([s[i:i + _ROWS_PER_CHUNK].topk(k, 1).indices for i in range(0, n, _ROWS_PER_CHUNK)])
    keys = (torch.arange(n)[:, None] * n + best).flatten()
    reached = torch.zeros(n, dtype=torch.bool)
    reached[best.flatten()] = True
    lonely = (~reached).nonzero().flatten()
    if lonely.numel():
        rows = s[:, lonely].topk(k, 0).indices  # (k, lonely)
        keys = torch.cat([keys, (rows * n + lonely[None, :]).flatten()])
    return keys.unique()


def _sparse_matching(s: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor | None:
    """Maximum-weight perfect matching on the candidates (columns of each row), ``None`` if there is none."""
    n = s.shape[0]
    vals = s[rows, cols]
    cost = (vals.max() - vals + 1.0).numpy()  # positive costs: an explicit zero would read as no edge
    graph = csr_matrix((cost, (rows.numpy(), cols.numpy())), shape=(n, n))
    try:
        _, matched = min_weight_full_bipartite_matching(graph)
    except ValueError:  # the candidates hold no perfect matching
        return None
    return torch.from_numpy(np.asarray(matched, dtype=np.int64))


def _potentials(s: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, row_of_col: torch.Tensor,
                start: torch.Tensor) -> torch.Tensor | None:
    """Row potentials ``u`` with ``u_i + v_j >= s_ij`` on the candidates, ``v_j = s[m_j, j] - u[m_j]``
    (``m_j`` the row matched to column j): shortest paths ``u[m_j] <= u[i] + s[m_j, j] - s[i, j]`` by
    Bellman-Ford from ``start``, each round relaxing only the edges out of rows that moved (``rows``
    sorted); ``None`` if they do not settle (the matching is not optimal)."""
    n = s.shape[0]
    dst = row_of_col[cols]
    weight = s[dst, cols] - s[rows, cols]
    first = torch.searchsorted(rows, torch.arange(n + 1))
    u, moved = start.clone(), torch.arange(n)
    for _ in range(n + 1):
        if moved.numel() == 0:
            return u
        begin, count = first[moved], first[moved + 1] - first[moved]
        edge = torch.arange(int(count.sum())) + torch.repeat_interleave(begin - (count.cumsum(0) - count), count)
        relaxed = u.scatter_reduce(0, dst[edge], u[rows[edge]] + weight[edge], "amin")
        moved = (relaxed < u).nonzero().flatten()
        u = relaxed
    return None


def _near_bound(s: torch.Tensor, u: torch.Tensor, v: torch.Tensor, keys: torch.Tensor, tol: float,
                reach: float) -> torch.Tensor:
    """Flat keys off the candidates ``keys`` (sorted) of the entries within ``reach`` of the bound
    ``u_i + v_j`` (the likely next ones) when any of them comes within ``tol`` of it, else none.
    One pass over ``s`` by row chunks finds each row's largest entry off the candidates; only rows
    that come within ``reach`` are read again."""
    n = s.shape[0]
    excess = torch.empty(n, dtype=torch.float64)
    bounds = torch.searchsorted(keys, torch.arange(0, n + _ROWS_PER_CHUNK, _ROWS_PER_CHUNK).clamp_max(n) * n)
    for c, i in enumerate(range(0, n, _ROWS_PER_CHUNK)):
        slack = s[i:i + _ROWS_PER_CHUNK] - v[None, :]
        slack.sub_(u[i:i + _ROWS_PER_CHUNK, None])
        inside = keys[bounds[c]:bounds[c + 1]]
        slack[inside // n - i, inside % n] = -torch.inf  # the candidates (the matching included) are not asked
        excess[i:i + _ROWS_PER_CHUNK] = slack.amax(1)
    if not bool((excess > -tol).any()):
        return keys[:0]
    rows = (excess > -reach).nonzero().flatten()
    slack = s[rows] - u[rows, None] - v[None, :]
    hit = (slack > -reach).nonzero()
    found = rows[hit[:, 0]] * n + hit[:, 1]
    return found[~torch.from_numpy(np.isin(found.numpy(), keys.numpy()))]
