"""Goal statistics without calibration data at repair time (rethinking-rebasin, appendix G.4).

A repair needs two sets of per-channel statistics:

1. the GOAL (mean, std) of every site, i.e. the unoperated model's distribution; and
2. the operated model's CURRENT (mean, std), measured on it after the surgery.

This module provides (1) without touching calibration data when the correction is made:

- :func:`batchnorm_goal` reads it from the BatchNorm layers of a BN network (their running
  statistics and affine): no data at all, only two samples of *any* input of the right shape
  (random is fine) to trace which layers are sites, or an explicit ``sites`` list;
- :class:`RecordStats` records it during training (forward hooks, float64, the last
  ``window`` training batches) so it can be saved next to the checkpoint and used later
  with ``repair_(model, RecordStats.load(path), data)`` or ``--goal-stats FILE``.

What is NOT data-free: (2). ``repair_`` still measures the operated model on a batch
(64 samples is usually enough), in every mode: ``repair``/``rescale`` measure the
site statistics, and ``reset`` (and ``auto`` at BatchNorm sites) recomputes the BN running
statistics from that batch and does not use the goal at all. The paper's own
data-independent variant avoids the batch only by evaluating the operated model in training
mode, i.e. by normalizing with the statistics of each TEST batch; this package folds the
correction into the weights instead, so it needs the calibration batch for (2). Its labels
are never used.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
    ...                       nn.Flatten(), nn.Linear(4 * 6 * 6, 10)).eval()
    >>> goal = batchnorm_goal(model, torch.randn(2, 1, 8, 8))   # random input: only traced
    >>> goal["1"].mean.tolist(), goal["1"].std.tolist()[0] == (1 / (1 + 1e-5)) ** 0.5
    ([0.0, 0.0, 0.0, 0.0], True)
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..run import distributed
from ..run.forward import ForwardFn, default_forward, head
from ..producers import site_owner
from ..sites.find import Selector, Site, find_sites
from .activation import ActivationStats, ChannelStats
from .collect import StatsSteps

__all__ = ["RecordStats", "batchnorm_goal", "match_goal"]


def _sites(model: nn.Module, example_inputs: Any, sites: list[Site] | None, select: Selector,
           include_classifier: bool, forward_fn: ForwardFn | None) -> list[Site]:
    if sites is not None:
        return list(sites)
    if example_inputs is None:
        raise ValueError("pass example_inputs (two samples of any input of the right shape; random is fine) "
                         "or sites= to say which outputs get goal statistics")
    return find_sites(model, head(example_inputs, 2), select=select, include_classifier=include_classifier,
                      forward_fn=forward_fn)


def batchnorm_goal(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    sites: list[Site] | None = None,
    skip_missing: bool = False,
    select: Selector = None,
    include_classifier: bool = False,
    forward_fn: ForwardFn | None = None,
) -> ActivationStats:
    """Goal statistics of a BN network read from its BatchNorm layers: no calibration data.

    At a site whose output is a BatchNorm in eval mode, ``y = g (x - m) / sqrt(v + eps) + b``
    with running mean ``m`` and variance ``v``. If the producer's output ``x`` is distributed
    as the running statistics say (mean ``m``, variance ``v``), the BN output has

        mean = b,    std = |g| * sqrt(v / (v + eps))

    per channel (``g = 1, b = 0`` without affine), which is returned. It equals the
    measured eval-mode statistics exactly when the data's batch statistics equal the running
    ones (population variance), and approximately for a well-trained model on training data.

    Args:
        model: the unoperated BN network (not modified; no forward on real data).
        example_inputs: two samples of any input of the right shape, only to trace the
            sites (random values are fine); not needed with ``sites``.
        sites: the sites to give goals; found from ``example_inputs`` when omitted.
        skip_missing: sites not taken after a BatchNorm (or one without running
            statistics) are left out, with a warning naming them (``.skipped`` on the
            result lists them); by default they raise.
        select, include_classifier, forward_fn: site selection, see :func:`~prune_repair.find_sites`.

    Raises:
        ValueError: a site without a BatchNorm (unless ``skip_missing``), or no BN site at all.
    """
    model = distributed.unwrap(model)
    sites = _sites(model, example_inputs, sites, select, include_classifier, forward_fn)
    kept, stats, skipped = [], {}, []
    for site in sites:
        try:
            bn = site_owner(model, site)[0] if site.norm is not None else None
        except AttributeError:
            raise ValueError(f"site '{site.fqn}' is not a submodule of the model") from None
        if not isinstance(bn, _BatchNorm) or bn.running_mean is None or bn.running_var is None:
            skipped.append(site.fqn)
            continue
        var = bn.running_var.detach().to(torch.float64)
        weight = torch.ones_like(var) if bn.weight is None else bn.weight.detach().to(torch.float64)
        bias = torch.zeros_like(var) if bn.bias is None else bn.bias.detach().to(torch.float64)
        std = weight.abs() * (var / (var + bn.eps)).clamp_min(0).sqrt()
        stats[site.fqn] = ChannelStats.from_moments(bias.cpu(), std.cpu(), count=1)
        kept.append(site)
    if skipped and not skip_missing:
        raise ValueError(f"no BatchNorm with running statistics at site(s) {', '.join(repr(s) for s in skipped)}: "
                         "their goal cannot be read from the model; record it with RecordStats or "
                         "collect_stats(...).save(), or pass skip_missing=True to leave them out")
    if not kept:
        raise ValueError("the model has no site after a BatchNorm with running statistics: "
                         "record goal statistics with RecordStats or collect_stats(...).save() instead")
    if skipped:
        warnings.warn(f"batchnorm_goal: no BatchNorm at {', '.join(skipped)}: left out of the goal", stacklevel=2)
    result = ActivationStats(kept, stats)
    result.skipped = skipped  # type: ignore[attr-defined]
    return result


class RecordStats(contextlib.AbstractContextManager):
    """Record goal statistics during training: float64 per-channel mean/var at every site.

    Forward hooks on the sites (registered on enter, always removed on exit) take the
    statistics of each recorded forward pass. What is kept is a WINDOW, not an EMA: the
    pooled exact statistics (Chan's merge, as :func:`~prune_repair.collect_stats`) of the
    last ``window`` recorded passes (``window=None``: all of them). A window over the end of
    training describes the final weights better than a running average over all of it;
    ``stats()`` over the same batches equals ``collect_stats`` over them (in eval mode, for a
    model whose train and eval forwards agree).

    Which passes are recorded: by default only those made in training mode with gradients
    enabled (``record="train"``), so validation passes in between do not count;
    ``record="eval"`` records only passes in eval mode (e.g. one pass over the training
    set after training), ``record="any"`` all. Note that in training mode a BatchNorm site's
    output is normalized with the batch's own statistics and dropout is active, so the
    recorded goal is the training-mode distribution; for BN networks :func:`batchnorm_goal`
    gives the eval-mode goal without any recording.

    Sites whose linear is called through ``F.linear`` by a parent (``call="function"``) are
    recorded only for forwards made through ``rec(batch)``; plain module sites and attention
    projections are recorded whatever calls the model.

    The sites are the observe-only steps of :mod:`.collect` (those of :func:`~prune_repair.collect_stats`),
    hooked into the training forwards. Under ``torch.distributed`` (e.g. DDP training, each
    rank on its shard) :meth:`stats` pools every rank's window exactly: call it (and
    :meth:`save`) on every rank.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> with RecordStats(model, torch.randn(2, 4), window=100) as rec:
        ...     for _ in range(3):
        ...         loss = model(torch.randn(16, 4)).square().mean()
        ...         opt.zero_grad(); loss.backward(); opt.step()
        >>> rec.batches, rec.stats()["0"].count
        (3, 48)
    """

    def __init__(self, model: nn.Module, example_inputs: Any = None, *, sites: list[Site] | None = None,
                 window: int | None = 500, record: str = "train", select: Selector = None,
                 include_classifier: bool = False, forward_fn: ForwardFn | None = None):
        if window is not None and window < 1:
            raise ValueError(f"window must be at least 1 batch (or None for all), got {window}")
        if record not in ("train", "eval", "any"):
            raise ValueError(f"record must be 'train', 'eval' or 'any', got {record!r}")
        self.model = distributed.unwrap(model)
        self.sites = _sites(self.model, example_inputs, sites, select, include_classifier, forward_fn)
        self.window, self.record, self.forward_fn = window, record, forward_fn
        self.method = StatsSteps(self.model, self.sites, window)
        self._stack: contextlib.ExitStack | None = None
        self._run = None

    def _wanted(self) -> bool:
        if self.record == "any":
            return True
        training = self.model.training
        return training and torch.is_grad_enabled() if self.record == "train" else not training

    def _arrive(self, k: int, contribute: Callable[[], None]) -> bool:
        if self._wanted():
            contribute()
        return False  # nothing is decided while recording

    def __enter__(self) -> "RecordStats":
        if self._stack is not None:
            raise RuntimeError("RecordStats is already recording")
        forward_fn = self.forward_fn or default_forward
        forward = lambda batch: forward_fn(self.model, batch)  # noqa: E731
        stack = contextlib.ExitStack()
        steps = range(len(self.method.steps))
        self._run = stack.enter_context(self.method.attach(forward, steps, self._arrive))
        self._stack = stack
        return self

    def __exit__(self, *exc: Any) -> None:
        stack, self._stack, self._run = self._stack, None, None
        if stack is not None:
            stack.close()
        return None

    def __call__(self, batch: Any) -> Any:
        """Forward ``batch`` through the model with every site recorded (grads kept)."""
        if self._run is None:
            raise RuntimeError("call rec(batch) inside 'with RecordStats(...) as rec:'")
        return self._run(batch)

    @property
    def batches(self) -> int:
        """Recorded passes of the first site on this rank (all of them, not only those in the window)."""
        return self.method.steps[0].calls if self.method.steps else 0

    def stats(self) -> ActivationStats:
        """Pooled statistics of the last ``window`` recorded passes of every site (of every rank:
        two collectives under ``torch.distributed``, so every rank calls it)."""
        mine = {step.name: step.merged() for step in self.method.steps}
        pooled = distributed.all_reduce_channel_stats(mine, {s.fqn: s.channels for s in self.sites}, ChannelStats)
        missing = [fqn for fqn, s in pooled.items() if s is None]
        if missing:
            raise ValueError(f"nothing recorded at site '{missing[0]}': run training forwards inside the 'with' "
                             f"block (record={self.record!r} records only those passes)")
        return ActivationStats(self.sites, pooled)

    def save(self, path: str | Path, **kwargs: Any) -> None:
        """Write :meth:`stats` (loads with ``ActivationStats.load`` / ``RecordStats.load``); under
        ``torch.distributed`` every rank calls it and rank 0 writes the pooled statistics."""
        stats = self.stats()
        if distributed.is_main_process():
            stats.save(path, **kwargs)

    load = staticmethod(ActivationStats.load)


def match_goal(goal: ActivationStats, sites: list[Site], known: list[Site] | None = None,
               what: str = "the goal statistics") -> ActivationStats:
    """``goal`` restricted to ``sites`` (the model's sites, in the model's order), checked.

    Every site must be in ``goal`` with the same channel count, and every site of ``goal``
    must be one of ``known`` (default ``sites``; e.g. the sites with the classifier, which
    are then dropped); otherwise a one-line ValueError says which site differs.
    """
    by_fqn = {s.fqn: s for s in goal.sites}
    known_fqns = {s.fqn for s in (known if known is not None else sites)}
    extra = [fqn for fqn in goal if fqn not in known_fqns]
    if extra:
        raise ValueError(f"{what} name site '{extra[0]}', which the model does not have: "
                         "record them on a model of the same architecture")
    for site in sites:
        g = by_fqn.get(site.fqn)
        if g is None or site.fqn not in goal:
            raise ValueError(f"{what} have no site '{site.fqn}' of the model ({len(goal)} sites: "
                             f"{', '.join(list(goal)[:4])}{', ...' if len(goal) > 4 else ''}): "
                             "record them on a model of the same architecture")
        if g.channels != site.channels or goal[site.fqn].mean.numel() != site.channels:
            raise ValueError(f"{what} have {goal[site.fqn].mean.numel()} channels at site '{site.fqn}' "
                             f"but the model has {site.channels}: record them on a model of the same architecture")
        s = goal[site.fqn]
        if not (torch.isfinite(s.mean).all() and torch.isfinite(s.var).all()):
            raise ValueError(f"{what} hold NaN/Inf at site '{site.fqn}'")
    return ActivationStats(sites, {s.fqn: goal[s.fqn] for s in sites})
