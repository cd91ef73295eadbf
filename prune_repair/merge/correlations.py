"""Correlation matrices of a matching's paired units, one unit of groups at a time, into reused buffers.

:func:`unit_correlations` turns the paired moments of a unit's groups (:class:`CrossMoments` per
probe) into each group's correlation matrix of A's units (rows) against B's (columns), probes
weighted. The buffers are reused by the next unit (the assignment reads a unit's matrices before
the next are written), so a matching holds one float64 C x C buffer per position in a unit, not one
per group.

Example:
    >>> import torch
    >>> from prune_repair.merge.groups import Axis
    >>> x = torch.randn(200, 3)
    >>> m = CrossMoments()
    >>> m.add_pair(x.clone(), x.clone(), last=True)
    >>> class Probe: weight = 1.0
    >>> g = PermGroup("g", [Axis.block("w", 0, 3)])
    >>> dead = {}
    >>> c = unit_correlations([g], {("g", 0): m}, {"g": [Probe()]}, {}, dead, {}, CrossMoments)["g"]
    >>> torch.allclose(c.diagonal(), torch.ones(3, dtype=torch.float64)), torch.allclose(c, c.T), dead
    (True, True, {'g': 0})
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .cross_moments import CrossMoments
from .groups import PermGroup


def unit_correlations(unit: Sequence[PermGroup], moments: dict, probe_lists: dict, buffers: dict,
                      dead: dict[str, int], later: dict[str, list], moments_of: Callable[[tuple], CrossMoments]
                      ) -> dict[str, torch.Tensor]:
    """Each group's correlation matrix of A's units (rows) with B's (columns), probes weighted, and (into
    ``dead``) its count of dead units (zero spread in A or B: their rows and columns are 0). The last
    batch's pairs (``later``) are added here to ``moments_of(key)``, each read at once (its product stays
    in a shared workspace; a probe's only batch with fewer samples than units is scaled before its product,
    :meth:`CrossMoments.scale_only_pair_into_`); written into ``buffers`` (one float64 buffer per position in a
    unit, reused by the next unit): no fresh C x C memory per probe or group, block by block with the moments'
    pending updates (:meth:`CrossMoments.scale_into_`)."""
    corrs = {}
    for slot, g in enumerate(unit):
        corr = None
        dead_any = torch.zeros(g.size, dtype=torch.bool)
        last = dict(later.pop(g.name, []))
        for key in [(g.name, i) for i in range(len(probe_lists[g.name]))]:  # (the probes' order)
            probe = probe_lists[g.name][key[1]]

            def scales(var_a: torch.Tensor, var_b: torch.Tensor, weight: float = probe.weight
                       ) -> tuple[torch.Tensor, torch.Tensor]:
                nonlocal dead_any
                std_a, std_b = var_a.clamp_min(0).sqrt(), var_b.clamp_min(0).sqrt()
                dead_a = std_a <= 1e-12 * (std_a.max() + 1e-300)
                dead_b = std_b <= 1e-12 * (std_b.max() + 1e-300)
                if weight == 1.0:
                    dead_any = dead_any | (dead_a | dead_b).cpu()
                return (torch.where(dead_a, 0.0, weight / torch.where(dead_a, 1.0, std_a)),
                        torch.where(dead_b, 0.0, 1.0 / torch.where(dead_b, 1.0, std_b)))
            if key in last:
                ya, yb = last[key]()
                if key not in moments and ya.shape[0] < ya.shape[1]:  # its only batch, fewer samples than units:
                    add = corr is not None  # each side scaled before the product (no scaling pass over C x C)
                    corr = corr if add else _buffer(buffers, slot, g.size, ya.device)
                    moments_of(key).scale_only_pair_into_(ya, yb, scales, corr, add)
                    moments.pop(key)
                    continue
                moments_of(key).add_pair(ya, yb, last=True)
            if key not in moments:
                continue
            m = moments.pop(key)
            row_scale, col_scale = scales(*m.variances())
            add, corr = corr is not None, corr if corr is not None else _buffer(buffers, slot, g.size, m.m2.device)
            m.scale_into_(corr, row_scale, col_scale, add)
        corrs[g.name] = corr.cpu()
        dead[g.name] = int(dead_any.sum())
    return corrs


def _buffer(buffers: dict, slot: int, width: int, device: torch.device) -> torch.Tensor:
    """A float64 ``(width, width)`` view of ``buffers[(slot, device)]``, grown when too small."""
    shape = (width, width)
    key, size = (slot, device), width * width
    if key not in buffers or buffers[key].numel() < size:
        buffers[key] = torch.empty(size, dtype=torch.float64, device=device)
    return buffers[key][:size].view(shape)
