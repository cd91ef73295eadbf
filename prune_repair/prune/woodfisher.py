"""WoodFisher: blockwise inverse empirical Fisher by Woodbury updates (Singh & Alistarh, 2020).

The prunable weights of each layer are cut into blocks of ``block_size`` (the last
block of a layer is zero-padded). Per block, the inverse of the damped empirical
Fisher ``F = damp * I + (1/N) * sum_n g_n g_n^T`` is built from ``F^-1 = I / damp``
by Sherman-Morrison-Woodbury updates, one per gradient ``g_n``::

    F^-1 <- F^-1 - (F^-1 g)(F^-1 g)^T / (N + g^T F^-1 g)

``rank`` gradients can be folded in at once with the rank-k form of the same
identity (exactly k rank-1 updates in exact arithmetic, run as matrix products):
``F^-1 <- F^-1 - U (N I + G^T U)^-1 U^T`` with ``U = F^-1 G``. Score of weight q:
``w_q**2 / (2 [F^-1]_qq)``; the optional OBS update of the kept weights is
``dw = -sum_q F^-1 e_q w_q / [F^-1]_qq`` over the pruned q of each block.

Cost: O(N * block_size * d) time and O(block_size * d) memory for d prunable
weights; :func:`woodfisher_memory` is checked against ``max_memory_gb`` (and the
memory the machine has free) before anything is allocated.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from .targets import find_targets
    >>> model = nn.Sequential(nn.Linear(6, 2))
    >>> data = (torch.randn(16, 6), torch.randint(0, 2, (16,)))
    >>> inv = inverse_fisher(model, find_targets(model), data, block_size=4)
    >>> inv.blocks.shape, woodfisher_scores(inv, find_targets(model))["0"].shape
    (torch.Size([3, 4, 4]), torch.Size([2, 6]))
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..engine.run import distributed
from .fisher import LossFn, Progress, gradient_chunks, local_share
from .grad_data import gradient_samples
from .targets import PruneError, Target, effective_weights

GIB = 2**30


@dataclass
class InverseFisher:
    """Blockwise inverse Fisher ``blocks`` (B, c, c); ``layout`` maps a layer FQN to its
    (first block, number of blocks, number of weights)."""

    blocks: torch.Tensor
    layout: dict[str, tuple[int, int, int]]
    num_grads: int
    damp: float

    def _per_layer(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a (B, c) tensor into per-layer flat vectors without padding."""
        return {fqn: flat[b0:b0 + nb].reshape(-1)[:n] for fqn, (b0, nb, n) in self.layout.items()}

    def to_blocks(self, per_layer: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-layer tensors (any shape with the layer's numel) as one (B, c) tensor, zero-padded."""
        c = self.blocks.shape[-1]
        parts = []
        for fqn, (_, nb, n) in self.layout.items():
            flat = per_layer[fqn].reshape(-1).to(self.blocks.dtype)
            parts.append(torch.cat([flat, flat.new_zeros(nb * c - n)]).view(nb, c))
        return torch.cat(parts)

    def diagonal(self) -> dict[str, torch.Tensor]:
        """``[F^-1]_qq`` per layer, as flat vectors."""
        return self._per_layer(torch.diagonal(self.blocks, dim1=-2, dim2=-1))

    def obs_update(self, weights: dict[str, torch.Tensor], keep: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Weights after the OBS step for removing the weights where ``keep`` is False;
        pruned positions are set to exactly zero."""
        diag = torch.diagonal(self.blocks, dim1=-2, dim2=-1)
        w = self.to_blocks(weights)
        pruned = self.to_blocks({k: (~v).to(self.blocks.dtype) for k, v in keep.items()})
        step = torch.bmm(self.blocks, (pruned * w / diag).unsqueeze(-1)).squeeze(-1)
        new = self._per_layer((w - step) * (1 - pruned))
        return {fqn: new[fqn].view(weights[fqn].shape).to(weights[fqn].dtype) for fqn in weights}


def woodfisher_layout(targets: list[Target], block_size: int) -> dict[str, tuple[int, int, int]]:
    """Block layout of the targets: FQN -> (first block, blocks, weights)."""
    layout, start = {}, 0
    for t in targets:
        nb = -(-t.numel // block_size)
        layout[t.fqn] = (start, nb, t.numel)
        start += nb
    return layout


def woodfisher_memory(targets: list[Target], block_size: int, dtype: torch.dtype = torch.float32, rank: int = 32) -> int:
    """Bytes the inverse-Fisher blocks (plus the update buffers of ``rank`` gradients) take."""
    blocks = sum(nb for _, nb, _ in woodfisher_layout(targets, block_size).values())
    item = torch.tensor([], dtype=dtype).element_size()
    return item * blocks * (block_size * block_size + 3 * block_size * rank + rank * rank)


def _available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_woodfisher_memory(targets: list[Target], block_size: int, dtype: torch.dtype, rank: int,
                            max_memory_gb: float) -> int:
    """Raise :class:`PruneError` if the blocks would not fit; return the bytes needed."""
    if block_size < 1:
        raise PruneError(f"WoodFisher block size must be at least 1, got {block_size}")
    need = woodfisher_memory(targets, block_size, dtype, rank)
    free = _available_bytes()
    limit = max_memory_gb * GIB if free is None else min(max_memory_gb * GIB, 0.8 * free)
    if need > limit:
        lo, hi = 0, block_size - 1  # the largest block size that fits (memory grows with the block size)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if woodfisher_memory(targets, mid, dtype, rank) <= limit else (lo, mid - 1)
        hint = f"use a block size of at most {lo}" if lo >= 1 else "prune fewer layers"
        raise PruneError(
            f"WoodFisher with block size {block_size} needs {need / GIB:.2f} GiB for "
            f"{sum(t.numel for t in targets)} weights but only {limit / GIB:.2f} GiB may be used: "
            f"{hint} or raise max_memory_gb"
        )
    return need


def inverse_fisher(
    model: nn.Module,
    targets: list[Target],
    data: Any,
    *,
    num_grads: int | None = 400,
    group_size: int = 1,
    damp: float = 1e-5,
    block_size: int = 128,
    rank: int = 32,
    dtype: torch.dtype = torch.float32,
    max_memory_gb: float = 4.0,
    seed: int = 0,
    loss_fn: LossFn | None = None,
    progress: Progress | None = None,
) -> InverseFisher:
    """Blockwise inverse of the damped empirical Fisher, by Woodbury updates.

    Args:
        model, targets: the model and its prunable layers.
        data: ``(x, y)`` tensors, or an HF input dict (see :mod:`~prune_repair.prune.grad_data`).
        num_grads: gradients N (the "fisher subsample size"); None: ``samples // group_size``.
        group_size: samples averaged in each gradient (the "fisher mini-batch size").
        damp: damping added to the Fisher diagonal.
        block_size: weights per block (memory ``block_size`` floats per weight).
        rank: gradients folded in per update (1 = plain Sherman-Morrison rank-1 updates).
        dtype: precision of the blocks (float64 for exact checks).
        max_memory_gb: refuse (before allocating) when the blocks would need more.

    Under ``torch.distributed`` each rank computes the gradients of its shard of the
    data (its share of ``num_grads``) and the chunks are all-gathered in rank order, so
    every rank runs the same Woodbury updates (``rank * world_size`` gradients at a time)
    and holds the same inverse: the gradients are split, the inverse is not (the
    Woodbury sequence is sequential). Equal to the one-process result up to rounding
    when every sample is used once; use ``dtype=torch.float64`` to compare.
    """
    if not (damp > 0 and math.isfinite(damp)):
        raise PruneError(f"WoodFisher damping must be a positive number, got {damp}")
    if rank < 1:
        raise PruneError(f"WoodFisher update rank must be at least 1, got {rank}")
    check_woodfisher_memory(targets, block_size, dtype, rank * distributed.world_size(), max_memory_gb)
    device = targets[0].stored.device
    layout = woodfisher_layout(targets, block_size)
    num_blocks = sum(nb for _, nb, _ in layout.values())
    blocks = torch.eye(block_size, dtype=dtype, device=device).div_(damp).repeat(num_blocks, 1, 1)
    inv = InverseFisher(blocks, layout, 0, damp)
    samples = len(gradient_samples(data, "woodfisher"))
    n = float(num_grads if num_grads is not None else samples // group_size)
    local = local_share(num_grads)
    chunks = gradient_chunks(model, targets, data, num_grads=local, group_size=group_size, chunk=rank,
                             seed=seed, loss_fn=loss_fn, progress=progress, method="woodfisher")
    if not distributed.is_distributed():
        for grads in chunks:
            g = _grad_blocks(grads, layout, block_size, dtype)
            _woodbury_(blocks, g, n)
            inv.num_grads += g.shape[-1]
        return inv
    mine = local if local is not None else samples // group_size
    if num_grads is None:
        n = distributed.all_reduce_sum_(torch.tensor([float(mine)], dtype=torch.float64)).item()
    for _ in range(int(distributed.all_reduce_max(float(-(-mine // rank))))):  # lockstep, zero-padded
        grads = next(chunks, None)
        g = blocks.new_zeros(num_blocks, block_size, rank)
        if grads is not None:
            mine_g = _grad_blocks(grads, layout, block_size, dtype)
            g[..., :mine_g.shape[-1]] = mine_g
        _woodbury_(blocks, distributed.all_gather_cat(g, dim=-1), n)  # zero columns change nothing
    inv.num_grads = int(n)
    return inv


def _grad_blocks(grads: dict[str, torch.Tensor], layout: dict[str, tuple[int, int, int]], c: int,
                 dtype: torch.dtype) -> torch.Tensor:
    """Gradient chunk ``{fqn: (k, *shape)}`` as zero-padded blocks (B, c, k)."""
    parts = []
    for fqn, (_, nb, n) in layout.items():
        flat = grads[fqn].reshape(grads[fqn].shape[0], -1).to(dtype)
        parts.append(torch.nn.functional.pad(flat, (0, nb * c - n)).view(flat.shape[0], nb, c))
    return torch.cat(parts, dim=1).permute(1, 2, 0).contiguous()


def _woodbury_(blocks: torch.Tensor, g: torch.Tensor, n: float) -> None:
    """Fold gradients ``g`` (B, c, k) into ``blocks`` = F^-1 (B, c, c) for ``F += g g^T / n``."""
    u = torch.bmm(blocks, g)  # (B, c, k)
    if g.shape[-1] == 1:
        denom = n + (g * u).sum(dim=(1, 2))  # (B,)
        blocks.baddbmm_(u / denom.view(-1, 1, 1), u.transpose(1, 2), alpha=-1)
        return
    small = torch.bmm(g.transpose(1, 2), u)  # (B, k, k)
    small.diagonal(dim1=-2, dim2=-1).add_(n)
    small = (small + small.transpose(1, 2)) / 2
    chol = torch.linalg.cholesky(small)
    solved = torch.cholesky_solve(u.transpose(1, 2), chol)  # (B, k, c)
    blocks.baddbmm_(u, solved, alpha=-1)


def woodfisher_scores(inv: InverseFisher, targets: list[Target]) -> dict[str, torch.Tensor]:
    """OBS saliency ``w_q**2 / (2 [F^-1]_qq)`` per weight, shaped like each weight."""
    diag = inv.diagonal()
    weights = effective_weights(targets)
    scores = {}
    for fqn, w in weights.items():
        d = diag[fqn].to(torch.float64).view(w.shape)
        if bool((d <= 0).any()):
            raise PruneError(
                f"the inverse Fisher of layer '{fqn}' lost positivity (rounding): raise the damping "
                "or use dtype=torch.float64"
            )
        scores[fqn] = w.to(torch.float64).square() / (2 * d)
    return scores
