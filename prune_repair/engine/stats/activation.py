"""Per-channel activation statistics of a model's sites: :class:`ActivationStats` (float64,
mergeable, serializable) and :func:`collect_stats`, which measures them with the observe-only
steps of :mod:`.collect` on the calibration pipeline (any pass strategy, any number of ranks).

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> stats = collect_stats(model, torch.randn(32, 4))
    >>> list(stats.keys()), stats["0"].mean.dtype, stats["0"].std.shape
    (['0'], torch.float64, torch.Size([8]))
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager as ContextManager
import dataclasses
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..producers import site_owner
from ..run import distributed
from ..run.forward import ForwardFn, as_batches, head
from ..run.lockstep import Passes
from ..run.pipeline import PassLog, calibrate
from ..run.progress import ProgressArg
from ..sites.discover import Discovery, Key
from ..sites.find import Selector, Site, block_modules, find_sites
from .channel import ChannelStats, merge_moments
from .collect import StatsSteps

__all__ = ["ActivationStats", "ChannelStats", "collect_stats", "merge_moments"]


class ActivationStats(Mapping[str, ChannelStats]):
    """Statistics of every site of a model, keyed by the site's FQN.

    Carries the :class:`~prune_repair.engine.sites.find.Site` list it was measured on, so a
    repair can reuse it without tracing the model again. Saves with
    :meth:`save` and loads with ``weights_only=True``.
    """

    def __init__(self, sites: list[Site], stats: dict[str, ChannelStats]):
        self.sites = list(sites)
        self._stats = dict(stats)

    def __getitem__(self, fqn: str) -> ChannelStats:
        return self._stats[fqn]

    def __iter__(self) -> Iterator[str]:
        return iter(self._stats)

    def __len__(self) -> int:
        return len(self._stats)

    def __repr__(self) -> str:
        return f"ActivationStats({len(self)} sites, {sum(s.channels for s in self.sites)} channels)"

    def site(self, fqn: str) -> Site:
        return next(s for s in self.sites if s.fqn == fqn)

    def interpolate(self, other: "ActivationStats", alpha: float) -> "ActivationStats":
        """Goal statistics for a merge at ``alpha``: means and STDs lerped (REPAIR eq. 3-4).

        >>> a = ActivationStats([], {"l": ChannelStats.from_moments(torch.zeros(1), torch.ones(1))})
        >>> b = ActivationStats([], {"l": ChannelStats.from_moments(torch.ones(1), 3 * torch.ones(1))})
        >>> a.interpolate(b, 0.5)["l"].std
        tensor([2.], dtype=torch.float64)
        """
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        missing = [k for k in self if k not in other]
        if missing:
            raise ValueError(f"cannot interpolate statistics: site '{missing[0]}' is missing from the second set")
        goal = {}
        for fqn, a in self.items():
            b = other[fqn]
            if a.mean.shape != b.mean.shape:
                raise ValueError(
                    f"cannot interpolate statistics of site '{fqn}': {a.mean.numel()} vs {b.mean.numel()} channels"
                )
            goal[fqn] = ChannelStats.from_moments(
                (1 - alpha) * a.mean + alpha * b.mean, (1 - alpha) * a.std + alpha * b.std
            )
        return ActivationStats(self.sites, goal)

    def select_channels(self, kept: Mapping[str, torch.Tensor]) -> "ActivationStats":
        """Statistics restricted to kept channels, e.g. after structured pruning.

        ``kept`` maps a site FQN (or its producer's FQN) to the indices of the
        channels that survive; sites not named keep all their channels.
        """
        sites, stats = [], {}
        for site in self.sites:
            idx = kept.get(site.fqn, kept.get(site.producer))
            s = self._stats[site.fqn]
            if idx is not None:
                idx = torch.as_tensor(idx, dtype=torch.long)
                s = ChannelStats(s.count, s.mean[idx], s.m2[idx])
                site = dataclasses.replace(site, channels=int(idx.numel()))
            sites.append(site)
            stats[site.fqn] = s
        return ActivationStats(sites, stats)

    def state_dict(self) -> dict[str, Any]:
        return {"sites": [s.to_dict() for s in self.sites], "stats": {k: v.to_dict() for k, v in self.items()}}

    @classmethod
    def from_state_dict(cls, d: Mapping[str, Any]) -> "ActivationStats":
        return cls([Site.from_dict(s) for s in d["sites"]], {k: ChannelStats.from_dict(v) for k, v in d["stats"].items()})

    def save(self, path: str | Path, *, writer: Callable[[Path], ContextManager[Path]] | None = None) -> None:
        """Write to ``path``; loads with :meth:`load`.

        ``writer(path)`` is a context manager yielding the file to write and putting it in
        place on success (e.g. :func:`prune_repair.io.atomic_write`); by default the file
        is written directly.
        """
        if writer is None:
            torch.save(self.state_dict(), Path(path))
            return
        with writer(Path(path)) as tmp:
            torch.save(self.state_dict(), tmp)

    @classmethod
    def load(cls, path: str | Path) -> "ActivationStats":
        return cls.from_state_dict(torch.load(path, map_location="cpu", weights_only=True))


def collect_stats(
    model: nn.Module,
    data: Any,
    *,
    sites: list[Site] | None = None,
    select: Selector = None,
    include_classifier: bool = False,
    block_outputs: Selector = None,
    forward_fn: ForwardFn | None = None,
    passes: Passes | str | None = None,
    blocks: Sequence[str] | None = None,
    offload: str | Path | None = None,
    progress: ProgressArg = None,
) -> ActivationStats:
    """Measure per-channel mean/std at every site of ``model`` over ``data``.

    Args:
        model: the reference network (left unchanged; train/eval mode restored).
        data: one batch, or an iterable of batches (a DataLoader).
        sites: sites to measure. When omitted, the default single pass finds them as it measures
            the first batch (no pass of their own); with ``passes``, ``progress`` or under
            ``torch.distributed``, two samples of the first batch are traced first.
        select, include_classifier: site selection, see :func:`~prune_repair.engine.sites.find.find_sites`.
        block_outputs: modules whose outputs are measured too, as ``"block"`` sites
            (``find_sites(blocks=...)``).
        forward_fn: ``forward_fn(model, batch)`` for batches that are not tensors.
        passes: how to go over several batches, as in :func:`~prune_repair.engine.correct.repair.repair_`:
            by default ONE pass, one batch at a time (nothing is decided along the way, so the
            batches need not meet: the least memory of all); ``lockstep``, ``per-site`` or
            ``blockwise`` (``blocks``: the blocks' module names in call order, found by default;
            ``offload``: where block inputs wait, ``"cpu"`` or a folder removed afterwards) give
            the same statistics, so one ``passes`` option can serve a whole run.
        progress: ``True`` shows the sites as they are measured (stderr), a callable gets
            ``(done, total)``; silent by default.

    Under ``torch.distributed`` each rank passes its shard of the data and every rank
    gets the exact pooled statistics (see :mod:`~prune_repair.engine.run.distributed`);
    a ``DistributedDataParallel`` model is measured through its ``.module``.

    Raises:
        ValueError: a site the model does not have or that never ran; ``blocks``/``offload``
            without ``passes='blockwise'``; a strategy that cannot run on this model (named).
    """
    model = distributed.unwrap(model)
    batches = as_batches(data)
    first = None
    if (sites is None and passes is None and blocks is None and offload is None and not progress
            and not distributed.is_distributed()):  # one pass finds the sites and measures the first batch
        first = _discover(model, batches[0], select, include_classifier, block_outputs, forward_fn)
        sites = None if first is None else list(first)
    if sites is None:  # discovery needs no statistics: two samples are enough
        sites = find_sites(model, head(batches[0], 2), select=select, include_classifier=include_classifier,
                           blocks=block_outputs, forward_fn=forward_fn)
    for site in sites if first is None else ():  # sites the pass found are the model's own
        try:
            site_owner(model, site)
        except AttributeError:
            raise ValueError(f"site '{site.fqn}' is not a submodule of the model") from None
    method = StatsSteps(model, sites)
    if first is None:
        _measure(model, batches, method, forward_fn, passes, blocks, offload, progress)
    else:
        for step in method.steps:
            step.add(first[step.site])
        if len(batches) > 1:
            _measure(model, batches[1:], method, forward_fn, passes, blocks, offload, progress)
    stats = {step.name: step.merged() for step in method.steps}
    missing = [fqn for fqn, s in stats.items() if s is None]
    if missing:
        raise ValueError(f"site '{missing[0]}' never ran in the forward pass: check forward_fn and the site list")
    return ActivationStats(sites, stats)


def _discover(model: nn.Module, batch: Any, select: Selector, include_classifier: bool, block_outputs: Selector,
              forward_fn: ForwardFn | None) -> dict[Site, ChannelStats] | None:
    """The sites and their statistics on ``batch`` from ONE pass that finds the sites as it measures
    (:class:`~prune_repair.engine.sites.discover.Discovery`); None where that pass could not measure
    every site exactly once (then the sites are traced first and measured in a pass of their own)."""
    measured: dict[Key, ChannelStats] = {}

    def measure(key: Key, y: torch.Tensor, mask: torch.Tensor | None) -> None:
        measured[key] = ChannelStats.of(y, key[1], mask=mask)

    found = Discovery(model, measure, extra=block_modules(model, block_outputs), forward_fn=forward_fn)
    found.run(batch)
    with warnings.catch_warnings(record=True) as said:  # said once: here, or by find_sites after all
        warnings.simplefilter("always")
        sites = found.sites(select=select, include_classifier=include_classifier)
    if not found.measured_once(sites):
        return None
    for warning in said:
        warnings.warn(warning.message, warning.category, stacklevel=3)
    found.warn_unfit_masks(sites)
    return {site: measured[found.key(site)] for site in sites}


def _measure(model: nn.Module, batches: list[Any], method: StatsSteps, forward_fn: ForwardFn | None,
             passes: Passes | str | None, blocks: Sequence[str] | None, offload: str | Path | None,
             progress: ProgressArg) -> PassLog:
    """Run the observe-only steps on the pipeline: one plain pass unless ``passes`` names a strategy."""
    if passes is None:
        if blocks is not None or offload is not None:
            raise ValueError("blocks= and offload= apply to passes='blockwise' only: add passes='blockwise'")
        return calibrate(model, batches, method, all_at_once=True, forward_fn=forward_fn, progress=progress)
    return calibrate(model, batches, method, passes=passes, forward_fn=forward_fn, blocks=blocks, offload=offload,
                     progress=progress)
