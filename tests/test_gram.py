"""Gram statistics at matrix-product speed (engine/refit/gram.py, corr_gram.py, conv_gram.py, shared_gram.py).

The correlation Gram is exact: in float64 it equals the im2col Gram of ``F.unfold`` to rounding,
for any kernel, padding, groups and shape it accepts. Float32 products summed in float64 stay
within 1e-6 (relative) of the float64 im2col Gram on random and on realistic (post-ReLU) inputs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prune_repair.engine.refit.conv_gram import conv_method, conv_patches, output_size, pad_input
from prune_repair.engine.refit.chunk_products import add_centered_products_
from prune_repair.engine.refit.gram import Gram
from prune_repair.engine.refit.gram_options import GramMethod, current_options, gram_options
from prune_repair.engine.refit.shared_gram import SharedInputs


def _direct(conv: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """``G``, ``C``, ``yy`` from the full float64 im2col matrix (``F.unfold`` order), ones column last."""
    X = conv_patches(conv, x.double())
    g = conv.groups
    Y = y.double().flatten(2).transpose(1, 2).reshape(-1, g, conv.out_channels // g)
    Xe = torch.cat([X, torch.ones(*X.shape[:2], 1, dtype=torch.float64)], 2)
    return Xe.transpose(1, 2) @ Xe, Xe.transpose(1, 2) @ Y.transpose(0, 1), y.double().transpose(0, 1).flatten(1).square().sum(1)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("conv, size", [
    (nn.Conv2d(3, 5, 3, padding=1), (7, 9)),
    (nn.Conv2d(4, 4, 3, padding=0, groups=2), (6, 5)),
    (nn.Conv2d(6, 6, 3, padding=1, groups=6), (5, 8)),                     # depthwise
    (nn.Conv2d(2, 3, 5, padding=2, bias=False), (9, 7)),
    (nn.Conv2d(3, 4, (2, 3), padding="same", padding_mode="reflect"), (6, 7)),
    (nn.Conv2d(2, 2, 5, padding=2), (4, 4)),                               # outputs = kernel - 1
    (nn.Conv2d(3, 4, 5, padding=2), (2, 3)),                               # maps smaller than the kernel
    (nn.Conv2d(2, 3, 3, padding=1), (1, 1)),                               # only the centre tap meets data
    (nn.Conv2d(2, 3, 3, padding=(2, 0)), (3, 6)),                          # padding wider than needed
    (nn.Conv2d(3, 2, 1), (4, 3)),
    (nn.Conv1d(3, 4, 3, padding=2, padding_mode="circular"), (11,)),
])
def test_correlation_gram_equals_unfold_in_float64(conv, size):
    conv = conv.double()
    x = torch.randn(5, conv.in_channels, *size, dtype=torch.float64)
    y = conv(x).detach()
    gram = Gram.for_layer(conv, method="correlation")
    gram.add(x[:2], y[:2], chunk_bytes=1)  # chunks of one sample
    gram.add(x[2:], y[2:])
    G, C, yy = _direct(conv, x, y)
    assert _rel(gram.G, G) < 1e-13 and _rel(gram.C, C) < 1e-13 and _rel(gram.yy, yy) < 1e-13
    assert gram.rows == len(x) * y[0, 0].numel()


@pytest.mark.parametrize("kind", ["random", "relu", "image"])
@pytest.mark.parametrize("method", ["im2col", "correlation"])
@pytest.mark.parametrize("channels, padding_mode", [(32, "zeros"), (8, "zeros"), (32, "reflect")])
def test_float32_products_stay_within_1e6_of_the_float64_gram(kind, method, channels, padding_mode):
    torch.manual_seed(0)
    conv = nn.Conv2d(channels, 48, 3, padding=1, padding_mode=padding_mode)
    x = torch.randn(24, channels, 20, 20)
    if kind == "relu":  # post-ReLU activations of a conv stack on smooth images, a positive mean
        image = F.avg_pool2d(torch.rand(24, 3, 24, 24), 5, stride=1)
        x = torch.relu(nn.Conv2d(3, channels, 3, padding=0)(image) + 0.1).detach()
    if kind == "image":  # normalized upsampled blobs: mostly one background value, like MNIST digits
        x = F.interpolate((torch.rand(24, channels, 5, 5) > 0.8).float(), size=20, mode="bilinear")
        x = (x - x.mean()) / x.std()
    y = conv(x).detach()
    gram = Gram.for_layer(conv, method=method)
    assert gram.precision == "float32"
    gram.add(x, y, chunk_bytes=2**20)
    G, C, yy = _direct(conv, x, y)
    assert _rel(gram.G, G) < 1e-6 and _rel(gram.C, C) < 1e-6 and _rel(gram.yy, yy) < 1e-12
    assert float((gram.G - G).abs().max() / G.abs().max()) < 1e-6


@pytest.mark.parametrize("conv", [nn.Conv1d(24, 32, 5, padding=2), nn.Conv2d(32, 32, 3, padding=1, groups=2),
                                  nn.Conv2d(32, 16, (1, 3), padding=(0, 1), padding_mode="circular")])
def test_float32_correlation_statistics_of_other_convs_stay_within_1e6(conv):
    """1-D, grouped and circular stride-1 convs by the correlation Gram, float32 products."""
    torch.manual_seed(3)
    x = torch.relu(torch.randn(12, conv.in_channels, *([40] if isinstance(conv, nn.Conv1d) else [9, 11])) + 0.3)
    y = conv(x).detach()
    gram = Gram.for_layer(conv, method="correlation")
    gram.add(x, y)
    G, C, _ = _direct(conv, x, y)
    assert _rel(gram.G, G) < 1e-6 and _rel(gram.C, C) < 1e-6


def test_float32_products_of_one_large_sample_sum_in_float64_beyond_8192_rows():
    torch.manual_seed(2)
    conv = nn.Conv2d(16, 8, 3, padding=1)
    x = torch.relu(torch.randn(1, 16, 100, 100) + 0.5)  # 10,000 positions in one sample
    y = conv(x).detach()
    gram = Gram.for_layer(conv, method="correlation")
    gram.add(x, y)
    G, C, _ = _direct(conv, x, y)
    assert _rel(gram.G, G) < 1e-6 and _rel(gram.C, C) < 1e-6


def test_float64_precision_and_linear_layers():
    torch.manual_seed(1)
    layer = nn.Linear(20, 7)
    x = torch.randn(300, 20)
    y = layer(x).detach()
    fast, exact = Gram.for_layer(layer), Gram.for_layer(layer, precision="float64")
    fast.add(x, y, chunk_bytes=4 * 21 * 64)
    exact.add(x, y)
    Xe = torch.cat([x.double(), torch.ones(300, 1, dtype=torch.float64)], 1)
    torch.testing.assert_close(exact.G[0], Xe.T @ Xe, rtol=1e-13, atol=1e-11)
    assert 0 < _rel(fast.G[0], Xe.T @ Xe) < 1e-6 and _rel(fast.C[0], Xe.T @ y.double()) < 1e-6


def test_auto_takes_the_correlation_gram_where_it_saves_products():
    assert conv_method(nn.Conv2d(64, 64, 3, padding=1), (28, 28), "auto") is GramMethod.CORRELATION
    assert conv_method(nn.Conv2d(64, 64, 3, stride=2, padding=1), (14, 14), "auto") is GramMethod.IM2COL
    assert conv_method(nn.Conv2d(64, 64, 3, padding=1, groups=64), (28, 28), "auto") is GramMethod.IM2COL
    assert conv_method(nn.Conv2d(64, 64, 1), (28, 28), "auto") is GramMethod.IM2COL
    assert conv_method(nn.Conv2d(64, 64, 3, padding=1), (28, 28), "im2col") is GramMethod.IM2COL
    assert conv_method(nn.Conv2d(64, 64, 3, padding=1), (4, 4), "auto") is GramMethod.CORRELATION  # padding skipped
    assert conv_method(nn.Conv2d(64, 64, 3), (2, 2), "auto") is GramMethod.IM2COL  # 4 outputs: assembly dominates
    conv = nn.Conv2d(4, 4, 3, dilation=2)
    with pytest.raises(ValueError, match="method='correlation' needs a stride-1, dilation-1 conv"):
        Gram.for_layer(conv, method="correlation").add(torch.randn(1, 4, 9, 9), conv(torch.randn(1, 4, 9, 9)))
    assert output_size(conv, pad_input(conv, torch.randn(1, 4, 9, 9))) == (5, 5)


def test_gram_options_set_the_defaults_for_a_block():
    assert tuple(map(str, current_options())) == ("float32", "auto")
    with gram_options(precision="float64", method="im2col"):
        gram = Gram.for_layer(nn.Linear(2, 2))
        assert (gram.precision, gram.method) == ("float64", "im2col")
    assert tuple(map(str, current_options())) == ("float32", "auto")
    with pytest.raises(ValueError, match="unknown Gram precision 'half': use one of float32, float64"):
        Gram.for_layer(nn.Linear(2, 2), precision="half")


@pytest.mark.parametrize("make", [lambda: nn.Linear(6, 4), lambda: nn.Conv2d(16, 8, 3, padding=1)])
def test_layers_reading_the_same_input_share_one_gram(make):
    torch.manual_seed(2)
    q, k, v = make(), make(), make()
    x = torch.randn(8, 16, 16, 16) if isinstance(q, nn.Conv2d) else torch.randn(4, 5, 6)  # conv: by correlation
    shared, grams = SharedInputs(), []
    for layer in (q, k, v):
        gram = Gram.for_layer(layer)
        gram.add(x, layer(x).detach(), shared=shared)
        alone = Gram.for_layer(layer)
        alone.add(x, layer(x).detach())
        torch.testing.assert_close(gram.G, alone.G, rtol=0, atol=0)
        torch.testing.assert_close(gram.C, alone.C, rtol=0, atol=0)
        grams.append(gram)
    assert shared.hits == 2
    other = x.clone()  # equal values, another tensor: never matched
    Gram.for_layer(q).add(other, q(other).detach(), shared=shared)
    other.mul_(2)  # changed in place after it was stored: not matched either
    Gram.for_layer(k).add(other, k(other).detach(), shared=shared)
    assert shared.hits == 2


def test_shared_inputs_keep_a_gram_only_for_a_layer_yet_to_come_of_the_same_geometry():
    """Given the readers, ``X^T X`` is stored (a copy of ``G``) only while a layer that could reuse it has not
    started: q/k/v still share; the downsampling conv beside a 3x3 conv (same input, other geometry) stores none."""
    q, k, conv, down = nn.Linear(6, 4), nn.Linear(6, 3), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 8, 1)
    shared = SharedInputs(readers=[q, k, conv, down])
    x, img = torch.randn(5, 6), torch.randn(2, 4, 6, 6)
    for layer, inp in ((q, x), (k, x), (conv, img), (down, img)):
        Gram.for_layer(layer).add(inp, layer(inp).detach(), shared=shared)
    assert shared.hits == 1 and len(shared._entries) == 1  # q's, for k; nothing for the convs


def test_a_layer_outside_the_readers_neither_keeps_a_gram_nor_uses_up_a_reader():
    """An output projection of q's width (same signature, another input) runs before q and k: its own
    ``X^T X`` is not copied, and k still finds q's."""
    out, q, k = nn.Linear(6, 6), nn.Linear(6, 4), nn.Linear(6, 3)
    shared = SharedInputs(readers=[q, k])
    h, x = torch.randn(5, 6), torch.randn(5, 6)
    for layer, inp in ((out, h), (q, x), (k, x)):
        Gram.for_layer(layer).add(inp, layer(inp).detach(), shared=shared)
    assert shared.hits == 1 and len(shared._entries) == 1


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_symmetric_block_products_equal_the_full_product(dtype):
    """Wide chunks (several column blocks, two groups) multiply only the blocks on and above the diagonal,
    then mirror them: the same ``X^T X`` and ``X^T Y`` as one product (float32 rows: about the chunk's means)."""
    torch.manual_seed(2)
    g, m, d, o = 2, 700, 1000, 3
    x = torch.rand(g, m, d, dtype=dtype) + 3.0  # a common part, as post-ReLU activations have
    y = torch.randn(g, m, o, dtype=dtype)
    G = torch.zeros(g, d + 1, d + 1, dtype=torch.float64)
    C = torch.zeros(g, d + 1, o, dtype=torch.float64)
    add_centered_products_(G, C, x.clone(), y)
    Xe = torch.cat([x.double(), torch.ones(g, m, 1, dtype=torch.float64)], 2)
    tol = 1e-13 if dtype == torch.float64 else 1e-6
    assert _rel(G, Xe.transpose(1, 2) @ Xe) < tol and _rel(C, Xe.transpose(1, 2) @ y.double()) < tol
    assert _rel(G, G.transpose(1, 2)) < 1e-15  # symmetric (the diagonal blocks up to the product's rounding)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e30])
@pytest.mark.parametrize("make", [lambda: nn.Linear(6, 4), lambda: nn.Conv2d(16, 16, 3, padding=1)])
def test_a_non_finite_input_makes_the_statistics_non_finite(make, bad):
    """One bad input value (1e30 overflows the float32 products) shows on ``G``'s diagonal, which is what
    ``is_finite`` reads of it."""
    torch.manual_seed(4)
    layer = make()
    x = torch.randn(8, 16, 9, 9) if isinstance(layer, nn.Conv2d) else torch.randn(20, 6)
    gram = Gram.for_layer(layer)
    gram.add(x, layer(x).detach())
    assert gram.is_finite()
    x.view(-1)[7] = bad
    gram = Gram.for_layer(layer)
    gram.add(x, torch.randn_like(layer(x)))
    assert not gram.is_finite() and not bool(torch.isfinite(gram.G.diagonal(dim1=-2, dim2=-1)).all())
