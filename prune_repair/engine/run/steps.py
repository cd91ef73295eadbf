"""What a method sees of the calibration pipeline (:mod:`.pipeline`): its steps, the ``arrive``
call its hooks make, the per-batch :class:`Context`, and what a calibration ran (:class:`PassLog`).

Example:
    >>> log = PassLog([2, 1])
    >>> log.max_passes, log.blockwise()
    (2, {'blocks': 0, 'segment_passes': 3, 'max_passes': 2})
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from .reference import Capture, Keep, ReferenceOutputs, copy_output

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
        """The reference model's output of step ``k``'s module on this batch; use it before asking for
        another (it may be the reference's own tensor, which its forward goes on with afterwards)."""
        if self.targets is None:
            raise RuntimeError("this calibration runs no reference model beside the model")
        return self.targets(self.batch, self.index_of[k])


@dataclass
class Reference:
    """A reference model streamed beside the calibrated one (outputs at each step's module;
    ``capture``: how they are reached, default forward hooks on the modules of those names)."""

    model: nn.Module
    keep: Keep = copy_output
    cache_bytes: int = 2**30
    capture: Capture | None = None
    lend: Keep | None = None


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
