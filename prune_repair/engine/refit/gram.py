"""Streaming Gram statistics of one conv/linear layer: ``G = X^T X`` and ``C = X^T Y``, kept in float64.

``X`` is what the layer reads, one row per sample (linear, ``(N, ..., d_in)`` inputs give
one row per sample and token) or per output position (conv: the im2col patch matrix of
``F.unfold``, ``d_in = C_in / groups * prod(kernel)``), with a ones column appended LAST
for the bias. ``Y`` holds the targets of the layer's outputs on the same rows. A grouped
(or depthwise) conv has one ``G`` per group, since each group reads its own columns.

Only ``G`` (``(groups, d_in+1, d_in+1)``), ``C`` (``(groups, d_in+1, out/groups)``) and
``diag(Y^T Y)`` are kept: memory ``O(d_in^2 + d_in * d_out)``, never ``O(N * d_in)``; the
patches are unfolded a chunk of samples at a time (or not at all, see below). :func:`gram_bytes`
sizes a layer before anything is allocated and :meth:`Gram.for_layer` refuses (``ValueError``)
a layer over the limit. :meth:`Gram.relative_error` gives ``||Y - X w||/||Y||`` from ``G``, ``C``
and ``diag(Y^T Y)`` alone.

Speed (:mod:`~prune_repair.engine.refit.gram_options`): the products of a chunk are formed in
float32 for float32/half inputs (float64 inputs keep float64) and summed across chunks in
float64; ``precision="float64"`` keeps float64 products throughout. The rounding this adds is
about 1e-7 of ``||G||`` (measured in benchmarks/RESULTS.md, tested to 1e-6), five orders below the
default ridge damping of 1e-2. A stride-1 conv forms its patch Gram from shifted correlations
of the input, and its ``X^T Y`` from shifted windows (:mod:`~prune_repair.engine.refit.corr_gram`, no
patch matrix; ``method``). Layers that
read the same input tensor (q/k/v, gate/up) can share one ``X^T X``: pass the same
:class:`~prune_repair.engine.refit.shared_gram.SharedInputs` to their :meth:`Gram.add`.

Example:
    >>> import torch
    >>> from torch import nn
    >>> layer = nn.Linear(3, 2).double()
    >>> x = torch.randn(50, 3, dtype=torch.float64)
    >>> gram = Gram.for_layer(layer)
    >>> gram.add(x, layer(x).detach())
    >>> gram.G.shape, gram.C.shape, gram.rows
    (torch.Size([1, 4, 4]), torch.Size([1, 4, 2]), 50)
    >>> w = torch.cat([layer.weight, layer.bias[:, None]], 1).detach()   # [W | b]
    >>> gram.relative_error(w[None]) < 1e-7
    tensor(True)
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..run import distributed
from ..producers import is_conv1d
from .conv_gram import conv_method, conv_patches, output_size, pad_input, patch_view
from .chunk_products import add_centered_products_, add_correlation_products_
from .corr_gram import PRODUCT_ROWS
from .fit_error import relative_errors
from .gram_options import GramMethod, GramPrecision, compute_dtype, current_options
from .gram_storage import GramStorage

if TYPE_CHECKING:
    from .shared_gram import SharedInputs

__all__ = ["Gram", "GramMethod", "GramPrecision", "conv_patches", "has_gram", "reads_last_dim", "row_view",
           "rows_to_weight", "check_gram_memory", "gram_bytes", "layer_shape", "DEFAULT_MAX_GRAM_BYTES"]

GRAM_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear)
"""Layer classes whose Gram statistics :class:`Gram` can accumulate (and HF ``Conv1D``, see :func:`has_gram`)."""


def has_gram(module: nn.Module) -> bool:
    """Whether :class:`Gram` handles ``module``: Conv1d/Conv2d/Linear, or an HF ``Conv1D``
    (GPT-2's linear layer with its weight stored transposed, ``[in, out]``)."""
    return isinstance(module, GRAM_TYPES) or is_conv1d(module)


def reads_last_dim(module: nn.Module) -> bool:
    """Whether the layer's channels are the LAST dim of its input and output (Linear, HF Conv1D)."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def row_view(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """A weight-shaped tensor of ``module`` as ``(out, d_in)`` rows (a view; transposed for HF
    ``Conv1D``), and :func:`rows_to_weight` the way back.

    >>> row_view(nn.Conv2d(2, 4, 3), torch.zeros(4, 2, 3, 3)).shape
    torch.Size([4, 18])
    """
    return weight.T if is_conv1d(module) else weight.reshape(weight.shape[0], -1)


def rows_to_weight(module: nn.Module, rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(out, d_in)`` rows back in the layout of ``like`` (the layer's stored weight)."""
    return rows.T.reshape(like.shape) if is_conv1d(module) else rows.reshape(like.shape)

DEFAULT_MAX_GRAM_BYTES = 4 * 2**30
DEFAULT_CHUNK_BYTES = 64 * 2**20


def layer_shape(module: nn.Module) -> tuple[int, int, int]:
    """``(groups, d_in, out)`` of a conv/linear layer: ``d_in`` columns per group, ``out`` rows in all.

    >>> layer_shape(nn.Conv2d(8, 16, 3, groups=4)), layer_shape(nn.Linear(5, 7))
    ((4, 18, 16), (1, 5, 7))
    """
    if isinstance(module, nn.Linear):
        return 1, module.in_features, module.out_features
    if is_conv1d(module):
        return 1, module.weight.shape[0], module.weight.shape[1]
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return module.groups, module.in_channels // module.groups * math.prod(module.kernel_size), module.out_channels
    raise TypeError(f"no Gram statistics for a {type(module).__name__}: only Conv1d, Conv2d, Linear and HF Conv1D layers")


def gram_bytes(module: nn.Module) -> int:
    """Bytes the float64 statistics of ``module`` take: ``G``, ``C`` and ``diag(Y^T Y)``."""
    groups, d, out = layer_shape(module)
    return 8 * (groups * (d + 1) * (d + 1 + out // groups) + out)


def format_bytes(n: float) -> str:
    """``1.5 GB`` / ``12.0 MB``: a size for a message.

    >>> format_bytes(3 * 2**30), format_bytes(5 * 2**20)
    ('3.0 GB', '5.0 MB')
    """
    return f"{n / 2**30:.1f} GB" if n >= 2**30 else f"{n / 2**20:.1f} MB"


def check_gram_memory(module: nn.Module, name: str, max_bytes: int) -> int:
    """``gram_bytes(module)``, or ``ValueError`` naming the layer when it exceeds ``max_bytes``."""
    need = gram_bytes(module)
    if need > max_bytes:
        groups, d, out = layer_shape(module)
        raise ValueError(
            f"layer '{name}' needs {format_bytes(need)} for its float64 Gram statistics "
            f"({groups} x {d + 1} x {d + 1 + out // groups} values), more than the limit of "
            f"{format_bytes(max_bytes)}: raise max_gram_bytes or leave the layer out of the selection"
        )
    return need


class Gram:
    """Accumulated ``G``, ``C``, ``yy`` and row count of one layer (see the module doc).

    ``precision`` / ``method``: see :mod:`~prune_repair.engine.refit.gram_options` (default: the
    current :func:`~prune_repair.engine.refit.gram_options.gram_options`)."""

    def __init__(self, module: nn.Module, G: torch.Tensor, C: torch.Tensor, yy: torch.Tensor, name: str = "", *,
                 precision: GramPrecision | str | None = None, method: GramMethod | str | None = None):
        self.module, self.name = module, name
        self.groups, self.d_in, self.out = layer_shape(module)
        self.G, self.C, self.yy = G, C, yy
        self.rows = 0
        self.storage: GramStorage | None = None
        """Where ``G``'s memory came from (:meth:`for_layer`): the solve may borrow from it too."""
        self.product_dtype: torch.dtype | None = None
        """The dtype the products were formed in (float64 once any was): what the solve may round to."""
        default_precision, default_method = current_options()
        self.precision = GramPrecision.parse(precision if precision is not None else default_precision, "Gram precision")
        self.method = GramMethod.parse(method if method is not None else default_method, "Gram method")

    def all_reduce_(self) -> "Gram":
        """Sum ``G``, ``C``, ``yy`` and the row count over the ranks of a torch.distributed
        process group (one collective; nothing without one), so every rank solves the same
        system from all the calibration data."""
        if distributed.is_distributed():
            flat = torch.cat([self.G.reshape(-1), self.C.reshape(-1), self.yy.reshape(-1),
                              self.G.new_tensor([float(self.rows)])])
            distributed.all_reduce_sum_(flat)
            sizes = [self.G.numel(), self.C.numel(), self.yy.numel()]
            g, c, yy, rows = flat.split(sizes + [1])
            self.G, self.C, self.yy = g.view_as(self.G), c.view_as(self.C), yy.view_as(self.yy)
            self.rows = int(rows.item())
        return self

    @classmethod
    def for_layer(
        cls, module: nn.Module, *, name: str = "", max_bytes: int = DEFAULT_MAX_GRAM_BYTES,
        device: torch.device | str | None = None, precision: GramPrecision | str | None = None,
        method: GramMethod | str | None = None, storage: GramStorage | None = None,
    ) -> "Gram":
        """Zero statistics for ``module`` on ``device`` (default: the layer's), after the memory check;
        ``G`` in ``storage``'s spare memory when it fits."""
        check_gram_memory(module, name or type(module).__name__, max_bytes)
        groups, d, out = layer_shape(module)
        if device is None:
            device = next((p.device for p in module.parameters()), torch.device("cpu"))
        device = torch.device(device)
        kw = dict(dtype=torch.float64, device=device)
        G = storage.zeros((groups, d + 1, d + 1), device) if storage is not None else torch.zeros(groups, d + 1, d + 1, **kw)
        gram = cls(module, G, torch.zeros(groups, d + 1, out // groups, **kw), torch.zeros(out, **kw), name,
                   precision=precision, method=method)
        gram.storage = storage
        return gram

    def add(self, x: torch.Tensor, y: torch.Tensor, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
            mask: torch.Tensor | None = None, shared: "SharedInputs | None" = None) -> None:
        """Accumulate the rows of input ``x`` (what the layer reads) and target ``y`` (its
        output's shape: ``(N, out, ...)`` for a conv, ``(N, ..., out)`` for a linear).

        ``mask``: an ``(N, T)`` attention mask for token inputs ``(N, T, d_in)`` of a linear
        layer; positions where it is 0 (padding) are left out.
        ``shared``: a :class:`~prune_repair.engine.refit.shared_gram.SharedInputs` holding the
        ``X^T X`` of inputs seen before; a layer reading the same tensor (same geometry, mask
        and options) adds that instead of forming it again.
        """
        x_in, reused = x, (shared.lookup(self, x, mask) if shared is not None else None)
        store = shared is not None and reused is None and shared.wanted(self)
        fresh = self.rows == 0  # then the increment is G itself: no copy before, one after
        before = self.G.clone() if store and not fresh else None
        if mask is not None and reads_last_dim(self.module) and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask.shape):
            keep = mask.to(device=x.device, dtype=torch.bool)
            x, y = x[keep], y.to(x.device)[keep]
        try:
            self._add(x, y, chunk_bytes, with_gram=reused is None)
        finally:
            self._buf = None
        if reused is not None:
            self.G += reused
        elif store:
            shared.store(self, x_in, mask, self.G - before if before is not None else self.G.clone())

    def _add(self, x: torch.Tensor, y: torch.Tensor, chunk_bytes: int, with_gram: bool = True) -> None:
        g, d, out = self.groups, self.d_in, self.out
        ct = compute_dtype(self.precision, x.dtype)
        self.product_dtype = ct if self.product_dtype in (None, ct) else torch.float64
        if reads_last_dim(self.module):
            y_rows = _target_rows(self.module, y, out, self.name)
            x_rows = x.reshape(-1, d)
            if len(x_rows) != len(y_rows):
                raise ValueError(f"layer '{self.name}': {len(x_rows)} input rows but {len(y_rows)} target rows")
            step = max(1, chunk_bytes // (ct.itemsize * (d + 1)))
            step = step if ct == torch.float64 else min(step, PRODUCT_ROWS)
            for start in range(0, len(x_rows), step):
                self._accumulate(x_rows[start:start + step].unsqueeze(0), y_rows[start:start + step], ct, with_gram)
            return
        _check_conv_target(self.module, x, y, self.name)
        n = x.shape[0]
        padded_one = pad_input(self.module, x[:1])
        ho, wo = output_size(self.module, padded_one)
        most = n if ct == torch.float64 else max(1, PRODUCT_ROWS // (ho * wo))  # samples per chunk
        if conv_method(self.module, (ho, wo), self.method, n) is GramMethod.CORRELATION:
            step = min(most, max(1, chunk_bytes // max(1, ct.itemsize * padded_one[0].numel())))
            for start in range(0, n, step):
                self._correlate(x[start:start + step].to(ct), y[start:start + step], with_gram)
            return
        y_rows = _target_rows(self.module, y, out, self.name)
        step = min(most, max(1, chunk_bytes // max(ct.itemsize * ho * wo * g * (d + 1), 1)))
        for start in range(0, n, step):
            patches = patch_view(self.module, x[start:start + step])  # a strided view, not copied
            self._accumulate(patches, y_rows[start * ho * wo:(start + step) * ho * wo], ct, with_gram)

    def _accumulate(self, x_rows: torch.Tensor, y_rows: torch.Tensor, ct: torch.dtype, with_gram: bool) -> None:
        g, m = x_rows.shape[0], len(y_rows)  # x_rows: (g, rows, d), or a conv's 7-d patch view
        buf = getattr(self, "_buf", None)
        if buf is None or buf.shape[0] != g or buf.shape[1] < m or buf.dtype != ct:  # one buffer for all chunks
            buf = self._buf = torch.empty(g, m, self.d_in, dtype=ct, device=self.G.device)
        buf = buf[:, :m]
        buf.view(x_rows.shape).copy_(x_rows)  # one copy: layout, dtype and device
        y = y_rows.to(device=self.G.device, dtype=ct).view(m, g, -1).transpose(0, 1)
        add_centered_products_(self.G, self.C, buf, y, with_gram=with_gram)  # float32: about the chunk's means
        self.yy.add_(y_rows.to(device=self.G.device, dtype=torch.float64, copy=True).square_().sum(0))
        self.rows += m

    def _correlate(self, x: torch.Tensor, y: torch.Tensor, with_gram: bool) -> None:
        """One chunk of a conv by the correlation Gram (``x`` in the compute dtype): no patch matrix."""
        add_correlation_products_(self.G, self.C, self.module, x, y.to(self.G.device), with_gram=with_gram)
        squares = y.to(device=self.G.device, dtype=torch.float64, copy=True).square_()
        self.yy += squares.sum([i for i in range(y.dim()) if i != 1])
        self.rows += y.shape[0] * math.prod(y.shape[2:])

    def relative_error(self, weight: torch.Tensor, *, intercept: bool = True) -> torch.Tensor:
        """``||Y - X w|| / ||Y||`` over the whole layer, from the statistics alone (float64 scalar).

        ``weight`` is ``(groups, out/groups, d_in + 1)`` with the bias LAST, or
        ``(groups, out/groups, d_in)`` with ``intercept=False`` (no bias term)."""
        return self.relative_errors(weight, intercept=intercept)[0]

    def relative_errors(self, *weights: torch.Tensor, intercept: bool = True,
                        quad: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`relative_error` of several weights through the same products
        (:mod:`~prune_repair.engine.refit.fit_error`), a float64 ``(len(weights),)`` tensor; ``quad``:
        their quadratic forms ``sum w^T G w`` where known (:attr:`.ridge.RidgeSolution.quad`)."""
        G, C = (self.G, self.C) if intercept else (self.G[:, :-1, :-1], self.C[:, :-1])
        stacked = torch.stack([w.to(device=G.device, dtype=torch.float64) for w in weights])
        return relative_errors(stacked, G, C, self.yy, quad)

    def is_finite(self) -> bool:
        """Whether every accumulated value is finite (one host sync). ``G`` is read on its diagonal: a NaN/Inf
        input shows there (squared), and ``|G_ij| <= sqrt(G_ii G_jj)`` bounds the rest (summing all of a
        4609-wide ``G`` took 20 ms)."""
        diagonal = self.G.diagonal(dim1=-2, dim2=-1)
        return bool(torch.isfinite(diagonal.sum() + self.C.sum() + self.yy.sum()))


def _check_conv_target(module: nn.Module, x: torch.Tensor, y: torch.Tensor, name: str) -> None:
    if y.dim() < 2 or y.shape[1] != module.out_channels or y.shape[0] != x.shape[0]:
        raise ValueError(f"layer '{name}' has {module.out_channels} output channels but its target has shape "
                         f"{list(y.shape)} for an input of shape {list(x.shape)}")


def _target_rows(module: nn.Module, y: torch.Tensor, out: int, name: str) -> torch.Tensor:
    """Targets as ``(rows, out)``, rows ordered like the input rows."""
    if reads_last_dim(module):
        if y.shape[-1] != out:
            raise ValueError(f"layer '{name}' has {out} outputs but its target has {y.shape[-1]} (last dim)")
        return y.reshape(-1, out)
    if y.dim() < 2 or y.shape[1] != out:
        raise ValueError(f"layer '{name}' has {out} output channels but its target has shape {list(y.shape)}")
    return y.flatten(2).transpose(1, 2).reshape(-1, out)
