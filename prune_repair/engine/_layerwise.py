"""Layer-by-layer passes: Gram statistics of each layer with every upstream layer already updated.

:func:`layerwise_` visits conv/linear layers in execution order. For each it accumulates
a :class:`~prune_repair.engine.gram.Gram` from the layer's input in the model as it is
NOW (upstream layers already changed) and a target, then calls ``step(i, gram)``, which
may rewrite the layer. Targets come from ``target(batch_index, layer_index)`` (e.g.
:class:`ReferenceOutputs`), or, with ``target=None``, are the layer's own output before
the step.

Cost: with one batch, ONE pass of the model (each step runs inside a hook, before the
layer computes, so downstream layers see the updated output). With several batches, one
prefix pass per layer per batch (stopped at that layer), since the statistics of every
batch are needed before the step. :class:`ReferenceOutputs` runs the reference once per
batch and caches the outputs of upcoming layers up to a memory budget; a further prefix
pass refills the cache only when the budget was reached.

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

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.utils.prune as torch_prune
from torch import nn

from ._forward import ForwardFn, StopForward, first_tensor, hooked_pass
from .gram import DEFAULT_MAX_GRAM_BYTES, Gram

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

    def __call__(self, b: int, i: int) -> torch.Tensor:
        for key in [k for k in self.cache if k[0] == b and k[1] < i]:
            del self.cache[key]  # layers already done
        if (b, i) not in self.cache:
            self._fill(b, i)
        return self.cache.pop((b, i))

    def _fill(self, b: int, i: int) -> None:
        index = {self.fqns[j]: j for j in range(i, len(self.fqns))}
        modules = dict(self.reference.named_modules())
        used = 0

        def hook(module, inputs, output, fqn):
            nonlocal used
            j = index[fqn]
            y = first_tensor(output)
            if fqn in self.kept:
                y = y.index_select(1 if not isinstance(module, nn.Linear) else -1, self.kept[fqn].to(y.device))
            self.cache[(b, j)] = y
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
) -> int:
    """Run ``step(i, gram)`` for every layer in order (see the module doc). Returns the passes made."""
    batches, layers = list(batches), list(layers)
    done = [False] * len(layers)
    inline = len(batches) == 1
    current, grams = [0], {}

    def consume(i: int, inputs: tuple, y: torch.Tensor) -> None:
        fqn, module = layers[i]
        if inline:
            gram = Gram.for_layer(module, name=fqn, max_bytes=max_gram_bytes)
            gram.add(inputs[0], y)
            step(i, gram.all_reduce_())
            refresh_pruned_weight(module, inputs)
        else:
            grams[i].add(inputs[0], y)
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
        with hooked_pass(model, forward_hooks=fwd, pre_hooks=pre, forward_fn=forward_fn) as run:
            run(batches[0])
        _check_ran(layers, done)
        return 1
    passes = 0
    for i, (fqn, module) in enumerate(layers):
        grams = {i: Gram.for_layer(module, name=fqn, max_bytes=max_gram_bytes)}
        fwd, pre = hooks([i])
        with hooked_pass(model, forward_hooks=fwd, pre_hooks=pre, forward_fn=forward_fn) as run:
            for b, batch in enumerate(batches):
                current[0] = b
                run(batch)
                passes += 1
        _check_ran(layers[i:i + 1], done[i:i + 1])
        step(i, grams.pop(i).all_reduce_())
    return passes


def _check_ran(layers: Sequence[Layer], done: Sequence[bool]) -> None:
    missing = [fqn for (fqn, _), ok in zip(layers, done) if not ok]
    if missing:
        raise ValueError(f"layer '{missing[0]}' did not run on the calibration data: "
                         "check the data and forward_fn, or leave the layer out of the selection")
