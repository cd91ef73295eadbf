"""Repair after structured pruning with torch-pruning (channels removed, shapes shrink).

After structured pruning, channel j of the reference is no longer channel j. The
pruner's history (``pruner.pruning_history()``: root layer, out/in, indices removed)
is replayed on a copy of the ORIGINAL model whose weight rows are tagged with their
channel index; the tags that survive are the kept channels of every conv/linear
layer, coupled layers (residual streams, BatchNorms) included, because torch-pruning
itself expands each history entry into its dependency group. The reference
statistics are then restricted to those channels and the model is repaired.

Three-line recipe (``model`` a module, ``batch`` a calibration tensor)::

    ref, original = pr.collect_stats(model, batch), copy.deepcopy(model)
    pruner = tp.pruner.MetaPruner(model, batch, importance=tp.importance.MagnitudeImportance(p=2),
                                  pruning_ratio=0.5, ignored_layers=[model.fc]); pruner.step()
    report = repair_structured_(model, ref, batch, original=original, history=pruner.pruning_history())

Saving: the smaller model cannot load into the original architecture, so
:func:`save_structured` writes ``{"state_dict", "pruning_history", "example_shape"}``
(plain tensors, lists and ints: it loads with ``weights_only=True``) and
:func:`load_structured_` rebuilds the shapes by replaying the history on a fresh,
unpruned instance of the architecture before loading the weights with ``strict=True``.

Example:
    >>> import copy, torch, torch_pruning as tp
    >>> import prune_repair as pr
    >>> from prune_repair.zoo.models import ResNetMini
    >>> model, batch = ResNetMini(width=8).eval(), torch.randn(32, 1, 28, 28)
    >>> ref, original = pr.collect_stats(model, batch), copy.deepcopy(model)
    >>> pruner = tp.pruner.MetaPruner(model, batch[:2], importance=tp.importance.MagnitudeImportance(p=2),
    ...                               pruning_ratio=0.5, ignored_layers=[model.fc])
    >>> pruner.step()
    >>> report = repair_structured_(model, ref, batch, original=original, history=pruner.pruning_history())
    >>> report.kept["conv1"].numel(), model.conv1.out_channels
    (4, 4)
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..engine.run.forward import ForwardFn, as_batches
from ..io.outputs import atomic_write
from ..engine.producers import out_channels
from ..engine.correct.modes import RepairMode, Variant
from ..engine.correct.repair import RepairReport, repair_  # noqa: F401  (RepairReport: annotation)
from ..engine.sites.find import PRODUCER_TYPES
from ..engine.stats.activation import ActivationStats
from .targets import PruneError

History = list[tuple[str, bool, list[int]]]
"""torch-pruning's pruning history: (root layer FQN, out-channel pruning?, removed indices)."""


def _example(data: Any) -> Any:
    batch = as_batches(data)[0]
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def _graph(model: nn.Module, example_inputs: Any, forward_fn: ForwardFn | None):
    import torch_pruning as tp

    return tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs, forward_fn=forward_fn,
                                                 verbose=False)


def replay_history_(model: nn.Module, history: History, example_inputs: Any, forward_fn: ForwardFn | None = None) -> None:
    """Prune an unpruned ``model`` in place exactly as the history says (torch-pruning replay)."""
    dg = _graph(model, example_inputs, forward_fn)
    try:
        dg.load_pruning_history([[str(n), bool(o), [int(i) for i in idx]] for n, o, idx in history])
    except (AttributeError, IndexError, KeyError, RuntimeError) as err:
        raise PruneError(
            f"the pruning history does not fit this model ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}): "
            "replay it on an unpruned model of the architecture that was pruned"
        ) from None


def kept_channels(original: nn.Module, history: History, example_inputs: Any,
                  forward_fn: ForwardFn | None = None) -> dict[str, torch.Tensor]:
    """Indices (into ``original``) of the output channels each conv/linear layer keeps.

    ``original`` is the model before pruning (it is not changed). Returns
    ``{layer FQN: LongTensor}`` for every conv/linear layer.
    """
    ghost = copy.deepcopy(original).to(torch.float64)
    example = example_inputs.to(torch.float64) if isinstance(example_inputs, torch.Tensor) and \
        example_inputs.is_floating_point() else example_inputs
    layers = {fqn: m for fqn, m in ghost.named_modules() if isinstance(m, PRODUCER_TYPES)}
    with torch.no_grad():
        for m in layers.values():
            rows = torch.arange(m.weight.shape[0], dtype=torch.float64, device=m.weight.device)
            m.weight.copy_(rows.view(-1, *([1] * (m.weight.dim() - 1))).expand_as(m.weight))
    replay_history_(ghost, history, example, forward_fn)
    return {fqn: m.weight.detach().reshape(m.weight.shape[0], -1)[:, 0].round().long().cpu()
            for fqn, m in layers.items()}


@dataclass
class StructuredReport:
    """Result of :func:`repair_structured_`: kept channels per layer and the repair report."""

    kept: dict[str, torch.Tensor]
    repair: RepairReport
    seconds: float
    channels: dict[str, tuple[int, int]] = field(default_factory=dict)  # layer -> (before, after)

    def to_dict(self) -> dict[str, Any]:
        return {"channels": {k: list(v) for k, v in self.channels.items()}, "seconds": self.seconds,
                "repair": self.repair.to_dict()}


def repair_structured_(
    model: nn.Module,
    reference: ActivationStats,
    data: Any,
    *,
    original: nn.Module | None = None,
    history: History | None = None,
    kept: dict[str, torch.Tensor] | None = None,
    example_inputs: Any = None,
    mode: RepairMode | str = RepairMode.AUTO,
    variant: Variant | str = Variant.EXACT,
    forward_fn: ForwardFn | None = None,
) -> StructuredReport:
    """Repair a structurally pruned ``model`` toward the kept channels of ``reference``, in place.

    Give either ``kept`` (layer FQN -> kept output-channel indices) or ``original``
    (the model before pruning) and ``history`` (``pruner.pruning_history()``). The
    ``reconstruct`` modes refit every smaller layer toward the ``original`` model's outputs
    of the kept channels (they need ``original``; ``reference`` is then used only by the
    statistics correction of ``reconstruct+repair``).
    ``example_inputs`` (default: the first batch of ``data``) is used to trace the
    dependency graph of ``original``. Returns a :class:`StructuredReport`.
    """
    start = time.perf_counter()
    if kept is None:
        if original is None or history is None:
            raise PruneError("structured repair needs kept=... or both original= (the unpruned model) and "
                             "history=pruner.pruning_history()")
        kept = kept_channels(original, history, example_inputs if example_inputs is not None else _example(data),
                             forward_fn)
    modules = dict(model.named_modules())
    channels = {}
    for site in reference.sites:
        idx = kept.get(site.fqn, kept.get(site.producer))
        layer = modules.get(site.producer)
        if idx is not None and layer is not None:
            out = out_channels(layer)
            if int(idx.numel()) != out:
                raise PruneError(
                    f"layer '{site.producer}' has {out} output channels but {idx.numel()} are marked kept: "
                    "the history or kept indices belong to another pruning run"
                )
            channels[site.producer] = (site.channels, out)
    if RepairMode.parse(mode, "correction").reconstructs:
        if original is None:
            raise PruneError(f"'{mode}' refits the kept weights toward the unpruned model's layer outputs: "
                             "pass original= (the model before pruning)")
        rebuilt = repair_(model, original, data, repair=RepairMode.RECONSTRUCT, forward_fn=forward_fn,
                          kept={f: idx for f, idx in kept.items() if f in modules})
        if RepairMode.parse(mode, "correction") is RepairMode.RECONSTRUCT:
            return StructuredReport(kept, rebuilt, time.perf_counter() - start, channels)
        report = repair_(model, reference.select_channels(kept), data, repair=RepairMode.AUTO, variant=variant,
                         forward_fn=forward_fn)
        report.mode, report.extra["reconstruct"] = RepairMode.RECONSTRUCT_REPAIR.value, rebuilt.extra["reconstruct"]
        return StructuredReport(kept, report, time.perf_counter() - start, channels)
    goal = reference.select_channels(kept)
    report = repair_(model, goal, data, repair=mode, variant=variant, forward_fn=forward_fn)
    return StructuredReport(kept, report, time.perf_counter() - start, channels)


def save_structured(model: nn.Module, path: str | os.PathLike[str], history: History, example_inputs: torch.Tensor) -> None:
    """Save a structurally pruned model so :func:`load_structured_` can rebuild it.

    The file holds ``state_dict``, ``pruning_history`` and the shape/dtype of the
    example input, and loads with ``torch.load(..., weights_only=True)``. It is written
    atomically (temporary file, fsync, rename).
    """
    payload = {
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "pruning_history": [[str(n), bool(o), [int(i) for i in idx]] for n, o, idx in history],
        "example_shape": [int(s) for s in example_inputs.shape],
        "example_dtype": str(example_inputs.dtype).removeprefix("torch."),
    }
    with atomic_write(path) as tmp, open(tmp, "wb") as fh:
        torch.save(payload, fh)


def load_structured_(path: str | os.PathLike[str], model: nn.Module) -> nn.Module:
    """Load a file written by :func:`save_structured` into ``model``, a fresh UNPRUNED
    instance of the architecture: the history is replayed to shrink it, then the
    weights load with ``strict=True``. Returns ``model`` in eval mode."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or not {"state_dict", "pruning_history", "example_shape"} <= set(blob):
        raise PruneError(f"{path} was not written by save_structured: it lacks state_dict/pruning_history/example_shape")
    dtype = getattr(torch, str(blob.get("example_dtype", "float32")), torch.float32)
    if dtype.is_floating_point:  # float inputs follow the model's precision
        dtype = next(model.parameters()).dtype
    example = torch.zeros(blob["example_shape"], dtype=dtype)
    replay_history_(model, blob["pruning_history"], example)
    try:
        model.load_state_dict(blob["state_dict"], strict=True)
    except RuntimeError as err:
        raise PruneError(f"{path} does not fit this architecture after replaying its history "
                         f"({str(err).splitlines()[0]}): build the model with the same architecture and arguments") from None
    return model.eval()
