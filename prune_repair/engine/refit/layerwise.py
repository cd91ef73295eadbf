"""Layer-by-layer refits as steps of the calibration pipeline: Gram statistics of each layer with
every upstream layer already updated.

:func:`layerwise_` visits conv/linear layers in execution order. For each it accumulates
a :class:`~prune_repair.engine.refit.gram.Gram` from the layer's input in the model as it is
NOW (upstream layers already changed) and a target, then calls ``step(i, gram)``, which
may rewrite the layer; the layer's new output is what flows on. The target is the reference
model's output of the same layer on the same batch (``target=ReferenceOutputs(...)``, the
reference run beside the model by the pipeline), or, with ``target=None``, the layer's own
output before the step.

The passes are the pipeline's (:mod:`~prune_repair.engine.run.pipeline`): with one batch ONE
pass of the model (each step runs inside a hook, before the layer computes) and one streamed
pass of the reference; with several, ``passes="lockstep"`` (default: one pass per batch, the
batches meeting at every layer, all their activations at the current layer alive at once),
``"per-site"`` (one prefix pass per layer and batch, one batch in memory at a time; the
reference's outputs of upcoming layers cached up to a budget) or ``"blockwise"`` (one block of
the model, and of the reference beside it, at a time). Padded token positions (a batch dict's
``attention_mask``) are left out of every Gram.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    >>> seen = []
    >>> _ = layerwise_(model, [torch.randn(5, 3, dtype=torch.float64)],
    ...                [("0", model[0]), ("2", model[2])], step=lambda i, g: seen.append((i, g.rows)))
    >>> seen
    [(0, 5), (1, 5)]
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..run.forward import ForwardFn, as_batches, first_tensor
from ..run.lockstep import Passes
from ..run.pipeline import Arrive, Context, Reference, calibrate
from ..run.reference import ReferenceOutputs
from .attention_inputs import ReferenceCapture, attach_calls, owner_of, refresh_pruned_weight
from .gram import DEFAULT_MAX_GRAM_BYTES, Gram
from .gram_storage import GramStorage
from .shared_gram import SharedInputs

__all__ = ["LayerStep", "LayerSteps", "ReferenceOutputs", "layerwise_", "refresh_pruned_weight"]

Layer = tuple[str, nn.Module]
StepFn = Callable[[int, Gram], None]


class LayerStep:
    """One layer: its Gram statistics over the batches, then ``step(index, gram)``."""

    def __init__(self, index: int, name: str, module: nn.Module, step: StepFn, max_gram_bytes: int,
                 kind: str = "module", owner: nn.Module | None = None, shared: SharedInputs | None = None,
                 storage: GramStorage | None = None):
        self.index, self.name, self.where, self.module = index, name, name, module
        self.step, self.max_gram_bytes = step, max_gram_bytes
        self.kind, self.owner, self.shared = kind, owner, shared  # see refit.attention_layers
        self.storage = storage
        self.gram: Gram | None = None

    def _new_gram(self) -> Gram:
        return Gram.for_layer(self.module, name=self.name, max_bytes=self.max_gram_bytes, storage=self.storage)

    def add(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None) -> None:
        if self.gram is None:
            self.gram = self._new_gram()
        self.gram.add(x, y, mask=mask, shared=self.shared)

    def pool(self) -> None:
        if self.gram is None:  # nothing ran here on this rank: zeros, so every rank takes part
            self.gram = self._new_gram()
        self.gram.all_reduce_()

    def decide(self) -> None:
        gram, self.gram = self.gram, None
        if gram is None or gram.rows == 0:
            raise ValueError(f"layer '{self.name}' did not run on the calibration data: "
                             "check the data and forward_fn, or leave the layer out of the selection")
        self.step(self.index, gram)
        if self.storage is not None:  # the step keeps nothing of the statistics
            self.storage.give_back(gram.G)


class LayerSteps:
    """Layers as pipeline steps: a pre-hook (target: the reference's output) or a forward hook
    (target: the layer's own output, then recomputed with the new weights) adds each batch.
    Attention projections and ``F.linear`` sites (``kinds``, ``owners``) are reached by
    :mod:`~prune_repair.engine.refit.attention_inputs`. Layers reading the same input tensor
    share one ``X^T X`` (``readers``: the layers that may, default all). ``recycle``: the steps keep
    nothing of the Gram they are given, so its memory is reused by the next layer's
    (:class:`~prune_repair.engine.refit.gram_storage.GramStorage`)."""

    point = "layer"

    def __init__(self, layers: Sequence[Layer], step: StepFn, *, own_output: bool, what: str = "layers",
                 max_gram_bytes: int = DEFAULT_MAX_GRAM_BYTES, kinds: dict[str, str] | None = None,
                 owners: dict[str, nn.Module] | None = None, recycle: bool = False,
                 readers: Sequence[nn.Module] | None = None):
        self.what, self.own_output = what, own_output
        kinds, owners = kinds or {}, owners or {}
        shared = SharedInputs(readers=[module for _, module in layers] if readers is None else readers)
        storage = GramStorage() if recycle else None
        self.steps = [LayerStep(i, name, module, step, max_gram_bytes, kinds.get(name, "module"), owners.get(name),
                                shared, storage) for i, (name, module) in enumerate(layers)]

    @contextlib.contextmanager
    def attach(self, forward: Callable[[Any], Any], active: Sequence[int], arrive: Arrive,
               context: Context) -> Iterator[Callable[[Any], Any]]:
        def pre(k: int) -> Callable:
            def hook(module: nn.Module, inputs: tuple) -> None:
                step = self.steps[k]
                if arrive(k, lambda: step.add(inputs[0], context.reference(k), context.mask)):
                    refresh_pruned_weight(module, inputs)
            return hook

        def post(k: int) -> Callable:
            def hook(module: nn.Module, inputs: tuple, output: Any) -> Any:
                step = self.steps[k]
                if arrive(k, lambda: step.add(inputs[0], first_tensor(output), context.mask)):
                    refresh_pruned_weight(module, inputs)
                    return module.forward(*inputs)  # the output of the updated layer
                return None
            return hook

        handles = []
        try:
            for k in active:
                module = self.steps[k].module
                if self.steps[k].kind == "module":
                    handles.append(module.register_forward_hook(post(k)) if self.own_output
                                   else module.register_forward_pre_hook(pre(k)))
            with attach_calls(self.steps, active, arrive, context, self.own_output) as within:
                yield lambda batch: within(lambda: forward(batch))
        finally:
            for handle in handles:
                handle.remove()


def layerwise_(
    model: nn.Module,
    batches: Sequence[Any],
    layers: Sequence[Layer],
    *,
    step: StepFn,
    target: ReferenceOutputs | None = None,
    forward_fn: ForwardFn | None = None,
    max_gram_bytes: int = DEFAULT_MAX_GRAM_BYTES,
    passes: Passes | str = Passes.LOCKSTEP,
    blocks: Sequence[str] | None = None,
    offload: str | Path | None = None,
    progress: Any = None,
    what: str = "layers",
    kinds: dict[str, str] | None = None,
    recycle: bool = False,
    readers: Sequence[nn.Module] | None = None,
) -> int:
    """Run ``step(i, gram)`` for every layer in order (see the module doc). Returns the forwards
    made (batches x passes; a segment run counts one); ``target.passes`` counts the reference's.

    ``target``: a :class:`~prune_repair.engine.run.reference.ReferenceOutputs` naming the
    reference model (its ``keep``, ``max_bytes`` are used; the pipeline runs it) or None (each
    layer's own output). ``blocks``, ``offload``: see ``passes="blockwise"``. ``progress``: see
    :mod:`~prune_repair.engine.run.progress`. ``kinds``: layer FQN -> ``"in_proj"``, ``"out_proj"`` or
    ``"function"`` for layers not called as modules (:mod:`~prune_repair.engine.refit.attention_layers`).
    ``recycle``: ``step`` keeps no reference to the Gram (or its tensors) it is given, so the next layer's
    ``G`` reuses its memory. ``readers``: the layers that may share an ``X^T X`` with another (default: all;
    :func:`~prune_repair.engine.refit.shared_gram.shared_readers`).
    """
    batches, kinds = as_batches(batches), dict(kinds or {})
    owners = {name: owner_of(model, name) for name, kind in kinds.items() if kind in ("in_proj", "out_proj")}
    reference = None
    if target is not None:
        capture = ReferenceCapture(kinds) if any(k != "module" for k in kinds.values()) else None
        reference = Reference(target.reference, target.keep, target.max_bytes, capture=capture, lend=target.lend)
    method = LayerSteps(layers, step, own_output=target is None, what=what, max_gram_bytes=max_gram_bytes,
                        kinds=kinds, owners=owners, recycle=recycle, readers=readers)
    log = calibrate(model, batches, method, passes=passes, forward_fn=forward_fn, reference=reference,
                    blocks=blocks, offload=offload, progress=progress)
    if target is not None:
        target.passes += log.reference
    return log.forwards
