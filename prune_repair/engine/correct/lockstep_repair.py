"""The exact repair over several batches in one pass per batch (see :mod:`.lockstep`).

:func:`lockstep_repair_pass` runs every batch through the operated model at once, in step:
at each site every batch adds its statistics, the site's correction is decided from all of
them (``SitePlan.finalize``, which also pools ``torch.distributed`` ranks) and every batch
goes on with it applied, as the one-batch exact pass does inline.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from .modes import RepairMode
    >>> from .site_plan import make_plans
    >>> from ..stats.activation import collect_stats
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).double()
    >>> x = torch.randn(40, 4, dtype=torch.float64)
    >>> goal = collect_stats(model, x)
    >>> with torch.no_grad():
    ...     _ = model[0].weight.mul_(3.0)
    >>> plans, _ = make_plans(model, goal, RepairMode.REPAIR, add_bias=False)
    >>> lockstep_repair_pass(model, plans, [x[:15], x[15:]])
    >>> [p.affine is not None for p in plans]
    [True, True]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..run.forward import ForwardFn, StopForward, hooked_pass
from ..run.lockstep import Lockstep
from .site_plan import SitePlan, plan_hooks
from ..sites.find import Site
from ..sites.taps import SiteTaps


def lockstep_repair_pass(model: nn.Module, plans: Sequence[SitePlan], batches: Sequence[Any],
                         forward_fn: ForwardFn | None = None) -> None:
    """Measure, decide and apply every plan over all ``batches``: one forward per batch.

    The batches' activations at the current site are all alive at once (like one batch of
    their total size). Plans no batch reached keep ``acc=None`` (the caller finalizes them).

    Raises:
        ValueError: the batches reach the sites in different orders (data-dependent paths).
    """
    plans = list(plans)
    lock = Lockstep("site")
    index = {id(plan): k for k, plan in enumerate(plans)}
    pre, sites, observe, correction = plan_hooks(plans, set(plans), False, set(plans), None)
    by_fqn = {plan.site.fqn: plan for plan in plans if not plan.is_reset}
    by_module = {plan.module: plan for plan in plans if plan.is_reset}

    def meet(plan: SitePlan, contribute: Callable[[], None]) -> None:
        lock.meet(index[id(plan)], plan.site.fqn, contribute, plan.finalize)
        if lock.all_decided(len(plans)):
            raise StopForward  # every site is decided: nothing downstream is needed

    def meet_observe(site: Site, y: torch.Tensor, mask: torch.Tensor | None) -> None:
        meet(by_fqn[site.fqn], lambda: observe(site, y, mask))

    pre_hooks = {module: (lambda mod, args, hook=hook, plan=by_module[module]: meet(plan, lambda: hook(mod, args)))
                 for module, hook in pre.items()}
    with (hooked_pass(model, pre_hooks=pre_hooks, forward_fn=forward_fn) as forward,
          SiteTaps(model, sites, meet_observe, correction).attached(forward) as tapped):
        lock.run([lambda batch=batch: tapped(batch) for batch in batches])
