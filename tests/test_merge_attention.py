"""Merging attention models: head-aware permutation groups (torchvision ViT and Swin v1), exact
recovery of a permuted copy, and one-line refusals for attention the groups do not cover."""

import time

import pytest
import torch
from torch import nn
from torchvision.models import VisionTransformer
from torchvision.models.convnext import CNBlockConfig, ConvNeXt
from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2

from prune_repair import find_groups, merge
from prune_repair.merge import activation_matching, invert, permute, permute_state_dict, random_perms
from prune_repair.merge import prepare_merge, weight_matching
from prune_repair.merge.attention_groups import vit_groups
from prune_repair.merge.groups import GroupError


def convnext(seed):
    torch.manual_seed(seed)
    return ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], num_classes=10).eval()


def vit(seed, heads=2, **kw):
    torch.manual_seed(seed)
    return VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=heads, hidden_dim=16,
                             mlp_dim=32, num_classes=10, **kw).double().eval()


X = torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_convnext_activation_matching_reads_layernorm2d_on_the_channel_dim():
    x = torch.randn(16, 3, 32, 32)
    merged = merge(convnext(0), convnext(1), x, alpha=0.5, align="activation")
    assert merged(x[:2]).shape == (2, 10)


def test_vit_groups_move_heads_as_units_and_keep_the_function():
    model = vit(0, heads=4)
    groups = find_groups(model, X[:4])  # checks that a random permutation keeps the output
    assert [g.name for g in groups][:3] == ["residual", "encoder.layers.encoder_layer_0.self_attention:qk",
                                            "encoder.layers.encoder_layer_0.self_attention:vo"]
    perms = random_perms(groups, torch.Generator().manual_seed(1))
    qk, vo = (perms[f"encoder.layers.encoder_layer_0.self_attention:{p}"].view(4, 4) for p in ("qk", "vo"))
    assert torch.equal(qk // 4, vo // 4) and bool((qk // 4 == (qk // 4)[:, :1]).all())  # same whole-head moves
    torch.testing.assert_close(permute(model, groups, perms)(X), model(X), atol=1e-12, rtol=1e-12)


def swin(seed, **kw):
    torch.manual_seed(seed)
    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 1], num_heads=[2, 4], window_size=[2, 2],
                           num_classes=10, stochastic_depth_prob=0.0, **kw).double().eval()


@pytest.mark.parametrize("build", [lambda s: vit(s), lambda s: vit(s, heads=4, representation_size=12), swin],
                         ids=["vit", "vit-pre-logits", "swin_t"])
@pytest.mark.parametrize("align", ["weight", "activation"])
def test_a_permuted_copy_is_recovered_and_merges_back_to_the_model_at_every_alpha(build, align):
    a, x = build(0), X
    groups = find_groups(a, x[:4])
    perms = random_perms(groups, torch.Generator().manual_seed(7))
    b = permute(a, groups, perms)
    al = weight_matching(a, b, groups) if align == "weight" else activation_matching(a, b, x, groups)
    for g in groups:
        assert torch.equal(al.perms[g.name], invert(perms[g.name])), g.name
    plan = prepare_merge([a, b], x, align=align)
    for alpha in (0.0, 0.25, 0.5, 0.8, 1.0):
        merged, _ = plan.merged([1 - alpha, alpha], repair="none")
        for key, value in a.state_dict().items():
            torch.testing.assert_close(merged.state_dict()[key], value, atol=1e-15, rtol=1e-15)
        torch.testing.assert_close(merged(x), a(x), atol=1e-12, rtol=1e-12)
    repaired, _ = plan.merged([0.5, 0.5], repair="repair")
    torch.testing.assert_close(repaired(x), a(x), atol=1e-10, rtol=1e-10)


def test_dims_inside_heads_stay_in_order_when_inner_permutation_is_off():
    groups = vit_groups(vit(0, heads=2), inner=False)
    perms = random_perms(groups, torch.Generator().manual_seed(0))
    p = perms["encoder.layers.encoder_layer_0.self_attention:qk"].view(2, 8)
    assert torch.equal(p % 8, torch.arange(8).expand(2, 8)) and not torch.equal(p[:, 0], torch.tensor([0, 8]))


def test_a_permutation_that_splits_a_head_is_refused():
    model = vit(0)
    groups = find_groups(model, X[:2])
    perms = random_perms(groups, torch.Generator().manual_seed(0))
    name = "encoder.layers.encoder_layer_0.self_attention:vo"
    perms[name] = torch.arange(16).roll(1)
    with pytest.raises(ValueError, match="splits an attention head"):
        permute_state_dict(model.state_dict(), groups, perms)


@pytest.mark.parametrize("align", ["weight", "activation", "none"])
def test_models_whose_head_counts_differ_are_refused_in_one_line(align):
    with pytest.raises(ValueError, match=r"has 2 heads in .* and 4 in") as err:
        merge(vit(0, heads=2), vit(1, heads=4), X, align=align, repair="repair")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("build, layer", [
    (lambda: nn.Sequential(nn.Conv2d(3, 8, 8, 8), nn.Flatten(2), nn.Unflatten(1, (1, 8)), nn.Flatten(1, 2),
                           nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)),
     r"layer '4\.self_attn' \(MultiheadAttention\) is attention: head-aware permutation groups are built for "
     r"torchvision VisionTransformer and Swin \(v1\), HF GPT-2, LLaMA and BERT only, not for Sequential"),
    (lambda: swin(0, block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2),
     r"'features\.1\.0' is a SwinTransformerBlockV2 with ShiftedWindowAttentionV2: head-aware groups are built "
     r"for Swin v1 blocks only"),
])
def test_other_attention_models_fail_fast_naming_the_layer(build, layer):
    model, start = build().eval(), time.perf_counter()
    with pytest.raises(GroupError, match=layer) as err:
        find_groups(model, torch.randn(2, 3, 32, 32))
    assert time.perf_counter() - start < 10 and "\n" not in str(err.value)
