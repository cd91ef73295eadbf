"""Tiny architectures for tests, examples, benchmarks and the MNIST zoo.

Every model takes MNIST-shaped input ``(N, 1, 28, 28)`` by default, outputs
``(N, num_classes)`` logits and has ``example_inputs(batch_size)``, a random input
of the right shape in the model's dtype and on its device. Submodules are named
(``features.fc1``, ``layer2.0.conv1``, ``blocks.1.fc2``) so that the fully
qualified names used for sites, stats and masks read well.

- :class:`MLP`: flatten, Linear+ReLU per width, linear classifier.
- :class:`PlainCNN`: VGG-style conv3x3 (+BatchNorm) + ReLU + MaxPool stages, then
  a flatten into the linear classifier.
- :class:`ResNetMini`: a ResNet-20-style network with residual streams and a
  choice of BatchNorm, channel LayerNorm or no normalization.
- :class:`TokenMLP`: a pre-LayerNorm residual MLP on ``(N, T, C)`` tokens.

Example:
    >>> import torch
    >>> model = ResNetMini(blocks_per_stage=(1, 1)).double()
    >>> model(model.example_inputs(2)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["MLP", "PlainCNN", "ResNetMini", "BasicBlock", "TokenMLP", "TokenBlock", "channel_norm"]

NORM_KINDS = ("bn", "ln", "none")


class _TinyModel(nn.Module):
    """Base class: ``example_inputs`` built from ``input_shape`` in the model's dtype/device."""

    input_shape: tuple[int, ...] = (1, 28, 28)

    def example_inputs(self, batch_size: int = 4) -> torch.Tensor:
        """A standard-normal input batch of shape ``(batch_size, *input_shape)``."""
        param = next(self.parameters())
        return torch.randn(batch_size, *self.input_shape, dtype=param.dtype, device=param.device)


class MLP(_TinyModel):
    """Multilayer perceptron: ``Flatten -> (Linear -> ReLU) per width -> Linear``.

    Hidden layers are ``features.fc1``, ``features.fc2``, ...; the classifier is
    ``classifier``. ``example_inputs`` is MNIST-shaped when ``in_features == 784``,
    else ``(N, in_features)``.

    Example:
        >>> model = MLP(widths=(32, 32))
        >>> model(model.example_inputs(3)).shape
        torch.Size([3, 10])
    """

    def __init__(
        self,
        widths: Sequence[int] = (128, 128),
        in_features: int = 784,
        num_classes: int = 10,
        bias: bool = True,
    ) -> None:
        super().__init__()
        layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
        width_in = in_features
        for i, width in enumerate(widths, start=1):
            layers[f"fc{i}"] = nn.Linear(width_in, width, bias=bias)
            layers[f"relu{i}"] = nn.ReLU()
            width_in = width
        self.features = nn.Sequential(layers)
        self.classifier = nn.Linear(width_in, num_classes, bias=bias)
        self.input_shape = (in_features,) if in_features != 784 else (1, 28, 28)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class PlainCNN(_TinyModel):
    """VGG-style CNN: per stage ``conv3x3 (+BN) -> ReLU -> MaxPool2d(2)``, then
    ``Flatten -> Linear``.

    With ``batch_norm=True`` each conv has no bias and is followed by a BatchNorm2d
    (the "CNN with BatchNorm"). The classifier sees ``C * H * W`` flattened columns,
    so each channel of the last conv is tied to a block of ``H * W`` columns.
    Stage ``i`` (from 1) is ``features.conv{i}``, ``features.bn{i}``,
    ``features.relu{i}``, ``features.pool{i}``.

    Example:
        >>> model = PlainCNN(channels=(8, 16), batch_norm=True)
        >>> model(model.example_inputs(2)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        channels: Sequence[int] = (16, 32),
        num_classes: int = 10,
        batch_norm: bool = False,
        in_channels: int = 1,
        input_size: int = 28,
    ) -> None:
        super().__init__()
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        c_in, size = in_channels, input_size
        for i, c_out in enumerate(channels, start=1):
            layers[f"conv{i}"] = nn.Conv2d(c_in, c_out, 3, padding=1, bias=not batch_norm)
            if batch_norm:
                layers[f"bn{i}"] = nn.BatchNorm2d(c_out)
            layers[f"relu{i}"] = nn.ReLU()
            layers[f"pool{i}"] = nn.MaxPool2d(2)
            c_in, size = c_out, size // 2
        if size < 1:
            raise ValueError(f"{len(channels)} pooling stages shrink a {input_size}px input to nothing: use fewer stages")
        self.features = nn.Sequential(layers)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(c_in * size * size, num_classes)
        self.input_shape = (in_channels, input_size, input_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.features(x)))


def channel_norm(kind: str, channels: int) -> nn.Module:
    """The normalization layer for ``kind``: ``"bn"`` -> BatchNorm2d, ``"none"`` ->
    Identity, ``"ln"`` -> ``GroupNorm(1, channels)``.

    The "channel LayerNorm" is GroupNorm with one group: each sample is normalized
    over all of (C, H, W) jointly, then scaled and shifted per channel.

    Example:
        >>> norm = channel_norm("ln", 8)
        >>> type(norm).__name__, norm.num_groups
        ('GroupNorm', 1)
    """
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "ln":
        return nn.GroupNorm(1, channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}: use one of {', '.join(NORM_KINDS)}")


class BasicBlock(nn.Module):
    """ResNet basic block: ``relu(norm2(conv2(relu(norm1(conv1(x))))) + shortcut(x))``.

    ``shortcut`` is Identity when the shape is kept, else a 1x1 conv (with stride)
    followed by a norm. Convs carry a bias only when ``norm == "none"``.

    Example:
        >>> block = BasicBlock(8, 16, stride=2)
        >>> block(torch.randn(2, 8, 14, 14)).shape
        torch.Size([2, 16, 7, 7])
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, norm: str = "bn") -> None:
        super().__init__()
        bias = norm == "none"
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=bias)
        self.norm1 = channel_norm(norm, out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=bias)
        self.norm2 = channel_norm(norm, out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = nn.Sequential(
                OrderedDict(
                    conv=nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=bias),
                    norm=channel_norm(norm, out_channels),
                )
            )
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNetMini(_TinyModel):
    """Small ResNet-20-style CNN with residual streams.

    Stem ``conv1 -> norm1 -> relu``, then stages ``layer1, layer2, ...`` of
    :class:`BasicBlock` with widths ``width * 2**i`` (stride 2 at the start of every
    stage after the first), global average pool, linear ``fc``.
    ``blocks_per_stage=(3, 3, 3)`` with ``width=16`` is the ResNet-20 layout
    (three stages of 16/32/64 channels). ``norm`` is ``"bn"`` (BatchNorm2d),
    ``"ln"`` (channel LayerNorm as ``GroupNorm(1, C)``, see :func:`channel_norm`)
    or ``"none"`` (convs get biases instead).

    Example:
        >>> model = ResNetMini(width=8, blocks_per_stage=(1, 1), norm="ln")
        >>> model(model.example_inputs(2)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        width: int = 16,
        blocks_per_stage: Sequence[int] = (1, 1),
        norm: str = "bn",
        num_classes: int = 10,
        in_channels: int = 1,
        input_size: int = 28,
    ) -> None:
        super().__init__()
        if norm not in NORM_KINDS:
            raise ValueError(f"unknown norm {norm!r}: use one of {', '.join(NORM_KINDS)}")
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=norm == "none")
        self.norm1 = channel_norm(norm, width)
        self.relu = nn.ReLU()
        c_in = width
        for i, n_blocks in enumerate(blocks_per_stage):
            c_out = width * 2**i
            blocks = [BasicBlock(c_in if b == 0 else c_out, c_out, 2 if (i > 0 and b == 0) else 1, norm) for b in range(n_blocks)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            c_in = c_out
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(c_in, num_classes)
        self.num_stages = len(blocks_per_stage)
        self.input_shape = (in_channels, input_size, input_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.norm1(self.conv1(x)))
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{i}")(x)
        return self.fc(self.flatten(self.avgpool(x)))


class TokenBlock(nn.Module):
    """Pre-LayerNorm residual MLP block on ``(N, T, C)``: ``x + fc2(act(fc1(norm(x))))``.

    ``hidden`` is the width of ``fc1`` (default ``2 * dim``); ``act`` is GELU.

    Example:
        >>> TokenBlock(8)(torch.randn(2, 5, 8)).shape
        torch.Size([2, 5, 8])
    """

    def __init__(self, dim: int, hidden: int | None = None) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        hidden = hidden or 2 * dim
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class TokenMLP(_TinyModel):
    """A LayerNorm model on tokens: every linear acts on the last dim of ``(N, T, C)``.

    The ``(N, 1, 28, 28)`` image is cut into ``tokens`` square patches without
    padding or cropping (16 tokens = a 4x4 grid of 7x7 patches = 49 pixels each;
    ``tokens`` must be a square number whose root divides 28). Patches are embedded
    by ``embed`` (Linear to ``dim``) plus a learned position embedding ``pos_embed``,
    then pass ``depth`` :class:`TokenBlock` s (``blocks.0``, ...), a final LayerNorm
    ``norm``, a mean over tokens and the linear ``head``.

    Example:
        >>> model = TokenMLP(dim=16, depth=1)
        >>> model(model.example_inputs(2)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        dim: int = 32,
        tokens: int = 16,
        depth: int = 2,
        num_classes: int = 10,
        hidden_ratio: int = 2,
        image_size: int = 28,
    ) -> None:
        super().__init__()
        grid = math.isqrt(tokens)
        if grid * grid != tokens or image_size % grid:
            raise ValueError(
                f"tokens={tokens} cannot tile a {image_size}x{image_size} image: "
                f"use a square number whose root divides {image_size} (e.g. 16)"
            )
        self.grid, self.patch = grid, image_size // grid
        self.embed = nn.Linear(self.patch * self.patch, dim)
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, tokens, dim))
        self.blocks = nn.Sequential(*[TokenBlock(dim, hidden_ratio * dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.input_shape = (1, image_size, image_size)

    def to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 1, H, W)`` images -> ``(N, T, P*P)`` patches in row-major grid order."""
        n, g, p = x.shape[0], self.grid, self.patch
        x = x.reshape(n, g, p, g, p).permute(0, 1, 3, 2, 4)
        return x.reshape(n, g * g, p * p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(self.to_tokens(x)) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x.mean(dim=1))
