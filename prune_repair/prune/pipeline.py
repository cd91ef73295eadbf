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
import dataclasses
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..metrics.classify import evaluate
from ..engine.run.forward import head
from .fisher import gradient_progress
from .masks import measure_sparsity, sparsity_all_params
from .obs import ObsOptions
from .head import head_filter
from .methods import FisherOptions, PruneMethod, parse_method, prune_, score_weights
from .report import PruneReport
from .settings import PruneSettings
from .nm import NMPattern, check_divides, is_pattern_text, parse_sparsity
from .sparsity_config import layer_sparsities
from .targets import PruneError, Target
from .woodfisher import check_woodfisher_memory
from ..engine.correct.modes import RepairMode
from ..engine.correct.settings import RepairSettings

Metrics = dict[str, float]
Evaluate = Callable[[nn.Module], Metrics]


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
    calib: tuple[Any, torch.Tensor | None],
    sparsities: Sequence[float | str | NMPattern],
    *,
    method: PruneMethod | str = PruneMethod.GLOBAL_MAGNITUDE,
    options: FisherOptions | ObsOptions | None = None,
    prune: PruneSettings | None = None,
    repair: RepairSettings | RepairMode | str = RepairMode.AUTO,
    eval_data: tuple[Any, Any] | Evaluate | None = None,
    fisher_data: tuple[Any, torch.Tensor | None] | None = None,
    on_row: Callable[[PruneRow], None] | None = None,
) -> PruneRun:
    """Prune ``model`` (left unchanged) at each sparsity, repair toward its statistics, evaluate.

    Args:
        model: the dense model.
        calib: ``(x, y)`` calibration data (``x`` a tensor or an HF input dict; ``y`` class labels
            or None): statistics, OBS, wanda, and Fisher gradients unless ``fisher_data``.
        sparsities: fractions in [0, 1), or one ``"N:M"`` pattern.
        method: a :class:`PruneMethod`; options: its settings (:class:`FisherOptions` for fisher /
            woodfisher, :class:`~prune_repair.prune.obs.ObsOptions` for obs).
        prune: which layers are pruned (:class:`~prune_repair.prune.settings.PruneSettings`).
        repair: the correction (:class:`~prune_repair.engine.correct.settings.RepairSettings`, or
            just its mode); its ``passes`` / ``blocks`` / ``offload`` / ``batch_size`` / ``progress``
            govern every pass over ``calib`` (statistics, OBS, repair, reconstruction), its
            ``progress`` the Fisher gradients too.
        eval_data: ``(x, y)`` to evaluate on with :func:`~prune_repair.metrics.classify.evaluate`
            (default: ``calib``), or ``evaluate(model) -> {"acc", "loss", ...}`` (dict batches,
            perplexity of HF LMs).
        fisher_data: ``(x, y)`` for the gradient-based scorers (default: ``calib``).
        on_row: called with each finished row.

    ``auto`` after ``obs`` applies no correction (said in ``notes``): obs already refits every
    layer to the dense outputs, and a statistics correction on top can undo that fit.
    """
    sparsities = check_mix([parse_sparsity(s) for s in sparsities])
    if not sparsities:
        raise PruneError("no sparsity given: pass at least one, e.g. 0.9")
    method, prune = parse_method(method), prune or PruneSettings()
    settings = repair if isinstance(repair, RepairSettings) else RepairSettings(repair)
    _check_options(method, options)
    notes = []
    if method.reconstructs and settings.mode is RepairMode.AUTO:
        settings = dataclasses.replace(settings, repair=RepairMode.NONE)
        notes.append("--repair auto after obs applies no correction: obs already refits each layer to the dense "
                     "outputs, and a statistics correction on top can undo that fit (ask for one with --repair)")
    select = head_filter(model, prune.select, prune.prune_head, prune.sparsity_config)
    x, y = calib
    evaluate_ = eval_data if callable(eval_data) else _evaluator(eval_data if eval_data is not None else calib)
    targets = _checked_targets(model, head(x, 2), select, method, options, prune, sparsities[0])
    start = time.perf_counter()
    dense = evaluate_(model)
    seconds = {"evaluate": time.perf_counter() - start}
    start = time.perf_counter()
    reference = settings.reference(model, x)
    seconds["reference_stats"] = time.perf_counter() - start
    scores = None if method.reconstructs else score_weights(
        model, method, fisher_data if fisher_data is not None else calib, targets=targets, options=options,
        progress=gradient_progress(settings.progress, method.value))
    rows, pruned = [], None
    for sparsity in sparsities:
        pruned = copy.deepcopy(model)
        report = _prune_one_(pruned, sparsity, method, calib, options, scores, prune, settings)
        row = _repair_and_measure_(pruned, report, method, x, prune, select, settings, reference, evaluate_, seconds)
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return PruneRun(method.value, settings.mode.value, dense, rows, pruned, seconds, notes)


def _repair_and_measure_(pruned: nn.Module, report: PruneReport, method: PruneMethod, x: Any, prune: PruneSettings,
                         select: Any, settings: RepairSettings, reference: Any, evaluate_: Evaluate,
                         seconds: dict[str, float]) -> PruneRow:
    """Evaluate the pruned model, repair it toward ``reference`` (when there is one), evaluate again."""
    start = time.perf_counter()
    before = evaluate_(pruned)
    after, repair_seconds, dead, correction = before, 0.0, 0, {}
    if reference is not None:
        result = settings.repair_(pruned, reference, x)
        repair_seconds, correction = result.seconds, result.to_dict()
        dead = sum(len(v) for v in result.dead_channels.values())
        after = evaluate_(pruned)
    seconds["evaluate"] += time.perf_counter() - start - repair_seconds
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tied-weight warning was given once already
        achieved = measure_sparsity(prune.targets(pruned, head(x, 2), select)).fraction
    extra = {"prune_layers": report.layers} if method.reconstructs else {}
    return _row(report, achieved, before, after, repair_seconds, dead, pruned, {**correction, **extra})


def _row(report: PruneReport, achieved: float, before: Metrics, after: Metrics, repair_seconds: float, dead: int,
         pruned: nn.Module, correction: dict[str, Any]) -> PruneRow:
    return PruneRow(report.sparsity, achieved, before["acc"], before["loss"], after["acc"], after["loss"],
                    {"prune": report.seconds["score"] + report.seconds["mask"], "repair": repair_seconds}, dead,
                    sparsity_all_params(pruned), correction, report.pattern, report.layers)


def _checked_targets(model: nn.Module, example: Any, select: Any, method: PruneMethod, options: Any,
                     prune: PruneSettings, first: float | NMPattern) -> list[Target]:
    """The prunable layers, once what would fail later (an N:M width, a config, WoodFisher's memory) is refused."""
    targets = prune.targets(model, example, select)
    if isinstance(first, NMPattern) and not method.reconstructs:
        check_divides(targets, first)
    if prune.sparsity_config is not None:
        layer_sparsities(targets, prune.sparsity_config)
    if method is PruneMethod.WOODFISHER:  # before the dense evaluation, not after it
        o = options or FisherOptions()
        check_woodfisher_memory(targets, o.block_size, o.dtype, o.rank, o.max_memory_gb)
    return targets


def _check_options(method: PruneMethod, options: Any) -> None:
    """Refuse settings of another method (they would be ignored)."""
    wanted = ObsOptions if method.reconstructs else FisherOptions if method.needs_labels else None
    if options is not None and not isinstance(options, wanted or ()):
        raise PruneError(f"{type(options).__name__} are settings of "
                         f"{'obs' if isinstance(options, ObsOptions) else 'fisher / woodfisher'}, not of "
                         f"'{method.value}': drop them or pick that method")


def _evaluator(data: tuple[Any, Any]) -> Evaluate:
    eval_x, eval_y = data
    return lambda model: evaluate(model, eval_x, eval_y)


def _prune_one_(model: nn.Module, sparsity: float | NMPattern, method: PruneMethod, calib: tuple[Any, Any],
                options: Any, scores: Any, prune: PruneSettings, settings: RepairSettings) -> PruneReport:
    """Prune ``model`` in place at one sparsity (obs goes over ``calib`` as ``settings`` say)."""
    kwargs = {**prune.prune_kwargs(), "prune_head": True}  # the head was left out of select already, if it is
    kwargs["select"] = head_filter(model, prune.select, prune.prune_head, prune.sparsity_config)
    if method.reconstructs:
        return prune_(model, sparsity, method, (settings.batches(calib[0]), None), obs=options,
                      obs_passes=settings.where(), **kwargs)
    return prune_(model, sparsity, method, calib, options=options, scores=scores, **kwargs)
