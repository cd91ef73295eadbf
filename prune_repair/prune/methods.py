"""One entry point for one-shot unstructured pruning: :func:`prune_`.

Methods are a ``str`` Enum backed by one registry, so the same value works in
Python, on the CLI and in JSON. Scoring (the expensive part for Fisher and
WoodFisher) is separate from masking: :func:`score_weights` once, then
:func:`prune_` at as many sparsities as wanted with ``scores=``.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 3))
    >>> report = prune_(model, 0.9, method="global-magnitude")
    >>> report.achieved_sparsity, report.zeros, report.prunable
    (0.9, 234, 260)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..engine.run import distributed
from ..engine.registry import MethodEnum
from ..engine.sites.find import Selector
from .fisher import Progress, fisher_scores
from .grad_data import gradient_samples
from .magnitude import magnitude_scores
from .obs import ObsOptions
from .obs_method import prune_with_obs
from .report import PruneReport, example_of, inputs_of, layer_rows
from .allocate import build_masks, warn_empty
from .head import head_filter
from .masks import MaskStyle, apply_masks_, measure_sparsity, sparsity_all_params
from .nm import NMPattern, check_divides, parse_sparsity
from .sparsity_config import layer_sparsities
from .targets import PruneError, Target, effective_weights, find_targets
from .wanda import wanda_scores
from .woodfisher import InverseFisher, inverse_fisher, woodfisher_scores


DEFAULT_FISHER_SAMPLES = 400
"""Gradients the Fisher scorers use by default (all samples when the data has fewer)."""


class PruneMethod(MethodEnum):
    """How weights are scored (the registry of pruners); the lowest scores are pruned."""

    GLOBAL_MAGNITUDE = "global-magnitude", "|w|, one threshold over all layers", "Han et al. 2015"
    LAYER_MAGNITUDE = "layer-magnitude", "|w|, the same sparsity in every layer", "Zhu & Gupta 2017"
    FISHER = "fisher", "w^2 * mean(g^2) / 2 from per-sample gradients, global", "diagonal empirical Fisher"
    WOODFISHER = "woodfisher", "w^2 / (2 [F^-1]_qq), blockwise inverse empirical Fisher", "Singh & Alistarh 2020"
    OBS = ("obs", "layer by layer, w^2 / [H^-1]_qq from each layer's input Gram matrix, survivors refitted "
           "to the dense outputs", "OBC, Frantar & Alistarh 2022; SparseGPT 2023")
    WANDA = ("wanda", "|w| * input feature norm on calibration data, the same sparsity in every output row",
             "Sun et al. 2023")

    @property
    def scope(self) -> str:
        """How the sparsity is shared: one threshold (``global``), per layer, or per output row."""
        return {PruneMethod.LAYER_MAGNITUDE: "layer", PruneMethod.WANDA: "row"}.get(self, "global")

    @property
    def needs_labels(self) -> bool:
        return self in (PruneMethod.FISHER, PruneMethod.WOODFISHER)

    @property
    def reconstructs(self) -> bool:
        """Chooses the mask while refitting the weights (no scores: see :func:`~prune_repair.prune.obs.obs_prune_`)."""
        return self is PruneMethod.OBS


def parse_method(method: PruneMethod | str) -> PruneMethod:
    """``method`` as a :class:`PruneMethod`, or a :class:`PruneError` listing the known ones."""
    try:
        return PruneMethod.parse(method, "pruning method")
    except ValueError as err:
        raise PruneError(str(err)) from None


@dataclass
class FisherOptions:
    """Settings of the gradient-based scorers (the WoodFisher names in brackets).

    num_grads: gradients used [fisher subsample size]; None: ``DEFAULT_FISHER_SAMPLES``
    (400), or every sample once when the data holds fewer; more than the data holds is
    an error (see :meth:`gradients_for`). group_size: samples per gradient [fisher
    mini-batch size]. damp, block_size, rank, dtype, max_memory_gb: see
    :func:`~prune_repair.prune.woodfisher.inverse_fisher`. obs_update: move the kept
    weights by the OBS step (woodfisher only). chunk: gradients per vmap call (fisher).
    """

    num_grads: int | None = None
    group_size: int = 1
    damp: float = 1e-5
    block_size: int = 128
    rank: int = 32
    obs_update: bool = False
    max_memory_gb: float = 4.0
    dtype: torch.dtype = torch.float32
    chunk: int = 32
    seed: int = 0

    def gradients_for(self, samples: int) -> int:
        """The number of gradients to use with ``samples`` samples at hand.

        >>> FisherOptions().gradients_for(1000), FisherOptions().gradients_for(64)
        (400, 64)
        >>> FisherOptions(num_grads=100, group_size=2).gradients_for(150)
        Traceback (most recent call last):
        ...
        prune_repair.prune.targets.PruneError: 100 gradients of 2 samples each need 200 samples, but the data has 150: use fewer gradients or more data
        """
        available = samples // self.group_size
        if self.num_grads is None:
            return max(1, min(DEFAULT_FISHER_SAMPLES, available))
        if self.num_grads > available:
            raise PruneError(f"{self.num_grads} gradients of {self.group_size} samples each need "
                             f"{self.num_grads * self.group_size} samples, but the data has {samples}: "
                             "use fewer gradients or more data")
        return int(self.num_grads)


@dataclass
class PruneScores:
    """Scores of every target weight (lower = pruned first), reusable across sparsities."""

    method: PruneMethod
    scores: dict[str, torch.Tensor]
    seconds: float
    inverse_fisher: InverseFisher | None = field(default=None, repr=False)


def _samples(data: Any) -> int:
    """Samples of a gradient scorer's data over all ranks (this process's share when distributed)."""
    return len(gradient_samples(data)) * distributed.world_size()


def score_weights(
    model: nn.Module,
    method: PruneMethod | str,
    data: Any = None,
    *,
    targets: list[Target] | None = None,
    options: FisherOptions | None = None,
    progress: Progress | None = None,
) -> PruneScores:
    """Score the target weights of ``model`` with ``method`` (data ``(x, y)``, or an HF input dict, for the
    Fisher methods: see :mod:`~prune_repair.prune.grad_data`)."""
    method, options = parse_method(method), options or FisherOptions()
    if method.needs_labels:
        gradient_samples(data, method.value)
    targets = targets if targets is not None else find_targets(model, example_inputs=example_of(data))
    start, inv = time.perf_counter(), None
    if method in (PruneMethod.GLOBAL_MAGNITUDE, PruneMethod.LAYER_MAGNITUDE):
        scores = magnitude_scores(targets)
    elif method is PruneMethod.WANDA:
        if data is None:
            raise PruneError("wanda scores weights by their input norms on calibration data: pass data=x (or (x, y))")
        scores = wanda_scores(model, targets, inputs_of(data))
    elif method is PruneMethod.FISHER:
        scores = fisher_scores(model, targets, data, num_grads=options.gradients_for(_samples(data)),
                               chunk=options.chunk, seed=options.seed, progress=progress)
    else:
        inv = inverse_fisher(
            model, targets, data, num_grads=options.gradients_for(_samples(data)),
            group_size=options.group_size, damp=options.damp, block_size=options.block_size, rank=options.rank,
            dtype=options.dtype, max_memory_gb=options.max_memory_gb, seed=options.seed, progress=progress,
        )
        scores = woodfisher_scores(inv, targets)
    return PruneScores(method, scores, time.perf_counter() - start, inv)


def prune_(
    model: nn.Module,
    sparsity: float | str | NMPattern,
    method: PruneMethod | str = PruneMethod.GLOBAL_MAGNITUDE,
    data: Any = None,
    *,
    select: Selector = None,
    skip_first: bool = False,
    skip_classifier: bool = False,
    style: MaskStyle | str = MaskStyle.ZEROS,
    options: FisherOptions | None = None,
    scores: PruneScores | None = None,
    progress: Progress | None = None,
    include_tied: bool = False,
    obs: ObsOptions | None = None,
    sparsity_config: dict[str, float] | None = None,
    prune_head: bool = False,
    floor: bool = True,
    obs_passes: dict[str, Any] | None = None,
) -> PruneReport:
    """Prune ``model`` in place to ``sparsity`` (zeros / conv+linear weights) and report.

    Args:
        model: the network; its conv/linear weights are the candidates.
        sparsity: fraction of prunable weights to zero, in [0, 1), or an ``"N:M"`` pattern
            (:mod:`~prune_repair.prune.nm`: N of every M inputs of each output row stay).
        method: a :class:`PruneMethod` value.
        data: ``(x, y)`` calibration tensors (required by ``fisher`` / ``woodfisher``;
            for the others it only fixes the layer order for ``skip_first``).
        select, skip_first, skip_classifier: which layers are prunable (see :func:`find_targets`).
        style: ``zeros`` (plain weights) or ``torch`` (torch.nn.utils.prune masks kept).
        options: :class:`FisherOptions` for the gradient-based methods.
        scores: scores from :func:`score_weights` on this model (skips scoring).
        progress: ``progress(done, total)`` callback while gradients are computed.
        include_tied: also prune weights shared with other modules (see :func:`find_targets`).
        obs: :class:`~prune_repair.prune.obs.ObsOptions` for ``method="obs"``, which needs
            calibration inputs as ``data`` (``x`` or ``(x, y)``); ``wanda`` needs them too.
        sparsity_config: layer FQN or ``re:`` pattern -> sparsity for the layers it names
            (:mod:`~prune_repair.prune.sparsity_config`); the others get ``sparsity``.
        prune_head: also prune a language model's output head (left dense by default, see
            :mod:`~prune_repair.prune.head`).
        floor: global thresholds keep every output row's best weight (no layer emptied; see
            :mod:`~prune_repair.prune.allocate`).
        obs_passes: ``passes``, ``blocks``, ``offload``, ``progress`` of obs's pass over the data
            (as :func:`~prune_repair.prune.obs.obs_prune_` takes them; e.g. ``RepairSettings.where()``).

    ``achieved_sparsity`` counts the prunable weights; ``sparsity_all_params`` every parameter;
    ``layers`` lists ``{"fqn", "sparsity", "pattern"}`` per pruned layer. A layer left all
    zero is warned about.
    """
    sparsity, method, style = parse_sparsity(sparsity), parse_method(method), MaskStyle(style)
    if isinstance(sparsity, NMPattern) and sparsity_config is not None:
        raise PruneError(f"an N:M pattern ({sparsity}) applies to every layer: it does not mix with a sparsity config")
    select = head_filter(model, select, prune_head, sparsity_config)
    if method.reconstructs:
        return prune_with_obs(model, sparsity, data, obs or ObsOptions(), select, skip_first, skip_classifier, style,
                              sparsity_config, floor, obs_passes or {}, include_tied)
    if obs_passes:
        raise PruneError(f"obs_passes= applies to method='obs' only, not to '{method.value}'")
    options = options or FisherOptions()
    targets = find_targets(model, select=select, skip_first=skip_first, skip_classifier=skip_classifier,
                           example_inputs=example_of(data) if data is not None else None, include_tied=include_tied)
    overrides = layer_sparsities(targets, sparsity_config) if sparsity_config is not None else {}
    if isinstance(sparsity, NMPattern):
        check_divides(targets, sparsity)
    scores, transform = _scores_for(model, method, data, targets, options, progress, scores)
    start = time.perf_counter()
    masks = build_masks(targets, {t.fqn: scores.scores[t.fqn] for t in targets}, sparsity, method.scope, transform,
                        overrides, floor)
    if options.obs_update and method is PruneMethod.WOODFISHER and (isinstance(sparsity, NMPattern) or sparsity > 0):
        _obs_update_(targets, masks, scores.inverse_fisher)
    apply_masks_(targets, masks, style)
    warn_empty(targets)
    count = measure_sparsity(targets)
    seconds = {"score": scores.seconds, "mask": time.perf_counter() - start}
    pattern = str(sparsity) if isinstance(sparsity, NMPattern) else "unstructured"
    asked = sparsity.sparsity if isinstance(sparsity, NMPattern) else sparsity
    return PruneReport(method.value, asked, count.fraction, count.zeros, count.total, count.per_layer,
                       seconds, masks, sparsity_all_params(model), layer_rows(count.per_layer, pattern), pattern)


def _scores_for(model: nn.Module, method: PruneMethod, data: Any, targets: list[Target], options: FisherOptions,
                progress: Progress | None, scores: PruneScores | None) -> tuple[PruneScores, Any]:
    """The scores of ``targets`` (given, or computed) and the transform masks apply to them.

    Magnitude needs no score tensors: ``|w|`` is taken chunk by chunk from the weights themselves.
    """
    transform = None
    if scores is None and method in (PruneMethod.GLOBAL_MAGNITUDE, PruneMethod.LAYER_MAGNITUDE):
        scores, transform = PruneScores(method, effective_weights(targets), 0.0), torch.abs
    if scores is None:
        scores = score_weights(model, method, data, targets=targets, options=options, progress=progress)
    elif scores.method is not method:
        raise PruneError(f"the scores were made by {scores.method.value}, not {method.value}: rescore the model")
    missing = [t.fqn for t in targets if t.fqn not in scores.scores]
    if missing:
        raise PruneError(f"the scores have no entry for layer '{missing[0]}': score the same layers you prune")
    return scores, transform


def _obs_update_(targets: list[Target], masks: dict[str, torch.Tensor], inv: InverseFisher | None) -> None:
    if inv is None:
        raise PruneError("the OBS update needs the inverse Fisher: score with score_weights(..., 'woodfisher')")
    if set(inv.layout) != {t.fqn for t in targets}:
        raise PruneError("the OBS update needs the inverse Fisher of exactly the pruned layers: rescore them")
    with torch.no_grad():
        new = inv.obs_update({t.fqn: t.weight.detach() for t in targets}, masks)
        for t in targets:
            t.stored.copy_(new[t.fqn].to(t.stored.dtype))
