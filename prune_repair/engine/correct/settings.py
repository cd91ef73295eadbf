"""``RepairSettings``: every option of one correction as one small object.

A flow that repairs after some surgery (``prune_and_repair``, the CLI) takes one
:class:`RepairSettings` instead of a dozen keywords: which correction, how the calibration
batches are gone over (``passes``, ``blocks``, ``offload``, ``batch_size``), progress, the
goal statistics and the reconstruction's ridge options. It is checked when made, so a bad
combination is refused before any work, and :meth:`RepairSettings.repair_` runs
:func:`~prune_repair.engine.correct.repair.repair_` with it.

Example:
    >>> import torch
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> batch = torch.randn(64, 8)
    >>> settings = RepairSettings("repair", passes="per-site", batch_size=16)
    >>> goal = settings.reference(model, batch)
    >>> with torch.no_grad():
    ...     _ = model[0].weight.mul_(3.0)
    >>> [s.fqn for s in settings.repair_(model, goal, batch).sites]
    ['0']
    >>> RepairSettings("repair", offload="cpu")
    Traceback (most recent call last):
    ...
    ValueError: offload= applies to passes='blockwise' only: add passes='blockwise' (--passes blockwise)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..run.forward import ForwardFn
from ..run.lockstep import Passes
from ..run.progress import ProgressArg
from ..stats.activation import ActivationStats, collect_stats
from .modes import RepairMode, Variant
from .report import RepairReport
from .repair import repair_


@dataclass
class RepairSettings:
    """How a model is corrected after a surgery (see the module doc).

    repair, variant: a :class:`RepairMode` (``none`` skips the correction) and a :class:`Variant`.
    passes, blocks, offload: how the calibration batches are gone over (every pass of the flow:
    statistics, OBS, repair, reconstruction; see :func:`~prune_repair.engine.correct.repair.repair_`).
    batch_size: a calibration tensor is split into batches of this many samples (exact all the
    same; bounds the memory of one pass). progress: as in :mod:`~prune_repair.engine.run.progress`.
    include_classifier: also correct the classifier's logits. goal: statistics to repair toward
    instead of measuring the reference on the data. damping, reconstruct: the ridge damping and
    further keywords (``max_gram_bytes``, ...) of the reconstruct modes.
    """

    repair: RepairMode | str = RepairMode.AUTO
    variant: Variant | str = Variant.EXACT
    passes: Passes | str = Passes.LOCKSTEP
    blocks: Sequence[str] | None = None
    offload: str | Path | None = None
    batch_size: int | None = None
    progress: ProgressArg = None
    include_classifier: bool = False
    goal: ActivationStats | None = field(default=None, repr=False)
    damping: float = 1e-2
    reconstruct: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.repair = RepairMode.parse(self.repair, "correction")
        self.variant = Variant.parse(self.variant, "variant")
        self.passes = Passes.parse(self.passes, "passes")
        if (self.blocks is not None or self.offload is not None) and self.passes is not Passes.BLOCKWISE:
            what = "offload=" if self.offload is not None else "blocks="
            raise ValueError(f"{what} applies to passes='blockwise' only: add passes='blockwise' (--passes blockwise)")
        if self.offload not in (None, "cpu") and Path(self.offload).expanduser().is_file():
            raise ValueError(f"offload {self.offload} is a file: give a folder (it is created if missing) or 'cpu'")
        if self.passes is not Passes.LOCKSTEP and self.variant is not Variant.EXACT:
            raise ValueError(f"passes='{self.passes.value}' chooses how the exact variant goes over the batches; "
                             f"'{self.variant.value}' makes one pass anyway: leave passes at its default")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.goal is not None and self.repair.reconstructs:
            raise ValueError(f"repair '{self.repair.value}' fits the reference model's layer outputs: it cannot use "
                             "goal statistics (drop the goal, or use repair/rescale)")
        if self.reconstruct and not self.repair.reconstructs:
            raise ValueError(f"reconstruct options ({', '.join(sorted(self.reconstruct))}) apply to the reconstruct "
                             f"modes only, not to '{self.repair.value}'")

    @property
    def mode(self) -> RepairMode:
        return self.repair  # parsed in __post_init__

    def where(self) -> dict[str, Any]:
        """``passes``, ``blocks``, ``offload``, ``progress``: the pass keywords every pipeline step takes."""
        return {"passes": self.passes, "blocks": self.blocks, "offload": self.offload, "progress": self.progress}

    def batches(self, data: Any) -> Any:
        """``data`` split into batches of ``batch_size`` samples when it is one larger tensor (or dict of
        tensors), else as given."""
        size = self.batch_size
        if size and torch.is_tensor(data) and len(data) > size:
            return list(data.split(size))
        if size and isinstance(data, dict) and data and all(torch.is_tensor(v) and v.dim() for v in data.values()):
            lengths = {len(v) for v in data.values()}
            if len(lengths) == 1 and lengths.pop() > size:  # a dict batch (HF inputs): split every entry alike
                return [dict(zip(data, parts)) for parts in zip(*(v.split(size) for v in data.values()))]
        return data

    def reference(self, model: nn.Module, data: Any, forward_fn: ForwardFn | None = None
                  ) -> ActivationStats | nn.Module | None:
        """What :meth:`repair_` corrects toward: ``model`` itself for the reconstruct modes, else ``goal``
        or ``model``'s statistics on ``data`` (None for ``repair='none'``)."""
        if self.mode is RepairMode.NONE:
            return None
        if self.mode.reconstructs:
            return model
        if self.goal is not None:
            return self.goal
        return collect_stats(model, self.batches(data), include_classifier=self.include_classifier,
                             forward_fn=forward_fn, **self.where())

    def repair_(self, model: nn.Module, reference: ActivationStats | nn.Module, data: Any,
                forward_fn: ForwardFn | None = None) -> RepairReport:
        """:func:`~prune_repair.engine.correct.repair.repair_` of ``model`` toward ``reference`` with these settings."""
        extra = {"damping": self.damping, **self.reconstruct} if self.mode.reconstructs else {}
        return repair_(model, reference, self.batches(data), repair=self.mode, variant=self.variant,
                       forward_fn=forward_fn, **self.where(), **extra)
