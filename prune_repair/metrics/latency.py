"""Measured forward latency of two models on the same batch, and parameter counts.

:func:`latency_ratio` times ``model(batch)`` and ``baseline(batch)`` alternately on the
same device (one warm-up call each, then ``runs`` timed calls each, synchronizing CUDA
around every call) and returns the median of ``model`` over the median of ``baseline``.
Timings are noisy on a shared machine; the ratio of interleaved medians is the figure to
report, never a timed assertion.

Example:
    >>> import torch
    >>> from torch import nn
    >>> big, small = nn.Linear(256, 256), nn.Linear(256, 16)
    >>> r = latency_ratio(small, big, torch.randn(64, 256), runs=3)
    >>> r.ratio > 0, count_params(small) < count_params(big)
    (True, True)
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..engine.run.forward import ForwardFn, default_forward, eval_mode


def count_params(model: nn.Module) -> int:
    """Number of parameters (each shared tensor once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@dataclass
class Latency:
    """Median seconds of one forward of the model and of the baseline, and their ratio."""

    seconds: float
    baseline_seconds: float
    runs: int

    @property
    def ratio(self) -> float:
        return self.seconds / self.baseline_seconds if self.baseline_seconds > 0 else float("nan")


def _timed(model: nn.Module, batch: Any, forward_fn: ForwardFn) -> float:
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    forward_fn(model, batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def latency_ratio(model: nn.Module, baseline: nn.Module, batch: Any, *, runs: int = 5,
                  forward_fn: ForwardFn | None = None) -> Latency:
    """Median forward time of ``model`` over that of ``baseline`` on ``batch`` (see the module doc)."""
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    forward_fn = forward_fn or default_forward
    mine, theirs = [], []
    with eval_mode(model), eval_mode(baseline), torch.no_grad():
        _timed(model, batch, forward_fn), _timed(baseline, batch, forward_fn)
        for _ in range(runs):
            mine.append(_timed(model, batch, forward_fn))
            theirs.append(_timed(baseline, batch, forward_fn))
    return Latency(statistics.median(mine), statistics.median(theirs), runs)
