"""Observing (and correcting) site outputs during a pass, however the producer is called.

A site's output is reached in one of three ways, named by :attr:`Site.call`:

- ``"module"``: a forward hook on the site's module (conv/linear/Conv1D/norm);
- ``"function"``: an ``nn.Linear`` whose weight a parent passes to ``F.linear`` (swin_t), so
  its own hooks never fire: a :class:`~torch.overrides.TorchFunctionMode` catches the call;
- ``"attention"``: the q/k/v projections and ``out_proj`` of an ``nn.MultiheadAttention``,
  computed inside ``F.multi_head_attention_forward``. q/k/v are exactly linear in the
  attention's inputs, so a pre-hook recomputes them (``x @ W_q^T + b_q``) and applies a
  correction by folding it into the in-projection for the duration of the call; the
  attention's output IS ``out_proj``'s output.

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
from torch.overrides import TorchFunctionMode

from ..run.forward import batch_mask, first_tensor
from ..producers import PARTS, split_part
from .find import Site

Observe = Callable[[Site, torch.Tensor, "torch.Tensor | None"], None]
"""``observe(site, output, mask)``: ``mask`` (bool, the output's leading dims) or None."""
Correction = Callable[[Site], "tuple[torch.Tensor, torch.Tensor] | None"]
"""``correction(site) -> (scale, shift)`` to apply to the output now, or None."""

LINEAR_FUNCS = (F.linear, torch._C._nn.linear)


def scale_shift(y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """``scale * y + shift`` per channel along ``channel_dim``."""
    view = [1] * y.dim()
    view[channel_dim] = -1
    return torch.addcmul(shift.to(y.dtype).view(view), y, scale.to(y.dtype).view(view))


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


class _LinearCalls(TorchFunctionMode):
    """Catches ``F.linear(x, weight, bias)`` whose weight is a watched tensor."""

    def __init__(self, on_call: Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None],
                 weights: dict[int, Any]):
        super().__init__()
        self.on_call, self.weights = on_call, weights

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in LINEAR_FUNCS:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            key = self.weights.get(id(weight))
            if key is not None:
                new = self.on_call(key, out)
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
        return None if c is None else scale_shift(y, c[0], c[1], site.channel_dim)

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

    def _attention_hooks(self, mha: nn.MultiheadAttention, parts: dict[str, Site], out: Site | None):
        patches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._patches.append(patches)

        def pre(module, args, kwargs):
            inputs = list(args[:3]) + [kwargs.get(k) for k in ("query", "key", "value")[len(args):]]
            e = mha.embed_dim
            weight, bias = mha.in_proj_weight, mha.in_proj_bias
            present = [(i, p, slice(i * e, (i + 1) * e)) for i, p in enumerate(PARTS) if p in parts]
            for i, p, rows in present:  # measure q, k, v all before any fold (threads in lockstep share the weight)
                y = F.linear(inputs[i], weight[rows], None if bias is None else bias[rows])
                self._measure(parts[p], y if mha.batch_first or y.dim() != 3 else y.transpose(0, 1))
            for i, p, rows in present:
                c = self.correction(parts[p])
                if c is None:
                    continue
                if not patches:  # fold into the in-projection for this call; restored after it
                    patches.extend((t, t.detach().clone()) for t in (weight, bias) if t is not None)
                weight[rows].mul_(c[0].to(weight.dtype)[:, None])
                if bias is not None:
                    bias[rows].mul_(c[0].to(bias.dtype)).add_(c[1].to(bias.dtype))
            return None

        def post(module, inputs, output):
            _restore(patches)
            if out is None:
                return None
            y = output[0]
            new = self._tap(out, y, y if mha.batch_first or y.dim() != 3 else y.transpose(0, 1))
            return None if new is None else (new, *output[1:])

        return pre, post

    @contextlib.contextmanager
    def attached(self, forward: Callable[[Any], Any]) -> Iterator[Callable[[Any], Any]]:
        """Register the taps; yields ``run(batch)`` (``forward`` with the batch's mask set).
        Everything is removed, and attention weights restored, on exit."""
        handles, self._patches = [], []
        function_sites: dict[int, Site] = {}
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
                function_sites[id(self.model.get_submodule(site.producer).weight)] = site
            else:
                module = self.model.get_submodule(site.fqn)
                handles.append(module.register_forward_hook(self._module_hook(site)))
        try:
            for owner, entry in attention.items():
                mha = self.model.get_submodule(owner)
                pre, post = self._attention_hooks(mha, entry["parts"], entry["out"])
                handles.append(mha.register_forward_pre_hook(pre, with_kwargs=True))
                handles.append(mha.register_forward_hook(post))
            mode = (_LinearCalls(lambda site, y: self._tap(site, y), function_sites) if function_sites
                    else contextlib.nullcontext())

            def run(batch: Any) -> Any:
                self.mask = batch_mask(batch)
                try:
                    with mode:
                        return forward(batch)
                finally:
                    self.mask = None
                    for patches in self._patches:
                        _restore(patches)

            yield run
        finally:
            for handle in handles:
                handle.remove()
            for patches in self._patches:
                _restore(patches)


def _restore(patches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        while patches:
            target, saved = patches.pop()
            target.copy_(saved)
