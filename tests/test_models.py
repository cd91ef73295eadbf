"""The tiny architectures: shapes, dtypes, layouts and readable submodule names."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prune_repair.zoo.models import MLP, BasicBlock, PlainCNN, ResNetMini, TokenMLP, channel_norm

MODELS = {
    "mlp": lambda: MLP(widths=(32, 16)),
    "mlp-no-bias": lambda: MLP(widths=(8,), bias=False),
    "cnn": lambda: PlainCNN(channels=(4, 8)),
    "cnn-bn": lambda: PlainCNN(channels=(4, 8), batch_norm=True),
    "resnet-bn": lambda: ResNetMini(width=4, blocks_per_stage=(1, 1)),
    "resnet-ln": lambda: ResNetMini(width=4, blocks_per_stage=(1, 1), norm="ln"),
    "resnet-none": lambda: ResNetMini(width=4, blocks_per_stage=(1, 1), norm="none"),
    "token-mlp": lambda: TokenMLP(dim=8, depth=2),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_on_example_inputs_in_model_dtype(name: str, dtype: torch.dtype) -> None:
    model = MODELS[name]().to(dtype).eval()
    x = model.example_inputs(3)
    assert x.dtype == dtype
    assert tuple(x.shape) == (3, 1, 28, 28)
    out = model(x)
    assert out.shape == (3, 10)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_example_inputs_default_batch_and_train_mode_backward(name: str) -> None:
    model = MODELS[name]()
    x = model.example_inputs()
    assert x.shape[0] == 4
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_mlp_layout_and_names() -> None:
    model = MLP(widths=(128, 64), num_classes=7)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert list(linears) == ["features.fc1", "features.fc2", "classifier"]
    assert linears["features.fc1"].in_features == 784
    assert linears["classifier"].out_features == 7
    assert MLP(bias=False).classifier.bias is None


def test_mlp_with_flat_inputs() -> None:
    model = MLP(widths=(5,), in_features=20)
    assert tuple(model.example_inputs(2).shape) == (2, 20)


def test_plain_cnn_flattens_into_classifier() -> None:
    model = PlainCNN(channels=(16, 32))
    assert model.classifier.in_features == 32 * 7 * 7
    assert [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)] == ["features.conv1", "features.conv2"]
    assert all(conv.bias is not None for conv in (model.features.conv1, model.features.conv2))


def test_plain_cnn_with_batch_norm_has_bias_free_convs() -> None:
    model = PlainCNN(channels=(16, 32), batch_norm=True)
    assert model.features.conv1.bias is None and model.features.conv2.bias is None
    assert isinstance(model.features.bn1, nn.BatchNorm2d) and model.features.bn2.num_features == 32


def test_plain_cnn_rejects_too_many_pooling_stages() -> None:
    with pytest.raises(ValueError, match="use fewer stages"):
        PlainCNN(channels=(4,) * 6)


def test_resnet20_layout() -> None:
    model = ResNetMini(width=16, blocks_per_stage=(3, 3, 3))
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 9
    assert [model.layer1[0].conv1.out_channels, model.layer2[0].conv1.out_channels, model.layer3[0].conv1.out_channels] == [16, 32, 64]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) == 19  # stem + 2 per block; with fc that makes the 20 layers
    assert isinstance(model.layer1[0].shortcut, nn.Identity)
    assert isinstance(model.layer2[0].shortcut.conv, nn.Conv2d) and model.layer2[0].shortcut.conv.stride == (2, 2)
    assert model.fc.in_features == 64
    assert model(model.example_inputs(2)).shape == (2, 10)


def test_resnet_norm_choices() -> None:
    assert isinstance(ResNetMini(norm="bn").layer1[0].norm1, nn.BatchNorm2d)
    ln = ResNetMini(norm="ln").layer1[0].norm1
    assert isinstance(ln, nn.GroupNorm) and ln.num_groups == 1
    plain = ResNetMini(norm="none")
    assert isinstance(plain.layer1[0].norm1, nn.Identity) and plain.layer1[0].conv1.bias is not None
    assert ResNetMini(norm="bn").layer1[0].conv1.bias is None
    with pytest.raises(ValueError, match="unknown norm 'gn'"):
        ResNetMini(norm="gn")
    with pytest.raises(ValueError, match="bn, ln, none"):
        channel_norm("batch", 4)


def test_resnet_block_adds_residual_before_last_relu() -> None:
    block = BasicBlock(4, 4, norm="none").double()
    for p in block.parameters():
        nn.init.zeros_(p)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(block(x), torch.relu(x))


def test_token_mlp_linears_act_on_last_dim_of_tokens() -> None:
    model = TokenMLP(dim=12, tokens=16, depth=2)
    seen: dict[str, tuple[int, ...]] = {}

    def record(name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            seen[name] = tuple(output.shape)

        return hook

    hooks = [m.register_forward_hook(record(name)) for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.LayerNorm))]
    model(model.example_inputs(3))
    for hook in hooks:
        hook.remove()
    assert seen["embed"] == (3, 16, 12)
    assert seen["blocks.0.fc1"] == (3, 16, 24)
    assert seen["blocks.1.fc2"] == (3, 16, 12)
    assert seen["blocks.0.norm"] == (3, 16, 12) and seen["norm"] == (3, 16, 12)
    assert seen["head"] == (3, 10)


def test_token_mlp_tokens_are_7x7_patches_in_grid_order() -> None:
    model = TokenMLP()
    image = torch.arange(784.0).reshape(1, 1, 28, 28)
    tokens = model.to_tokens(image)
    assert tokens.shape == (1, 16, 49)
    torch.testing.assert_close(tokens[0, 1], image[0, 0, 0:7, 7:14].flatten())
    torch.testing.assert_close(tokens[0, 6], image[0, 0, 7:14, 14:21].flatten())


def test_token_mlp_rejects_tokens_that_do_not_tile_the_image() -> None:
    with pytest.raises(ValueError, match="square number"):
        TokenMLP(tokens=10)
    assert TokenMLP(tokens=49).to_tokens(torch.zeros(2, 1, 28, 28)).shape == (2, 49, 16)
