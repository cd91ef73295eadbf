"""One site's part in a repair: what is measured there, the correction it gets, and the hooks
that measure and correct it during a pass (used by :func:`~prune_repair.engine.correct.repair.repair_`)."""

from __future__ import annotations


import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..run import distributed
from ..run.forward import StopForward
from ..producers import out_channels as producer_out_channels, site_owner
from ..sites.fold import can_shift
from .modes import ChannelAffine, RepairMode, channel_affine, site_mode
from ..sites.find import Site
from .report import SiteReport
from ..stats.activation import ActivationStats, ChannelStats

NEVER_RAN = "it never ran on the calibration data (a branch the data does not reach?)"


class SitePlan:
    """Measurement, correction and bookkeeping of one site during a repair."""

    def __init__(self, model: nn.Module, site: Site, mode: RepairMode, goal: ChannelStats):
        self.site, self.mode, self.goal = site, mode, goal
        self.module = site_owner(model, site)[0]
        self.shift_ok = can_shift(model, site)
        self.acc: ChannelStats | None = None
        self.rel_tol = 4 * torch.finfo(torch.float32).eps  # set from the measured dtype
        self.affine: ChannelAffine | None = None
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

    def finalize(self) -> None:
        if distributed.is_distributed():  # pool the ranks' statistics before deciding (2 collectives)
            pooled = distributed.all_reduce_channel_stats({"s": self.acc}, {"s": self.site.channels}, ChannelStats)
            self.acc = pooled["s"]
        acc = self.acc
        if acc is None:  # the site never ran: nothing measured, nothing to correct
            self.report.mode, self.report.skipped = "skipped", NEVER_RAN
            return
        if self.is_reset:
            bn = self.module
            dead = ~torch.isfinite(acc.mean) | ~torch.isfinite(acc.var) | (acc.var == 0)
            self.report.dead_channels = dead.nonzero().flatten().tolist()
            if bn.running_mean is not None:
                ok = ~(~torch.isfinite(acc.mean) | ~torch.isfinite(acc.var))
                with torch.no_grad():
                    bn.running_mean.copy_(torch.where(ok, acc.mean, bn.running_mean.double()))
                    bn.running_var.copy_(torch.where(ok, acc.var, bn.running_var.double()))
            return
        affine = channel_affine(self.mode, acc.mean, acc.std, self.goal.mean, self.goal.std, self.rel_tol)
        if not self.shift_ok and bool((affine.shift != 0).any()):
            affine.shift = torch.zeros_like(affine.shift)
            self.report.shift_dropped = True
        self.affine = affine
        self.report.dead_channels = affine.dead.nonzero().flatten().tolist()

    def apply(self, y: torch.Tensor) -> torch.Tensor:
        view = [1] * y.dim()
        view[self.site.channel_dim] = -1
        scale = self.affine.scale.to(y.dtype).view(view)
        shift = self.affine.shift.to(y.dtype).view(view)
        return torch.addcmul(shift, y, scale)


def make_plans(model: nn.Module, reference: ActivationStats, mode: RepairMode, add_bias: bool
           ) -> tuple[list[SitePlan], list[SiteReport]]:
    """The sites to correct, and reports of the sites ``mode`` does not apply to."""
    plans, skipped = [], []
    for site in reference.sites:
        if site.kind == "block":
            raise ValueError(
                f"site '{site.fqn}' is a block output: a correction there cannot be folded into the original "
                "architecture (a residual sum has no weights of its own); collect the goal without blocks="
            )
        try:
            module, (producer, part) = site_owner(model, site)[0], site_owner(model, site.producer)
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
        if add_bias and m in (RepairMode.REPAIR, RepairMode.RESHIFT) and not can_shift(model, site):
            if part is not None or isinstance(producer, nn.MultiheadAttention):
                raise ValueError(f"attention '{site.producer}' has no in-projection bias to hold a shift, and "
                                 "adding one is not supported: repair without add_bias (the scale is applied)")
            weight = producer.weight
            producer.bias = nn.Parameter(torch.zeros(out, dtype=weight.dtype, device=weight.device))
        plans.append(SitePlan(model, site, m, reference[site.fqn]))
    return plans, skipped


def plan_hooks(plans: list[SitePlan], measuring: set, inline: bool, applying: set, stop_after: SitePlan | None):
    """Pre-hooks (reset sites) and site taps (affine sites) for one kind of pass:
    ``(pre_hooks, sites, observe, correction)``, see :class:`~prune_repair.engine.sites.taps.SiteTaps`."""
    pre_hooks, by_site = {}, {}
    for plan in plans:
        if plan.is_reset:

            def pre(module, inputs, plan=plan):
                if plan in measuring:
                    plan.measure(inputs[0])
                    if inline:
                        plan.finalize()
                if plan is stop_after:
                    raise StopForward

            pre_hooks[plan.module] = pre
        else:
            by_site[plan.site.fqn] = plan

    def observe(site: Site, y: torch.Tensor, mask: torch.Tensor | None) -> None:
        plan = by_site[site.fqn]
        if plan in measuring:
            plan.measure(y, mask)
            if inline:
                plan.finalize()
        if plan is stop_after:
            raise StopForward

    def correction(site: Site) -> tuple[torch.Tensor, torch.Tensor] | None:
        plan = by_site[site.fqn]
        if plan.affine is not None and (plan in applying or (inline and plan in measuring)):
            return plan.affine.scale, plan.affine.shift
        return None

    return pre_hooks, [p.site for p in by_site.values()], observe, correction
