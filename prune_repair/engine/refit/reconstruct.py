"""Reconstruction: rebuild each layer's output from the weights that remain (ARCHITECTURE.md, "Reconstruction").

:func:`reconstruct_` solves, per conv/linear layer in execution order (attention q/k/v rows and
out_proj, ``F.linear`` sites: :mod:`.attention_layers`), a ridge least-squares
problem for every output row over its NONZERO weights (plus the bias): the input is what the
operated model feeds the layer with all upstream layers already reconstructed, the target is
the reference model's output of the same layer on the same samples. Zeros stay exactly zero;
state_dict keys, shapes and dtypes are unchanged.

Example:
    >>> import copy, torch
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> reference = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4)).double()
    >>> model = copy.deepcopy(reference)
    >>> with torch.no_grad():
    ...     _ = model[0].weight.mul_(torch.rand(32, 8, dtype=torch.float64) > 0.7)   # prune ~70%
    >>> x = torch.randn(256, 8, dtype=torch.float64)
    >>> report = reconstruct_(model, reference, x)
    >>> [layer.fqn for layer in report.layers]
    ['0', '2']
    >>> report.layers[1].error_after < report.layers[1].error_before
    True
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..run.forward import ForwardFn, as_batches, head
from .layerwise import ReferenceOutputs, layerwise_
from ..run.lockstep import Passes
from ..checks import check_finite, parameter_holders, stored_weight
from .gram import DEFAULT_MAX_GRAM_BYTES, Gram, check_gram_memory, has_gram, reads_last_dim
from .layer_rows import check_gram, current_rows, intercept_kind, write_rows_
from ..producers import is_packed_attention
from .attention_layers import covered_owners, layer_module, refit_layers
from .ridge import masked_ridge
from .shared_gram import shared_readers
from ..sites.find import Selector, make_filter, sites_from_calls
from ..sites.trace import trace_calls

Progress = Callable[[int, int], None] | bool | None


@dataclass
class LayerReconstruction:
    """One reconstructed layer.

    ``rows``: rows of X (samples x positions); ``d_in``: weights per output row (per group);
    ``max_support``: most nonzero weights of a row; ``damping``: largest relative damping
    used (raised above the requested one where a factorization failed); ``error_*``:
    ``||Y - Y_hat|| / ||Y||`` toward the target before and after; ``intercept``: where the
    intercept went: ``"bias"``, ``"batchnorm"`` (running_mean of the BatchNorm that follows),
    ``"absorbed"`` (a BatchNorm on batch statistics removes it) or ``"none"`` (solved
    without one: the layer has no bias and no BatchNorm follows).
    """

    fqn: str
    rows: int
    d_in: int
    max_support: int
    damping: float
    error_before: float
    error_after: float
    intercept: str
    groups: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ReconstructReport:
    """Result of :func:`reconstruct_`."""

    layers: list[LayerReconstruction]
    seconds: float
    passes: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"layers": [layer.to_dict() for layer in self.layers], "seconds": self.seconds,
                "passes": dict(self.passes), "skipped": dict(self.skipped)}


def reconstruct_(
    model: nn.Module,
    reference: nn.Module,
    data: Any,
    *,
    select: Selector = None,
    damping: float = 1e-2,
    kept: dict[str, torch.Tensor] | None = None,
    forward_fn: ForwardFn | None = None,
    max_gram_bytes: int = DEFAULT_MAX_GRAM_BYTES,
    reference_cache_bytes: int = 2**30,
    progress: Progress | None = None,
    passes: Passes | str = Passes.LOCKSTEP,
    blocks: Sequence[str] | None = None,
    offload: str | Path | None = None,
) -> ReconstructReport:
    """Reconstruct every conv/linear layer of ``model`` toward ``reference``, in place.

    Args:
        model: the operated network (pruned); its zeros (or ``weight_mask`` under
            ``torch.nn.utils.prune``, whose ``weight_orig`` then takes the solution) are kept.
        reference: the unoperated network of the same architecture (not ``model`` itself).
        data: calibration data: one batch, or a list of batches (they accumulate).
        select: layers to reconstruct (``filter_fn(module, fqn)``, FQNs or ``re:``
            patterns); default: every conv/linear layer and attention projection, the classifier included.
        damping: ridge ``lambda`` relative to the mean diagonal of the layer's Gram matrix.
        kept: layer FQN -> indices of the reference's output channels the (structurally
            pruned) layer kept; the layer is fitted to those channels of the reference.
        forward_fn: ``forward_fn(model, batch)`` for batches that are not plain tensors.
        max_gram_bytes: refuse layers whose float64 Gram statistics need more memory.
        reference_cache_bytes: memory for reference outputs cached between ``per-site`` passes.
        progress: ``progress(done, total)`` after each layer, or ``True`` to show the layers as
            they are refitted (stderr; see :mod:`~prune_repair.engine.run.progress`).
        passes, blocks, offload: how several batches are gone over, as in
            :func:`~prune_repair.engine.correct.repair.repair_` (``blockwise``: one block of the
            model and of the reference beside it at a time).

    Memory: ``O(d_in^2 + d_in * d_out)`` per layer (one layer at a time), never
    ``O(N * d_in)``: im2col patches are unfolded a chunk of samples at a time.
    Cost: one trace pass, then one pass of ``model`` and one of ``reference`` per batch (each
    layer is solved in a hook before it computes; the reference forward runs beside it and
    pauses at the layer needed next, so one reference output is alive at a time); with
    ``passes="per-site"``, one prefix pass of ``model`` per layer and batch instead. Plus,
    per layer, the Gram accumulation (``rows * d_in^2``) and the masked solves (about
    ``|S|^3 / 3`` per row, or CG iterations at matrix-product speed for wide supports, see
    :mod:`~prune_repair.engine.refit.ridge`). Padded token positions (``attention_mask`` 0 in a
    batch dict) are left out of the Gram statistics.

    Raises:
        ValueError: no conv/linear layer, a reference of another architecture,
            non-finite weights, or a layer over ``max_gram_bytes``.
    """
    start = time.perf_counter()
    if (blocks is not None or offload is not None) and Passes.parse(passes, "passes") is not Passes.BLOCKWISE:
        raise ValueError("blocks= and offload= apply to passes='blockwise' only: add passes='blockwise'")
    if reference is model:
        raise ValueError("the reference must be a separate copy of the unoperated model, not the model itself")
    batches, kept = as_batches(data), dict(kept or {})
    layers, bns, skipped, kinds, readers = _chosen_layers(model, reference, batches, select, kept, forward_fn,
                                                          max_gram_bytes)
    reports: list[LayerReconstruction] = []

    def step(i: int, gram: Gram) -> None:
        fqn, module = layers[i]
        reports.append(_solve_layer(fqn, module, gram, bns[fqn], damping))

    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    targets = ReferenceOutputs(reference, batches, [f for f, _ in layers], keep=_kept_channels(kept),
                               lend=_kept_channels(kept, copy=False), forward_fn=forward_fn,
                               max_bytes=reference_cache_bytes)
    try:
        made = layerwise_(model, batches, layers, step=step, target=targets, forward_fn=forward_fn,
                          max_gram_bytes=max_gram_bytes, passes=passes, blocks=blocks, offload=offload,
                          progress=progress, what="reconstruct", kinds=kinds, recycle=True, readers=readers)
    except BaseException:
        model.load_state_dict(saved)
        raise
    _warn_thin(reports)
    return ReconstructReport(reports, time.perf_counter() - start,
                             {"trace": 1, "model": made, "reference": targets.passes}, skipped)


def _chosen_layers(model: nn.Module, reference: nn.Module, batches: list[Any], select: Selector,
                   kept: dict[str, torch.Tensor], forward_fn: ForwardFn | None, max_gram_bytes: int
                   ) -> tuple[list[tuple[str, nn.Module]], dict[str, _BatchNorm | None], dict[str, str], dict[str, str],
                              list[nn.Module]]:
    """The layers to refit in execution order, the BatchNorm after each (or None), the layers
    left out with the reason (a warning names them), each layer's kind, and the layers that may share
    an ``X^T X`` (:func:`~prune_repair.engine.refit.shared_gram.shared_readers`); after the checks of both
    models."""
    for net, what in ((model, "the model"), (reference, "the reference")):
        check_finite(net, what, needs="reconstruction")
    calls = trace_calls(model, head(batches[0], 2), forward_fn=forward_fn)
    layers, skipped, kinds = _layers(model, calls, select)
    listed = {f for f, _ in layers} | set(skipped)
    skipped.update(_not_covered(model, listed | covered_owners(listed), select))
    if skipped:
        listed = ", ".join(f"'{fqn}' ({why})" for fqn, why in skipped.items())
        warnings.warn(f"{len(skipped)} layer(s) are not reconstructed and keep their weights: {listed}", stacklevel=3)
    _check_architecture(layers, reference, kept)
    for fqn, module in layers:
        check_gram_memory(module, fqn, max_gram_bytes)
    norms = {s.producer: s.norm for s in sites_from_calls(calls, include_classifier=True)}
    modules = dict(model.named_modules())
    bns = {fqn: modules.get(norms.get(fqn) or "") for fqn, _ in layers}
    bns = {f: bn if isinstance(bn, _BatchNorm) else None for f, bn in bns.items()}
    return layers, bns, skipped, kinds, shared_readers(calls, layers, kinds)


def _kept_channels(kept: dict[str, torch.Tensor], *, copy: bool = True
                   ) -> Callable[[str, nn.Module, torch.Tensor], torch.Tensor]:
    """What is kept of a reference layer's output: the channels the pruned layer kept, else all (a copy,
    or with ``copy=False`` the output itself)."""
    def keep(fqn: str, ref_module: nn.Module, y: torch.Tensor) -> torch.Tensor:
        if fqn in kept:
            return y.index_select(-1 if reads_last_dim(ref_module) else 1, kept[fqn].to(y.device))
        return y.clone() if copy else y
    return keep


def _warn_thin(reports: list[LayerReconstruction]) -> None:
    thin = [r for r in reports if r.rows < r.max_support]
    if thin:
        worst = max(thin, key=lambda r: r.max_support - r.rows)
        warnings.warn(
            f"reconstruction is under-determined in {len(thin)} layer(s): layer '{worst.fqn}' has {worst.rows} "
            f"calibration rows (samples x positions) for up to {worst.max_support} weights per output, so the "
            "damping decides part of the solution: use more calibration samples", stacklevel=3)


def _solve_layer(fqn: str, module: nn.Module, gram: Gram, bn: _BatchNorm | None, damping: float) -> LayerReconstruction:
    check_gram(gram)
    intercept = intercept_kind(module, bn)
    fit = intercept != "none"
    current, mask = current_rows(module, gram, fit)
    G, C = (gram.G, gram.C) if fit else (gram.G[:, :-1, :-1], gram.C[:, :-1])
    prior = current[..., : gram.d_in]  # a weight without signal on the data keeps its value (not 0)
    # float32 products: a float32 factorization rounds about as much as they did (and is 1.2-1.5x faster)
    factor = "float32" if gram.product_dtype == torch.float32 else None
    sol = masked_ridge(G, C, mask, damping=damping, intercept=fit, prior=prior, quad_of=current, factor=factor,
                       storage=gram.storage)
    before, after = gram.relative_errors(current, sol.weight, intercept=fit, quad=sol.quad).tolist()
    write_rows_(module, bn, intercept, sol.weight)
    return LayerReconstruction(fqn, gram.rows, gram.d_in, int(mask.sum(-1).max()), sol.damping, float(before),
                               float(after), intercept, gram.groups)


def _layers(model: nn.Module, calls, select: Selector
            ) -> tuple[list[tuple[str, nn.Module]], dict[str, str], dict[str, str]]:
    """Layers in execution order (attention projections and ``F.linear`` sites included), the
    ones left out with the reason, and each layer's kind (:mod:`.attention_layers`)."""
    filter_fn, holders = make_filter(select), parameter_holders(model)
    layers, skipped, kinds = [], {}, {}
    for found in refit_layers(model, calls):
        fqn, module = found.fqn, found.module
        if filter_fn is not None and not (filter_fn(module, fqn) or (found.owner != fqn and filter_fn(
                model.get_submodule(found.owner), found.owner))):
            continue
        tied = holders.get(id(stored_weight(module)), [])
        if not has_gram(module):
            skipped[fqn] = f"{type(module).__name__} layers are not reconstructed"
        elif found.calls > 1:
            skipped[fqn] = "called more than once per forward (shared weights)"
        elif len(tied) > 1:
            skipped[fqn] = f"its weight is tied ({' = '.join(tied)}): refitting it would change the other module too"
        else:
            layers.append((fqn, module))
            kinds[fqn] = found.kind
    if not layers:
        raise ValueError("found no conv/linear layer to reconstruct (Conv1d, Conv2d or Linear, called once per "
                         "forward" + (", among the selected layers)" if select is not None else ")"))
    return layers, skipped, kinds


def _not_covered(model: nn.Module, listed: set[str], select: Selector) -> dict[str, str]:
    """Prunable layers the layer-by-layer pass does not reach (their forward never ran), with the reason."""
    filter_fn = make_filter(select)
    missing = {}
    for fqn, module in model.named_modules():
        if fqn in listed or (filter_fn is not None and not filter_fn(module, fqn)):
            continue
        if is_packed_attention(module):
            missing[fqn] = "the attention module did not run"
        elif has_gram(module):
            missing[fqn] = "it did not run on the calibration data"
    return missing


def _check_architecture(layers, reference: nn.Module, kept: dict[str, torch.Tensor]) -> None:
    for fqn, module in layers:
        try:
            other = layer_module(reference, fqn)
        except AttributeError:
            other = None
        if other is None or type(other) is not type(module):
            found = "no such layer" if other is None else f"a {type(other).__name__}"
            raise ValueError(f"the reference does not match the model: layer '{fqn}' is a {type(module).__name__} "
                             f"in the model but {found} in the reference")
        w, w_ref = stored_weight(module), stored_weight(other)
        if fqn in kept:
            idx = kept[fqn]
            if len(idx) != w.shape[0] or (len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= w_ref.shape[0])):
                raise ValueError(f"kept['{fqn}'] has {len(idx)} channel indices for a layer with {w.shape[0]} outputs "
                                 f"(the reference has {w_ref.shape[0]}): give one reference index per kept output")
        elif (w.shape != w_ref.shape) if not kept else (w.shape[0] != w_ref.shape[0]):
            raise ValueError(f"the reference does not match the model: layer '{fqn}' has weight shape {list(w.shape)} "
                             f"in the model but {list(w_ref.shape)} in the reference")

