"""Observing (and correcting) site outputs during a pass, however the producer is called.

A site's output is reached in one of three ways, named by :attr:`Site.call`:

- ``"module"``: a forward hook on the site's module (conv/linear/Conv1D/norm);
- ``"function"``: an ``nn.Linear`` whose weight a parent passes to ``F.linear`` (swin_t), so
  its own hooks never fire: the call is caught through the weight (:class:`~.watched.Watch`,
  which leaves every other torch call of the pass alone);
- ``"attention"``: the q/k/v projections and ``out_proj`` of an ``nn.MultiheadAttention``,
  computed inside ``F.multi_head_attention_forward``, caught the same way (through the
  in-projection weight, which also turns off the fused fast path that would bypass it). Packed
  self-attention without masks (ViT) is run with its in-projection computed once, q/k/v
  measured and corrected on the way (:mod:`.attention_once`); any other call gets q/k/v
  recomputed for measuring (``x @ W_q^T + b_q``, exactly linear in its inputs) and its
  corrections folded into the in-projection for the call. The attention's output IS
  ``out_proj``'s output.

When a batch is a dict with an ``attention_mask`` (N, T), outputs shaped (N, T, ..., C)
are measured on the unmasked positions only.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from .find import find_sites
    >>> mha = nn.MultiheadAttention(4, 2, batch_first=True)
    >>> x = torch.randn(3, 5, 4)
    >>> seen = {}
    >>> taps = SiteTaps(mha, find_sites(mha, (x, x, x), forward_fn=lambda m, b: m(*b)),
    ...                 lambda site, y, mask: seen.setdefault(site.fqn, tuple(y.shape)))
    >>> with taps.attached(lambda b: mha(*b)) as run:
    ...     _ = run((x, x, x))
    >>> seen
    {'in_proj:q': (3, 5, 4), 'in_proj:k': (3, 5, 4), 'in_proj:v': (3, 5, 4), 'out_proj': (3, 5, 4)}
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..run.forward import batch_mask, first_tensor
from ..producers import PARTS, split_part
from .attention_once import bind, projects_once, recomputed, self_attention
from .find import Site
from .watched import Watch

Observe = Callable[[Site, torch.Tensor, "torch.Tensor | None"], None]
"""``observe(site, output, mask)``: ``mask`` (bool, the output's leading dims) or None."""
Correction = Callable[[Site], "tuple[torch.Tensor, torch.Tensor] | None"]
"""``correction(site) -> (scale, shift)`` to apply to the output now, or None."""

LINEAR_FUNCS = (F.linear, torch._C._nn.linear)


def scale_shift(y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, channel_dim: int,
                in_place: bool = False) -> torch.Tensor:
    """``scale * y + shift`` per channel along ``channel_dim``; ``in_place`` writes it into ``y``
    (the same values, no new activation-sized tensor to allocate and page in).

    >>> y = torch.ones(2, 3)
    >>> scale_shift(y, torch.tensor([1.0, 2.0, 3.0]), torch.zeros(3), -1, in_place=True) is y, y[0].tolist()
    (True, [1.0, 2.0, 3.0])
    """
    view = [1] * y.dim()
    view[channel_dim] = -1
    return torch.addcmul(shift.to(y.dtype).view(view), y, scale.to(y.dtype).view(view), out=y if in_place else None)


def output_mask(mask: torch.Tensor | None, channel_dim: int, y: torch.Tensor) -> tuple[torch.Tensor | None, bool]:
    """``(mask to measure y with, whether the batch's mask fits y)``: an (N, T) mask applies to
    (N, T, ..., C) outputs; None when there is no mask or one value per sample (nothing padded)."""
    if mask is None or y.dim() < 2 or (y.dim() == 2 and y.shape[0] == mask.shape[0]):
        return None, True
    if y.dim() >= 3 and channel_dim % y.dim() == y.dim() - 1 and tuple(y.shape[:2]) == tuple(mask.shape):
        return mask.to(y.device), True
    return None, False


def warn_unfit_mask(fqn: str, mask: torch.Tensor, y: torch.Tensor, stacklevel: int = 3) -> None:
    """Say that a site's statistics count padded positions (the mask does not fit its output)."""
    warnings.warn(f"the attention mask {list(mask.shape)} does not fit the output {list(y.shape)} of site "
                  f"'{fqn}': its statistics count padded positions too", stacklevel=stacklevel)


class _Calls:
    """The calls that use a watched tensor (:class:`~.watched.Watch`): ``F.linear(x, weight, bias)``
    whose weight is watched, ``F.multi_head_attention_forward`` whose in-projection is; others run as they are."""

    def __init__(self, on_linear: Callable[[Any, torch.Tensor], torch.Tensor | None], linears: dict[int, Any],
                 on_attention: Callable[..., Any], attentions: dict[int, Any]):
        self.on_linear, self.linears = on_linear, linears
        self.on_attention, self.attentions = on_attention, attentions

    def __call__(self, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        if func is F.multi_head_attention_forward and self.attentions:
            call = bind(args, kwargs)
            key = self.attentions.get(id(call["in_proj_weight"]))
            if key is not None:
                return self.on_attention(key, call, lambda: func(*args, **kwargs))
        out = func(*args, **kwargs)
        if func in LINEAR_FUNCS:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            key = self.linears.get(id(weight))
            if key is not None:
                new = self.on_linear(key, out)
                return out if new is None else new
        return out


class SiteTaps:
    """Hooks that hand each site's output to ``observe`` and apply ``correction`` to it."""

    def __init__(self, model: nn.Module, sites: list[Site], observe: Observe, correction: Correction | None = None):
        self.model, self.sites, self.observe = model, list(sites), observe
        self.correction = correction or (lambda site: None)
        self._local = threading.local()  # the batch's attention mask, per thread (lockstep passes share the taps)
        self._warned: set[str] = set()

    @property
    def mask(self) -> torch.Tensor | None:
        """The attention mask of the batch the calling thread is running (None: no padding)."""
        return getattr(self._local, "mask", None)

    @mask.setter
    def mask(self, value: torch.Tensor | None) -> None:
        self._local.mask = value

    def _mask_for(self, site: Site, y: torch.Tensor) -> torch.Tensor | None:
        mask, fits = output_mask(self.mask, site.channel_dim, y)
        if not fits and site.fqn not in self._warned:
            self._warned.add(site.fqn)
            warn_unfit_mask(site.fqn, self.mask, y, stacklevel=4)
        return mask

    def _measure(self, site: Site, y: torch.Tensor) -> None:
        self.observe(site, y, self._mask_for(site, y))

    def _tap(self, site: Site, y: torch.Tensor, measured: torch.Tensor | None = None) -> torch.Tensor | None:
        self._measure(site, y if measured is None else measured)
        c = self.correction(site)
        if c is None:
            return None
        # a site's output is a fresh tensor of its producer (or a view of one): corrected in place,
        # unless autograd records it (then a new tensor, as the graph may need the old values)
        in_place = not (y.requires_grad and torch.is_grad_enabled())
        return scale_shift(y, c[0], c[1], site.channel_dim, in_place=in_place)

    def _module_hook(self, site: Site) -> Callable:
        def hook(module, inputs, output):
            y = first_tensor(output)
            if y is None:
                return None
            new = self._tap(site, y)
            if new is None:
                return None
            return new if isinstance(output, torch.Tensor) else type(output)((new, *output[1:]))
        return hook

    def _attention_pre(self, entry: tuple) -> Callable:
        """For attention calls the mode does not catch (the model called outside ``run``, as
        RecordStats lets it be): q/k/v recomputed from the module's inputs before the call."""
        mha = entry[0]

        def pre(module, args, kwargs):
            if getattr(self._local, "caught", False):
                return None  # the mode runs this call
            inputs = list(args[:3]) + [kwargs.get(k) for k in ("query", "key", "value")[len(args):]]
            seq_first = [x.transpose(0, 1) if mha.batch_first and x.dim() == 3 else x for x in inputs]
            call = {"query": seq_first[0], "key": seq_first[1], "value": seq_first[2],
                    "in_proj_weight": mha.in_proj_weight, "in_proj_bias": mha.in_proj_bias}
            return self._attention_call(entry, call, lambda: None, once=False)
        return pre

    def _attention_call(self, entry: tuple, call: dict[str, Any], run: Callable[[], Any], once: bool = True) -> Any:
        """One attention call: q/k/v measured and corrected (projected once where :func:`projects_once`
        allows; else recomputed for measuring and the corrections folded into the in-projection
        for the call, restored after it by the module's forward hook)."""
        mha, parts, patches = entry
        present = [(i, parts[p]) for i, p in enumerate(PARTS) if p in parts]

        def measured(ys: list[torch.Tensor]) -> list[tuple[int, Site, tuple]]:
            for i, site in present:  # q, k, v all measured before any correction (lockstep threads)
                self._measure(site, _batch_first(ys[i]))
            return [(i, site, c) for i, site in present if (c := self.correction(site)) is not None]

        if once and projects_once(call):
            def hand(*ys: torch.Tensor) -> tuple[torch.Tensor, ...]:
                ys = list(ys)
                for i, site, c in measured(ys):
                    ys[i] = scale_shift(ys[i], c[0], c[1], -1)
                return tuple(ys)
            return self_attention(call, hand)
        weight, bias = call["in_proj_weight"], call["in_proj_bias"]  # the tensors themselves (no stand-ins)
        e = mha.embed_dim
        for i, site, c in measured(recomputed(call)):
            if not patches:  # fold into the in-projection for this call; restored after it
                patches.extend((t, t.detach().clone()) for t in (weight, bias) if t is not None)
            weight[i * e:(i + 1) * e].mul_(c[0].to(weight.dtype)[:, None])
            if bias is not None:
                bias[i * e:(i + 1) * e].mul_(c[0].to(bias.dtype)).add_(c[1].to(bias.dtype))
        return run()

    def _attention_post(self, mha: nn.MultiheadAttention, out: Site | None, patches: list) -> Callable:
        def post(module, inputs, output):
            _restore(patches)
            if out is None:
                return None
            y = output[0]
            new = self._tap(out, y, y if mha.batch_first or y.dim() != 3 else y.transpose(0, 1))
            return None if new is None else (new, *output[1:])
        return post

    @contextlib.contextmanager
    def attached(self, forward: Callable[[Any], Any]) -> Iterator[Callable[[Any], Any]]:
        """Register the taps; yields ``run(batch)`` (``forward`` with the batch's mask set).
        Everything is removed, and attention weights restored, on exit."""
        handles, self._patches = [], []
        function_sites: dict[int, Site] = {}
        watched: list[torch.Tensor] = []  # the weights whose calls are caught
        attention: dict[str, dict[str, Any]] = {}
        for site in self.sites:
            if site.call == "attention":
                owner, part = split_part(site.fqn)
                entry = attention.setdefault(owner if part else site.fqn.rpartition(".")[0], {"parts": {}, "out": None})
                if part:
                    entry["parts"][part] = site
                else:
                    entry["out"] = site
            elif site.call == "function":
                watched.append(self.model.get_submodule(site.producer).weight)
                function_sites[id(watched[-1])] = site
            else:
                module = self.model.get_submodule(site.fqn)
                handles.append(module.register_forward_hook(self._module_hook(site)))
        try:
            attentions: dict[int, tuple] = {}
            for owner, entry in attention.items():
                mha, patches = self.model.get_submodule(owner), []
                self._patches.append(patches)
                if entry["parts"]:
                    watched.append(mha.in_proj_weight)
                    held = attentions[id(mha.in_proj_weight)] = (mha, entry["parts"], patches)
                    handles.append(mha.register_forward_pre_hook(self._attention_pre(held), with_kwargs=True))
                handles.append(mha.register_forward_hook(self._attention_post(mha, entry["out"], patches)))
            calls = _Calls(lambda site, y: self._tap(site, y), function_sites, self._attention_call, attentions)
            watch = Watch(self.model, watched, calls) if watched else contextlib.nullcontext()

            def run(batch: Any) -> Any:
                self.mask = batch_mask(batch)
                self._local.caught = bool(attentions)
                try:
                    with watch:
                        return forward(batch)
                finally:
                    self.mask, self._local.caught = None, False
                    for patches in self._patches:
                        _restore(patches)

            yield run
        finally:
            for handle in handles:
                handle.remove()
            for patches in self._patches:
                _restore(patches)


def _batch_first(t: torch.Tensor) -> torch.Tensor:
    """An attention call's (L, N, E) tensor as (N, L, E); unbatched ones as they are."""
    return t.transpose(0, 1) if t.dim() == 3 else t


def _restore(patches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        while patches:
            target, saved = patches.pop()
            target.copy_(saved)
