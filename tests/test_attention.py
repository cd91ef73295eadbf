"""Attention is covered: MultiheadAttention q/k/v + out_proj (ViT) and F.linear layers (swin_t)
are sites and prunable targets; exact float64 repair, folding, keys, shapes and zeros kept."""

import copy

import pytest
import torch
from torch import nn
from torchvision.models import VisionTransformer
from torchvision.models.swin_transformer import SwinTransformer

from prune_repair import collect_stats, find_sites, repair_
from prune_repair.engine.sites.taps import SiteTaps
from prune_repair.prune import find_targets, prune_

VIT_ATTN = "encoder.layers.encoder_layer_0.self_attention"


def vit():
    torch.manual_seed(0)
    return VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                             num_classes=10).double().eval()


def swin():
    torch.manual_seed(0)
    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=[2, 2],
                           num_classes=10).double().eval()


def images(n=16):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def random_prune_(model, fraction=0.6):
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for t in find_targets(model):
            t.stored.mul_((torch.rand(t.stored.shape, generator=g, dtype=torch.float64) > fraction).double())
            t.stored.mul_(1.7)  # distort the statistics too


def assert_exact_repair(model, x, data=None):
    ref = collect_stats(model, x)
    pruned = copy.deepcopy(model)
    random_prune_(pruned)
    unfolded = copy.deepcopy(pruned)
    zeros = {t.stored_name: t.stored == 0 for t in find_targets(pruned)}
    shapes = {k: v.shape for k, v in pruned.state_dict().items()}
    report = repair_(pruned, ref, x if data is None else data, repair="repair")
    after = collect_stats(pruned, x, sites=ref.sites)
    for fqn in ref:
        torch.testing.assert_close(after[fqn].mean, ref[fqn].mean, atol=1e-10, rtol=0)
        torch.testing.assert_close(after[fqn].std, ref[fqn].std, atol=1e-10, rtol=1e-10)
    state = pruned.state_dict()
    assert {k: v.shape for k, v in state.items()} == shapes
    assert all(bool((state[k][z] == 0).all()) for k, z in zeros.items())
    # the folded model computes what the unfolded model with the corrections applied computes
    corr = report.corrections
    taps = SiteTaps(unfolded, ref.sites, lambda *a: None,
                    lambda s: (corr[s.fqn].scale, corr[s.fqn].shift) if s.fqn in corr else None)
    with torch.no_grad(), taps.attached(unfolded) as run:
        expected = run(x)
    torch.testing.assert_close(pruned(x), expected, atol=1e-10, rtol=1e-10)
    return ref, report


def test_vit_sites_cover_qkv_and_out_proj():
    sites = {s.fqn: s for s in find_sites(vit(), images(2))}
    for part in ("in_proj:q", "in_proj:k", "in_proj:v", "out_proj"):
        assert sites[f"{VIT_ATTN}.{part}"].call == "attention" and sites[f"{VIT_ATTN}.{part}"].channels == 32
    assert "heads.head" not in sites


def test_vit_exact_repair_folds_into_in_proj_rows():
    ref, report = assert_exact_repair(vit(), images())
    fqns = [s.fqn for s in report.sites]
    assert f"{VIT_ATTN}.in_proj:k" in fqns and not report.skipped


def test_vit_exact_repair_with_several_batches():
    x = images()
    assert_exact_repair(vit(), x, data=[x[:8], x[8:]])


def test_vit_in_proj_is_prunable_and_sparsity_over_all_parameters_is_reported():
    model = vit()
    names = {(t.fqn, t.name) for t in find_targets(model)}
    assert (VIT_ATTN, "in_proj_weight") in names and (f"{VIT_ATTN}.out_proj", "weight") in names
    report = prune_(model, 0.9)
    assert report.achieved_sparsity == pytest.approx(0.9, abs=1e-4)
    assert float((model.get_submodule(VIT_ATTN).in_proj_weight == 0).double().mean()) > 0.5
    assert 0.5 < report.sparsity_all_params < report.achieved_sparsity


def test_vit_torch_prune_masks_on_in_proj():
    model = vit()
    prune_(model, 0.5, style="torch")
    assert hasattr(model.get_submodule(VIT_ATTN), "in_proj_weight_mask")
    model(images(2))


def test_swin_linear_called_through_f_linear_is_a_site():
    sites = {s.fqn: s for s in find_sites(swin(), images(2))}
    assert sites["features.1.0.attn.qkv"].call == "function" and sites["features.1.0.attn.proj"].call == "function"


def test_swin_exact_repair():
    assert_exact_repair(swin(), images(8))


def test_multihead_attention_not_batch_first_and_cross_attention():
    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.kv = nn.Linear(6, 8), nn.Linear(6, 8)
            self.attn = nn.MultiheadAttention(8, 2)
            self.head = nn.Linear(8, 3)

        def forward(self, x):  # (T, N, 6)
            kv = self.kv(x)
            return self.head(self.attn(self.q(x), kv, kv)[0])

    torch.manual_seed(0)
    model = Cross().double().eval()
    x = torch.randn(5, 12, 6, dtype=torch.float64)
    assert "attn.in_proj:v" in [s.fqn for s in find_sites(model, x)]
    assert_exact_repair(model, x)
