"""Merging without alignment, then correcting, on attention models (torchvision ViT's
MultiheadAttention, swin_t's window attention through F.linear): the endpoint statistics of
every site, attention projections included, are read by the same taps a repair uses."""

import pytest
import torch
from torchvision.models import VisionTransformer
from torchvision.models.swin_transformer import SwinTransformer

from prune_repair import collect_stats
from prune_repair.merge import merge, prepare_merge


def vit(seed):
    torch.manual_seed(seed)
    return VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
                             num_classes=10).double().eval()


def swin(seed):
    torch.manual_seed(seed)
    return SwinTransformer(patch_size=[4, 4], embed_dim=8, depths=[1, 1], num_heads=[2, 2], window_size=[2, 2],
                           num_classes=10).double().eval()


@pytest.fixture(scope="module")
def x():
    return torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.mark.parametrize("build", [vit, swin], ids=["vit", "swin_t"])
def test_exact_repair_after_plain_average_reaches_the_goal_at_every_site(build, x):
    plan = prepare_merge([build(0), build(1)], x, align="none")
    merged, report = plan.merged([0.3, 0.7], repair="repair")
    goal = plan.moments().goal([0.3, 0.7])
    assert any(":q" in s.fqn for s in goal.sites) or any(s.call == "function" for s in goal.sites)
    measured = collect_stats(merged, x, sites=goal.sites)
    for s in goal.sites:
        torch.testing.assert_close(measured[s.fqn].mean, goal[s.fqn].mean, atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(measured[s.fqn].std, goal[s.fqn].std, atol=1e-9, rtol=1e-9)
    assert {r.fqn for r in report.sites} == {s.fqn for s in goal.sites}


@pytest.mark.parametrize("build", [vit, swin], ids=["vit", "swin_t"])
@pytest.mark.parametrize("repair", ["repair", "rescale", "auto"])
def test_merging_a_model_with_itself_without_alignment_changes_nothing(build, repair, x):
    model = build(0)
    merged = merge(model, build(0), x, alpha=0.5, align="none", repair=repair)
    torch.testing.assert_close(merged(x), model(x), atol=1e-10, rtol=1e-10)


def test_padded_tokens_are_left_out_of_the_endpoint_statistics():
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(8, 2, 16, batch_first=True, dropout=0.0).double()
    fwd = lambda m, b: m(b["x"])  # noqa: E731
    x = torch.randn(4, 5, 8, dtype=torch.float64)
    mask = torch.ones(4, 5, dtype=torch.long)
    mask[:, 3:] = 0
    padded = {"x": x, "attention_mask": mask}
    junk = {"x": torch.cat([x[:, :3], 1e3 * torch.randn(4, 2, 8, dtype=torch.float64)], 1), "attention_mask": mask}
    m1 = prepare_merge([layer, layer], padded, align="none", forward_fn=fwd).moments()
    m2 = prepare_merge([layer, layer], junk, align="none", forward_fn=fwd).moments()
    token_wise = [s for s in m1.sites if s.fqn.endswith((":q", ":k", ":v"))]  # attention mixes tokens after
    assert len(token_wise) == 3
    for s in token_wise:
        torch.testing.assert_close(m1.mean[s.fqn], m2.mean[s.fqn])
        torch.testing.assert_close(m1.cov[s.fqn], m2.cov[s.fqn])
