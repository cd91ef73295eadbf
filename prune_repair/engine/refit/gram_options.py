"""How Gram statistics are computed: the precision of the products and the method for conv layers.

:class:`~prune_repair.engine.refit.gram.Gram` takes both per layer (``Gram.for_layer(...,
precision=, method=)``); where it is left out, the process-wide defaults set here apply, so
a caller that creates Grams deep inside a pass (the reconstruction, the OBS pruner) can be
switched as a whole with :func:`gram_options`.

Precision: products are formed per chunk of rows in the compute dtype and summed across
chunks in float64 (``G``, ``C`` and ``diag(Y^T Y)`` are always float64). ``float32`` (the
default) forms them in float32 for float32 / float16 / bfloat16 inputs; a float64 input keeps
float64 products (rounding it would throw away what the caller asked for). ``float64``
forms every product in float64 (the slower path, for reference).

Example:
    >>> from prune_repair.engine.refit.gram_options import gram_options, current_options
    >>> current_options()
    (<GramPrecision.FLOAT32: 'float32'>, <GramMethod.AUTO: 'auto'>)
    >>> with gram_options(precision="float64", method="im2col"):
    ...     current_options()
    (<GramPrecision.FLOAT64: 'float64'>, <GramMethod.IM2COL: 'im2col'>)
    >>> compute_dtype("float32", torch.bfloat16), compute_dtype("float32", torch.float64)
    (torch.float32, torch.float64)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ..registry import MethodEnum


class GramPrecision(MethodEnum):
    """The dtype of the per-chunk products (sums across chunks are float64 either way)."""

    FLOAT32 = "float32", "float32 products per chunk (float64 inputs keep float64), summed in float64"
    FLOAT64 = "float64", "float64 products end to end (the reference path, about 2x slower)"


class GramMethod(MethodEnum):
    """How the patch Gram ``X^T X`` of a conv layer is formed (linear layers have one way)."""

    AUTO = "auto", "correlation where it needs fewer multiplications (stride-1 convs), else im2col"
    IM2COL = "im2col", "products of the unfolded patch rows, a chunk of samples at a time"
    CORRELATION = ("correlation", "shifted correlations of the input, summed per tap window (stride 1, "
                   "dilation 1 only; zero padding skipped); exact, 3-6x fewer multiplications for a 3x3 kernel")


_DEFAULTS: list[tuple[GramPrecision, GramMethod]] = [(GramPrecision.FLOAT32, GramMethod.AUTO)]


def current_options() -> tuple[GramPrecision, GramMethod]:
    """The default ``(precision, method)`` that Grams created now get."""
    return _DEFAULTS[-1]


@contextlib.contextmanager
def gram_options(*, precision: GramPrecision | str | None = None,
                 method: GramMethod | str | None = None) -> Iterator[None]:
    """Within the block, Grams created without explicit options use these (``None``: unchanged).
    Process-wide, not per thread: the threads of one lockstep pass share it."""
    old_precision, old_method = current_options()
    new = (GramPrecision.parse(precision, "Gram precision") if precision is not None else old_precision,
           GramMethod.parse(method, "Gram method") if method is not None else old_method)
    _DEFAULTS.append(new)
    try:
        yield
    finally:
        for i in range(len(_DEFAULTS) - 1, 0, -1):  # this block's entry (the first one is the default)
            if _DEFAULTS[i] is new:
                del _DEFAULTS[i]
                break


def compute_dtype(precision: GramPrecision | str, input_dtype: torch.dtype) -> torch.dtype:
    """The dtype products are formed in for an input of ``input_dtype`` (see the module doc)."""
    if GramPrecision.parse(precision, "Gram precision") is GramPrecision.FLOAT64 or input_dtype == torch.float64:
        return torch.float64
    return torch.float32
