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

import threading
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from . import distributed
from .forward import ForwardFn, as_batches
from .lockstep import Passes
from .progress import Progress
from .reference import Keep, ReferenceOutputs, copy_output

Arrive = Callable[[int, Callable[[], None]], bool]
"""``arrive(k, contribute) -> decided_now``: called by a hook when a batch reaches step ``k``."""


class Step(Protocol):
    """One point of a method: a site or a layer."""

    name: str  # in errors and progress
    where: str  # the module it runs in (which block holds it; the reference's module of the same name)

    def pool(self) -> None:
        """Pool this rank's statistics with every other rank's (called only under torch.distributed)."""

    def decide(self) -> None:
        """Decide from everything observed and apply it (also when nothing was observed)."""


class Method(Protocol):
    """A calibration method: its steps in execution order and the hooks that reach them."""

    what: str  # "repair", "reconstruct", ... (progress)
    point: str  # "site" or "layer" (errors)
    steps: Sequence[Step]

    def attach(self, forward: Callable[[Any], Any], active: Sequence[int], arrive: Arrive,
               context: "Context") -> AbstractContextManager[Callable[[Any], Any]]:
        """Hook the ``active`` steps into the model for a pass; yields ``run(batch)`` (``forward`` wrapped)."""


class Context:
    """What a step's hook may ask about the batch being run (per thread: lockstep runs several)."""

    def __init__(self, masks: Sequence[torch.Tensor | None]):
        self.masks = list(masks)
        self._local = threading.local()
        self.targets: ReferenceOutputs | None = None
        self.index_of: dict[int, int] = {}

    @property
    def batch(self) -> int:
        """The index of the batch the calling thread runs."""
        return self._local.batch

    @batch.setter
    def batch(self, b: int) -> None:
        self._local.batch = b

    @property
    def mask(self) -> torch.Tensor | None:
        """The batch's padding mask (``attention_mask`` as bool, True = a real token), or None."""
        return self.masks[self.batch]

    def reference(self, k: int) -> torch.Tensor:
        """The reference model's output of step ``k``'s module on this batch."""
        if self.targets is None:
            raise RuntimeError("this calibration runs no reference model beside the model")
        return self.targets(self.batch, self.index_of[k])


@dataclass
class Reference:
    """A reference model streamed beside the calibrated one (outputs at each step's module)."""

    model: nn.Module
    keep: Keep = copy_output
    cache_bytes: int = 2**30


@dataclass
class PassLog:
    """What a calibration ran: ``passes`` per segment (one segment unless blockwise; each pass runs
    every batch once), ``forwards`` (batch runs of the model or of one segment), ``reference``
    (batch runs of the reference) and ``blocks`` (0 unless blockwise)."""

    passes: list[int] = field(default_factory=lambda: [0])
    forwards: int = 0
    reference: int = 0
    blocks: int = 0

    @property
    def max_passes(self) -> int:
        return max(self.passes)

    def blockwise(self) -> dict[str, int]:
        return {"blocks": self.blocks, "segment_passes": sum(self.passes), "max_passes": self.max_passes}


def calibrate(model: nn.Module, data: Any, method: Method, *, passes: Passes | str = Passes.LOCKSTEP,
              all_at_once: bool = False, forward_fn: ForwardFn | None = None, reference: Reference | None = None,
              blocks: Sequence[str] | None = None, offload: str | Path | None = None, progress: Any = None) -> PassLog:
    """Run ``method`` over ``data`` under the ``passes`` strategy (see the module doc); every step is
    decided exactly once, in order (a step no batch reached is decided after the passes).

    Raises:
        ValueError: ``blocks``/``offload`` without ``passes='blockwise'``; ``all_at_once`` with
            another strategy than the default; a strategy that cannot run on this model (named).
    """
    from .strategies import Runner  # the strategies build on the names above

    passes = Passes.parse(passes, "passes")
    if (blocks is not None or offload is not None) and passes is not Passes.BLOCKWISE:
        raise ValueError("blocks= and offload= apply to passes='blockwise' only: add passes='blockwise'")
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
