"""OBS pruning: choose the mask while reconstructing, layer by layer (OBC / SparseGPT ideas).

Layers are visited in execution order with the Gram statistics of
:mod:`prune_repair.engine.refit.gram` (inputs from the model as pruned so far, targets: the
dense reference model's outputs, or with ``target="layer"`` the dense layer's own output
on those inputs). Per layer, with ``H = G + lam I`` (``lam = damping * mean(diag G)``,
the bias column last and never pruned):

1. ``W*``: the ridge optimum of the dense layer toward the target (pulled toward the
   current weights), so ``||Y - X w||^2 + lam ||w - w0||^2 = (w - W*) H (w - W*)^T + const``;
2. columns are pruned block by block (``block_size``): within a block the weights of least
   saliency ``w_q^2 / [H^-1]_qq`` (read off the Cholesky factor of ``H^-1`` as it is
   eliminated) go, each removal compensated on the block's later columns at once and on
   the columns after the block lazily with one matrix product (SparseGPT's update,
   :mod:`~prune_repair.prune.obs_sweep`);
3. with ``refit`` (default) the kept weights are then solved exactly for that mask by
   :func:`~prune_repair.engine.refit.ridge.masked_ridge`, which can only lower the error.

``candidates`` (:mod:`~prune_repair.prune.obs_layer`): steps 1-3 run for each candidate mask
(the sweep above, the sweep with 10x damping, the magnitude mask of the current weights)
and the refit with the lowest error on the layer's data is kept, so a layer's error is never
above magnitude pruning + reconstruction's on the same inputs.

``steps`` (gradual one-shot): the model is pruned ``steps`` times, to the sparsities
``1 - (1 - sparsity) ** (k / steps)`` (each step removes the same fraction of the weights
left), every step fitted to the same dense reference with the inputs of the model pruned so
far. Later layers then see inputs already shaped by a sparser upstream before their own
largest cut. Measured on the zoo's ViT at 90% (bench_transformers.py): 4 steps 89.5% vs one step 83.7%.

Allocation: ``uniform`` prunes ``round(sparsity * n)`` weights of every layer. ``global``
takes each layer's budget from one threshold on the saliency ``w_q^2`` over all layers
(the profile of global magnitude pruning: the ``round(sparsity * N)`` smallest weights of
the model, counted per layer); the candidates then pick WHICH weights of a layer go.
Overall sparsity equals the target exactly. (A threshold on the OBS saliency normalized by
the layer's output energy measured worse on the zoo: it strips classifiers to 98-99%.)

Example:
    >>> import torch
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).double()
    >>> report = obs_prune_(model, torch.randn(256, 16, dtype=torch.float64), 0.75, steps=2)
    >>> report.achieved_sparsity, [round(layer.sparsity, 2) for layer in report.layers]
    (0.75, [0.75, 0.75])
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..engine.run.forward import ForwardFn, as_batches, head
from ..engine.refit.layerwise import ReferenceOutputs, layerwise_
from ..engine.run.lockstep import Passes
from ..engine.refit.gram import DEFAULT_MAX_GRAM_BYTES, Gram, check_gram_memory, has_gram, layer_shape
from ..engine.refit.attention_layers import refit_layers
from ..engine.sites.find import Selector, make_filter, sites_from_calls
from ..engine.sites.trace import trace_calls
from .fisher import Progress
from .nm import NMPattern, parse_sparsity
from .obs_layer import DEFAULT_CANDIDATES, MaskCandidate, parse_candidates, prune_layer_
from .obs_budgets import budgets_of, step_sparsities
from .obs_sweep import obs_rows
from .targets import PruneError

__all__ = ["MaskCandidate", "ObsLayer", "ObsOptions", "ObsReport", "obs_prune_", "obs_rows"]


@dataclass
class ObsOptions:
    """Settings of :func:`obs_prune_` when it is reached through ``prune_(method="obs")``.

    allocation: ``"global"`` (per-layer budgets from one magnitude threshold, the default)
    or ``"uniform"``; damping, block_size, target, candidates, steps: see :func:`obs_prune_`.
    """

    allocation: str = "global"
    damping: float = 1e-2
    block_size: int = 128
    target: str = "reference"
    candidates: tuple[MaskCandidate | str, ...] | str = DEFAULT_CANDIDATES
    steps: int = 1


@dataclass
class ObsLayer:
    """One pruned layer: its sparsity, ``||Y - Y_hat|| / ||Y||`` before and after (with several
    steps: the last step's, ``before`` = the layer as the previous step left it) and the candidate kept."""

    fqn: str
    weights: int
    sparsity: float
    damping: float
    error_before: float
    error_after: float
    mask: str = MaskCandidate.OBS.value

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ObsReport:
    """Result of :func:`obs_prune_`."""

    sparsity: float
    achieved_sparsity: float
    allocation: str
    layers: list[ObsLayer]
    seconds: dict[str, float] = field(default_factory=dict)
    steps: int = 1
    candidates: list[str] = field(default_factory=lambda: [c.value for c in DEFAULT_CANDIDATES])

    def to_dict(self) -> dict[str, Any]:
        return {"sparsity": self.sparsity, "achieved_sparsity": self.achieved_sparsity,
                "allocation": self.allocation, "layers": [la.to_dict() for la in self.layers],
                "seconds": dict(self.seconds), "steps": self.steps, "candidates": list(self.candidates)}


def obs_prune_(
    model: nn.Module,
    data: Any,
    sparsity: float | str | NMPattern,
    *,
    allocation: str = "uniform",
    damping: float = 1e-2,
    block_size: int = 128,
    candidates: Iterable[MaskCandidate | str] | str = DEFAULT_CANDIDATES,
    steps: int = 1,
    skip_first: bool = False,
    skip_classifier: bool = False,
    select: Selector = None,
    target: str = "reference",
    refit: bool = True,
    forward_fn: ForwardFn | None = None,
    max_gram_bytes: int = DEFAULT_MAX_GRAM_BYTES,
    progress: Progress | bool | None = None,
    sparsity_config: dict[str, float] | None = None,
    floor: bool = True,
    passes: Passes | str = Passes.LOCKSTEP,
    blocks: Sequence[str] | None = None,
    offload: str | Path | None = None,
) -> ObsReport:
    """Prune ``model`` in place to ``sparsity`` (zeros / weights of the pruned layers), see the module doc.

    ``target``: ``"reference"`` (outputs of a dense copy taken on entry: upstream error is
    corrected too) or ``"layer"`` (the dense layer's output on the pruned-upstream inputs; with
    several steps, the layer as the previous step left it).
    Memory: the Gram statistics of one layer, ``O(d_in^2 + d_in * d_out)``, plus a dense
    copy of the model for ``target="reference"``. Cost: per step, one pass per calibration batch
    (``passes``, ``blocks``, ``offload``: how several batches are gone over, as in
    :func:`~prune_repair.engine.correct.repair.repair_`) and per layer one sweep and one masked
    refit per candidate. ``progress``: ``(done, total)`` after each layer, or True to show the
    layers on stderr.

    ``candidates``: the masks tried per layer (``"obs"``, ``"obs-damped"``, ``"magnitude"``, see
    :mod:`~prune_repair.prune.obs_layer`); ``refit=False`` takes one. ``steps``: gradual one-shot
    pruning in that many steps (unstructured sparsity only).
    ``sparsity`` ``"N:M"``: in each group of M input columns, the N of highest saliency when
    the sweep reaches the group are kept (SparseGPT's semi-structured choice); the refit keeps
    the pattern. ``sparsity_config``: layer -> sparsity for the layers it names. ``floor``:
    a ``global`` budget leaves every layer at least as many weights as it has output rows.
    """
    start = time.perf_counter()
    sparsity = parse_sparsity(sparsity)
    pattern = sparsity if isinstance(sparsity, NMPattern) else None
    candidates = parse_candidates(candidates)
    _check_options(pattern, sparsity_config, allocation, target, block_size, steps)
    batches = as_batches(data)
    layers, bns, kinds = _checked_layers(model, batches, pattern, skip_first, skip_classifier, select, forward_fn,
                                         max_gram_bytes)
    numels = [m.weight.numel() for _, m in layers]
    dense = copy.deepcopy(model) if target == "reference" else None
    seconds = {"allocate": 0.0, "prune": 0.0}
    layer_args = {"damping": damping, "block_size": block_size, "pattern": pattern, "refit": refit,
                  "candidates": candidates}
    pass_args = {"forward_fn": forward_fn, "max_gram_bytes": max_gram_bytes, "passes": passes, "blocks": blocks,
                 "offload": offload, "progress": progress}
    schedule = step_sparsities(sparsity, steps) if pattern is None else [sparsity]
    for k, step_sparsity in enumerate(schedule, 1):
        t0 = time.perf_counter()
        config = sparsity_config if k == steps or sparsity_config is None else {
            name: step_sparsities(value, steps)[k - 1] for name, value in sparsity_config.items()}
        budgets = budgets_of(layers, numels, step_sparsity, pattern, allocation, config, floor)
        seconds["allocate"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        reports = _prune_step(model, batches, layers, bns, kinds, budgets, dense, layer_args, pass_args,
                              "obs" if steps == 1 else f"obs step {k}/{steps}")
        seconds["prune"] += time.perf_counter() - t0
    if allocation != "global" or pattern is not None:
        del seconds["allocate"]
    seconds["total"] = time.perf_counter() - start
    zeros = sum(round(r.sparsity * r.weights) for r in reports)
    target_sparsity = pattern.sparsity if pattern is not None else sparsity
    return ObsReport(target_sparsity, zeros / sum(numels), allocation, reports, seconds, steps,
                     [c.value for c in candidates])


def _prune_step(model: nn.Module, batches: list[Any], layers: list[tuple[str, nn.Module]],
                bns: dict[str, _BatchNorm | None], kinds: dict[str, str], budgets: list[int], dense: nn.Module | None,
                layer_args: dict[str, Any], pass_args: dict[str, Any], what: str) -> list[ObsLayer]:
    """One pass over the layers: each pruned to its budget toward ``dense``'s outputs (or its own, when None)."""
    reports: list[ObsLayer] = []

    def step(i: int, gram: Gram) -> None:
        fqn, module = layers[i]
        done = prune_layer_(module, gram, bns[fqn], budgets[i], **layer_args)
        numel = module.weight.numel()
        reports.append(ObsLayer(fqn, numel, 1 - float(done.keep.sum()) / numel, done.damping, done.error_before,
                                done.error_after, done.mask))

    reference = None if dense is None else ReferenceOutputs(dense, batches, [f for f, _ in layers],
                                                            forward_fn=pass_args["forward_fn"])
    layerwise_(model, batches, layers, step=step, target=reference, what=what, kinds=kinds, **pass_args)
    return reports


def _check_options(pattern: NMPattern | None, sparsity_config: dict[str, float] | None, allocation: str,
                   target: str, block_size: int, steps: int) -> None:
    """One-line errors for options that do not fit together."""
    if pattern is not None and sparsity_config is not None:
        raise PruneError(f"an N:M pattern ({pattern}) applies to every layer: it does not mix with a sparsity config")
    if allocation not in ("uniform", "global"):
        raise PruneError(f"unknown allocation {allocation!r}: use 'uniform' or 'global'")
    if target not in ("reference", "layer"):
        raise PruneError(f"unknown target {target!r}: use 'reference' or 'layer'")
    if block_size < 1:
        raise PruneError(f"block_size must be at least 1, got {block_size}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise PruneError(f"steps must be a whole number of at least 1, got {steps!r}")
    if pattern is not None and steps > 1:
        raise PruneError(f"an N:M pattern ({pattern}) is reached in one step: use steps=1 with it")


def _checked_layers(model: nn.Module, batches: list[Any], pattern: NMPattern | None, skip_first: bool,
                    skip_classifier: bool, select: Selector, forward_fn: ForwardFn | None, max_gram_bytes: int
                    ) -> tuple[list[tuple[str, nn.Module]], dict[str, _BatchNorm | None], dict[str, str]]:
    """The layers to prune in execution order (memory and N:M fit checked), the BatchNorm after each,
    and each layer's kind (attention projections, ``F.linear`` sites: ``engine.refit.attention_layers``)."""
    calls = trace_calls(model, head(batches[0], 2), forward_fn=forward_fn)
    layers, kinds = _layers(model, calls, skip_first, skip_classifier, select)
    for fqn, module in layers:
        check_gram_memory(module, fqn, max_gram_bytes)
        if pattern is not None and layer_shape(module)[1] % pattern.m:
            raise PruneError(f"N:M pattern {pattern} does not fit layer '{fqn}': its output rows read "
                             f"{layer_shape(module)[1]} inputs, not a multiple of {pattern.m}; use an M that divides "
                             "it or leave the layer out (--layers)")
    norms = {s.producer: s.norm for s in sites_from_calls(calls, include_classifier=True)}
    modules = dict(model.named_modules())
    bns = {f: modules[norms[f]] if isinstance(modules.get(norms.get(f) or ""), _BatchNorm) else None for f, _ in layers}
    return layers, bns, kinds


def _layers(model: nn.Module, calls, skip_first: bool, skip_classifier: bool, select: Selector
            ) -> tuple[list[tuple[str, nn.Module]], dict[str, str]]:
    found = [f for f in refit_layers(model, calls) if has_gram(f.module) and f.calls == 1]
    if skip_first:
        found = found[1:]
    if skip_classifier:
        found = found[:-1]
    filter_fn = make_filter(select)
    if filter_fn is not None:
        found = [f for f in found if filter_fn(f.module, f.fqn) or (
            f.owner != f.fqn and filter_fn(model.get_submodule(f.owner), f.owner))]
    if not found:
        raise PruneError("found no layer to prune (Conv1d, Conv2d or Linear, called once per forward): "
                         "check the model and the layer selection")
    return [(f.fqn, f.module) for f in found], {f.fqn: f.kind for f in found}
