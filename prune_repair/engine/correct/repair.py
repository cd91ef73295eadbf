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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checks import check_finite
from ..refit.reconstruct import reconstruct_
from ..run import distributed
from ..run.forward import ForwardFn, as_batches, batch_size_of
from ..run.lockstep import Passes
from ..run.pipeline import PassLog, calibrate
from ..sites.fold import fold_correction_
from ..stats.activation import ActivationStats, collect_stats
from .finite_sites import check_after_pass, check_unvouched, vouched_tensors
from .modes import RepairMode, Variant
from .report import RepairReport, SiteReport
from .site_plan import SitePlan, SiteSteps, make_plans

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
    passes: Passes | str = Passes.LOCKSTEP,
    blocks: Sequence[str] | None = None,
    offload: str | Path | None = None,
    progress: bool | Callable[[int, int], None] | None = None,
    **reconstruct_options: Any,
) -> RepairReport:
    """Correct ``model`` in place so its site statistics match ``reference``, and fold.

    Args:
        model: the operated network (pruned, merged, ...), same sites as the reference.
        reference: goal statistics: :func:`collect_stats` of the unpruned model, or
            ``stats_a.interpolate(stats_b, alpha)`` for a merge; or the unpruned model
            itself (its statistics are then collected on ``data``). The ``reconstruct``
            modes need the model.
        data: calibration data: one batch, or several (a list, a DataLoader; see ``passes``).
        repair: a :class:`RepairMode` (``auto`` resets BatchNorm sites and repairs others).
        variant: ``exact`` (upstream corrections applied while measuring) or ``all-at-once``.
        forward_fn: ``forward_fn(model, batch)`` for batches that are not plain tensors.
        add_bias: give layers without bias a bias to hold the shift (changes state_dict
            keys); by default such sites get the scale only, reported as ``shift_dropped``.
        passes: how the exact variant goes over several batches (:mod:`~prune_repair.engine.run.
            pipeline`): ``lockstep`` (default) ONE pass, the batches side by side and in step at
            every site (their activations at a site alive at once); ``per-site`` one prefix pass
            per site, one batch in memory at a time (also for data-dependent paths);
            ``blockwise`` one block at a time over all batches, for models whose activations do
            not fit (``blocks``: the blocks' module names in call order, found by default;
            ``offload``: where block inputs wait, ``"cpu"`` or a folder removed afterwards).
        reconstruct_options: for the ``reconstruct`` modes, keywords of
            :func:`~prune_repair.engine.refit.reconstruct.reconstruct_` (``damping``, ``select``,
            ``kept``, ``max_gram_bytes``); its report is under ``report.extra["reconstruct"]``.
        progress: ``True`` shows the sites as they are decided (stderr), a callable gets
            ``(done, total)``; silent by default (:mod:`~prune_repair.engine.run.progress`).

    Returns:
        a :class:`RepairReport` (``passes``: passes over the data, each running every batch once;
        the model keeps its train/eval mode); sites not corrected (never reached, or no BatchNorm
        to reset) are reported with ``mode="skipped"`` and the reason, and a warning names them.

    Raises:
        ValueError: no sites in ``reference``; ``reset`` on a network without BatchNorm;
            a variant that does not apply; statistics that do not fit the model.

    Under ``torch.distributed`` each rank passes its shard of the data; each site's
    correction is decided from the exact pooled statistics of all ranks (two small
    all-reduces per site, taken before the site's decision, so the one-pass exact repair
    stays exact), and every rank ends with the same weights. All ranks must run the same sites in the same order. A
    ``DistributedDataParallel`` model is repaired through its ``.module``.
    """
    start = time.perf_counter()
    mode, variant, passes = _parse(repair, variant, passes, blocks, offload)
    where = {"passes": passes, "blocks": blocks, "offload": offload, "progress": progress}
    if mode.reconstructs:
        return _reconstruct_then_repair_(model, reference, data, mode, variant, forward_fn, add_bias,
                                         {**reconstruct_options, **where})
    if reconstruct_options:
        raise TypeError(f"repair_() got {', '.join(sorted(reconstruct_options))}, which only the reconstruct modes take")
    goal = _goal(reference, data, forward_fn, progress)
    model = distributed.unwrap(model)
    _check_samples(data)
    if add_bias:  # make_plans may add biases: the weights are checked before anything changes
        check_finite(model)
    plans, skipped = ([], []) if mode is RepairMode.NONE else make_plans(model, goal, mode, add_bias)
    if not add_bias:  # the site producers' weights are checked by the statistics of the pass
        check_unvouched(model, vouched_tensors(plans))
    if mode is RepairMode.RESET and not plans:
        raise ValueError("reset recomputes BatchNorm statistics, but no site of this model is followed by a "
                         "BatchNorm: use repair='repair' (or 'auto')")
    log = _run_plans_(model, plans, data, variant is Variant.ALL_AT_ONCE, forward_fn, where) if plans else PassLog([0])
    return _report_folded_(model, goal, mode, variant, plans, skipped, log, passes, time.perf_counter() - start)


def _parse(repair: RepairMode | str, variant: Variant | str, passes: Passes | str, blocks: Sequence[str] | None,
           offload: str | Path | None) -> tuple[RepairMode, Variant, Passes]:
    mode, variant = RepairMode.parse(repair, "correction"), Variant.parse(variant, "variant")
    passes = Passes.parse(passes, "passes")
    if (blocks is not None or offload is not None) and passes is not Passes.BLOCKWISE:
        raise ValueError("blocks= and offload= apply to passes='blockwise' only: add passes='blockwise'")
    if variant is Variant.CLOSED_FORM:
        raise ValueError("the closed-form variant predicts merged statistics from the endpoints: "
                         "it applies to merging only (prepare_merge(...).merged(variant='closed-form'))")
    if passes is not Passes.LOCKSTEP and variant is not Variant.EXACT:
        raise ValueError(f"passes='{passes.value}' chooses how the exact variant goes over several batches; the "
                         f"'{variant.value}' variant makes one pass anyway: leave passes at its default")
    if variant is Variant.ALL_AT_ONCE and mode is RepairMode.RECONSTRUCT:
        raise ValueError("'reconstruct' refits each layer with the layers before it already refitted, so the "
                         "'all-at-once' variant does not apply: leave variant at 'exact'")
    return mode, variant, passes


def _goal(reference: ActivationStats | nn.Module, data: Any, forward_fn: ForwardFn | None,
          progress: bool | Callable[[int, int], None] | None) -> ActivationStats:
    """The goal statistics: given, or measured on the reference model (a pass shown as its own when
    ``progress is True``; a callback counts the repair's sites only)."""
    if isinstance(reference, nn.Module):
        reference = collect_stats(reference, data, forward_fn=forward_fn, progress=progress is True)
    if not reference.sites:
        raise ValueError("the reference statistics hold no sites, so there is nothing to correct: "
                         "the model has no conv/linear output that a correction can be folded into")
    return reference


def _check_samples(data: Any) -> None:
    samples = torch.tensor([float(sum(batch_size_of(b) for b in as_batches(data)))], dtype=torch.float64)
    if float(distributed.all_reduce_sum_(samples)[0]) < 2:
        raise ValueError("calibration needs at least 2 samples to measure a spread: pass a larger batch")


def _run_plans_(model: nn.Module, plans: list[SitePlan], data: Any, all_at_once: bool, forward_fn: ForwardFn | None,
                where: dict[str, Any]) -> PassLog:
    """Measure and decide every plan on the pipeline (weights checked finite after it, see
    :mod:`.finite_sites`); BatchNorm statistics restored if it fails."""
    saved = {id(p): (p.module.running_mean.clone(), p.module.running_var.clone())
             for p in plans if p.is_reset and p.module.running_mean is not None}
    try:
        log = calibrate(model, data, SiteSteps(model, plans), all_at_once=all_at_once, forward_fn=forward_fn,
                        **where)
        check_after_pass(model, plans)
        return log
    except BaseException:
        with torch.no_grad():
            for plan in plans:
                if id(plan) in saved:
                    plan.module.running_mean.copy_(saved[id(plan)][0])
                    plan.module.running_var.copy_(saved[id(plan)][1])
        raise


def _report_folded_(model: nn.Module, goal: ActivationStats, mode: RepairMode, variant: Variant,
                    plans: list[SitePlan], skipped: list[SiteReport], log: PassLog, passes: Passes,
                    seconds: float) -> RepairReport:
    """Fold every decided affine into the weights; the report (a warning names the skipped sites)."""
    corrections = {}
    for plan in plans:
        plan.finish()
        if plan.affine is not None:
            corrections[plan.site.fqn] = plan.affine
            fold_correction_(model, plan.site, corrections[plan.site.fqn])
    order = {site.fqn: i for i, site in enumerate(goal.sites)}
    reports = sorted([p.report for p in plans] + skipped, key=lambda r: order[r.fqn])
    report = RepairReport(mode.value, variant.value, log.max_passes, seconds, reports, corrections)
    if passes is Passes.BLOCKWISE and plans:
        report.extra["blockwise"] = log.blockwise()
    if report.skipped:
        listed = ", ".join(f"'{fqn}' ({why})" for fqn, why in report.skipped.items())
        warnings.warn(f"{len(report.skipped)} of {len(reports)} sites were not corrected: {listed}", stacklevel=3)
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
        goal = collect_stats(reference, data, forward_fn=forward_fn, progress=options["progress"] is True)
        report = repair_(model, goal, data,
                         repair=RepairMode.AUTO, variant=variant, forward_fn=forward_fn, add_bias=add_bias,
                         passes=options["passes"], blocks=options["blocks"], offload=options["offload"],
                         progress=options["progress"])
        report.mode = mode.value
    report.extra["reconstruct"] = rebuilt.to_dict()
    report.seconds = time.perf_counter() - start
    return report
