"""Head-structured permutations: attention heads move as units, groups of one attention together.

A head group (``PermGroup.head_size = d``) has ``heads x d`` channels. Its permutations are
block-structured: ``perm[h*d + i] = sigma[h]*d + tau_h[i]``, where ``sigma`` moves whole heads
and is shared by every group of the same ``tie`` (the q/k rows and the v rows/out-projection
columns of one attention), and ``tau_h`` permutes the dims inside head ``h`` (the identity
unless ``inner``). Such a permutation leaves attention's function unchanged: scores
``q_h . k_h`` see the same dim permutation on both sides, and the out-projection's columns
follow the value rows.

Example:
    >>> import torch
    >>> from .groups import Axis, PermGroup
    >>> qk = PermGroup("qk", [Axis.block("w", 0, 4)], head_size=2, tie="attn")
    >>> vo = PermGroup("vo", [Axis.block("v", 0, 4)], head_size=2, tie="attn", inner=True)
    >>> sims = [torch.eye(4).roll(2, 1), torch.eye(4)[[3, 2, 1, 0]]]   # B's head 1 is A's head 0
    >>> [q.tolist() for q in assign_heads(sims, [qk, vo])]
    [[2, 3, 0, 1], [3, 2, 1, 0]]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from .groups import PermGroup


def units(groups: Sequence[PermGroup]) -> list[list[PermGroup]]:
    """Groups as the units a matching solves at once: each plain group alone, the head
    groups of one ``tie`` together (first-seen order)."""
    out: list[list[PermGroup]] = []
    ties: dict[str, list[PermGroup]] = {}
    for g in groups:
        if g.head_size is None or g.tie is None:
            out.append([g])
        elif g.tie in ties:
            ties[g.tie].append(g)
        else:
            ties[g.tie] = [g]
            out.append(ties[g.tie])
    return out


def heads_of(g: PermGroup) -> int:
    """Number of heads of a head group."""
    return g.size // int(g.head_size)


def head_order(g: PermGroup, perm: torch.Tensor) -> torch.Tensor:
    """The head permutation ``sigma`` of a block-structured ``perm`` (new head h is old head sigma[h])."""
    d = int(g.head_size)
    return perm.cpu().view(-1, d)[:, 0] // d


def random_unit(unit: Sequence[PermGroup], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """A random block-structured permutation per group of one tie (heads moved alike; never
    all the identity when more than one head exists)."""
    first = unit[0]
    h, d = heads_of(first), int(first.head_size)
    sigma = torch.randperm(h, generator=generator)
    if h > 1 and torch.equal(sigma, torch.arange(h)):
        sigma = sigma.roll(1)
    out = {}
    for g in unit:
        inner = [torch.randperm(d, generator=generator) if g.inner else torch.arange(d) for _ in range(h)]
        out[g.name] = torch.cat([sigma[i] * d + inner[i] for i in range(h)])
    return out


def check_unit(unit: Sequence[PermGroup], perms: Mapping[str, torch.Tensor]) -> None:
    """Raise ``ValueError`` unless the perms of one tie move whole heads, all alike, and keep
    the dims inside a head in order where ``inner`` is off."""
    sigma = None
    for g in unit:
        p = perms.get(g.name)
        if p is None:
            continue
        h, d = heads_of(g), int(g.head_size)
        blocks = p.cpu().view(h, d)
        head = blocks // d
        if not bool((head == head[:, :1]).all()):
            raise ValueError(f"the permutation for group '{g.name}' splits an attention head: heads of "
                             f"{d} dims move as units")
        if not g.inner and not torch.equal(blocks % d, torch.arange(d).expand(h, d)):
            raise ValueError(f"the permutation for group '{g.name}' reorders the dims inside a head, which "
                             "this group does not allow (rotary embeddings, or inner=False)")
        if sigma is not None and not torch.equal(sigma, head[:, 0]):
            raise ValueError(f"group '{g.name}' moves its heads differently from the other groups of "
                             f"attention '{g.tie}': they must share one head permutation")
        sigma = head[:, 0]


def _best(block: np.ndarray, inner: bool) -> tuple[float, np.ndarray]:
    """Best inner assignment of one (d, d) head-pair block and its value."""
    if not inner:
        return float(np.trace(block)), np.arange(block.shape[0])
    rows, cols = linear_sum_assignment(block, maximize=True)
    return float(block[rows, cols].sum()), cols


def assign_heads(sims: Sequence[torch.Tensor], unit: Sequence[PermGroup],
                 head_sim: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Block-structured permutations ``q_g`` maximizing ``sum_g sum_c sims[g][c, q_g[c]]``.

    ``sims[g]`` is the (heads*d, heads*d) similarity of A's units (rows) and B's (columns) of
    group ``unit[g]``. Every head pair gets its best inner assignment per group (when
    ``inner``), then one assignment over heads picks the head permutation shared by the tie;
    ``head_sim`` (heads, heads) adds the similarity of per-head tensors (``head_axes``).
    """
    first = unit[0]
    h, d = heads_of(first), int(first.head_size)
    mats = [s.detach().to("cpu", torch.float64).numpy().reshape(h, d, h, d) for s in sims]
    score = np.zeros((h, h)) if head_sim is None else head_sim.detach().to("cpu", torch.float64).numpy().copy()
    inner_cols: list[dict[tuple[int, int], np.ndarray]] = [{} for _ in unit]
    for k, (g, m) in enumerate(zip(unit, mats)):
        for i in range(h):
            for j in range(h):
                value, cols = _best(m[i, :, j, :], g.inner)
                score[i, j] += value
                inner_cols[k][(i, j)] = cols
    _, sigma = linear_sum_assignment(score, maximize=True)
    out = []
    for k in range(len(unit)):
        q = np.concatenate([sigma[i] * d + inner_cols[k][(i, int(sigma[i]))] for i in range(h)])
        out.append(torch.from_numpy(q.astype(np.int64)))
    return out
