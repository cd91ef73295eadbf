"""Which outputs get corrected: the *sites* of a model.

A site is the output of a conv/linear layer, taken after its BatchNorm when one
consumes that output directly. Sites are found for any model that runs forward:
a walk over the modules plus one hooked forward pass that records the order in
which modules run and which tensor each one consumed. No per-architecture tables.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
    ...                       nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    >>> [s.fqn for s in find_sites(model, torch.randn(2, 1, 8, 8))]
    ['1']
    >>> [s.fqn for s in find_sites(model, torch.randn(2, 1, 8, 8), include_classifier=True)]
    ['1', '4']
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..run.forward import ForwardFn, as_batches
from ..run.distributed import unwrap
from ..producers import PARTS, is_packed_attention, is_producer, out_channels, part_fqn
from .trace import NORM_TYPES, Call, FunctionCall, trace_calls

PRODUCER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
"""Layers whose output channels are weight rows a correction can be folded into (plus HF
``Conv1D``, see :func:`~prune_repair.engine.producers.is_producer`, and attention projections)."""

FilterFn = Callable[[nn.Module, str], bool]
Selector = FilterFn | Sequence[str] | str | None


@dataclass(frozen=True)
class Site:
    """One corrected output.

    Attributes:
        fqn: module whose output is corrected (the norm when one follows).
        producer: the conv/linear layer that produced the channels.
        norm: the norm between producer and output (BatchNorm, or a GroupNorm/LayerNorm
            with a per-channel affine), or None.
        channel_dim: 1 for (N, C, ...) outputs, -1 for linear outputs (N, ..., C).
        channels: number of channels.
        kind: ``"layer"``, or ``"block"`` for a residual-block output (measurable, but a
            correction there cannot be folded into the original architecture).
        call: how the output is reached: ``"module"`` (a hook on ``fqn``), ``"function"``
            (a linear whose weight a parent passes to ``F.linear``) or ``"attention"`` (the
            q/k/v projections ``<mha>.in_proj:q`` ... and ``<mha>.out_proj`` of an
            ``nn.MultiheadAttention``); see :mod:`prune_repair.engine.sites.taps`.
    """

    fqn: str
    producer: str
    norm: str | None
    channel_dim: int
    channels: int
    kind: str = "layer"
    call: str = "module"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Site":
        return cls(**d)


def make_filter(select: Selector) -> FilterFn | None:
    r"""Turn FQN strings / ``re:`` patterns (or a callable) into ``filter_fn(module, fqn)``.

    >>> f = make_filter(["fc1", r"re:^features\.\d+$"])
    >>> f(None, "fc1"), f(None, "features.3"), f(None, "fc2")
    (True, True, False)
    """
    if select is None or callable(select):
        return select
    patterns = [select] if isinstance(select, str) else list(select)
    exact = {p for p in patterns if not p.startswith("re:")}
    regexes = [re.compile(p[3:]) for p in patterns if p.startswith("re:")]

    def filter_fn(module: nn.Module, fqn: str) -> bool:
        return fqn in exact or any(r.search(fqn) for r in regexes)

    return filter_fn


def find_sites(
    model: nn.Module,
    example_inputs: Any,
    *,
    select: Selector = None,
    include_classifier: bool = False,
    blocks: Selector = None,
    forward_fn: ForwardFn | None = None,
) -> list[Site]:
    """Sites of ``model`` in execution order, found with one hooked forward pass.

    Args:
        model: any module that runs forward on ``example_inputs``.
        example_inputs: one batch (tensor, ``(x, y)`` tuple or dict; see ``forward_fn``).
        select: ``filter_fn(module, fqn) -> bool``, or FQN strings / ``re:`` regexes,
            matched against the producer's or the site's FQN. Default: every site.
        include_classifier: also correct the last conv/linear layer (off by default).
        blocks: modules (FQNs / ``re:`` / filter_fn) whose outputs are extra ``"block"``
            sites, e.g. residual blocks (REPAIR paper sec. 5.2). Their statistics can be
            collected; :func:`~prune_repair.repair_` refuses to correct them, since the
            output of a residual sum has no weights of its own to fold a correction into.
        forward_fn: ``forward_fn(model, batch)`` for batches that are not plain tensors.

    Layers called more than once per forward (weight sharing) are skipped: one
    per-channel affine cannot be folded into a layer that serves two call sites.
    A ``DistributedDataParallel`` model is traced through its ``.module`` (FQNs without
    the ``module.`` prefix, as the other engine functions use them).
    """
    model = unwrap(model)
    extra = block_modules(model, blocks)
    calls = trace_calls(model, as_batches(example_inputs)[0], forward_fn=forward_fn, extra=extra)
    return sites_of_calls(calls, extra, select=select, include_classifier=include_classifier)


def block_modules(model: nn.Module, blocks: Selector) -> list[nn.Module]:
    """The modules ``blocks`` names (see :func:`find_sites`); raises when it names none."""
    block_filter = make_filter(blocks)
    extra = [] if block_filter is None else [m for name, m in model.named_modules() if name and block_filter(m, name)]
    if blocks is not None and not extra:
        raise ValueError(f"blocks={blocks!r} matches no submodule: give FQNs such as 'layer1.0' or 're:' patterns")
    return extra


def sites_of_calls(calls: list["Call"], extra: Sequence[nn.Module], *, select: Selector = None,
                   include_classifier: bool = False) -> list[Site]:
    """:func:`find_sites`'s sites from the calls of one traced forward (``extra``: the modules whose
    outputs are ``"block"`` sites), in execution order; raises when there are none."""
    sites = sites_from_calls(calls, select=select, include_classifier=include_classifier)
    order = {fqn: i for i, (fqn, *_rest) in enumerate(calls)}
    extra_ids = {id(m) for m in extra}
    for fqn, module, _, y in calls:
        if id(module) in extra_ids and y is not None and y.dim() >= 2:
            sites.append(Site(fqn, fqn, None, block_channel_dim(y), int(y.shape[block_channel_dim(y)]), kind="block"))
    if not sites:
        if select is not None and sites_from_calls(calls, include_classifier=True):
            raise ValueError(f"the selection {select!r} matches no site: give the FQN of a conv/linear layer "
                             "(or its norm) or a 're:' pattern; find_sites(model, inputs) lists them all")
        raise ValueError(
            "found no site in the model: no conv/linear/Conv1D layer or attention projection ran on the "
            "example inputs" + ("" if include_classifier else " other than the classifier (pass "
                                "include_classifier=True to correct it)")
            + "; check that forward_fn feeds the batch to the model")
    owner = {s.fqn: split_owner(s.fqn) for s in sites}
    return sorted(sites, key=lambda s: order.get(s.fqn, order.get(owner[s.fqn], 0)))


def block_channel_dim(y: "torch.Tensor") -> int:
    """The channel dim of a block output: 1 for feature maps (N, C, ...), -1 for tokens."""
    return 1 if y.dim() > 3 else -1


def split_owner(fqn: str) -> str:
    """The module that runs an attention site: ``'a.in_proj:q'`` and ``'a.out_proj'`` -> ``'a'``."""
    head, sep, _ = fqn.rpartition(".in_proj:")
    return head if sep else fqn.rpartition(".")[0]


def sites_from_calls(calls: list[Call], *, select: Selector = None, include_classifier: bool = False) -> list[Site]:
    """Sites from a trace made by :func:`trace_calls` (see :func:`find_sites`).

    The classifier is the last conv/linear layer that ran (a head that never runs in eval,
    like googlenet's auxiliary classifiers, is not it)."""
    filter_fn = make_filter(select)
    call_counts: dict[str, int] = {}
    for fqn, *_ in calls:
        call_counts[fqn] = call_counts.get(fqn, 0) + 1
    consumer_norm = {id(x): (fqn, m) for fqn, m, x, _ in calls if isinstance(m, NORM_TYPES) and x is not None}

    producers = [(fqn, m, y) for fqn, m, _, y in calls if y is not None and (
        is_producer(m) or isinstance(m, (FunctionCall, nn.MultiheadAttention)))]
    if not include_classifier:
        last = [i for i, (_, m, _) in enumerate(producers) if not isinstance(m, nn.MultiheadAttention)]
        if last:
            del producers[last[-1]]
    sites: list[Site] = []

    def keep(module: nn.Module, site: Site, *names: str) -> None:
        if filter_fn is None or any(filter_fn(module, n) for n in (site.producer, site.fqn, *names)):
            sites.append(site)

    shared = sorted({fqn for fqn, m, _ in producers if call_counts[fqn] > 1 and (filter_fn is None or filter_fn(m, fqn))})
    if shared:
        warnings.warn(f"{len(shared)} layer(s) run more than once per forward and are not corrected (one "
                      f"per-channel affine cannot serve two call sites): {', '.join(shared)}", stacklevel=3)
    for fqn, module, y in producers:
        if call_counts[fqn] > 1 or fqn in {s.producer for s in sites}:
            continue
        if isinstance(module, nn.MultiheadAttention):
            for site in _attention_sites(fqn, module):
                keep(module, site, fqn)
            continue
        call = "function" if isinstance(module, FunctionCall) else "module"
        module = module.module if isinstance(module, FunctionCall) else module
        channels = out_channels(module)
        channel_dim = 1 if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) else -1
        norm_fqn, norm = consumer_norm.get(id(y), (None, None))
        norm_dim = _per_channel_norm_dim(norm, channels, channel_dim)
        if norm_dim is not None and call_counts[norm_fqn] == 1:
            site = Site(fqn=norm_fqn, producer=fqn, norm=norm_fqn, channel_dim=norm_dim, channels=channels)
        else:
            site = Site(fqn=fqn, producer=fqn, norm=None, channel_dim=channel_dim, channels=channels, call=call)
        keep(module, site)
    return sites


def _attention_sites(fqn: str, mha: nn.MultiheadAttention) -> list[Site]:
    """q/k/v sites of a packed in-projection, and the ``out_proj`` site, of one attention module."""
    e = int(mha.embed_dim)
    sites = [Site(part_fqn(fqn, p), part_fqn(fqn, p), None, -1, e, call="attention")
             for p in PARTS if is_packed_attention(mha)]
    if not is_packed_attention(mha):
        warnings.warn(f"attention '{fqn}' has separate q/k/v weights (kdim/vdim differ from embed_dim): "
                      "its projections are not corrected, only its out_proj", stacklevel=4)
    out = f"{fqn}.out_proj" if fqn else "out_proj"
    return sites + [Site(out, out, None, -1, int(mha.out_proj.out_features), call="attention")]


def _per_channel_norm_dim(norm: nn.Module | None, channels: int, channel_dim: int) -> int | None:
    """Channel dim of a norm's output if a per-channel correction there folds into it, else None.

    BatchNorm always (affine parameters or running statistics); GroupNorm and LayerNorm
    when they carry a per-channel affine over exactly the producer's channels.
    """
    if isinstance(norm, _BatchNorm):
        return 1
    if isinstance(norm, nn.GroupNorm) and norm.affine and norm.num_channels == channels and channel_dim == 1:
        return 1
    if (isinstance(norm, nn.LayerNorm) and norm.weight is not None and tuple(norm.normalized_shape) == (channels,)
            and channel_dim == -1):
        return -1
    return None
