"""Layer-by-layer passes: Gram statistics of each layer with every upstream layer already updated.

:func:`layerwise_` visits conv/linear layers in execution order. For each it accumulates
a :class:`~prune_repair.engine.refit.gram.Gram` from the layer's input in the model as it is
NOW (upstream layers already changed) and a target, then calls ``step(i, gram)``, which
may rewrite the layer. Targets come from ``target(batch_index, layer_index)`` (e.g.
:class:`ReferenceOutputs`), or, with ``target=None``, are the layer's own output before
the step.

Cost: with one batch, ONE pass of the model (each step runs inside a hook, before the
layer computes, so downstream layers see the updated output) and, with
:class:`ReferenceOutputs` targets, one streamed pass of the reference. With several batches, by
default (``passes="lockstep"``) also one pass per batch: the batches run side by side in
threads that meet at every layer (:mod:`~prune_repair.engine.run.lockstep`), each adds its Gram
statistics, the step runs once all have, and all go on with the updated layer; the
activations of all batches at the current layer (of the model, and of the reference) are
alive at once, like one batch of their total size. ``passes="per-site"`` makes one prefix pass per layer per batch instead (one
batch in memory at a time). :class:`ReferenceOutputs` runs the reference once per batch:
with one batch and in lockstep each batch's reference forward pauses at the layer asked for
next (one reference output alive at a time); with ``per-site`` passes it caches the outputs
of upcoming layers up to a memory budget, and a further prefix pass refills the cache only
when the budget was reached. Padded token positions (a batch dict's ``attention_mask``) are
left out of every Gram.

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
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.utils.prune as torch_prune
from torch import nn

from ..run.forward import ForwardFn, StopForward, first_tensor, hooked_pass
from .gram import DEFAULT_MAX_GRAM_BYTES, Gram, reads_last_dim
from ..sites.taps import batch_mask
from ..run.lockstep import Lockstep, Passes, Stream

Layer = tuple[str, nn.Module]
TargetFn = Callable[[int, int], torch.Tensor]
StepFn = Callable[[int, Gram], None]


class ReferenceOutputs:
    """Outputs of the reference model's layers (same FQNs), per batch, cached within a budget.

    ``kept`` maps an FQN to the output channels to keep (after structured pruning).
    """

    def __init__(self, reference: nn.Module, batches: Sequence[Any], fqns: Sequence[str], *,
                 kept: dict[str, torch.Tensor] | None = None, forward_fn: ForwardFn | None = None,
                 max_bytes: int = 2**30):
        self.reference, self.batches, self.fqns = reference, list(batches), list(fqns)
        self.kept, self.forward_fn = kept or {}, forward_fn
        self.per_batch = max(1, max_bytes // max(1, len(self.batches)))
        self.cache: dict[tuple[int, int], torch.Tensor] = {}
        self.passes = 0
        self._streams: dict[int, Stream] | None = None
        self._produce: Callable[[int], Callable] | None = None

    def __call__(self, b: int, i: int) -> torch.Tensor:
        for key in [k for k in self.cache if k[0] == b and k[1] < i]:
            del self.cache[key]  # layers already done
        if self._streams is not None:
            self._pull(b, i)
        elif (b, i) not in self.cache:
            self._fill(b, i)
        return self.cache.pop((b, i))

    def _keep(self, module: nn.Module, fqn: str, output: Any) -> torch.Tensor:
        """The layer's output, a copy (a later in-place op, e.g. ``ReLU(inplace=True)``, must not
        change it), with the kept channels only."""
        y = first_tensor(output)
        if fqn in self.kept:
            return y.index_select(-1 if reads_last_dim(module) else 1, self.kept[fqn].to(y.device))
        return y.clone()

    @contextlib.contextmanager
    def streaming(self) -> Iterator["ReferenceOutputs"]:
        """Within the block, the reference runs ONCE per batch, in a thread that pauses at each
        layer until its output is asked for (:class:`~prune_repair.engine.run.lockstep.Stream`):
        nothing is cached ahead and no prefix pass is repeated. The paused forwards are
        stopped on exit."""
        modules = dict(self.reference.named_modules())
        index = {fqn: j for j, fqn in enumerate(self.fqns)}
        local = threading.local()

        def hook(module, inputs, output, fqn):
            local.emit((index[fqn], self._keep(module, fqn, output)))

        hooks = {modules[f]: (lambda m, a, o, f=f: hook(m, a, o, f)) for f in self.fqns}
        with hooked_pass(self.reference, forward_hooks=hooks, forward_fn=self.forward_fn) as run:

            def produce(b: int) -> Callable:
                def forward(emit: Callable[[Any], None]) -> None:
                    local.emit = emit
                    run(self.batches[b])
                return forward

            self._streams, self._produce = {}, produce
            try:
                yield self
            finally:
                streams, self._streams, self._produce = self._streams, None, None
                for stream in streams.values():
                    stream.close()

    def _pull(self, b: int, i: int) -> None:
        while (b, i) not in self.cache:
            if b not in self._streams:
                self._streams[b] = Stream(self._produce(b))
                self.passes += 1
            more, item = self._streams[b].next()
            if not more:
                raise ValueError(f"layer '{self.fqns[i]}' of the reference did not run on the calibration data")
            j, y = item
            if j >= i:  # an earlier layer the model has passed is not needed any more
                self.cache[(b, j)] = y

    def _fill(self, b: int, i: int) -> None:
        index = {self.fqns[j]: j for j in range(i, len(self.fqns))}
        modules = dict(self.reference.named_modules())
        used = 0

        def hook(module, inputs, output, fqn):
            nonlocal used
            j = index[fqn]
            y = self.cache[(b, j)] = self._keep(module, fqn, output)
            used += y.numel() * y.element_size()
            if used >= self.per_batch and j >= i or j == len(self.fqns) - 1:
                raise StopForward

        hooks = {modules[f]: (lambda m, a, o, f=f: hook(m, a, o, f)) for f in index}
        with hooked_pass(self.reference, forward_hooks=hooks, forward_fn=self.forward_fn) as run:
            run(self.batches[b])
        self.passes += 1
        if (b, i) not in self.cache:
            raise ValueError(f"layer '{self.fqns[i]}' of the reference did not run on the calibration data")


def refresh_pruned_weight(module: nn.Module, inputs: tuple) -> None:
    """Recompute ``weight`` from ``weight_orig * weight_mask`` after ``weight_orig`` changed."""
    for hook in list(module._forward_pre_hooks.values()):
        if isinstance(hook, torch_prune.BasePruningMethod):
            hook(module, inputs)


def layerwise_(
    model: nn.Module,
    batches: Sequence[Any],
    layers: Sequence[Layer],
    *,
    step: StepFn,
    target: TargetFn | None = None,
    forward_fn: ForwardFn | None = None,
    max_gram_bytes: int = DEFAULT_MAX_GRAM_BYTES,
    passes: Passes | str = Passes.LOCKSTEP,
) -> int:
    """Run ``step(i, gram)`` for every layer in order (see the module doc). Returns the forwards
    made (batches x passes); ``passes`` chooses how several batches are gone over."""
    batches, layers, passes = list(batches), list(layers), Passes.parse(passes, "passes")
    if passes is Passes.BLOCKWISE:
        raise ValueError("layerwise_ runs the whole model: blockwise passes are blockwise_layerwise_'s "
                         "(reconstruct_(passes='blockwise'))")
    masks = [batch_mask(batch) for batch in batches]  # padded token positions are left out of the Grams
    done = [False] * len(layers)
    inline = len(batches) == 1
    current, grams = [0], {}

    def consume(i: int, inputs: tuple, y: torch.Tensor) -> None:
        fqn, module = layers[i]
        if inline:
            gram = Gram.for_layer(module, name=fqn, max_bytes=max_gram_bytes)
            gram.add(inputs[0], y, mask=masks[0])
            step(i, gram.all_reduce_())
            refresh_pruned_weight(module, inputs)
        else:
            grams[i].add(inputs[0], y, mask=masks[current[0]])
        done[i] = True
        if not inline or i == len(layers) - 1:
            raise StopForward

    def hooks(indices: Sequence[int]) -> tuple[dict, dict]:
        if target is None:
            def post(mod, inputs, output, i):
                consume(i, inputs, first_tensor(output))
                return mod.forward(*inputs)  # the output of the updated layer
            return {layers[i][1]: (lambda m, a, o, i=i: post(m, a, o, i)) for i in indices}, {}
        return {}, {layers[i][1]: (lambda m, a, i=i: consume(i, a, target(current[0], i))) for i in indices}

    if inline:
        fwd, pre = hooks(range(len(layers)))
        with _streamed(target), hooked_pass(model, forward_hooks=fwd, pre_hooks=pre, forward_fn=forward_fn) as run:
            run(batches[0])
        _check_ran(layers, done)
        return 1
    if passes is Passes.LOCKSTEP:
        return _in_lockstep(model, batches, masks, layers, step, target, forward_fn, max_gram_bytes)
    made = 0
    for i, (fqn, module) in enumerate(layers):
        grams = {i: Gram.for_layer(module, name=fqn, max_bytes=max_gram_bytes)}
        fwd, pre = hooks([i])
        with hooked_pass(model, forward_hooks=fwd, pre_hooks=pre, forward_fn=forward_fn) as run:
            for b, batch in enumerate(batches):
                current[0] = b
                run(batch)
                made += 1
        _check_ran(layers[i:i + 1], done[i:i + 1])
        step(i, grams.pop(i).all_reduce_())
    return made


def _streamed(target: TargetFn | None) -> contextlib.AbstractContextManager:
    """Reference targets streamed (the reference runs once per batch, nothing cached ahead)."""
    return target.streaming() if isinstance(target, ReferenceOutputs) else contextlib.nullcontext()


def _in_lockstep(model: nn.Module, batches: list[Any], masks: list[torch.Tensor | None], layers: list[Layer],
                 step: StepFn, target: TargetFn | None, forward_fn: ForwardFn | None, max_gram_bytes: int) -> int:
    """:func:`layerwise_` over several batches in one pass per batch (see the module doc)."""
    lock, grams, done = Lockstep("layer"), {}, [False] * len(layers)

    def contribute(i: int, x: torch.Tensor, y: torch.Tensor) -> None:
        if i not in grams:
            grams[i] = Gram.for_layer(layers[i][1], name=layers[i][0], max_bytes=max_gram_bytes)
        grams[i].add(x, y, mask=masks[lock.current()])

    def decide(i: int, inputs: tuple) -> None:
        step(i, grams.pop(i).all_reduce_())
        refresh_pruned_weight(layers[i][1], inputs)
        done[i] = True

    def meet(i: int, inputs: tuple, y: Callable[[], torch.Tensor]) -> None:
        lock.meet(i, layers[i][0], lambda: contribute(i, inputs[0], y()), lambda: decide(i, inputs))
        if lock.all_decided(len(layers)):
            raise StopForward  # every layer is done: nothing downstream is needed

    if target is None:
        def post(module: nn.Module, inputs: tuple, output: Any, i: int) -> Any:
            meet(i, inputs, lambda: first_tensor(output))
            return module.forward(*inputs)  # the output of the updated layer
        fwd, pre = {m: (lambda m, a, o, i=i: post(m, a, o, i)) for i, (_, m) in enumerate(layers)}, {}
    else:
        fwd, pre = {}, {m: (lambda m, a, i=i: meet(i, a, lambda: target(lock.current(), i)))
                        for i, (_, m) in enumerate(layers)}
    with _streamed(target), hooked_pass(model, forward_hooks=fwd, pre_hooks=pre, forward_fn=forward_fn) as run:
        lock.run([lambda batch=batch: run(batch) for batch in batches])
    _check_ran(layers, done)
    return len(batches)


def _check_ran(layers: Sequence[Layer], done: Sequence[bool]) -> None:
    missing = [fqn for (fqn, _), ok in zip(layers, done) if not ok]
    if missing:
        raise ValueError(f"layer '{missing[0]}' did not run on the calibration data: "
                         "check the data and forward_fn, or leave the layer out of the selection")
