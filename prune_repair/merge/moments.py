"""Moments of paired channels of several models: the statistics a merge is repaired toward.

:func:`site_moments` gathers, in one lockstep pass, the per-channel means and the
covariance between models at every repair site: the goal statistics of a merge and the
cross-covariances the closed-form REPAIR variant needs. Site outputs are read by
:class:`~prune_repair.engine.sites.taps.SiteTaps`, as in a repair: attention projections
(``<mha>.in_proj:q``), linears run through ``F.linear`` by a parent (swin_t) and padding
masks are all handled.

With ``passes=`` (or ``blocks=``, ``offload=``, ``progress=``) the co-moments of two models are
steps of the calibration pipeline (:mod:`~prune_repair.engine.run.pipeline`): the second model
runs beside the first as the pipeline's reference, so every pass strategy (blockwise with
offload included) and progress apply, with the same moments.

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

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..engine.producers import site_owner
from ..engine.run import distributed
from ..engine.run.forward import ForwardFn, as_batches, hooked_pass
from ..engine.run.lockstep import Passes
from ..engine.run.pipeline import Arrive, Context, Reference, calibrate
from ..engine.run.progress import ProgressArg
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
                 forward_fn: ForwardFn | None = None, passes: Passes | str | None = None,
                 blocks: Sequence[str] | None = None, offload: str | Path | None = None,
                 progress: ProgressArg = None) -> SiteMoments:
    """Moments of the paired channels of ``models`` at ``sites``, in one pass over ``data``
    (pooled exactly over ranks under ``torch.distributed``).

    Each model's site outputs are read by :class:`~prune_repair.engine.sites.taps.SiteTaps`,
    the taps repair itself uses, so attention projections (``<mha>.in_proj:q``), layers run
    through ``F.linear`` by a parent (swin_t) and padding masks are handled as in a repair.

    ``passes``, ``blocks``, ``offload``, ``progress``: as in :func:`~prune_repair.repair_`; given,
    two models' co-moments run on the calibration pipeline (the second model beside the first;
    ``passes`` defaults to ``lockstep`` there), at sites that are a module's output (not a
    projection computed inside a parent)."""
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
    if passes is not None or blocks is not None or offload is not None or progress not in (None, False):
        return _pipeline_moments(models, data, sites, forward_fn, passes, blocks, offload, progress)
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
        seen.setdefault(site.fqn, []).append(_rows(site, y, mask))

    with hooked_pass(model, forward_fn=forward_fn) as forward, SiteTaps(model, list(sites), observe).attached(
            forward) as run:
        run(batch)
    return {k: v[0] if len(v) == 1 else torch.cat(v) for k, v in seen.items()}


def _rows(site: Site, y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """A site output as (values, channels) float64 rows, padded positions dropped."""
    y = y.detach()
    y = y[mask] if mask is not None else y.movedim(site.channel_dim, -1)
    return y.reshape(-1, site.channels).to(torch.float64)


class _PairedSite:
    """One site's co-moments of the model and the reference run beside it: a pipeline step."""

    def __init__(self, site: Site):
        self.site, self.name, self.where = site, site.fqn, site.fqn
        self.acc = _PerChannel()

    def add(self, mine: torch.Tensor, theirs: torch.Tensor) -> None:
        if mine.shape != theirs.shape:
            raise ValueError(f"site '{self.name}' gave {theirs.shape[0]} and {mine.shape[0]} values per channel in "
                             "the two models: merge models of the same architecture")
        self.acc.add(torch.stack([mine, theirs]))

    def pool(self) -> None:
        if self.acc.mean is None:  # nothing ran here on this rank: zero samples, so every rank takes part
            c = self.site.channels
            self.acc.n, self.acc.mean = 0, torch.zeros(2, c, dtype=torch.float64)
            self.acc.m2 = torch.zeros(2, 2, c, dtype=torch.float64)
        _Moments.all_reduce_([self.acc])

    def decide(self) -> None:
        """Nothing to decide: the moments are read after the pass."""


class _PairedSites:
    """The sites as pipeline steps: each site's output of the model (a tap) beside the reference's."""

    what, point = "moments", "site"

    def __init__(self, model: nn.Module, sites: Sequence[Site]):
        self.model, self.steps = model, [_PairedSite(s) for s in sites]

    @contextlib.contextmanager
    def attach(self, forward: Callable[[Any], Any], active: Sequence[int], arrive: Arrive,
               context: Context) -> Iterator[Callable[[Any], Any]]:
        by_site = {self.steps[k].name: k for k in active}

        def observe(site: Site, y: torch.Tensor, mask: torch.Tensor | None) -> None:
            k = by_site[site.fqn]
            arrive(k, lambda: self.steps[k].add(_rows(site, y, mask), _rows(site, context.reference(k), mask)))

        with SiteTaps(self.model, [self.steps[k].site for k in active], observe).attached(forward) as run:
            yield run


def _pipeline_moments(models: list[nn.Module], data: Any, sites: list[Site], forward_fn: ForwardFn | None,
                      passes: Passes | str | None, blocks: Sequence[str] | None, offload: str | Path | None,
                      progress: ProgressArg) -> SiteMoments:
    """:func:`site_moments` of two models on the calibration pipeline (the second one as its reference)."""
    if len(models) != 2:
        raise ValueError(f"passes= runs the second model beside the first, so it takes two models, not "
                         f"{len(models)}: leave passes, blocks, offload and progress at their defaults")
    inside = [s.fqn for s in sites if s.call != "module"]
    if inside:
        raise ValueError(f"site '{inside[0]}' is computed inside its parent, so the model run beside cannot hand "
                         "out its output: leave passes, blocks, offload and progress at their defaults")
    method = _PairedSites(models[0], sites)
    calibrate(models[0], data, method, passes=Passes.LOCKSTEP if passes is None else passes, forward_fn=forward_fn,
              reference=Reference(models[1]), blocks=blocks, offload=offload, progress=progress)
    never = [step.name for step in method.steps if step.acc.n == 0]
    if never:
        raise ValueError(f"site '{never[0]}' never ran in the forward pass: check forward_fn")
    return SiteMoments(sites, {st.name: st.acc.n for st in method.steps}, {st.name: st.acc.mean for st in method.steps},
                       {st.name: st.acc.m2 / st.acc.n for st in method.steps})
