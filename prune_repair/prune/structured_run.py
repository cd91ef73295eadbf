"""Structured pruning as one step: remove units, correct, measure size and speed, evaluate.

:func:`structured_prune` takes a dense model (left unchanged) and returns a physically
smaller copy:

- transformer models (any MLP :func:`~prune_repair.prune.mlp_units.find_mlps` recognizes)
  lose ``ratio`` of every MLP's hidden units (:func:`~prune_repair.prune.structured_mlp.prune_mlps_`);
- other models with conv layers lose ``ratio`` of the output channels of every channel group
  of torch-pruning's dependency graph (:func:`~prune_repair.prune.structured_channels.prune_channels_`).

``repair`` is a :class:`~prune_repair.engine.correct.modes.RepairMode`: ``reconstruct``
refits toward the dense model's layer outputs (for MLPs: the consumer, by ridge over the
kept units, block by block); ``none`` only removes; the statistics modes (``auto``,
``repair``, ``reshift``, ...) correct toward the dense statistics of the kept units, and for
MLPs fold the removed units' mean contribution into the consumer's bias first (FLAP);
``reconstruct+repair`` does both. The result carries the metrics of the model with the same
units dropped and no correction (``before``) and after (``after``), parameter counts and the
forward latency ratio on the first calibration batch.

Example:
    >>> import torch
    >>> from prune_repair.zoo.models import TokenMLP
    >>> _ = torch.manual_seed(0)
    >>> dense, x = TokenMLP(dim=8, depth=2).eval(), torch.randn(32, 1, 28, 28)
    >>> result = structured_prune(dense, x, 0.5)
    >>> result.kind, result.params_after < result.params_before, result.model.blocks[0].fc1.out_features
    ('mlp', True, 8)
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..engine.correct.modes import RepairMode
from ..engine.correct.repair import repair_
from ..engine.run.forward import ForwardFn, as_batches
from ..engine.stats.activation import collect_stats
from ..metrics.latency import count_params, latency_ratio
from .mlp_units import find_mlps
from .structured import History, repair_structured_
from .structured_channels import prune_channels_
from .structured_mlp import Refit, prune_mlps_
from .targets import PruneError

Metrics = dict[str, float]


@dataclass
class StructuredResult:
    """The smaller model and what the step measured (see :func:`structured_prune`)."""

    model: nn.Module
    kind: str  # "mlp" or "channels"
    ratio: float
    repair: str
    heads: float
    history: History
    params_before: int
    params_after: int
    latency_ratio: float
    seconds: dict[str, float]
    before: Metrics = field(default_factory=dict)
    after: Metrics = field(default_factory=dict)
    layers: list[dict[str, Any]] = field(default_factory=list)
    correction: dict[str, Any] = field(default_factory=dict)
    config_key: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The structured fields of a ``--report`` row."""
        return {"structured": self.ratio, "structured_heads": self.heads, "structured_kind": self.kind, "params_before": self.params_before,
                "params_after": self.params_after, "params_ratio": self.params_after / max(self.params_before, 1),
                "latency_ratio": self.latency_ratio, "structured_layers": self.layers,
                "structured_seconds": dict(self.seconds)}


def check_ratio(ratio: float, flag: str = "--structured") -> float:
    """``ratio`` if it lies in [0, 1), else :class:`PruneError`."""
    if not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise PruneError(f"{flag} {ratio} is outside [0, 1): give the fraction to remove, e.g. 0.25")
    return float(ratio)


def structured_kind(model: nn.Module) -> str:
    """``mlp`` when the model has a recognizable MLP, ``channels`` when it has convs, else PruneError."""
    if find_mlps(model):
        return "mlp"
    if any(isinstance(m, (nn.Conv1d, nn.Conv2d)) for m in model.modules()):
        return "channels"
    raise PruneError("no recognizable MLP (fc1/fc2, c_fc/c_proj, gate/up/down_proj, intermediate/output.dense, "
                     "torchvision MLPBlock) or conv channel group in the model: --structured does not apply")


def _mlp_step(dense, data, ratio, heads, select, mode, damping, include_classifier, evaluate, forward_fn):
    model = copy.deepcopy(dense)
    refit = Refit.RIDGE if mode.reconstructs else (Refit.NONE if mode is RepairMode.NONE else Refit.BIAS)
    start = time.perf_counter()
    result = prune_mlps_(model, dense, data, ratio, heads=heads, refit=refit, select=select, damping=damping,
                         forward_fn=forward_fn)
    correction: dict[str, Any] = {}
    if mode not in (RepairMode.NONE, RepairMode.RECONSTRUCT) and any(r["kept"] < r["width"] for r in result.layers):
        goal = collect_stats(dense, data, include_classifier=include_classifier).select_channels(result.kept)
        stats_mode = RepairMode.AUTO if mode is RepairMode.RECONSTRUCT_REPAIR else mode
        correction = repair_(model, goal, data, repair=stats_mode, forward_fn=forward_fn).to_dict()
    seconds = {"prune_and_repair": time.perf_counter() - start}
    before = {}
    if evaluate is not None:
        dropped = copy.deepcopy(dense)
        prune_mlps_(dropped, dense, data, ratio, heads=heads, refit=Refit.NONE, kept=result.kept)
        before = evaluate(dropped)
    if hasattr(model, "save_pretrained") and result.config_key is None and any(
            r["kept"] < r["width"] for r in result.layers if r["kind"] == "mlp"):
        raise PruneError("the model's config names no MLP width (intermediate_size / n_inner / ffn_dim) equal to "
                         "every MLP's, so the smaller model would not load with from_pretrained: --structured "
                         "does not apply to this HF model")
    return model, result.history, result.layers, correction, seconds, before, result.config_key


def _channel_step(dense, data, ratio, heads, select, mode, damping, include_classifier, evaluate, forward_fn):
    if select != "energy":
        raise PruneError(f"unit selection '{select}' applies to transformer units: CNN channel groups are ranked by "
                         "activation energy x outgoing weight norm (drop the selection option)")
    if heads:
        raise PruneError("--structured-heads removes transformer attention heads: this model has no recognizable "
                         "transformer MLP or attention")
    model = copy.deepcopy(dense)
    start = time.perf_counter()
    history = prune_channels_(model, data, ratio, forward_fn=forward_fn)
    seconds = {"prune": time.perf_counter() - start}
    before = evaluate(model) if evaluate is not None else {}
    start = time.perf_counter()
    correction: dict[str, Any] = {}
    if history and mode is not RepairMode.NONE:
        reference = collect_stats(dense, data, include_classifier=include_classifier, forward_fn=forward_fn)
        report = repair_structured_(model, reference, data, original=dense, history=history, mode=mode,
                                    forward_fn=forward_fn)
        correction = report.repair.to_dict()
        layers = [{"fqn": k, "width": a, "kept": b} for k, (a, b) in report.channels.items()]
    else:
        layers = []
    seconds["repair"] = time.perf_counter() - start
    return model, history, layers, correction, seconds, before, None


def structured_prune(
    dense: nn.Module,
    data: Any,
    ratio: float,
    *,
    heads: float = 0.0,
    select: str = "energy",
    repair: RepairMode | str = RepairMode.RECONSTRUCT,
    damping: float = 1e-2,
    include_classifier: bool = False,
    evaluate: Callable[[nn.Module], Metrics] | None = None,
    forward_fn: ForwardFn | None = None,
    latency_runs: int = 5,
) -> StructuredResult:
    """A smaller, corrected copy of ``dense`` (see the module doc); ``heads``: the fraction of
    attention heads to remove as well (HF LLaMA-style attention only); ``select``: ``energy`` or
    ``obs`` (:mod:`~prune_repair.prune.unit_select`, transformers only); ``evaluate(model)`` gives
    the metrics of the model before and after the correction (skipped when None)."""
    ratio, heads = check_ratio(ratio), check_ratio(heads, "--structured-heads")
    if heads and not hasattr(dense, "save_pretrained"):
        raise PruneError("--structured-heads writes the new head count into an HF config: it applies to HF models "
                         "(hf:DIR) with LLaMA-style attention")
    mode = RepairMode.parse(repair, "correction")
    kind = structured_kind(dense)
    step = _mlp_step if kind == "mlp" else _channel_step
    model, history, layers, correction, seconds, before, key = step(dense, data, ratio, heads, select, mode, damping,
                                                                   include_classifier, evaluate, forward_fn)
    after = evaluate(model) if evaluate is not None else {}
    timing = latency_ratio(model, dense, as_batches(data)[0], runs=latency_runs, forward_fn=forward_fn)
    return StructuredResult(model.eval(), kind, ratio, mode.value, heads, history, count_params(dense), count_params(model),
                            timing.ratio, seconds, before, after, layers, correction, key)
