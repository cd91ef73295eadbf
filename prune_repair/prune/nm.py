"""N:M semi-structured sparsity: in every group of M consecutive inputs of an output row, N weights stay.

A layer's weight is read as rows, one per output (channel) and one column per input it
reads: ``(out, in)`` for a linear layer and an ``nn.MultiheadAttention``'s packed
``in_proj_weight``, ``(in, out)`` transposed for an HF ``Conv1D``, and the flattened
``C_in/groups * kH * kW`` patch of each output channel for a conv. The groups are M
consecutive columns of a row, so M must divide the row length. ``2:4`` keeps 2 of every 4
(50% sparsity), the pattern sparse tensor cores run.

Example:
    >>> import torch
    >>> pattern = parse_pattern("2:4")
    >>> pattern, pattern.sparsity
    (NMPattern(n=2, m=4), 0.5)
    >>> keep = nm_keep_rows(torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.5, 0.1, 0.2, 0.3]]), pattern)
    >>> keep.int().tolist()
    [[1, 0, 1, 0, 1, 0, 0, 1]]
    >>> follows_pattern(keep, pattern)
    True
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from ..engine.refit.gram import row_view, rows_to_weight
from .masks import check_sparsity
from .targets import PruneError, Target

_NM = re.compile(r"^\s*(-?\d+)\s*:\s*(-?\d+)\s*$")


@dataclass(frozen=True)
class NMPattern:
    """Keep ``n`` of every ``m`` consecutive inputs of each output row (``0 < n < m``)."""

    n: int
    m: int

    @property
    def sparsity(self) -> float:
        """The fraction of weights an N:M mask zeroes: ``1 - n / m``."""
        return 1 - self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


def is_pattern_text(value: object) -> bool:
    """Whether ``value`` is written as ``N:M`` (checked or not).

    >>> is_pattern_text("2:4"), is_pattern_text("0.5"), is_pattern_text(0.5)
    (True, False, False)
    """
    return isinstance(value, NMPattern) or (isinstance(value, str) and ":" in value)


def parse_pattern(value: NMPattern | str) -> NMPattern:
    """``"N:M"`` as an :class:`NMPattern`, or a one-line :class:`PruneError`.

    >>> parse_pattern("3:2")
    Traceback (most recent call last):
    ...
    prune_repair.prune.targets.PruneError: N:M pattern '3:2' needs 0 < N < M (N weights kept of every M inputs): e.g. 2:4
    """
    if isinstance(value, NMPattern):
        n, m, text = value.n, value.m, str(value)
    else:
        found = _NM.match(str(value))
        if found is None:
            raise PruneError(f"N:M pattern {value!r} is not two integers N:M: write e.g. 2:4")
        n, m, text = int(found.group(1)), int(found.group(2)), str(value).strip()
    if not 0 < n < m:
        raise PruneError(f"N:M pattern '{text}' needs 0 < N < M (N weights kept of every M inputs): e.g. 2:4")
    return NMPattern(n, m)


def parse_sparsity(value: float | str | NMPattern) -> float | NMPattern:
    """A sparsity in [0, 1) as a float, or ``"N:M"`` as an :class:`NMPattern`; else :class:`PruneError`.

    >>> parse_sparsity("0.5"), parse_sparsity("2:4")
    (0.5, NMPattern(n=2, m=4))
    """
    return parse_pattern(value) if is_pattern_text(value) else check_sparsity(value)


def row_length(target: Target) -> int:
    """Inputs per output row of a target layer (the axis the N:M groups run along)."""
    return int(row_view(target.module, target.weight.detach()).shape[1])


def check_divides(targets: list[Target], pattern: NMPattern) -> None:
    """:class:`PruneError` naming the first layer whose row length M does not divide."""
    for target in targets:
        d = row_length(target)
        if d % pattern.m:
            raise PruneError(f"N:M pattern {pattern} does not fit layer '{target.fqn}': its output rows read {d} "
                             f"inputs, not a multiple of {pattern.m}; use an M that divides {d} or leave the layer "
                             "out (--layers)")


def nm_keep_rows(scores: torch.Tensor, pattern: NMPattern) -> torch.Tensor:
    """Keep-mask of ``(rows, d)`` scores: the ``n`` highest of each group of ``m`` columns
    (ties to the earlier column)."""
    rows, d = scores.shape
    groups = scores.reshape(rows, d // pattern.m, pattern.m)
    order = torch.argsort(groups, dim=-1, descending=True, stable=True)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, order[..., :pattern.n], True)
    return keep.reshape(rows, d)


def nm_keep_mask(module: nn.Module, scores: torch.Tensor, pattern: NMPattern) -> torch.Tensor:
    """Keep-mask shaped like the layer's weight from weight-shaped ``scores``."""
    return rows_to_weight(module, nm_keep_rows(row_view(module, scores.detach()), pattern), scores)


def follows_pattern(rows: torch.Tensor, pattern: NMPattern) -> bool:
    """Whether every group of ``m`` consecutive columns of ``rows`` (``(out, d)``; a bool
    keep-mask or weights, nonzero = kept) holds at most ``n`` nonzeros."""
    if rows.shape[-1] % pattern.m:
        return False
    groups = (rows != 0).reshape(-1, pattern.m)
    return bool((groups.sum(-1) <= pattern.n).all())


def layer_follows(target: Target, pattern: NMPattern) -> bool:
    """Whether a target layer's effective weight follows ``pattern`` along its input rows."""
    return follows_pattern(row_view(target.module, target.weight.detach()), pattern)
