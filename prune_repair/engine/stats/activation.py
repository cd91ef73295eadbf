"""Per-channel activation statistics: float64, streaming, mergeable, serializable.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> stats = collect_stats(model, torch.randn(32, 4))
    >>> list(stats.keys()), stats["0"].mean.dtype, stats["0"].std.shape
    (['0'], torch.float64, torch.Size([8]))
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager as ContextManager
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..run import distributed
from ..run.forward import ForwardFn, as_batches, head, hooked_pass
from ..producers import site_owner
from ..sites.find import Selector, Site, find_sites
from ..sites.taps import SiteTaps


def merge_moments(a: tuple, b: tuple, comoment: Callable[[torch.Tensor], torch.Tensor] = torch.square) -> tuple:
    """Pooled ``(count, mean, m2)`` of two parts (Chan's parallel update); ``comoment(delta)``
    squares the mean difference (an outer product for cross-moments).

    >>> x = torch.tensor([1.0, 2.0, 3.0, 10.0], dtype=torch.float64)
    >>> part = lambda v: (len(v), v.mean(), v.var(correction=0) * len(v))
    >>> n, mean, m2 = merge_moments(part(x[:1]), part(x[1:]))
    >>> n, float(mean), torch.isclose(m2 / n, x.var(correction=0)).item()
    (4, 4.0, True)
    """
    (na, mean_a, m2_a), (nb, mean_b, m2_b) = a, b
    n = na + nb
    delta = mean_b - mean_a
    return n, mean_a + delta * (nb / n), m2_a + m2_b + comoment(delta) * (na * nb / n)


@dataclass
class ChannelStats:
    """Mean and variance of each channel over ``count`` values per channel (float64).

    Batches merge with Chan's parallel update, which gives the exact pooled
    mean/variance of everything seen, without float32 global sums.
    """

    count: int
    mean: torch.Tensor
    m2: torch.Tensor  # sum of squared deviations from the mean

    @classmethod
    def of(cls, y: torch.Tensor, channel_dim: int, mask: torch.Tensor | None = None) -> "ChannelStats":
        """Statistics of one output tensor; ``channel_dim`` is 1 or -1.

        ``mask`` (bool, shaped like the leading dims of ``y``, e.g. an (N, T) attention mask
        for an (N, T, C) output) keeps only the positions where it is True; it needs the
        channels on the last dim.

        >>> y = torch.tensor([[[1.0], [3.0], [100.0]]])           # (N=1, T=3, C=1)
        >>> ChannelStats.of(y, -1, mask=torch.tensor([[True, True, False]])).mean
        tensor([2.], dtype=torch.float64)

        Floating outputs below float64 are reduced by :func:`_shifted_moments` (float32 sums
        of small chunks about a first estimate of the mean, float64 across chunks: no float64
        copy of the activations and a temporary of at most one chunk); float64 and integer
        outputs in float64 directly.
        """
        y = y.detach()
        if mask is not None:
            if channel_dim % y.dim() != y.dim() - 1 or tuple(mask.shape) != tuple(y.shape[:mask.dim()]):
                raise ValueError(f"a mask of shape {list(mask.shape)} does not fit an output of shape "
                                 f"{list(y.shape)} with channels on dim {channel_dim}")
            y = y[mask.to(device=y.device, dtype=torch.bool)]
        cdim = channel_dim % y.dim()
        channels = y.shape[cdim]
        if y.dim() == 1:  # a (C,) output: one value per channel
            return cls(1, y.to(torch.float64), torch.zeros_like(y, dtype=torch.float64))
        if y.dtype in (torch.float32, torch.float16, torch.bfloat16) and y.numel() > 0:
            if cdim == y.dim() - 1 or (cdim == 1 and y.movedim(1, -1).is_contiguous()):
                rows = y.movedim(cdim, -1).reshape(-1, channels)  # a view when contiguous
                return cls(rows.shape[0], *_shifted_moments(rows, rows=True))
            if cdim == 1:
                maps = y.reshape(y.shape[0], channels, -1)
                return cls(maps.shape[0] * maps.shape[2], *_shifted_moments(maps, rows=False))
        y = y.to(torch.float64)
        dims = [d for d in range(y.dim()) if d != cdim]
        count = y.numel() // max(channels, 1)
        var, mean = torch.var_mean(y, dim=dims, correction=0)
        return cls(count, mean, var * count)

    def merge(self, other: "ChannelStats") -> "ChannelStats":
        """Pooled statistics of both (order does not matter)."""
        return ChannelStats(*merge_moments((self.count, self.mean, self.m2), (other.count, other.mean, other.m2)))

    @property
    def var(self) -> torch.Tensor:
        """Population variance (divides by count)."""
        return self.m2 / self.count

    @property
    def std(self) -> torch.Tensor:
        return self.var.clamp_min(0).sqrt()

    @classmethod
    def from_moments(cls, mean: torch.Tensor, std: torch.Tensor, count: int = 1) -> "ChannelStats":
        mean = mean.to(torch.float64)
        return cls(count, mean, std.to(torch.float64).square() * count)

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ChannelStats":
        return cls(int(d["count"]), d["mean"].to(torch.float64), d["m2"].to(torch.float64))


CHUNK_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 24}
"""Elements per temporary in :func:`_shifted_moments`: a small part of a large activation
(little added to the peak memory), yet few enough chunks that per-op costs stay small."""

ROW_GROUP = 16
"""Rows of a channel-last output summed in float32 before the float64 sum."""


def _shifted_moments(x: torch.Tensor, rows: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 ``(mean, m2)`` per channel of ``(R, C)`` rows (``rows=True``) or ``(N, C, S)`` maps.

    Values are centred, one chunk along dim 0 at a time, about the float32 rounding of the
    first chunk's mean (exact near the mean, Sterbenz); short runs (each map's ``S`` values,
    or ``ROW_GROUP`` rows) are summed in float32, everything across them in float64, and
    the shift is corrected exactly, so large offsets cause no cancellation and the
    activations are never copied whole (the temporary is one chunk).
    """
    work, c = torch.float32, x.shape[1]
    count = x.numel() // max(c, 1)
    if rows:  # (R, C) -> (R // K, K, C) groups, plus the leftover rows as groups of one
        cut = x.shape[0] - x.shape[0] % ROW_GROUP
        pieces = [p for p in (x[:cut].view(-1, ROW_GROUP, c), x[cut:].unsqueeze(1)) if p.numel()]
        inner, view = 1, (c,)
    else:
        pieces, inner, view = [x], 2, (c, 1)
    budget = CHUNK_ELEMENTS.get(x.device.type, 1 << 22)
    s1 = torch.zeros(c, dtype=torch.float64, device=x.device)
    s2 = torch.zeros(c, dtype=torch.float64, device=x.device)
    shift = None
    for piece in pieces:
        step = max(1, budget // max(piece[0].numel(), 1))
        for start in range(0, piece.shape[0], step):
            chunk = piece[start:start + step].to(work)
            if shift is None:  # the first chunk's mean: close to the mean, in float32
                first = chunk.sum(inner).sum(0, dtype=torch.float64) / (chunk.numel() // c)
                shift = first.to(work)
            d = chunk - shift.view(view)  # one centred chunk (a new tensor)
            s1 += d.sum(inner).sum(0, dtype=torch.float64)
            s2 += torch.linalg.vecdot(d, d, dim=inner).sum(0, dtype=torch.float64)
    offset = s1 / count
    return shift.to(torch.float64) + offset, (s2 - s1 * offset).clamp_min(0)


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
    blocks: Selector = None,
    forward_fn: ForwardFn | None = None,
) -> ActivationStats:
    """Measure per-channel mean/std at every site of ``model`` over ``data``.

    Args:
        model: the reference network (left unchanged; train/eval mode restored).
        data: one batch, or an iterable of batches (a DataLoader).
        sites: sites to measure; found by tracing two samples of the first batch
            when omitted.
        select, include_classifier, blocks: site selection, see :func:`~prune_repair.engine.sites.find.find_sites`.
        forward_fn: ``forward_fn(model, batch)`` for batches that are not tensors.

    Under ``torch.distributed`` each rank passes its shard of the data and every rank
    gets the exact pooled statistics (see :mod:`~prune_repair.engine.run.distributed`);
    a ``DistributedDataParallel`` model is measured through its ``.module``.
    """
    model = distributed.unwrap(model)
    batches = as_batches(data)
    stats: dict[str, ChannelStats] = {}

    def add(fqn: str, s: ChannelStats) -> None:
        stats[fqn] = stats[fqn].merge(s) if fqn in stats else s

    if sites is None:  # discovery needs no statistics: two samples are enough
        sites = find_sites(model, head(batches[0], 2), select=select, include_classifier=include_classifier,
                           blocks=blocks, forward_fn=forward_fn)

    for site in sites:
        try:
            site_owner(model, site)
        except AttributeError:
            raise ValueError(f"site '{site.fqn}' is not a submodule of the model") from None

    def observe(site: Site, y: torch.Tensor, mask: torch.Tensor | None) -> None:
        add(site.fqn, ChannelStats.of(y, site.channel_dim, mask=mask))

    with hooked_pass(model, forward_fn=forward_fn) as forward, SiteTaps(model, sites, observe).attached(forward) as run:
        for batch in batches:
            run(batch)
    if distributed.is_distributed():  # pool every rank's shard: two collectives for all sites
        pooled = distributed.all_reduce_channel_stats(stats, {s.fqn: s.channels for s in sites}, ChannelStats)
        stats = {k: v for k, v in pooled.items() if v is not None}
    missing = [s.fqn for s in sites if s.fqn not in stats]
    if missing:
        raise ValueError(f"site '{missing[0]}' never ran in the forward pass: check forward_fn and the site list")
    return ActivationStats(sites, stats)
