"""The renormalization engine: correct an operated network toward goal statistics.

:func:`repair_` measures each site of the operated model, computes a per-channel
affine (or recomputes BatchNorm statistics), and folds it into the weights, so the
result is a plain model of the original architecture.

Example:
    >>> import torch
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> batch = torch.randn(64, 8)
    >>> reference = collect_stats(model, batch)
    >>> with torch.no_grad():
    ...     _ = model[0].weight.mul_(3.0)             # some weight surgery
    >>> report = repair_(model, reference, batch)
    >>> after = collect_stats(model, batch)["0"]
    >>> torch.allclose(after.std, reference["0"].std, rtol=1e-4)
    True
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..run import distributed
from ..run.forward import ForwardFn, as_batches, batch_size_of, hooked_pass
from ..checks import check_finite
from ..sites.fold import Correction, fold_correction_
from .blockwise_repair import blockwise_repair_pass
from ..run.lockstep import Passes
from .lockstep_repair import lockstep_repair_pass
from .modes import RepairMode, Variant
from ..refit.reconstruct import reconstruct_
from .report import RepairReport, SiteReport
from .site_plan import SitePlan, make_plans, plan_hooks
from ..stats.activation import ActivationStats, collect_stats
from ..sites.taps import SiteTaps

__all__ = ["RepairReport", "SiteReport", "check_finite", "repair_"]

def repair_(
    model: nn.Module,
    reference: ActivationStats | nn.Module,
    data: Any,
    *,
    repair: RepairMode | str = RepairMode.AUTO,
    variant: Variant | str = Variant.EXACT,
    forward_fn: ForwardFn | None = None,
    add_bias: bool = False,
    mode: RepairMode | str | None = None,
    passes: Passes | str = Passes.LOCKSTEP,
    blocks: Sequence[str] | None = None,
    offload: str | Path | None = None,
    **reconstruct_options: Any,
) -> RepairReport:
    """Correct ``model`` in place so its site statistics match ``reference``, and fold.

    Args:
        model: the operated network (pruned, merged, ...), same sites as the reference.
        reference: goal statistics: :func:`collect_stats` of the unpruned model, or
            ``stats_a.interpolate(stats_b, alpha)`` for a merge; or the unpruned model
            itself (its statistics are then collected on ``data``). The ``reconstruct``
            modes need the model.
        data: calibration data: one batch, or several (a list, a DataLoader); the exact
            variant is exact over several batches too (see ``passes``).
        repair: a :class:`RepairMode` (``auto`` resets BatchNorm sites and repairs others).
        variant: ``exact`` (upstream corrections applied while measuring) or ``all-at-once``.
        forward_fn: ``forward_fn(model, batch)`` for batches that are not plain tensors.
        add_bias: give layers without bias a bias to hold the shift (changes state_dict
            keys); by default such sites get the scale only, reported as ``shift_dropped``.
        mode: deprecated name of ``repair``.
        passes: how the exact variant goes over several batches: ``lockstep`` (default) runs
            them through the model side by side, ONE pass in all (one forward per batch), in
            step at every site (:mod:`~prune_repair.engine.run.lockstep`); the activations of all
            batches at the current site are alive at once, like one batch of their total size.
            ``per-site`` makes one prefix pass per site over the data (one batch in memory at a
            time, about ``sites / 2`` times the forwards); use it when memory is short, or for a
            model whose batches take data-dependent paths (lockstep then says so). ``blockwise``
            runs the model one block at a time over all batches (:mod:`~prune_repair.engine.
            blockwise_repair`), keeping only the current block's inputs: for models whose
            activations do not fit at once, at about ``1 + sites per block / 2`` forwards.
        blocks: with ``passes="blockwise"``, the blocks' module names in call order (by default
            the longest chain of ``nn.Sequential`` / ``nn.ModuleList`` children is found).
        offload: with ``passes="blockwise"``, where block inputs wait: ``"cpu"`` (host memory,
            when the model is on a GPU) or a folder (files, removed afterwards).
        reconstruct_options: for the ``reconstruct`` modes, keywords of
            :func:`~prune_repair.engine.refit.reconstruct.reconstruct_` (``damping``, ``select``,
            ``kept``, ``max_gram_bytes``, ``progress``); its report is under
            ``report.extra["reconstruct"]``.

    Returns:
        a :class:`RepairReport` (``passes``: passes over the calibration data, each running
            every batch once); the model keeps its train/eval mode. Sites that were not
        corrected (they never ran on ``data``, or ``reset`` found no BatchNorm there) are
        reported with ``mode="skipped"`` and the reason, and a warning names them.

    Raises:
        ValueError: no sites in ``reference``; ``reset`` on a network without BatchNorm;
            a variant that does not apply; statistics that do not fit the model.

    Under ``torch.distributed`` each rank passes its shard of the data; each site's
    correction is decided from the exact pooled statistics of all ranks (two small
    all-reduces of ``channels + 1`` and ``channels`` float64 values per site and pass,
    taken in the hook, so the one-pass exact repair stays exact), and every rank ends
    with the same weights. All ranks must run the same sites in the same order. A
    ``DistributedDataParallel`` model is repaired through its ``.module``.
    """
    start = time.perf_counter()
    if mode is not None:
        warnings.warn("repair_(mode=...) is renamed repair_(repair=...)", DeprecationWarning, stacklevel=2)
        repair = mode
    mode, variant = RepairMode.parse(repair, "correction"), Variant.parse(variant, "variant")
    passes = Passes.parse(passes, "passes")
    if (blocks is not None or offload is not None) and passes is not Passes.BLOCKWISE:
        raise ValueError("blocks= and offload= apply to passes='blockwise' only: add passes='blockwise'")
    if passes is not Passes.LOCKSTEP and variant is not Variant.EXACT:
        raise ValueError(f"passes='{passes.value}' chooses how the exact variant goes over several batches; the "
                         f"'{variant.value}' variant makes one pass anyway: leave passes at its default")
    if mode.reconstructs:
        return _reconstruct_then_repair_(model, reference, data, mode, variant, forward_fn, add_bias,
                                         {**reconstruct_options, "passes": passes, "blocks": blocks,
                                          "offload": offload})
    if reconstruct_options:
        raise TypeError(f"repair_() got {', '.join(sorted(reconstruct_options))}, which only the reconstruct modes take")
    if isinstance(reference, nn.Module):
        reference = collect_stats(reference, data, forward_fn=forward_fn)
    if variant is Variant.CLOSED_FORM:
        raise ValueError("the closed-form variant predicts merged statistics from the endpoints: "
                         "it applies to merging only (prepare_merge(...).merged(variant='closed-form'))")
    if not reference.sites:
        raise ValueError("the reference statistics hold no sites, so there is nothing to correct: "
                         "the model has no conv/linear output that a correction can be folded into")
    model = distributed.unwrap(model)
    batches = as_batches(data)
    samples, several = float(sum(batch_size_of(b) for b in batches)), float(len(batches) > 1)
    if distributed.is_distributed():  # every rank must take the same path
        samples, several = distributed.all_reduce_sum_(torch.tensor([samples, several], dtype=torch.float64)).tolist()
    if samples < 2:
        raise ValueError("calibration needs at least 2 samples to measure a spread: pass a larger batch")
    check_finite(model)
    plans, skipped = ([], []) if mode is RepairMode.NONE else make_plans(model, reference, mode, add_bias)
    if mode is RepairMode.RESET and not plans:
        raise ValueError("reset recomputes BatchNorm statistics, but no site of this model is followed by a "
                         "BatchNorm: use repair='repair' (or 'auto')")
    saved = {id(p): (p.module.running_mean.clone(), p.module.running_var.clone())
             for p in plans if p.is_reset and p.module.running_mean is not None}
    made, blockwise = 0, None

    def run(measuring: set, inline: bool, applying: set, stop_after: SitePlan | None = None) -> None:
        nonlocal made
        pre, sites, observe, correction = plan_hooks(plans, measuring, inline, applying, stop_after)
        with (hooked_pass(model, pre_hooks=pre, forward_fn=forward_fn) as forward,
              SiteTaps(model, sites, observe, correction).attached(forward) as tapped):
            for batch in batches:
                tapped(batch)
        made += 1

    try:
        if plans and variant is Variant.EXACT and not several:
            run(set(plans), inline=True, applying=set())
            for plan in plans:
                if plan.acc is None:
                    plan.finalize()
        elif plans and variant is Variant.EXACT and passes is Passes.BLOCKWISE:
            blockwise = blockwise_repair_pass(model, plans, batches, forward_fn, blocks=blocks, offload=offload,
                                              inline=not several)
            made = blockwise["max_passes"]
            for plan in plans:
                if plan.acc is None and not several:
                    plan.finalize()
        elif plans and variant is Variant.EXACT and passes is Passes.LOCKSTEP:
            lockstep_repair_pass(model, plans, batches, forward_fn)  # one pass: every batch once, in step
            made = 1
            for plan in plans:
                if plan.acc is None:
                    plan.finalize()
        elif variant is Variant.EXACT:
            for k, plan in enumerate(plans):
                run({plan}, inline=False, applying={p for p in plans[:k] if p.affine is not None}, stop_after=plan)
                plan.finalize()
        elif plans:
            run(set(plans), inline=False, applying=set())
            for plan in plans:
                plan.finalize()
    except BaseException:
        for plan in plans:
            if id(plan) in saved:
                with torch.no_grad():
                    plan.module.running_mean.copy_(saved[id(plan)][0])
                    plan.module.running_var.copy_(saved[id(plan)][1])
        raise

    corrections = {}
    for plan in plans:
        if plan.affine is not None:
            corrections[plan.site.fqn] = Correction(plan.affine.scale, plan.affine.shift)
            fold_correction_(model, plan.site, corrections[plan.site.fqn])
    order = {site.fqn: i for i, site in enumerate(reference.sites)}
    reports = sorted([p.report for p in plans] + skipped, key=lambda r: order[r.fqn])
    report = RepairReport(mode.value, variant.value, made, time.perf_counter() - start, reports, corrections)
    if blockwise is not None:
        report.extra["blockwise"] = blockwise
    if report.skipped:
        listed = ", ".join(f"'{fqn}' ({why})" for fqn, why in report.skipped.items())
        warnings.warn(f"{len(report.skipped)} of {len(reports)} sites were not corrected: {listed}", stacklevel=2)
    return report


def _reconstruct_then_repair_(model: nn.Module, reference: Any, data: Any, mode: RepairMode, variant: Variant,
                              forward_fn: ForwardFn | None, add_bias: bool, options: dict[str, Any]) -> RepairReport:
    """``reconstruct`` (and, for ``reconstruct+repair``, the ``auto`` correction on top)."""
    if not isinstance(reference, nn.Module):
        raise ValueError(f"'{mode.value}' refits the weights toward the reference model's layer outputs, so it needs "
                         "the reference model itself, not its statistics: pass the unpruned model as reference")
    start = time.perf_counter()
    rebuilt = reconstruct_(model, reference, data, forward_fn=forward_fn, **options)
    if mode is RepairMode.RECONSTRUCT:
        report = RepairReport(mode.value, variant.value, sum(rebuilt.passes.values()), 0.0, [])
    else:
        report = repair_(model, collect_stats(reference, data, forward_fn=forward_fn), data,
                         repair=RepairMode.AUTO, variant=variant, forward_fn=forward_fn, add_bias=add_bias,
                         passes=options["passes"], blocks=options["blocks"], offload=options["offload"])
        report.mode = mode.value
    report.extra["reconstruct"] = rebuilt.to_dict()
    report.seconds = time.perf_counter() - start
    return report
