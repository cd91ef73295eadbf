"""Barrier curves: metrics along the interpolation path, with and without repair.

The barrier of a metric is ``max over alpha of [metric(merged) - ((1-alpha) metric(A) +
alpha metric(B))]`` (ARCHITECTURE.md, "Merging"). Accuracy enters as the error ``1 - acc``, so its
barrier is the largest drop of accuracy below the straight line between the endpoints,
as a fraction (0.2 = 20 points); loss barriers are in loss units.

Example:
    >>> round(barrier([0.0, 0.5, 1.0], [0.9, 0.6, 0.8], (0.9, 0.8), higher_is_better=True), 6)
    0.25
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..metrics.classify import evaluate
from ..engine.correct.modes import RepairMode
from ..engine.correct.modes import Variant
from .merge import Align, MergePlan, prepare_merge


class PlotError(ValueError):
    """A plot cannot be drawn (e.g. matplotlib is missing)."""


def alpha_grid(n: int) -> list[float]:
    """``n`` evenly spaced alphas from 0 to 1 (``n >= 2``).

    >>> alpha_grid(5)
    [0.0, 0.25, 0.5, 0.75, 1.0]
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"a curve needs at least 2 points (the endpoints), got {n}")
    return [i / (n - 1) for i in range(n)]


def barrier(alphas: Sequence[float], values: Sequence[float], endpoints: tuple[float, float],
            higher_is_better: bool = False) -> float:
    """Largest gap between ``values`` and the line between the endpoint values.

    With ``higher_is_better`` (accuracy) the gap is line minus value (error barrier).
    """
    start, end = endpoints
    sign = -1.0 if higher_is_better else 1.0
    return max(sign * (v - ((1 - a) * start + a * end)) for a, v in zip(alphas, values))


@dataclass
class CurvePoint:
    """Metrics of the merged model at one ``alpha``: raw (aligned average) and repaired."""

    alpha: float | None
    acc_raw: float
    loss_raw: float
    acc: float | None
    loss: float | None


@dataclass
class BarrierCurve:
    """Endpoint metrics, the curve, its barriers and timings (``to_dict`` is the CLI report)."""

    endpoints: list[dict[str, float]]
    points: list[CurvePoint]
    repair: str
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def barrier(self) -> dict[str, float | None]:
        """Barriers of accuracy (as error) and loss, raw and repaired (``None`` without repair).

        A point with ``alpha=None`` is a uniform average of all endpoints."""
        out: dict[str, float | None] = {}
        for key, sign in (("acc", -1.0), ("loss", 1.0)):
            ends = [e[key] for e in self.endpoints]
            for suffix in ("_raw", ""):
                gaps = []
                for p in self.points:
                    value = getattr(p, key + suffix)
                    if value is None:
                        break
                    w = [1 - p.alpha, p.alpha] if p.alpha is not None else [1 / len(ends)] * len(ends)
                    gaps.append(sign * (value - sum(wk * e for wk, e in zip(w, (ends[0], ends[-1]) if
                                                                             p.alpha is not None else ends))))
                out[key + suffix] = max(gaps) if gaps and len(gaps) == len(self.points) else None
        return {k: out[k] for k in ("acc_raw", "acc", "loss_raw", "loss")}

    def to_dict(self) -> dict[str, Any]:
        return {"endpoints": [dict(e) for e in self.endpoints], "curve": [asdict(p) for p in self.points],
                "barrier": self.barrier, "seconds": dict(self.seconds)}


def barrier_curve(
    a: nn.Module | None,
    b: nn.Module | None,
    data: Any,
    eval_x: torch.Tensor,
    eval_y: torch.Tensor,
    *,
    alphas: int | Sequence[float] = 11,
    align: Align | str = Align.ACTIVATION,
    repair: RepairMode | str = RepairMode.AUTO,
    variant: Variant | str = Variant.EXACT,
    plan: MergePlan | None = None,
    on_point: Callable[[CurvePoint], None] | None = None,
    **kwargs: Any,
) -> BarrierCurve:
    """Evaluate the aligned interpolation of ``a`` and ``b`` at each alpha, raw and repaired.

    Args:
        a, b: the endpoint models (not changed); ignored when ``plan`` is given.
        data: calibration data for alignment and repair.
        eval_x, eval_y: evaluation set.
        alphas: a number of evenly spaced points (11 = steps of 0.1) or the alphas themselves.
        align, repair, variant: as in :func:`~prune_repair.merge.merge`; ``repair='none'``
            leaves the repaired columns ``None``.
        plan: a :class:`MergePlan` of two models from :func:`prepare_merge` (reused, saves the alignment).
        on_point: called with each finished point (progress bars).
        kwargs: passed to :func:`prepare_merge` (``groups``, ``forward_fn``, ``seed``, ...).
    """
    grid = alpha_grid(alphas) if isinstance(alphas, int) else [float(x) for x in alphas]
    if any(not 0.0 <= x <= 1.0 for x in grid) or not grid:
        raise ValueError(f"curve alphas must lie in [0, 1], got {grid}")
    mode = RepairMode(repair)
    if plan is None:
        plan = prepare_merge([a, b], data, align=align, **kwargs)
    if len(plan.models) != 2:
        raise ValueError(f"a barrier curve joins two models, the plan has {len(plan.models)}")
    seconds = {"align": plan.seconds.get("align", 0.0), "repair": 0.0, "eval": 0.0}
    start = time.perf_counter()
    endpoints = [evaluate(m, eval_x, eval_y) for m in plan.models]
    seconds["eval"] += time.perf_counter() - start
    points = []
    for alpha in grid:
        raw, _ = plan.merged([1 - alpha, alpha], repair=RepairMode.NONE)
        start = time.perf_counter()
        raw_metrics = evaluate(raw, eval_x, eval_y)
        seconds["eval"] += time.perf_counter() - start
        fixed = {"acc": None, "loss": None}
        if mode is not RepairMode.NONE:
            start = time.perf_counter()
            repaired, _ = plan.merged([1 - alpha, alpha], repair=mode, variant=variant)
            seconds["repair"] += time.perf_counter() - start
            start = time.perf_counter()
            fixed = evaluate(repaired, eval_x, eval_y)
            seconds["eval"] += time.perf_counter() - start
        point = CurvePoint(alpha, raw_metrics["acc"], raw_metrics["loss"], fixed["acc"], fixed["loss"])
        points.append(point)
        if on_point is not None:
            on_point(point)
    return BarrierCurve(endpoints, points, mode.value, seconds)


def require_matplotlib() -> None:
    """Raise :class:`PlotError` with an install hint when matplotlib cannot be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotError("plotting needs matplotlib, which is not installed: pip install matplotlib (the 'plot' extra)") from None


def plot_curve(curve: BarrierCurve, path: str | Path, title: str | None = None) -> None:
    """Draw accuracy and loss along alpha, raw and repaired, into a PNG (needs matplotlib)."""
    if any(p.alpha is None for p in curve.points):
        raise PlotError("a curve of a uniform merge of several models has no alpha axis to plot")
    plot_points([asdict(p) for p in curve.points], curve.endpoints, "acc", curve.repair, path, title)


def plot_points(points: list[dict], endpoints: list[dict], metric: str, repair: str, path: str | Path,
                title: str | None = None) -> None:
    """Draw ``metric`` (``acc`` in %, ``ppl``) and loss along alpha from curve points
    ``{"alpha", "<metric>_raw", "loss_raw", "<metric>", "loss"}`` into a PNG (needs matplotlib)."""
    if any(p["alpha"] is None for p in points):
        raise PlotError("a curve of a uniform merge of several models has no alpha axis to plot")
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = [p["alpha"] for p in points]
    names = {"acc": "accuracy (%)", "ppl": "perplexity"}
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, label in ((axes[0], metric, names.get(metric, metric)), (axes[1], "loss", "loss")):
        scale = 100.0 if key == "acc" else 1.0
        ax.plot(alphas, [scale * p[f"{key}_raw"] for p in points], "o--", label="aligned, raw")
        if all(p.get(key) is not None for p in points):
            ax.plot(alphas, [scale * p[key] for p in points], "o-", label=f"aligned + {repair}")
        ends = [scale * endpoints[0][key], scale * endpoints[-1][key]]
        ax.plot([0, 1], ends, ":", color="gray", label="endpoint line")
        ax.set_xlabel("alpha")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
