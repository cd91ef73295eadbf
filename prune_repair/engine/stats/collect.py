"""Site statistics as steps of the calibration pipeline (:mod:`~prune_repair.engine.run.pipeline`).

Collecting statistics observes and changes nothing: each :class:`SiteStats` step adds the
:class:`~prune_repair.engine.stats.channel.ChannelStats` of every output reaching its site
(padded token positions left out), pools them exactly across ``torch.distributed`` ranks in
:meth:`SiteStats.pool`, and decides nothing. So the steps run under every pass strategy of
the pipeline, each giving the statistics of one pass over the batches.
:func:`~prune_repair.engine.stats.activation.collect_stats` and
:class:`~prune_repair.engine.stats.goal.RecordStats` are built on them.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from ..run.pipeline import calibrate
    >>> from ..sites.find import find_sites
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> x = torch.randn(10, 3)
    >>> method = StatsSteps(model, find_sites(model, x[:2]))
    >>> log = calibrate(model, [x[:4], x[4:]], method, passes="per-site")
    >>> [(s.name, s.merged().count) for s in method.steps], log.passes
    ([('0', 10)], [1])
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..producers import split_part
from ..run import distributed
from ..run.pipeline import Arrive, Context
from ..sites.find import Site
from ..sites.taps import SiteTaps
from .channel import ChannelStats

__all__ = ["SiteStats", "StatsSteps"]


class SiteStats:
    """One site's statistics: every observed output's, merged (``window=None``), or the last ``window``."""

    def __init__(self, site: Site, window: int | None = None):
        self.site, self.name, self.window = site, site.fqn, window
        self.where = split_part(site.fqn)[0]  # the module whose block holds the site
        self.parts: collections.deque[ChannelStats] = collections.deque(maxlen=window)
        self.calls = 0  # outputs observed (all of them, not only those in the window)

    def observe(self, y: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add the statistics of output ``y`` (``mask``: the positions to keep, or None)."""
        self.add(ChannelStats.of(y.detach(), self.site.channel_dim, mask=mask))

    def add(self, s: ChannelStats) -> None:
        """Add the statistics of one observed output."""
        self.calls += 1
        if self.window is None and self.parts:
            self.parts[0] = self.parts[0].merge(s)
        else:
            self.parts.append(s)

    def merged(self) -> ChannelStats | None:
        """This rank's statistics of the outputs kept (None: nothing observed)."""
        parts = list(self.parts)
        if not parts:
            return None
        total = parts[0]
        for part in parts[1:]:
            total = total.merge(part)
        return total

    def pooled(self) -> ChannelStats | None:
        """:meth:`merged` pooled over every ``torch.distributed`` rank (two collectives; every rank
        must call it); None when no rank observed anything. Without a process group: :meth:`merged`."""
        mine = self.merged()
        if not distributed.is_distributed():
            return mine
        return distributed.all_reduce_channel_stats({"s": mine}, {"s": self.site.channels}, ChannelStats)["s"]

    def pool(self) -> None:
        """Replace this rank's statistics by the pooled ones of every rank."""
        pooled = self.pooled()
        self.parts = collections.deque([pooled] if pooled is not None else [], maxlen=self.window)

    def decide(self) -> None:
        """Nothing to decide: observing changes nothing (the statistics are read with :meth:`merged`)."""


class StatsSteps:
    """The sites as observe-only steps: a tap on each site's output (:class:`~prune_repair.engine.sites.
    taps.SiteTaps`) that hands it to its step when ``arrive`` lets it."""

    what, point = "statistics", "site"

    def __init__(self, model: nn.Module, sites: Sequence[Site], window: int | None = None):
        self.model = model
        self.steps = [SiteStats(site, window) for site in sites]

    @contextlib.contextmanager
    def attach(self, forward: Callable[[Any], Any], active: Sequence[int], arrive: Arrive,
               context: Context | None = None) -> Iterator[Callable[[Any], Any]]:
        by_site = {self.steps[k].site.fqn: k for k in active}

        def observe(site: Site, y: torch.Tensor, mask: torch.Tensor | None) -> None:
            k = by_site[site.fqn]
            arrive(k, lambda: self.steps[k].observe(y, mask))

        sites = [self.steps[k].site for k in active]
        with SiteTaps(self.model, sites, observe).attached(forward) as run:
            yield run
