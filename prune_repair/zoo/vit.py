"""A torchvision VisionTransformer for one-channel images (the MNIST ViTs of the zoo).

:func:`mnist_vit` builds a plain :class:`torchvision.models.VisionTransformer` whose
patch embedding ``conv_proj`` reads ``in_channels`` (1 for MNIST) instead of 3;
everything else (class token, ``encoder.layers.encoder_layer_{i}`` blocks with an
``nn.MultiheadAttention`` ``self_attention`` and an ``mlp``, ``heads.head``) is
torchvision's own, so tools written for torchvision ViTs apply unchanged. torchvision
is imported only when a model is built.

Example:
    >>> import torch
    >>> model = mnist_vit(num_layers=1, hidden_dim=16, num_heads=2, mlp_dim=32)
    >>> model(torch.randn(3, 1, 28, 28)).shape
    torch.Size([3, 10])
    >>> type(model).__name__, model.encoder.layers.encoder_layer_0.self_attention.num_heads
    ('VisionTransformer', 2)
"""

from __future__ import annotations

import math

from torch import nn

__all__ = ["mnist_vit"]


def mnist_vit(
    image_size: int = 28,
    patch_size: int = 7,
    num_layers: int = 4,
    num_heads: int = 4,
    hidden_dim: int = 64,
    mlp_dim: int = 128,
    num_classes: int = 10,
    in_channels: int = 1,
) -> nn.Module:
    """A torchvision ``VisionTransformer`` on ``(N, in_channels, image_size, image_size)`` input.

    The defaults (28 px, 7 px patches = 16 tokens + a class token, 4 layers of width 64
    with 4 heads and an MLP of 128) give about 0.14 M parameters.

    Example:
        >>> sum(p.numel() for p in mnist_vit().parameters())
        139018
    """
    from torchvision.models.vision_transformer import VisionTransformer

    if image_size % patch_size:
        raise ValueError(f"patch_size {patch_size} does not divide image_size {image_size}: pick a divisor")
    model = VisionTransformer(image_size, patch_size, num_layers, num_heads, hidden_dim, mlp_dim,
                              num_classes=num_classes)
    # torchvision hard-codes 3 input channels: a new patch embedding for in_channels, with
    # torchvision's own initialization (truncated normal scaled by the fan-in, zero bias)
    model.conv_proj = nn.Conv2d(in_channels, hidden_dim, kernel_size=patch_size, stride=patch_size)
    nn.init.trunc_normal_(model.conv_proj.weight, std=math.sqrt(1 / (in_channels * patch_size * patch_size)))
    nn.init.zeros_(model.conv_proj.bias)
    return model
