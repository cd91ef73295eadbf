"""Activation matching, and moments of paired units of several models.

:func:`activation_matching` pairs the hidden units of B with those of A by the correlation
of their activations (Li et al. 2015; REPAIR). Per-batch moments are taken in float32 about the
batch mean (float64 for float64 models) and merged in float64 (Chan's update), for every group in ONE pass over the data: each batch
runs through A and then B with hooks that capture the tensors of all groups. The
activations of a group are the inputs of the layers that consume its channels (after the
nonlinearity); a group that no layer consumes is observed at its producers' outputs.
Units with zero spread ("dead") get zero correlation and are counted; the producers'
pre-activation correlations, with a tiny weight, decide between units that tie.

:func:`site_moments` gathers, in one lockstep pass, the per-channel means and the
covariance between models at every repair site: the goal statistics of a merge and the
cross-covariances the closed-form REPAIR variant needs.

Example:
    >>> import torch
    >>> from prune_repair.zoo.models import MLP
    >>> from prune_repair.merge.find_groups import find_groups
    >>> from prune_repair.merge.permute import permute, random_perms
    >>> a = MLP(widths=(16, 16))
    >>> x = torch.randn(128, 1, 28, 28)
    >>> groups = find_groups(a, x)
    >>> perms = random_perms(groups, torch.Generator().manual_seed(0))
    >>> al = activation_matching(a, permute(a, groups, perms), x, groups)
    >>> all(torch.equal(al.perms[g.name][perms[g.name]], torch.arange(16)) for g in groups)
    True
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..engine.run import distributed
from ..engine.run.forward import ForwardFn, as_batches, first_tensor, hooked_pass
from ..engine.producers import site_owner
from ..engine.sites.find import Site
from ..engine.sites.taps import SiteTaps
from ..engine.stats.activation import ActivationStats, ChannelStats, merge_moments
from .groups import PermGroup
from .permute import Alignment
from .weight_matching import assign


@dataclass(eq=False)
class Probe:
    """Where a group's channels are seen: the input or output of module ``module``,
    channel positions ``index`` along dim ``dim`` of that tensor; ``weight`` of its
    correlations in the matching (tie-breakers get a tiny one)."""

    module: str
    side: str  # "in" or "out"
    dim: int
    index: torch.Tensor
    weight: float = 1.0


TIE_BREAK = 1e-6
"""Weight of the producers' pre-activation correlations, which only decide between units
whose consumer-side activations tie (e.g. units that never fire)."""


CHANNELS_FIRST_NORMS = ("LayerNorm2d",)
"""LayerNorm subclasses (torchvision's, timm's) that normalize dim 1 of (N, C, H, W) inputs."""


def probes_of(model: nn.Module, group: PermGroup) -> list[Probe]:
    """Probes of ``group``: the inputs of its consumers (weight 1) plus its producers' outputs
    as tie-breakers, or the producers' outputs alone (weight 1) when nothing consumes it."""
    modules = dict(model.named_modules())
    ins, outs = [], []
    for axis in group.axes:
        name, _, param = axis.key.rpartition(".")
        m = modules.get(name)
        if m is None or param not in ("weight", "running_mean"):
            continue
        conv = isinstance(m, nn.modules.conv._ConvNd) and not m.transposed
        if axis.dim == 1 and (isinstance(m, nn.Linear) or (conv and m.groups == 1)):
            ins.append(Probe(name, "in", -1 if isinstance(m, nn.Linear) else 1, axis.index))
        elif axis.dim == 0 and isinstance(m, nn.LayerNorm):  # LayerNorm2d (ConvNeXt) normalizes dim 1
            ins.append(Probe(name, "in", 1 if type(m).__name__ in CHANNELS_FIRST_NORMS else -1, axis.index))
        elif axis.dim == 0 and isinstance(m, (nn.Linear, nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase,
                                              nn.GroupNorm)):
            outs.append(Probe(name, "out", -1 if isinstance(m, nn.Linear) else 1, axis.index))
        elif axis.dim == 1 and isinstance(m, nn.Embedding):
            outs.append(Probe(name, "out", -1, axis.index))
    if not ins:
        return outs
    return ins + [Probe(p.module, p.side, p.dim, p.index, TIE_BREAK) for p in outs]


def _samples(y: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """(samples, channels) copy of a probed tensor (blocks become samples), float32 for
    float32 and narrower activations (no float64 copy), else float64."""
    c, k = index.shape
    dtype = torch.float64 if y.dtype == torch.float64 or not y.is_floating_point() else torch.float32
    moved = y.detach().movedim(dim, -1)
    flat = index.flatten()
    start = int(flat[0])
    if k == 1 and torch.equal(flat, torch.arange(start, start + c)):  # plain channels: no gather
        picked = moved.narrow(-1, start, c)
        return torch.empty(picked.shape, dtype=dtype, device=y.device).copy_(picked).view(-1, c)
    picked = moved.index_select(-1, flat.to(y.device)).reshape(-1, c, k)
    return picked.transpose(1, 2).reshape(-1, c).to(dtype)


def _capture(model: nn.Module, batch: Any, probes: dict[nn.Module, list], forward_fn: ForwardFn | None) -> dict:
    """Run one batch, returning {probe key: tensor} for ``probes = {module: [(key, side)]}``."""
    seen: dict[Any, torch.Tensor] = {}
    pre, post = {}, {}
    for module, wanted in probes.items():
        if any(side == "in" for _, side in wanted):
            pre[module] = lambda m, inputs, w=wanted: seen.update({k: inputs[0] for k, s in w if s == "in"})
        if any(side == "out" for _, side in wanted):
            post[module] = lambda m, i, out, w=wanted: seen.update({k: first_tensor(out) for k, s in w if s == "out"})
    with hooked_pass(model, forward_hooks=post, pre_hooks=pre, forward_fn=forward_fn) as run:
        run(batch)
    return seen


class _Moments:
    """Float64 count/means/co-moment of paired (samples, C) blocks, merged exactly."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, None, None

    def add(self, y: torch.Tensor) -> None:
        """``y``: (K, n, C) -> per channel K x K co-moment."""
        self._merge(y.shape[1], y.mean(dim=1), self._comoment(y - y.mean(dim=1)[:, None, :]))

    def _merge(self, n: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        if self.mean is None:
            self.n, self.mean, self.m2 = n, mean, m2
            return
        self.n, self.mean, self.m2 = merge_moments((self.n, self.mean, self.m2), (n, mean, m2),
                                                   lambda delta: self._comoment(delta[:, None, :]))

    @staticmethod
    def all_reduce_(moments: Sequence["_Moments"]) -> None:
        """Pool each of ``moments`` (same order on every rank) over ranks, exactly: two collectives."""
        if not distributed.is_distributed():
            return
        parts = [(m.n, m.mean, m.m2) for m in moments]
        comoments = [lambda d, m=m: m._comoment(d[:, None, :]) for m in moments]
        for m, (n, mean, m2) in zip(moments, distributed.pool_moments(parts, comoments)):
            m.n, m.mean, m.m2 = n, mean, m2


class _Cross(_Moments):
    """Cross co-moment (C x C) of two models' units, with both variances as two extra rows."""

    def add_pair(self, ya: torch.Tensor, yb: torch.Tensor) -> None:
        """``ya``, ``yb``: (n, C) copies (centred in place). Float32 blocks are centred on the
        float32 rounding of their float64 mean and multiplied in float32; the co-moments are
        then corrected in float64 for that rounding (exact up to the float32 products)."""
        n = ya.shape[0]
        mean = torch.stack([ya.sum(0, dtype=torch.float64), yb.sum(0, dtype=torch.float64)]) / n
        centre = mean.to(ya.dtype)
        ya.sub_(centre[0])
        yb.sub_(centre[1])
        m2 = self._comoment((ya, yb)).to(torch.float64)
        if ya.dtype != torch.float64:  # moments about `centre`, not about `mean`: shift them back
            e = centre.to(torch.float64) - mean
            m2[:-2].addr_(e[0], e[1], alpha=-n)
            m2[-2].addcmul_(e[0], e[0], value=-n)
            m2[-1].addcmul_(e[1], e[1], value=-n)
        self._merge(n, mean, m2)

    @staticmethod
    def _comoment(c) -> torch.Tensor:  # (2, n, C) -> (C + 2, C), written in place (no concatenation)
        a, b = c[0], c[1]
        out = torch.empty(a.shape[-1] + 2, b.shape[-1], dtype=a.dtype, device=a.device)
        torch.mm(a.T, b, out=out[:-2])
        out[-2] = torch.linalg.vecdot(a, a, dim=0)
        out[-1] = torch.linalg.vecdot(b, b, dim=0)
        return out


class _PerChannel(_Moments):
    @staticmethod
    def _comoment(c: torch.Tensor) -> torch.Tensor:  # (K, n, C) -> (K, K, C)
        return torch.einsum("knc,lnc->klc", c, c)


def activation_matching(a: nn.Module, b: nn.Module, data: Any, groups: Sequence[PermGroup], *,
                        forward_fn: ForwardFn | None = None) -> Alignment:
    """Permutations aligning ``b`` to ``a`` by the correlation of paired units (one pass).

    Under ``torch.distributed`` each rank passes its shard of the data; the moments are
    pooled exactly over ranks, so every rank finds the same permutations.

    Args:
        a, b: models of the same architecture (unchanged; train/eval mode restored).
        data: calibration data: one batch or an iterable of batches.
        groups: permutation groups (see :func:`prune_repair.merge.groups.find_groups`).
        forward_fn: ``forward_fn(model, batch)`` for batches that are not plain tensors.
    """
    start = time.perf_counter()
    a, b = distributed.unwrap(a), distributed.unwrap(b)
    probe_lists = {g.name: probes_of(a, g) for g in groups}
    for g in groups:
        if not probe_lists[g.name]:
            raise ValueError(f"group '{g.name}' has no layer whose activations can be observed: "
                             "use align='weight' or pass groups that name a conv/linear/norm layer")
    specs = []
    for model in (a, b):
        mods = dict(model.named_modules())
        spec: dict[nn.Module, list] = {}
        for name, plist in probe_lists.items():
            for i, p in enumerate(plist):
                spec.setdefault(mods[p.module], []).append(((name, i), p.side))
        specs.append(spec)
    moments: dict[tuple[str, int], _Cross] = {}
    for batch in _each_batch(data):
        ya = _capture(a, batch, specs[0], forward_fn)
        yb = _capture(b, batch, specs[1], forward_fn)
        for name, plist in probe_lists.items():
            used: set[tuple[int, int]] = set()
            for i, p in enumerate(plist):
                key = (name, i)
                if key not in ya or key not in yb:
                    raise ValueError(f"layer '{p.module}' did not run in the forward pass: check forward_fn")
                if (id(ya[key]), id(yb[key])) in used:
                    continue  # two consumers of one tensor: count it once
                used.add((id(ya[key]), id(yb[key])))
                if ya[key].dim() == 0 or ya[key].shape[p.dim] <= int(p.index.max()):
                    raise ValueError(f"layer '{p.module}' has {ya[key].shape[p.dim] if ya[key].dim() else 0} "
                                     f"channels on dim {p.dim} of its {p.side}put {list(ya[key].shape)} but group "
                                     f"'{name}' needs {int(p.index.max()) + 1}: use align='weight' for this model")
                moments.setdefault(key, _Cross()).add_pair(_samples(ya[key], p.dim, p.index),
                                                           _samples(yb[key], p.dim, p.index))
    _Moments.all_reduce_([moments[k] for k in sorted(moments)])  # pooled over ranks (distributed)
    perms, dead, assigning = {}, {}, 0.0
    for g in groups:
        corr = None
        dead_any = torch.zeros(g.size, dtype=torch.bool)
        for key, m in moments.items():
            if key[0] != g.name:
                continue
            cross, var_a, var_b = m.m2[:-2], m.m2[-2], m.m2[-1]
            std_a, std_b = var_a.clamp_min(0).sqrt(), var_b.clamp_min(0).sqrt()
            dead_a = std_a <= 1e-12 * (std_a.max() + 1e-300)
            dead_b = std_b <= 1e-12 * (std_b.max() + 1e-300)
            c = cross.div(torch.where(dead_a, 1.0, std_a)[:, None]).div_(torch.where(dead_b, 1.0, std_b)[None, :])
            if dead_a.any():
                c[dead_a, :] = 0
            if dead_b.any():
                c[:, dead_b] = 0
            probe = probe_lists[g.name][key[1]]
            c = c.cpu()
            corr = c.mul_(probe.weight) if corr is None else corr.add_(c, alpha=probe.weight)
            if probe.weight == 1.0:
                dead_any |= (dead_a | dead_b).cpu()
        started = time.perf_counter()
        perms[g.name] = assign(corr, g.labels)
        assigning += time.perf_counter() - started
        dead[g.name] = int(dead_any.sum())
    return Alignment(perms, "activation", time.perf_counter() - start, dead_units=dead, assign_seconds=assigning)


def _each_batch(data: Any) -> Iterator[Any]:
    """The batches of ``data`` (as :func:`as_batches`), one at a time: a DataLoader or a
    generator is never held in memory whole."""
    if isinstance(data, (torch.Tensor, dict, tuple)) or not isinstance(data, Iterable):
        yield from as_batches(data)
        return
    empty = True
    for batch in data:
        empty = False
        yield batch
    if empty:
        raise ValueError("the calibration data is empty: pass at least one batch")


@dataclass
class SiteMoments:
    """Per-channel means ``(K, C)`` and between-model covariances ``(K, K, C)`` at each site."""

    sites: list[Site]
    count: dict[str, int]
    mean: dict[str, torch.Tensor]
    cov: dict[str, torch.Tensor]

    def stats(self, k: int) -> ActivationStats:
        """The :class:`ActivationStats` of model ``k`` alone."""
        return self.goal([1.0 if i == k else 0.0 for i in range(next(iter(self.mean.values())).shape[0])])

    def goal(self, weights: Sequence[float]) -> ActivationStats:
        """Goal statistics of a merge with ``weights``: weighted means and weighted STDs."""
        w = torch.tensor(list(weights), dtype=torch.float64)
        out = {}
        for s in self.sites:
            std = self.cov[s.fqn].diagonal(dim1=0, dim2=1).T.clamp_min(0).sqrt()  # (K, C)
            out[s.fqn] = ChannelStats.from_moments(w.to(std.device) @ self.mean[s.fqn], w.to(std.device) @ std,
                                                   self.count[s.fqn])
        return ActivationStats(self.sites, out)

    def predicted(self, weights: Sequence[float]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(mean, std) of each channel of ``sum_k w_k X_k`` (REPAIR eq. 5), per site."""
        w = torch.tensor(list(weights), dtype=torch.float64)
        out = {}
        for s in self.sites:
            cov, wd = self.cov[s.fqn], w.to(self.cov[s.fqn].device)
            var = torch.einsum("k,klc,l->c", wd, cov, wd)
            out[s.fqn] = (wd @ self.mean[s.fqn], var.clamp_min(0).sqrt())
        return out


def site_moments(models: Sequence[nn.Module], data: Any, sites: Sequence[Site], *,
                 forward_fn: ForwardFn | None = None) -> SiteMoments:
    """Moments of the paired channels of ``models`` at ``sites``, in one pass over ``data``
    (pooled exactly over ranks under ``torch.distributed``).

    Each model's site outputs are read by :class:`~prune_repair.engine.sites.taps.SiteTaps`,
    the taps repair itself uses, so attention projections (``<mha>.in_proj:q``), layers run
    through ``F.linear`` by a parent (swin_t) and padding masks are handled as in a repair."""
    models = [distributed.unwrap(m) for m in models]
    sites = list(sites)
    for model in models:
        for s in sites:
            try:
                site_owner(model, s)
            except AttributeError:
                raise ValueError(f"site '{s.fqn}' is not a layer of every model: merge models of the same "
                                 "architecture") from None
    acc: dict[str, _PerChannel] = {s.fqn: _PerChannel() for s in sites}
    for batch in as_batches(data):
        captured = [_site_outputs(model, batch, sites, forward_fn) for model in models]
        for s in sites:
            if any(s.fqn not in c for c in captured):
                raise ValueError(f"site '{s.fqn}' never ran in the forward pass: check forward_fn")
            counts = {c[s.fqn].shape[0] for c in captured}
            if len(counts) != 1:
                raise ValueError(f"site '{s.fqn}' gave {sorted(counts)} values per channel in different models: "
                                 "merge models of the same architecture")
            acc[s.fqn].add(torch.stack([c[s.fqn] for c in captured]))
    _Moments.all_reduce_([acc[s.fqn] for s in sites])
    return SiteMoments(sites, {k: v.n for k, v in acc.items()}, {k: v.mean for k, v in acc.items()},
                       {k: v.m2 / v.n for k, v in acc.items()})


def _site_outputs(model: nn.Module, batch: Any, sites: Sequence[Site],
                  forward_fn: ForwardFn | None) -> dict[str, torch.Tensor]:
    """{site fqn: (values, channels) float64} of one batch (padded positions dropped)."""
    seen: dict[str, list[torch.Tensor]] = {}

    def observe(site: Site, y: torch.Tensor, mask: torch.Tensor | None) -> None:
        y = y.detach()
        y = y[mask] if mask is not None else y.movedim(site.channel_dim, -1)
        seen.setdefault(site.fqn, []).append(y.reshape(-1, site.channels).to(torch.float64))

    with hooked_pass(model, forward_fn=forward_fn) as forward, SiteTaps(model, list(sites), observe).attached(
            forward) as run:
        run(batch)
    return {k: v[0] if len(v) == 1 else torch.cat(v) for k, v in seen.items()}
