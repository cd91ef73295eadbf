"""One site's part in a repair: what is measured there, the correction it gets, and the hooks
that measure and correct it during a pass of the calibration pipeline
(:mod:`~prune_repair.engine.run.pipeline`; used by :func:`~prune_repair.engine.correct.repair.repair_`).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from ..run.pipeline import calibrate
    >>> from ..stats.activation import collect_stats
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).double()
    >>> x = torch.randn(40, 4, dtype=torch.float64)
    >>> goal = collect_stats(model, x)
    >>> with torch.no_grad():
    ...     _ = model[0].weight.mul_(3.0)
    >>> plans, _ = make_plans(model, goal, RepairMode.REPAIR, add_bias=False)
    >>> calibrate(model, [x[:15], x[15:]], SiteSteps(model, plans), passes="per-site").passes
    [2]
    >>> [p.affine is not None for p in plans]
    [True, True]
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..run import distributed
from ..run.pipeline import Arrive, Context
from ..producers import out_channels as producer_out_channels, site_owner, split_part
from ..sites.fold import holds_shift
from .modes import ChannelAffine, RepairMode, channel_affine, finite_goal, site_mode
from ..sites.find import Site
from ..sites.taps import SiteTaps
from .report import SiteReport
from ..stats.activation import ActivationStats, ChannelStats

NEVER_RAN = "it never ran on the calibration data (a branch the data does not reach?)"


class SitePlan:
    """Measurement, correction and bookkeeping of one site during a repair."""

    def __init__(self, model: nn.Module, site: Site, mode: RepairMode, goal: ChannelStats,
                 owner: Callable[[str], tuple[nn.Module, str | None]] | None = None,
                 goal_ok: torch.Tensor | bool | None = None):
        """``owner(fqn)``: :func:`~prune_repair.engine.producers.site_owner` on ``model`` (or a faster
        lookup of the same); ``goal_ok``: :func:`~.modes.finite_goal` of ``goal`` when known."""
        owner = owner or (lambda fqn: site_owner(model, fqn))
        self.site, self.mode, self.goal = site, mode, goal
        self.goal_std = goal.std  # once, not during the pass
        self.goal_ok = finite_goal(goal.mean, self.goal_std) if goal_ok is None else goal_ok
        self.name, self.where = site.fqn, ""  # where: the module's name (set by make_plans)
        self.module, part = owner(site.fqn)
        self.producer = owner(site.producer)[0]
        self.shift_ok = holds_shift(self.module, part)
        self.acc: ChannelStats | None = None
        self.rel_tol = 4 * torch.finfo(torch.float32).eps  # set from the measured dtype
        self.single = False  # whether the measured outputs are float32 or narrower
        self.affine: ChannelAffine | None = None
        self.reset_ok: torch.Tensor | None = None  # reset: the channels whose statistics were taken
        self.report = SiteReport(site.fqn, mode.value, site.channels)

    @property
    def is_reset(self) -> bool:
        return self.mode is RepairMode.RESET

    def measure(self, y: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        cdim = 1 if self.is_reset else self.site.channel_dim
        if y.shape[cdim] != self.site.channels:
            raise ValueError(
                f"site '{self.site.fqn}' has {y.shape[cdim]} channels but its goal statistics have "
                f"{self.site.channels}: after structured pruning, map the statistics with select_channels()"
            )
        s = ChannelStats.of(y, cdim, mask=mask)
        self.acc = s if self.acc is None else self.acc.merge(s)
        self.rel_tol = 4 * torch.finfo(y.dtype).eps if y.dtype.is_floating_point else 1e-12
        self.single = y.dtype.is_floating_point and y.dtype.itemsize <= 4

    def pool(self) -> None:
        """Pool the ranks' statistics (two collectives), before :meth:`decide`."""
        pooled = distributed.all_reduce_channel_stats({"s": self.acc}, {"s": self.site.channels}, ChannelStats)
        self.acc = pooled["s"]

    def decide(self) -> None:
        """The correction from the statistics measured (BatchNorm statistics reset at once);
        a site nothing reached is reported as skipped."""
        acc = self.acc
        if acc is None:  # the site never ran: nothing measured, nothing to correct
            self.report.mode, self.report.skipped = "skipped", NEVER_RAN
            return
        if self.is_reset:  # few small ops: this runs in the pass (NaN fails both comparisons)
            bn, var = self.module, acc.var
            self.reset_ok = ok = (var < math.inf) & (acc.mean.abs() < math.inf)  # the dead ones reported by finish()
            if bn.running_mean is not None:
                with torch.no_grad():
                    bn.running_mean.copy_(torch.where(ok, acc.mean, bn.running_mean))
                    bn.running_var.copy_(torch.where(ok, var, bn.running_var))
            return
        affine = channel_affine(self.mode, acc.mean, acc.std, self.goal.mean, self.goal_std, self.rel_tol,
                                self.goal_ok)
        if not self.shift_ok and bool((affine.shift != 0).any()):
            affine.shift = torch.zeros_like(affine.shift)
            self.report.shift_dropped = True
        self.affine = affine  # the rest waits for finish(): every small op here slows the pass

    def finish(self) -> None:
        """After the pass, before the fold: the dead channels reported (reset: a zero or non-finite
        variance or a non-finite mean); for float32 (or narrower) outputs the scale rounded to
        float32, which the pass applied (2^-24 relative, below what such outputs resolve), so a
        float32 weight takes it exactly in float32 (``scale_rows_``)."""
        if self.is_reset and self.acc is not None:
            self.report.dead_channels = (~self.reset_ok | (self.acc.var == 0)).nonzero().flatten().tolist()
        affine = self.affine
        if affine is None:
            return
        if self.single:
            affine.scale = affine.scale.to(torch.float32).to(torch.float64)
        self.report.dead_channels = affine.dead.nonzero().flatten().tolist() if bool(affine.dead.any()) else []


def make_plans(model: nn.Module, reference: ActivationStats, mode: RepairMode, add_bias: bool
           ) -> tuple[list[SitePlan], list[SiteReport]]:
    """The sites to correct, and reports of the sites ``mode`` does not apply to."""
    plans, skipped = [], []
    named = dict(model.named_modules())

    def owner(fqn: str) -> tuple[nn.Module, str | None]:  # site_owner, from one walk of the modules
        name, part = split_part(fqn)
        return (named[name], part) if name in named else site_owner(model, fqn)

    all_finite = _all_finite(reference)  # one check of every goal instead of one per site
    for site in reference.sites:
        if site.kind == "block":
            raise ValueError(
                f"site '{site.fqn}' is a block output: a correction there cannot be folded into the original "
                "architecture (a residual sum has no weights of its own); collect the goal without block_outputs="
            )
        try:
            module, (producer, part) = owner(site.fqn)[0], owner(site.producer)
        except AttributeError:
            raise ValueError(
                f"the reference statistics name layer '{site.fqn}', which the model does not have: "
                "collect them on a model of the same architecture"
            ) from None
        out = producer_out_channels(producer, part)
        if out != site.channels:
            raise ValueError(
                f"layer '{site.producer}' has {out} output channels but the reference statistics have "
                f"{site.channels}: after structured pruning, map them with ActivationStats.select_channels()"
            )
        m = site_mode(mode, isinstance(module, _BatchNorm))
        if m is RepairMode.NONE:
            skipped.append(SiteReport(site.fqn, "skipped", site.channels, skipped="no BatchNorm to reset there"))
            continue
        if add_bias and m in (RepairMode.REPAIR, RepairMode.RESHIFT) and not holds_shift(*owner(site.fqn)):
            if part is not None or isinstance(producer, nn.MultiheadAttention):
                raise ValueError(f"attention '{site.producer}' has no in-projection bias to hold a shift, and "
                                 "adding one is not supported: repair without add_bias (the scale is applied)")
            weight = producer.weight
            producer.bias = nn.Parameter(torch.zeros(out, dtype=weight.dtype, device=weight.device))
        plans.append(SitePlan(model, site, m, reference[site.fqn], owner, True if all_finite else None))
    names = {module: name for name, module in named.items()}
    for plan in plans:
        plan.where = names.get(plan.module, "")
    return plans, skipped


def _all_finite(reference: ActivationStats) -> bool:
    """Whether every site's goal mean and spread is finite (then no site needs its own check)."""
    stats = [reference[site.fqn] for site in reference.sites if site.fqn in reference]
    tensors = [t.reshape(-1) for s in stats for t in (s.mean, s.m2)]  # finite m2 and count > 0: finite std
    if not tensors or len({t.device for t in tensors}) > 1 or any(s.count <= 0 for s in stats):
        return False
    return bool(torch.isfinite(torch.cat(tensors)).all())


class SiteSteps:
    """The plans as steps of the calibration pipeline: a reset plan observes its BatchNorm's input
    (a pre-hook), the others their site's output (:class:`~prune_repair.engine.sites.taps.SiteTaps`),
    which carries the plan's correction once it is decided."""

    what, point = "repair", "site"

    def __init__(self, model: nn.Module, plans: Sequence[SitePlan]):
        self.model, self.steps = model, list(plans)

    @contextlib.contextmanager
    def attach(self, forward: Callable[[Any], Any], active: Sequence[int], arrive: Arrive,
               context: Context) -> Iterator[Callable[[Any], Any]]:
        by_site, handles = {}, []

        def pre_hook(k: int) -> Callable:
            plan = self.steps[k]

            def hook(module: nn.Module, args: tuple) -> None:
                arrive(k, lambda: plan.measure(args[0]))
            return hook

        def observe(site: Site, y: torch.Tensor, mask: torch.Tensor | None) -> None:
            k = by_site[site.fqn]
            arrive(k, lambda: self.steps[k].measure(y, mask))

        def correction(site: Site) -> tuple[torch.Tensor, torch.Tensor] | None:
            affine = self.steps[by_site[site.fqn]].affine
            return None if affine is None else (affine.scale, affine.shift)

        try:
            for k in active:
                if self.steps[k].is_reset:
                    handles.append(self.steps[k].module.register_forward_pre_hook(pre_hook(k)))
                else:
                    by_site[self.steps[k].site.fqn] = k
            sites = [self.steps[k].site for k in by_site.values()]
            with SiteTaps(self.model, sites, observe, correction).attached(forward) as run:
                yield run
        finally:
            for handle in handles:
                handle.remove()
