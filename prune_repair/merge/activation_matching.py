"""Activation matching, and moments of paired units of several models.

:func:`activation_matching` pairs the hidden units of B with those of A by the correlation
of their activations (Li et al. 2015; REPAIR). Per-batch moments are taken in float32 about the
batch mean (float64 for float64 models) and merged in float64 (Chan's update), for every group in ONE pass over the data: each batch
runs through A and then B with hooks that capture the tensors of all groups. The
activations of a group are the inputs of the layers that consume its channels (after the
nonlinearity); a group that no layer consumes is observed at its producers' outputs.
Units with zero spread ("dead") get zero correlation and are counted; the producers'
pre-activation correlations, with a tiny weight, decide between units that tie. Those
tie-breakers are measured only for groups where a unit can be dead: one whose units all
vary in the first batch has none (a unit flat over the data is flat in every batch), and its
tie-breaking probes are skipped from the start (under ``torch.distributed`` every group keeps
them, so that all ranks pool the same moments).

:func:`site_moments` (the moments a merge is repaired toward) lives in :mod:`.moments`.
Attention: the packed q/k/v projections of an ``nn.MultiheadAttention`` are observed token
by token (recomputed in a pre-hook) and head groups are assigned with :mod:`.heads`;
padded tokens (a dict batch's ``attention_mask``) are left out.

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

import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..engine.run import distributed
from ..engine.run.forward import ForwardFn, as_batches
from ..engine.producers import is_conv1d
from ..engine.sites.taps import batch_mask
from .groups import PermGroup
from .attention_groups import check_same_heads
from .capture import capture, function_linears
from .heads import assign_heads, units
from .correlations import unit_correlations as _correlations
from .cross_moments import CrossMoments
from .moments import SiteMoments, _Moments, site_moments  # noqa: F401  (site_moments: public here too)
from .permute import Alignment
from .weight_matching import assign


@dataclass(eq=False)
class Probe:
    """Where a group's channels are seen: the input or output of module ``module``,
    channel positions ``index`` along dim ``dim`` of that tensor; ``weight`` of its
    correlations in the matching (tie-breakers get a tiny one)."""

    module: str
    side: str  # "in", "out", or "proj" (the packed q/k/v projections of an nn.MultiheadAttention)
    dim: int
    index: torch.Tensor
    weight: float = 1.0


TIE_BREAK = 1e-6
"""Weight of the producers' pre-activation correlations, which only decide between units
whose consumer-side activations tie (e.g. units that never fire)."""

FLAT = 1e-6
"""A unit whose range in the first batch is at most this fraction of its group's widest may
be dead (flat) over the data (dead: 1e-12 over all of it): its group keeps its tie-breakers."""

FLAT_ROWS = 4096
"""Rows of the first batch a group's units are checked on (fewer rows can only keep more tie-breakers)."""


UNITS_FIRST = 64
"""A probed tensor whose channel dim is followed by at least this many values (a conv's H x W) is copied unit by
unit, as (C, samples): the runs are copied as they lie (an (samples, C) copy reads one value per run, about 2x
slower); the block is handed on as its (samples, C) transpose (column-major)."""


CHANNELS_FIRST_NORMS = ("LayerNorm2d",)
"""LayerNorm subclasses (torchvision's, timm's) that normalize dim 1 of (N, C, H, W) inputs."""


def probes_of(model: nn.Module, group: PermGroup, *, modules: dict[str, nn.Module] | None = None) -> list[Probe]:
    """Probes of ``group``: the inputs of its consumers (weight 1) plus its producers' outputs
    as tie-breakers, or the producers' outputs alone (weight 1) when nothing consumes it.
    ``modules``: ``dict(model.named_modules())``, when the caller has it (one walk for all groups)."""
    modules = dict(model.named_modules()) if modules is None else modules
    ins, outs = [], []
    for axis in group.axes:
        name, _, param = axis.key.rpartition(".")
        m = modules.get(name)
        if isinstance(m, nn.MultiheadAttention) and param == "in_proj_weight" and axis.dim == 0:
            ins.append(Probe(name, "proj", -1, axis.index))  # q/k/v of each token, pooled over tokens
            continue
        if m is None or param not in ("weight", "running_mean") or _inside_attention(name, modules):
            continue  # (an attention's out_proj runs inside F.multi_head_attention_forward: no hooks fire)
        if is_conv1d(m) and param == "weight":  # HF Conv1D: weight [in, out]
            (outs if axis.dim == 1 else ins).append(Probe(name, "out" if axis.dim == 1 else "in", -1, axis.index))
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


def _inside_attention(name: str, modules: dict[str, nn.Module]) -> bool:
    """Whether module ``name`` is the ``out_proj`` of an ``nn.MultiheadAttention``."""
    parent, _, child = name.rpartition(".")
    return child == "out_proj" and isinstance(modules.get(parent), nn.MultiheadAttention)


def _samples(y: torch.Tensor, dim: int, index: torch.Tensor, mask: torch.Tensor | None = None,
             items: int | None = None) -> torch.Tensor:
    """(samples, channels) copy of a probed tensor (blocks become samples), float32 for
    float32 and narrower activations (no float64 copy), else float64; column-major where each
    channel's values lie in runs of :data:`UNITS_FIRST` or more. ``mask`` (N, T) drops
    the padded tokens of an (N, T, ..., C) tensor with channels last. ``items``: of the first
    items of dim 0 only (:func:`_leading`)."""
    c, k = index.shape
    y = y if items is None else y[:items]
    if (mask is not None and y.dim() >= 3 and dim % y.dim() == y.dim() - 1
            and tuple(y.shape[:2]) == tuple(mask.shape)):
        y, dim = y[mask.to(y.device)], -1
    dtype = torch.float64 if y.dtype == torch.float64 or not y.is_floating_point() else torch.float32
    moved = y.detach().movedim(dim, -1)
    flat = index.flatten()
    start = int(flat[0])
    if k == 1 and torch.equal(flat, torch.arange(start, start + c)):  # plain channels: no gather
        if math.prod(y.shape[dim % y.dim() + 1:]) >= UNITS_FIRST:  # copied run by run
            picked = y.detach().movedim(dim, 0).narrow(0, start, c)
            return torch.empty(picked.shape, dtype=dtype, device=y.device).copy_(picked).view(c, -1).T
        picked = moved.narrow(-1, start, c)
        return torch.empty(picked.shape, dtype=dtype, device=y.device).copy_(picked).view(-1, c)
    picked = moved.index_select(-1, flat.to(y.device)).reshape(-1, c, k)
    return picked.transpose(1, 2).reshape(-1, c).to(dtype)


def _leading(y: torch.Tensor, dim: int, index: torch.Tensor, rows: int, mask: torch.Tensor | None) -> int:
    """How many items of dim 0 hold the first ``rows`` samples of :func:`_samples` (all where they do not
    start there)."""
    if mask is not None or y.dim() < 2 or dim % y.dim() == 0:
        return y.shape[0] if y.dim() else 0
    return min(y.shape[0], -(-rows // max(1, y[0].numel() // max(1, y.shape[dim]) * index.shape[1])))


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
    check_same_heads([a, b], ["the reference", "the model to align"])
    modules = [dict(model.named_modules()) for model in (a, b)]
    probe_lists = {g.name: probes_of(a, g, modules=modules[0]) for g in groups}
    for g in groups:
        if not probe_lists[g.name]:
            raise ValueError(f"group '{g.name}' has no layer whose activations can be observed: "
                             "use align='weight' or pass groups that name a conv/linear/norm layer")
    specs = [_capture_spec(table, probe_lists, {}) for table in modules]
    moments: dict[tuple[str, int], CrossMoments] = {}
    workspace: dict = {}  # float32 product buffers, reused by every probe of one width
    keeps_ties = {g: False for g, plist in probe_lists.items() if all(p.weight == 1.0 for p in plist)}
    # group -> its tie-breakers are measured (decided on the first batch; False: it has none)
    called: tuple[set, set] = (set(), set())  # per model: linears caught at F.linear (swin's attention)
    later: dict[str, list] = {}  # group -> the last batch's pairs, measured when its correlations are read
    for n_batch, (batch, last) in enumerate(_each_batch(data)):
        if n_batch == 1:  # the tie-breakers of groups the first batch cleared are not captured any more
            specs = [_capture_spec(table, probe_lists, keeps_ties) for table in modules]
        ya = capture(a, batch, specs[0], forward_fn, called[0])
        yb = capture(b, batch, specs[1], forward_fn, called[1])
        if function_linears(specs[0], ya, called[0]) | function_linears(specs[1], yb, called[1]):
            ya = capture(a, batch, specs[0], forward_fn, called[0])  # linears a parent runs through F.linear
            yb = capture(b, batch, specs[1], forward_fn, called[1])
        mask = batch_mask(batch)  # padded tokens are left out
        for name, plist in probe_lists.items():
            used: set[tuple] = set()
            may_be_dead = distributed.is_distributed()
            for i, p in enumerate(plist):  # the weight-1 probes come first
                if p.weight != 1.0 and not keeps_ties.setdefault(name, may_be_dead):
                    continue  # every unit varies: nothing ties, the tie-breaker is not measured
                key = (name, i)
                if key not in ya or key not in yb:
                    raise ValueError(f"layer '{p.module}' did not run in the forward pass: check forward_fn")
                seen_as = (id(ya[key]), id(yb[key]), p.dim, int(p.index.min()), p.index.numel())
                if seen_as in used:
                    continue  # two consumers of one tensor: count it once
                used.add(seen_as)
                if ya[key].dim() == 0 or ya[key].shape[p.dim] <= int(p.index.max()):
                    raise ValueError(f"layer '{p.module}' has {ya[key].shape[p.dim] if ya[key].dim() else 0} "
                                     f"channels on dim {p.dim} of its {p.side}put {list(ya[key].shape)} but group "
                                     f"'{name}' needs {int(p.index.max()) + 1}: use align='weight' for this model")
                heads = None  # the samples the flat-unit check reads, kept when they are all of them
                if p.weight == 1.0 and name not in keeps_ties and not may_be_dead:
                    items = _leading(ya[key], p.dim, p.index, FLAT_ROWS, mask)
                    heads = tuple(_samples(y[key], p.dim, p.index, mask, items) for y in (ya, yb))
                    may_be_dead = any(_has_flat_unit(side) for side in heads)
                    heads = heads if items == ya[key].shape[0] else None

                def pair(ya_=ya[key], yb_=yb[key], p=p, mask=mask, heads=heads) -> tuple[torch.Tensor, torch.Tensor]:
                    return heads or (_samples(ya_, p.dim, p.index, mask), _samples(yb_, p.dim, p.index, mask))
                if last and not distributed.is_distributed():  # (pooling over ranks needs every moment first)
                    later.setdefault(name, []).append((key, pair))
                else:
                    _moments_of(moments, key, workspace).add_pair(*pair())
    if distributed.is_distributed():  # pooled over ranks
        for k in sorted(moments):
            moments[k].settle()
        _Moments.all_reduce_([moments[k] for k in sorted(moments)])
    perms, dead, assign_seconds = _assign_units(groups, moments, probe_lists, later, workspace)
    return Alignment(perms, "activation", time.perf_counter() - start, dead_units=dead,
                     assign_seconds=assign_seconds)


def _assign_units(groups: Sequence[PermGroup], moments: dict, probe_lists: dict[str, list[Probe]], later: dict,
                  workspace: dict) -> tuple[dict, dict, float]:
    """``(perms, dead units, seconds in the assignments)``: each unit's correlations, then its assignment
    (the correlation buffers are reused by the next unit)."""
    perms, dead, assign_seconds, buffers = {}, {}, 0.0, {}
    for unit in units(groups):
        corrs = _correlations(unit, moments, probe_lists, buffers, dead, later,
                              lambda key: _moments_of(moments, key, workspace))
        started = time.perf_counter()
        if unit[0].head_size is not None:  # attention: heads move as units, alike in q/k and v/out
            perms.update(zip([g.name for g in unit], assign_heads([corrs[g.name] for g in unit], unit)))
        else:
            perms[unit[0].name] = assign(corrs[unit[0].name], unit[0].labels)
        assign_seconds += time.perf_counter() - started
    return perms, dead, assign_seconds


def _capture_spec(modules: dict[str, nn.Module], probe_lists: dict[str, list[Probe]], keeps_ties: dict[str, bool]
                  ) -> dict[nn.Module, list]:
    """What :func:`capture` records of a model (``modules``: by name): module -> ``((group, probe index), side)``;
    tie-breakers only of the groups ``keeps_ties`` does not rule out."""
    spec: dict[nn.Module, list] = {}
    for name, plist in probe_lists.items():
        for i, p in enumerate(plist):
            if p.weight == 1.0 or keeps_ties.get(name, True):
                spec.setdefault(modules[p.module], []).append(((name, i), p.side))
    return spec


def _has_flat_unit(samples: torch.Tensor) -> bool:
    """Whether a unit (column) of ``samples`` is flat on its first :data:`FLAT_ROWS` rows: its range at
    most :data:`FLAT` of the widest. A unit flat over all the data is flat on any of its rows, so a
    group these rows clear has no dead unit.

    >>> _has_flat_unit(torch.tensor([[0.0, 1.0], [0.0, 2.0]])), _has_flat_unit(torch.eye(2))
    (True, False)
    """
    rows = samples[:FLAT_ROWS]
    if rows.shape[0] < 2:
        return True
    spread = rows.amax(0) - rows.amin(0)  # (torch.aminmax over dim 0 is about 10x slower on CPU)
    return bool((spread <= FLAT * spread.max()).any())


def _moments_of(moments: dict, key: tuple[str, int], workspace: dict) -> CrossMoments:
    """``moments[key]``, a new :class:`CrossMoments` sharing ``workspace`` the first time."""
    if key not in moments:
        moments[key] = CrossMoments(workspace)
    return moments[key]


def _each_batch(data: Any) -> Iterator[tuple[Any, bool]]:
    """The batches of ``data`` (as :func:`as_batches`), one at a time, each with whether it is the last
    (one batch read ahead): a DataLoader or a generator is never held in memory whole."""
    if isinstance(data, (torch.Tensor, dict, tuple)) or not isinstance(data, Iterable):
        data = as_batches(data)
    batches, none = iter(data), object()
    batch = next(batches, none)
    if batch is none:
        raise ValueError("the calibration data is empty: pass at least one batch")
    while True:
        after = next(batches, none)
        yield batch, after is none
        if after is none:
            return
        batch = after
