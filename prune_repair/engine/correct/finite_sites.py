"""The finite-weights check of a repair without a pass of its own over the site weights.

A repair needs finite weights (:func:`~prune_repair.engine.checks.check_finite`). Reading every
weight before the pass costs about 0.05x of a forward on convnext_tiny, while most of them are
the weights of the site producers, which the pass reads anyway: a NaN or Inf in a producer's
weight or bias makes its output channel NaN or infinite for every input (``NaN * 0`` is NaN,
``Inf * 0`` is NaN), and so the site's mean or spread. So those tensors are vouched for by the
statistics the pass measures; the others (norm affines, heads, the biases of attention
in-projections and of layers a parent calls through ``F.linear``, BatchNorms being reset) are
checked before the pass, and after it :func:`check_after_pass` runs the full check wherever a
statistic is not finite or a site never ran, so the error and its wording are those of ``check_finite``.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
    >>> with torch.no_grad():
    ...     model[0].weight[0, 0] = float("nan")
    >>> check_unvouched(model, {id(model[0].weight)})   # the linear weight: its site statistics will say
    >>> try:
    ...     check_unvouched(model, set())
    ... except ValueError as e:
    ...     print(str(e)[:40])
    the model holds NaN/Inf in 0.weight (1 v
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..checks import check_finite, is_finite
from ..producers import PARTS, split_part
from .site_plan import SitePlan


def vouched_tensors(plans: Sequence[SitePlan]) -> set[int]:
    """``id`` of each parameter and buffer that shows in some plan's statistics: every tensor of the
    producer of a site measured as a module output (and of the norm whose output is the site) and of
    the producer of a BatchNorm being reset (its input is measured); the weight of a layer a parent
    calls through ``F.linear`` and the in-projection weight of an attention whose q, k and v are all
    sites (those calls are caught by the weight itself, so it is the one used). Not their biases (a
    parent may use a changed copy), nor an attention's out-projection (the call is not caught by it)."""
    vouched: set[int] = set()
    parts: dict[int, set[str]] = {}
    for plan in plans:
        site = plan.site
        part = split_part(site.producer)[1]
        if part is not None and not plan.is_reset:
            parts.setdefault(id(plan.producer), set()).add(part)
            if len(parts[id(plan.producer)]) == len(PARTS):
                vouched.add(id(plan.producer.in_proj_weight))
        elif site.call == "function" and not plan.is_reset:
            vouched.add(id(plan.producer.weight))
        elif site.call == "module" and part is None:
            modules = [plan.producer] if plan.is_reset else [plan.producer, plan.module]
            vouched.update(id(t) for m in modules for t in _tensors(m))
    return vouched


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    """A module's own parameters and persistent buffers (what :func:`check_finite` reads of it)."""
    skip = module._non_persistent_buffers_set
    return [t for t in [*module._parameters.values(), *(b for n, b in module._buffers.items() if n not in skip)]
            if t is not None]


def check_unvouched(model: nn.Module, vouched: set[int]) -> None:
    """Raise :func:`check_finite`'s error when a parameter or (persistent) buffer whose ``id`` is not
    in ``vouched`` holds NaN or Inf."""
    sums: dict[tuple, list[torch.Tensor]] = {}  # each tensor's sum in its dtype (NaN/Inf propagate), by kind
    tensors = []
    for module in model.modules():
        for t in _tensors(module):
            if id(t) not in vouched and t.is_floating_point() and t.numel():
                tensors.append(t)
                sums.setdefault((t.dtype, t.device), []).append(t.detach().sum())
    if all(bool(torch.isfinite(torch.stack(group)).all()) for group in sums.values()):
        return
    if not all(is_finite(t) for t in tensors):  # a sum may have overflowed: value by value
        check_finite(model)


def check_after_pass(model: nn.Module, plans: Sequence[SitePlan]) -> None:
    """Raise :func:`check_finite`'s error after the pass if a weight is not finite: checked in full
    where a statistic is not finite (or too large to sum) or a site never ran."""
    if any(p.acc is None for p in plans) or not bool(
            torch.isfinite(torch.cat([t.reshape(-1) for p in plans for t in (p.acc.mean, p.acc.m2)]).sum())):
        check_finite(model)
