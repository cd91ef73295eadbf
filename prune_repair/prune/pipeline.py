"""The prune -> repair -> evaluate flow shared by ``prune-repair prune`` and the benchmarks.

Reference statistics are measured once on the dense model, weights are scored once
(Fisher/WoodFisher scores do not depend on the sparsity), then each sparsity is
applied to a fresh copy of the dense model, repaired and evaluated. The returned
:class:`PruneRun` renders the ``--report`` JSON of the CLI contract (ARCHITECTURE.md).

Example:
    >>> import torch
    >>> from prune_repair.zoo.models import MLP
    >>> _ = torch.manual_seed(0)
    >>> model = MLP(widths=(32,), in_features=10)
    >>> x, y = torch.randn(64, 10), torch.randint(0, 10, (64,))
    >>> run = prune_and_repair(model, (x, y), [0.5, 0.9], eval_data=(x, y))
    >>> [r.sparsity for r in run.rows], sorted(run.to_report())
    ([0.5, 0.9], ['dead_channels', 'dense', 'method', 'notes', 'repair', 'results', 'seconds'])
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..metrics.classify import evaluate
from ..engine.run.forward import head
from .fisher import Progress
from .masks import measure_sparsity, sparsity_all_params
from .obs import ObsOptions
from .head import head_filter
from .methods import FisherOptions, PruneMethod, parse_method, prune_, score_weights
from .nm import NMPattern, check_divides, is_pattern_text, parse_sparsity
from .sparsity_config import layer_sparsities
from .targets import PruneError, find_targets
from .woodfisher import check_woodfisher_memory
from ..engine.correct.modes import RepairMode
from ..engine.correct.repair import repair_
from ..engine.sites.find import Selector
from ..engine.stats.activation import ActivationStats, collect_stats

Metrics = dict[str, float]


@dataclass
class PruneRow:
    """One sparsity: pruned and repaired metrics, achieved sparsity, seconds."""

    sparsity: float
    achieved_sparsity: float
    acc_pruned: float
    loss_pruned: float
    acc_repaired: float
    loss_repaired: float
    seconds: dict[str, float]
    dead_channels: int = 0
    sparsity_all_params: float = float("nan")  # zeros / every parameter (achieved_sparsity: prunable only)
    correction: dict[str, Any] = field(default_factory=dict)  # the repair report: sites, reconstruct layers
    pattern: str = "unstructured"  # or the N:M pattern asked
    layers: list[dict[str, Any]] = field(default_factory=list)  # {"fqn", "sparsity", "pattern"} per pruned layer

    def to_dict(self) -> dict[str, Any]:
        """The row of the ``--report`` JSON: the keys of the CLI contract (ARCHITECTURE.md), plus ``pattern``,
        ``layers`` (per pruned layer), ``sites`` (and ``reconstruct``, per layer, for the reconstruct modes)."""
        row = {k: v for k, v in self.__dict__.items() if k not in ("dead_channels", "correction")}
        row.update({k: self.correction[k] for k in ("sites", "reconstruct", "prune_layers") if k in self.correction})
        return row


@dataclass
class PruneRun:
    """Result of :func:`prune_and_repair`; ``model`` is the repaired model at the last sparsity."""

    method: str
    repair: str
    dense: Metrics
    rows: list[PruneRow]
    model: nn.Module | None = field(default=None, repr=False)
    seconds: dict[str, float] = field(default_factory=dict)  # once per run, not per row
    notes: list[str] = field(default_factory=list)  # defaults the run chose (e.g. auto -> none after obs)

    def to_report(self) -> dict[str, Any]:
        """The ``--report`` JSON (the CLI contract in ARCHITECTURE.md), plus the method and repair mode."""
        return {"method": self.method, "repair": self.repair, "notes": list(self.notes), "dense": dict(self.dense),
                "results": [r.to_dict() for r in self.rows],
                "dead_channels": [r.dead_channels for r in self.rows], "seconds": dict(self.seconds)}


def parse_sparsities(text: str | float | Sequence[float | str]) -> list[float | NMPattern]:
    """``"0.5,0.9"`` (or a number, or a list) as checked sparsities, in the given order; or one
    ``"N:M"`` pattern, which mixes with nothing else.

    >>> parse_sparsities("0.5, 0.9"), parse_sparsities("2:4")
    ([0.5, 0.9], [NMPattern(n=2, m=4)])
    """
    if isinstance(text, str):
        parts = [p.strip() for p in text.split(",")]
        if not all(parts):
            raise PruneError(f"sparsity list {text!r} has an empty item: write e.g. 0.5,0.8,0.9")
        values: list[Any] = []
        for p in parts:
            try:
                values.append(p if is_pattern_text(p) else float(p))
            except ValueError:
                raise PruneError(f"sparsity {p!r} is not a number: write e.g. 0.5,0.8,0.9 (or one N:M pattern, "
                                 "e.g. 2:4)") from None
    elif isinstance(text, (int, float)):
        values = [text]
    else:
        values = list(text)
    if not values:
        raise PruneError("no sparsity given: pass at least one, e.g. 0.9")
    return check_mix([parse_sparsity(v) for v in values])


def check_mix(values: list[float | NMPattern]) -> list[float | NMPattern]:
    """``values``, unless an N:M pattern is mixed with anything else (:class:`PruneError`)."""
    patterns = [v for v in values if isinstance(v, NMPattern)]
    if patterns and len(values) > 1:
        raise PruneError(f"an N:M pattern ({patterns[0]}) mixes with nothing else in one run: give it alone "
                         "(--sparsity 2:4), and fractions in another run")
    return values


def prune_and_repair(
    model: nn.Module,
    calib: tuple[torch.Tensor, torch.Tensor],
    sparsities: Sequence[float],
    *,
    method: PruneMethod | str = PruneMethod.GLOBAL_MAGNITUDE,
    repair: RepairMode | str = RepairMode.AUTO,
    eval_data: tuple[torch.Tensor, torch.Tensor] | None = None,
    fisher_data: tuple[torch.Tensor, torch.Tensor] | None = None,
    options: FisherOptions | None = None,
    select: Selector = None,
    skip_first: bool = False,
    skip_classifier: bool = False,
    include_classifier: bool = False,
    include_tied: bool = False,
    progress: Progress | None = None,
    on_row: Callable[[PruneRow], None] | None = None,
    reconstruct_options: dict[str, Any] | None = None,
    obs: ObsOptions | None = None,
    goal: ActivationStats | None = None,
    evaluate_fn: Callable[[nn.Module, Any, Any], Metrics] | None = None,
    calib_batch_size: int | None = None,
    sparsity_config: dict[str, float] | None = None,
    prune_head: bool = False,
    floor: bool = True,
) -> PruneRun:
    """Prune ``model`` (left unchanged) at each sparsity, repair toward its statistics, evaluate.

    Args:
        model: the dense model.
        calib: ``(x, y)`` calibration batch (statistics; Fisher gradients unless ``fisher_data``).
        sparsities: checked to lie in [0, 1).
        method, repair: a :class:`PruneMethod` and a :class:`RepairMode` (``none`` skips repair).
        eval_data: ``(x, y)`` to evaluate on (default: ``calib``).
        fisher_data: ``(x, y)`` for the gradient-based scorers (default: ``calib``).
        options, select, skip_first, skip_classifier: see :func:`~prune_repair.prune.prune_`.
        include_classifier: also correct the classifier logits.
        include_tied: also prune weights tied to other modules (see :func:`~prune_repair.prune.find_targets`).
        progress, on_row: callbacks for gradient progress and each finished row.
        obs: settings of ``method="obs"`` (:class:`~prune_repair.prune.obs.ObsOptions`).
        reconstruct_options: keywords of :func:`~prune_repair.engine.refit.reconstruct.reconstruct_`
            (``damping``, ...) for ``repair="reconstruct"`` / ``"reconstruct+repair"``, which fit
            each layer to the dense model's outputs on ``calib``.
        goal: goal statistics to repair toward instead of measuring the dense model on
            ``calib`` (e.g. :func:`~prune_repair.engine.stats.goal.batchnorm_goal`, or a file
            saved by ``RecordStats``); ``calib`` still measures the pruned models.
        evaluate_fn: ``evaluate_fn(model, eval_x, eval_y) -> {"acc", "loss", ...}`` in place of
            :func:`~prune_repair.metrics.classify.evaluate` (dict batches, perplexity of HF LMs).
        calib_batch_size: statistics and repair see ``calib`` in batches of this many samples
            (exact all the same; bounds the memory of one pass). Default: one batch.
        sparsity_config, prune_head, floor: see :func:`~prune_repair.prune.prune_` (a language
            model's output head stays dense unless ``prune_head`` or the config names it).

    ``auto`` after ``obs`` applies no correction (said in ``notes``): obs already refits every
    layer to the dense outputs, and a statistics correction on top can undo that fit.
    """
    sparsities = check_mix([parse_sparsity(s) for s in sparsities])
    if not sparsities:
        raise PruneError("no sparsity given: pass at least one, e.g. 0.9")
    method, mode = parse_method(method), RepairMode.parse(repair, "correction")
    notes = []
    if method.reconstructs and mode is RepairMode.AUTO:
        mode = RepairMode.NONE
        notes.append("--repair auto after obs applies no correction: obs already refits each layer to the dense "
                     "outputs, and a statistics correction on top can undo that fit (ask for one with --repair)")
    select = head_filter(model, select, prune_head, sparsity_config)
    x, y = calib
    eval_x, eval_y = eval_data if eval_data is not None else calib
    stats_x = list(x.split(calib_batch_size)) if calib_batch_size and torch.is_tensor(x) and len(x) > calib_batch_size else x
    targets = find_targets(model, select=select, skip_first=skip_first, skip_classifier=skip_classifier,
                           example_inputs=head(x, 2), include_tied=include_tied)
    if isinstance(sparsities[0], NMPattern) and not method.reconstructs:  # refuse before any work
        check_divides(targets, sparsities[0])
    if sparsity_config is not None:
        layer_sparsities(targets, sparsity_config)
    if method is PruneMethod.WOODFISHER:  # refuse before any work, not after the dense evaluation
        o = options or FisherOptions()
        check_woodfisher_memory(targets, o.block_size, o.dtype, o.rank, o.max_memory_gb)
    start = time.perf_counter()
    evaluate_ = evaluate_fn or evaluate
    dense = evaluate_(model, eval_x, eval_y)
    seconds = {"evaluate": time.perf_counter() - start}
    start = time.perf_counter()
    if goal is not None and mode.reconstructs:
        raise PruneError(f"repair '{mode.value}' fits the dense model's layer outputs: it cannot use goal statistics")
    if mode.reconstructs:
        reference = model  # reconstruction fits the dense model's layer outputs
    elif goal is not None:
        reference = goal if mode is not RepairMode.NONE else None
    else:
        reference = collect_stats(model, stats_x, include_classifier=include_classifier) if mode is not RepairMode.NONE else None
    seconds["reference_stats"] = time.perf_counter() - start
    scores = None if method.reconstructs else score_weights(
        model, method, fisher_data if fisher_data is not None else calib, targets=targets, options=options,
        progress=progress)
    rows, pruned = [], None
    for sparsity in sparsities:
        pruned = copy.deepcopy(model)
        report = prune_(pruned, sparsity, method, (x, y), select=select, skip_first=skip_first,
                        skip_classifier=skip_classifier, options=options, scores=scores, include_tied=include_tied,
                        obs=obs, sparsity_config=sparsity_config, prune_head=True, floor=floor)
        start = time.perf_counter()
        before = evaluate_(pruned, eval_x, eval_y)
        after, repair_seconds, dead, correction = before, 0.0, 0, {}
        if reference is not None:
            result = repair_(pruned, reference, stats_x, repair=mode, **(reconstruct_options or {}))
            repair_seconds, correction = result.seconds, result.to_dict()
            dead = sum(len(v) for v in result.dead_channels.values())
            after = evaluate_(pruned, eval_x, eval_y)
        seconds["evaluate"] += time.perf_counter() - start - repair_seconds
        achieved = measure_sparsity(find_targets(pruned, select=select, skip_first=skip_first,
                                                 skip_classifier=skip_classifier, example_inputs=head(x, 2),
                                                 include_tied=include_tied))
        row = PruneRow(
            report.sparsity, achieved.fraction, before["acc"], before["loss"], after["acc"], after["loss"],
            {"prune": report.seconds["score"] + report.seconds["mask"], "repair": repair_seconds}, dead,
            sparsity_all_params(pruned),
            {**correction, **({"prune_layers": report.layers} if method.reconstructs else {})},
            report.pattern, report.layers,
        )
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return PruneRun(method.value, mode.value, dense, rows, pruned, seconds, notes)
