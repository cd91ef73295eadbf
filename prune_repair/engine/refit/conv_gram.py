"""Pieces of a conv layer's Gram statistics: padded inputs, im2col views, the method choice, and the
patch sums without unfolding anything.

A Conv1d is handled as a Conv2d of height 1.

Example:
    >>> import torch
    >>> from torch import nn
    >>> conv = nn.Conv2d(2, 4, 3, padding=1, groups=2).double()
    >>> x = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    >>> p = conv_patches(conv, x)
    >>> w = conv.weight.detach().reshape(2, 2, -1)          # (groups, out/groups, d_in)
    >>> y = torch.einsum("gmd,god->mgo", p, w).reshape(3, 25, 4).transpose(1, 2)
    >>> torch.allclose(y.reshape(3, 4, 5, 5), conv(x) - conv.bias[:, None, None])
    True
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .corr_gram import correlation_cost
from .gram_options import GramMethod

MIN_CORRELATION_CHANNELS = 8
"""Below this many channels per group the per-offset products are too thin to pay for their overhead."""
MIN_CORRELATION_ROWS = 1024
"""Below this many patch rows (samples x positions) per call the ``d^2`` assembly outweighs the saving."""
CORRELATION_ADVANTAGE = 0.3
"""``auto`` takes the correlation Gram when it needs at most this share of im2col's multiplications (counted
for the full ``X^T X``; im2col forms half of it). Measured on 128 samples, 1 thread: a 256-channel 3x3 conv
without padding on 6x6 maps (0.24) 0.29 s by im2col, 0.19 s by correlation; on 4x4 maps (0.33) 0.08 s vs
0.12 s, where the assembly of the blocks outweighs the products."""


def _pair(module: nn.Conv1d | nn.Conv2d, value) -> tuple[int, int]:
    return (1,) + tuple(value) if isinstance(module, nn.Conv1d) else tuple(value)


def kernel_of(module: nn.Conv1d | nn.Conv2d) -> tuple[int, int]:
    """The kernel as ``(kh, kw)`` (height 1 for a Conv1d)."""
    return _pair(module, module.kernel_size)


def pad_input(module: nn.Conv1d | nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``x`` padded as the layer pads it (any padding mode, string padding), as ``(N, C, H, W)``."""
    pad = tuple(module._reversed_padding_repeated_twice)
    if any(pad):
        x = F.pad(x, pad, mode="constant" if module.padding_mode == "zeros" else module.padding_mode)
    return x.unsqueeze(2) if isinstance(module, nn.Conv1d) else x


def patch_view(module: nn.Conv1d | nn.Conv2d, x: torch.Tensor, *, padded: bool = False) -> torch.Tensor:
    """im2col of ``x`` as a strided VIEW ``(groups, N, H_out, W_out, C_in/groups, kH, kW)``: no copy
    but the padding. Copying it into a contiguous buffer gives the ``(groups, N, positions, d_in)``
    patch rows in ``weight.reshape(out, -1)`` column order, and costs a fraction of ``F.unfold``
    (which ran single-threaded at about 1 GB/s here). ``padded``: ``x`` is already :func:`pad_input`'s."""
    x = x if padded else pad_input(module, x)
    (kh, kw), (dh, dw), (sh, sw) = kernel_of(module), _pair(module, module.dilation), _pair(module, module.stride)
    view = x.unfold(2, (kh - 1) * dh + 1, sh).unfold(3, (kw - 1) * dw + 1, sw)[..., ::dh, ::dw]
    n, c, ho, wo = view.shape[:4]
    g = module.groups
    return view.view(n, g, c // g, ho, wo, kh, kw).permute(1, 0, 3, 4, 2, 5, 6)


def conv_patches(module: nn.Conv1d | nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """im2col rows of a Conv1d/Conv2d input as ``(groups, N * positions, d_in)`` float64.

    Column order matches ``weight.reshape(out, -1)``; padding modes (zeros, reflect,
    replicate, circular) and string padding ("same", "valid") are honoured.
    """
    view = patch_view(module, x)
    g, n = view.shape[:2]
    return view.reshape(g, n * view.shape[2] * view.shape[3], -1).to(torch.float64)


def zero_pads(module: nn.Conv1d | nn.Conv2d) -> tuple[int, int, int, int]:
    """The (top, bottom, left, right) padding of the layer where it pads with zeros, else zeros
    (other padding modes repeat the input: those positions are data)."""
    if module.padding_mode != "zeros":
        return (0, 0, 0, 0)
    left, right, *rest = module._reversed_padding_repeated_twice
    top, bottom = rest if rest else (0, 0)
    return top, bottom, left, right


def output_size(module: nn.Conv1d | nn.Conv2d, padded: torch.Tensor) -> tuple[int, int]:
    """``(H_out, W_out)`` of the layer on a :func:`pad_input` input."""
    (kh, kw), (dh, dw), (sh, sw) = kernel_of(module), _pair(module, module.dilation), _pair(module, module.stride)
    hp, wp = padded.shape[2:]
    return (hp - (kh - 1) * dh - 1) // sh + 1, (wp - (kw - 1) * dw - 1) // sw + 1


def conv_method(module: nn.Conv1d | nn.Conv2d, out_size: tuple[int, int], requested: GramMethod | str,
                samples: int = MIN_CORRELATION_ROWS) -> GramMethod:
    """The method that forms the patch Gram: ``auto`` takes the correlation Gram for a stride-1,
    dilation-1 conv with enough channels per group and ``samples`` x positions rows where it saves
    enough multiplications; ``correlation``
    on a layer it does not apply to is a ``ValueError``."""
    requested = GramMethod.parse(requested, "Gram method")
    kernel = kernel_of(module)
    fits = _pair(module, module.stride) == (1, 1) and _pair(module, module.dilation) == (1, 1)
    if requested is GramMethod.CORRELATION:
        if not fits:
            raise ValueError(f"method='correlation' needs a stride-1, dilation-1 conv, not {module}: "
                             "use method='auto' or 'im2col'")
        return requested
    rows = samples * math.prod(out_size)
    if (requested is GramMethod.AUTO and fits and module.in_channels // module.groups >= MIN_CORRELATION_CHANNELS
            and rows >= MIN_CORRELATION_ROWS):
        im2col = math.prod(kernel) ** 2 * math.prod(out_size)
        if correlation_cost(out_size, kernel, zero_pads(module)) <= CORRELATION_ADVANTAGE * im2col:
            return GramMethod.CORRELATION
    return GramMethod.IM2COL
