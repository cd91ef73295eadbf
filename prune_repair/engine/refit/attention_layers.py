"""Every layer a refit can reach, in execution order, however it is called.

A refit (reconstruction, OBS) works on ``(fqn, module)`` layers whose module :class:`Gram`
understands. Besides conv/linear/HF ``Conv1D`` layers called normally (kind ``"module"``):

- ``"in_proj"``: one block of rows (q, k or v) of a packed ``nn.MultiheadAttention``
  in-projection, ``<fqn>.in_proj:q``; its module is a :class:`ProjectionRows`, an
  ``nn.Linear`` whose weight and bias SHARE storage with those rows, so writing a refit into
  it writes ``in_proj_weight`` / ``in_proj_bias`` in place (the packed layout is kept);
- ``"out_proj"``: the ``out_proj`` of an attention module, whose forward is never called
  (the attention function uses its weight);
- ``"function"``: an ``nn.Linear`` whose weight a parent passes to ``F.linear`` (swin_t).

:mod:`~prune_repair.engine.refit.attention_inputs` reaches their inputs and targets.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from ..sites.trace import trace_calls
    >>> model = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    >>> found = refit_layers(model, trace_calls(model, torch.randn(2, 3, 8)))
    >>> [(layer.fqn, layer.kind) for layer in found][:4]
    [('self_attn.in_proj:q', 'in_proj'), ('self_attn.in_proj:k', 'in_proj'), ('self_attn.in_proj:v', 'in_proj'), ('self_attn.out_proj', 'out_proj')]
    >>> rows = found[1].module
    >>> rows.weight.data_ptr() == model.self_attn.in_proj_weight[8:].data_ptr()
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..producers import PARTS, is_packed_attention, is_producer, output_rows, part_fqn, split_part
from ..sites.trace import Call, FunctionCall

__all__ = ["ProjectionRows", "RefitLayer", "refit_layers", "layer_module", "covered_owners"]


class ProjectionRows(nn.Linear):
    """The q, k or v rows of a packed attention in-projection as an ``nn.Linear`` sharing their storage
    (``weight_orig`` / ``weight_mask`` rows too under ``torch.nn.utils.prune``). Never called."""

    def __init__(self, mha: nn.MultiheadAttention, part: str):
        nn.Module.__init__(self)
        weight, bias = output_rows(mha, part)
        self.out_features, self.in_features = weight.shape
        self.part = part
        name = "weight_orig" if hasattr(mha, "in_proj_weight_orig") else "weight"
        setattr(self, name, nn.Parameter(weight.detach(), requires_grad=False))
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        mask = getattr(mha, "in_proj_weight_mask", None)
        if mask is not None:
            e = int(mha.embed_dim)
            i = PARTS.index(part)
            self.register_buffer("weight_mask", mask[i * e:(i + 1) * e], persistent=False)
            self.weight = self.weight_orig * self.weight_mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("ProjectionRows is a view for refits; the attention module computes the projection")


@dataclass
class RefitLayer:
    """One layer reached by a trace: ``kind`` (module doc), ``owner`` (the attention module's FQN
    for in_proj/out_proj, else ``fqn``) and ``calls`` (times it ran in the traced forward)."""

    fqn: str
    module: nn.Module
    kind: str
    owner: str
    calls: int


def refit_layers(model: nn.Module, calls: list[Call]) -> list[RefitLayer]:
    """Layers holding prunable weights in the order their outputs are formed (module doc);
    each once, with the number of times it ran. Separate-weight attention q/k/v are not listed."""
    found: dict[str, RefitLayer] = {}
    for fqn, module, _, _ in calls:
        if isinstance(module, nn.MultiheadAttention):
            out = f"{fqn}.out_proj" if fqn else "out_proj"
            items = [(part_fqn(fqn, p), ProjectionRows(module, p), "in_proj") for p in PARTS
                     if is_packed_attention(module)] + [(out, module.out_proj, "out_proj")]
            for name, layer, kind in items:
                _count(found, name, layer, kind, fqn)
        elif isinstance(module, FunctionCall):
            _count(found, fqn, module.module, "function", fqn)
        elif is_producer(module):
            _count(found, fqn, module, "module", fqn)
    return list(found.values())


def _count(found: dict[str, RefitLayer], fqn: str, module: nn.Module, kind: str, owner: str) -> None:
    if fqn in found:
        found[fqn].calls += 1
    else:
        found[fqn] = RefitLayer(fqn, module, kind, owner, 1)


def layer_module(model: nn.Module, fqn: str) -> nn.Module:
    """The module of a layer FQN: a :class:`ProjectionRows` for ``<attention>.in_proj:q|k|v``.

    Raises ``AttributeError`` when the model has no such layer."""
    name, part = split_part(fqn)
    module = model.get_submodule(name)
    return ProjectionRows(module, part) if part is not None else module


def covered_owners(fqns: set[str]) -> set[str]:
    """The attention modules (FQNs) whose in-projection rows are among ``fqns``."""
    return {split_part(f)[0] for f in fqns if split_part(f)[1] is not None}
