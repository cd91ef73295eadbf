"""The calibration pipeline: every method that observes the data and then changes the model runs on it.

A method is a list of **steps** (a site, a layer) in execution order and an ``attach`` that
hooks them into the model. When a batch's tensors reach step ``k``, the method's hook calls
``arrive(k, contribute)``: ``contribute()`` adds this batch's tensors to the step's statistics.
The pipeline decides when: once every batch has contributed, it pools the statistics across
``torch.distributed`` ranks (``step.pool()``) and calls ``step.decide()``, which decides AND
applies (a correction the hook applies from now on, or new weights) before anything downstream
of the step runs. ``arrive`` returns True when the step was decided during the call (a hook
that computed the module's output beforehand recomputes it).

The pipeline owns everything else, once for every method: the batches and ``forward_fn``,
padding masks (:attr:`Context.mask`), an optional reference model run beside the model
(:meth:`Context.reference`: the reference's output of the step's module on the same batch),
progress (:mod:`.progress`), and the pass strategy (:mod:`.strategies`):

- one batch in all: ONE inline pass (each step decided inside its hook);
- ``Passes.LOCKSTEP``: one pass per batch, the batches in step at every step (:mod:`.lockstep`);
- ``Passes.PER_SITE``: one prefix pass per step over the data, one batch at a time;
- ``Passes.BLOCKWISE``: one block of the model at a time (:mod:`.block_chain`), its inputs
  stored on the device, in host memory or in files (``offload``);
- ``all_at_once``: one pass where every step observes the uncorrected model, then all decide.

Example (a step that counts the rows reaching a layer, then halves its weight):
    >>> import contextlib, torch
    >>> from torch import nn
    >>> from .forward import hooked_pass
    >>> class Halve:
    ...     def __init__(self, name, module):
    ...         self.name = self.where = name
    ...         self.module, self.rows = module, 0
    ...     def pool(self): pass
    ...     def decide(self): self.module.weight.mul_(0.5)
    >>> class Halving:
    ...     what, point = "halve", "layer"
    ...     def __init__(self, model):
    ...         self.steps = [Halve(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    ...     @contextlib.contextmanager
    ...     def attach(self, forward, active, arrive, context):
    ...         def hook(k):
    ...             def count(module, args):
    ...                 step = self.steps[k]
    ...                 arrive(k, lambda: setattr(step, "rows", step.rows + len(args[0])))
    ...             return count
    ...         handles = [self.steps[k].module.register_forward_pre_hook(hook(k)) for k in active]
    ...         yield forward
    ...         for h in handles: h.remove()
    >>> model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    >>> method = Halving(model)
    >>> log = calibrate(model, [torch.randn(4, 2), torch.randn(6, 2)], method)
    >>> [s.rows for s in method.steps], log.passes
    ([10, 10], [1])
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from . import distributed
from .forward import ForwardFn, as_batches
from .lockstep import Passes
from .progress import Progress, ProgressArg
from .steps import Arrive, Context, Method, PassLog, Reference, Step
from .strategies import Runner

__all__ = ["Arrive", "Context", "Method", "PassLog", "Reference", "Step", "calibrate"]


def calibrate(model: nn.Module, data: Any, method: Method, *, passes: Passes | str = Passes.LOCKSTEP,
              all_at_once: bool = False, forward_fn: ForwardFn | None = None, reference: Reference | None = None,
              blocks: Sequence[str] | None = None, offload: str | Path | None = None,
              progress: ProgressArg = None) -> PassLog:
    """Run ``method`` over ``data`` under the ``passes`` strategy (see the module doc); every step is
    decided exactly once, in order (a step no batch reached is decided after the passes).

    Raises:
        ValueError: ``blocks``/``offload`` without ``passes='blockwise'``, ``all_at_once`` with
            ``passes`` other than the default; a strategy that cannot run on this model (the
            blockwise chain, a lockstep pass on data-dependent paths: named).
    """
    passes = Passes.parse(passes, "passes")
    if (blocks is not None or offload is not None) and passes is not Passes.BLOCKWISE:
        raise ValueError("blocks= and offload= apply to passes='blockwise' only: add passes='blockwise'")
    if all_at_once and passes is not Passes.LOCKSTEP:
        raise ValueError(f"an all-at-once calibration makes one pass over the batches, so passes='{passes.value}' "
                         "does not apply: leave passes at its default")
    batches = as_batches(data)
    several = distributed.all_reduce_max(float(len(batches) > 1)) > 0  # every rank takes the same path
    with Progress(method.what, len(method.steps), progress) as bar:
        runner = Runner(model, batches, method, forward_fn, reference, bar)
        if all_at_once:
            runner.all_at_once()
        elif passes is Passes.BLOCKWISE:
            runner.blockwise(several, blocks, offload)
        elif not several:
            runner.inline()
        elif passes is Passes.LOCKSTEP:
            runner.lockstep()
        else:
            runner.per_site()
        runner.decide_rest()
    return runner.log
