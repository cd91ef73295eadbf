"""Merging attention and LayerNorm-channel models: ConvNeXt merges; ViT and swin_t fail in
seconds with one line naming the attention layer (head permutations are not supported yet)."""

import time

import pytest
import torch
from torchvision.models import VisionTransformer
from torchvision.models.convnext import CNBlockConfig, ConvNeXt
from torchvision.models.swin_transformer import SwinTransformer

from prune_repair import find_groups, merge
from prune_repair.merge.groups import GroupError


def convnext(seed):
    torch.manual_seed(seed)
    return ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], num_classes=10).eval()


def test_convnext_activation_matching_reads_layernorm2d_on_the_channel_dim():
    x = torch.randn(16, 3, 32, 32)
    merged = merge(convnext(0), convnext(1), x, alpha=0.5, align="activation")
    assert merged(x[:2]).shape == (2, 10)


@pytest.mark.parametrize("build, layer", [
    (lambda: VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                               num_classes=10), r"layer 'encoder\.layers\.encoder_layer_0\.self_attention' "
                                            r"\(MultiheadAttention\)"),
    (lambda: SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=[2, 2],
                             num_classes=10), r"layer 'features\.1\.0\.attn' \(ShiftedWindowAttention\)"),
])
def test_attention_models_fail_fast_naming_the_layer(build, layer):
    model, start = build().eval(), time.perf_counter()
    with pytest.raises(GroupError, match=layer) as err:
        find_groups(model, torch.randn(2, 3, 32, 32))
    assert time.perf_counter() - start < 10 and "\n" not in str(err.value)
