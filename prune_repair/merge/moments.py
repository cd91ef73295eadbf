"""Moments of paired channels of several models: the statistics a merge is repaired toward.

:func:`site_moments` gathers, in one lockstep pass, the per-channel means and the
covariance between models at every repair site: the goal statistics of a merge and the
cross-covariances the closed-form REPAIR variant needs. Site outputs are read by
:class:`~prune_repair.engine.sites.taps.SiteTaps`, as in a repair: attention projections
(``<mha>.in_proj:q``), linears run through ``F.linear`` by a parent (swin_t) and padding
masks are all handled.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from prune_repair.engine.sites.find import find_sites
    >>> a, b, x = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), nn.Sequential(
    ...     nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), torch.randn(32, 3)
    >>> m = site_moments([a, b], x, find_sites(a, x))
    >>> m.cov["0"].shape   # (models, models, channels)
    torch.Size([2, 2, 4])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..engine.producers import site_owner
from ..engine.run import distributed
from ..engine.run.forward import ForwardFn, as_batches, hooked_pass
from ..engine.sites.find import Site
from ..engine.sites.taps import SiteTaps
from ..engine.stats.activation import ActivationStats, ChannelStats, merge_moments
from .attention_groups import check_same_heads


class _Moments:
    """Float64 count/means/co-moment of paired (samples, C) blocks, merged exactly."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, None, None

    def add(self, y: torch.Tensor) -> None:
        """``y``: (K, n, C) -> per channel K x K co-moment."""
        self._merge(y.shape[1], y.mean(dim=1), self._comoment(y - y.mean(dim=1)[:, None, :]))

    def _merge(self, n: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        if self.mean is None:
            self.n, self.mean, self.m2 = n, mean, m2
            return
        self.n, self.mean, self.m2 = merge_moments((self.n, self.mean, self.m2), (n, mean, m2),
                                                   lambda delta: self._comoment(delta[:, None, :]))

    @staticmethod
    def all_reduce_(moments: Sequence["_Moments"]) -> None:
        """Pool each of ``moments`` (same order on every rank) over ranks, exactly: two collectives."""
        if not distributed.is_distributed():
            return
        parts = [(m.n, m.mean, m.m2) for m in moments]
        comoments = [lambda d, m=m: m._comoment(d[:, None, :]) for m in moments]
        for m, (n, mean, m2) in zip(moments, distributed.pool_moments(parts, comoments)):
            m.n, m.mean, m.m2 = n, mean, m2


class _PerChannel(_Moments):
    @staticmethod
    def _comoment(c: torch.Tensor) -> torch.Tensor:  # (K, n, C) -> (K, K, C)
        return torch.einsum("knc,lnc->klc", c, c)


@dataclass
class SiteMoments:
    """Per-channel means ``(K, C)`` and between-model covariances ``(K, K, C)`` at each site."""

    sites: list[Site]
    count: dict[str, int]
    mean: dict[str, torch.Tensor]
    cov: dict[str, torch.Tensor]

    def stats(self, k: int) -> ActivationStats:
        """The :class:`ActivationStats` of model ``k`` alone."""
        return self.goal([1.0 if i == k else 0.0 for i in range(next(iter(self.mean.values())).shape[0])])

    def goal(self, weights: Sequence[float]) -> ActivationStats:
        """Goal statistics of a merge with ``weights``: weighted means and weighted STDs."""
        w = torch.tensor(list(weights), dtype=torch.float64)
        out = {}
        for s in self.sites:
            std = self.cov[s.fqn].diagonal(dim1=0, dim2=1).T.clamp_min(0).sqrt()  # (K, C)
            out[s.fqn] = ChannelStats.from_moments(w.to(std.device) @ self.mean[s.fqn], w.to(std.device) @ std,
                                                   self.count[s.fqn])
        return ActivationStats(self.sites, out)

    def predicted(self, weights: Sequence[float]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(mean, std) of each channel of ``sum_k w_k X_k`` (REPAIR eq. 5), per site."""
        w = torch.tensor(list(weights), dtype=torch.float64)
        out = {}
        for s in self.sites:
            cov, wd = self.cov[s.fqn], w.to(self.cov[s.fqn].device)
            var = torch.einsum("k,klc,l->c", wd, cov, wd)
            out[s.fqn] = (wd @ self.mean[s.fqn], var.clamp_min(0).sqrt())
        return out


def site_moments(models: Sequence[nn.Module], data: Any, sites: Sequence[Site], *,
                 forward_fn: ForwardFn | None = None) -> SiteMoments:
    """Moments of the paired channels of ``models`` at ``sites``, in one pass over ``data``
    (pooled exactly over ranks under ``torch.distributed``).

    Each model's site outputs are read by :class:`~prune_repair.engine.sites.taps.SiteTaps`,
    the taps repair itself uses, so attention projections (``<mha>.in_proj:q``), layers run
    through ``F.linear`` by a parent (swin_t) and padding masks are handled as in a repair."""
    models = [distributed.unwrap(m) for m in models]
    check_same_heads(models, [f"model {i}" for i in range(len(models))])
    sites = list(sites)
    for model in models:
        for s in sites:
            try:
                site_owner(model, s)
            except AttributeError:
                raise ValueError(f"site '{s.fqn}' is not a layer of every model: merge models of the same "
                                 "architecture") from None
    acc: dict[str, _PerChannel] = {s.fqn: _PerChannel() for s in sites}
    for batch in as_batches(data):
        captured = [_site_outputs(model, batch, sites, forward_fn) for model in models]
        for s in sites:
            if any(s.fqn not in c for c in captured):
                raise ValueError(f"site '{s.fqn}' never ran in the forward pass: check forward_fn")
            counts = {c[s.fqn].shape[0] for c in captured}
            if len(counts) != 1:
                raise ValueError(f"site '{s.fqn}' gave {sorted(counts)} values per channel in different models: "
                                 "merge models of the same architecture")
            acc[s.fqn].add(torch.stack([c[s.fqn] for c in captured]))
    _Moments.all_reduce_([acc[s.fqn] for s in sites])
    return SiteMoments(sites, {k: v.n for k, v in acc.items()}, {k: v.mean for k, v in acc.items()},
                       {k: v.m2 / v.n for k, v in acc.items()})


def _site_outputs(model: nn.Module, batch: Any, sites: Sequence[Site],
                  forward_fn: ForwardFn | None) -> dict[str, torch.Tensor]:
    """{site fqn: (values, channels) float64} of one batch (padded positions dropped)."""
    seen: dict[str, list[torch.Tensor]] = {}

    def observe(site: Site, y: torch.Tensor, mask: torch.Tensor | None) -> None:
        y = y.detach()
        y = y[mask] if mask is not None else y.movedim(site.channel_dim, -1)
        seen.setdefault(site.fqn, []).append(y.reshape(-1, site.channels).to(torch.float64))

    with hooked_pass(model, forward_fn=forward_fn) as forward, SiteTaps(model, list(sites), observe).attached(
            forward) as run:
        run(batch)
    return {k: v[0] if len(v) == 1 else torch.cat(v) for k, v in seen.items()}
