"""Sites found by the measuring pass itself (collect_stats without sites): the same sites and
statistics as tracing them first and measuring them in a pass of their own; outputs changed in
place before they could be measured send it back to that way. Short feature maps' moments."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from prune_repair import ChannelStats, collect_stats, find_sites
from prune_repair.engine.run.forward import head
from prune_repair.engine.sites.discover import Discovery
from prune_repair.engine.stats import activation
from prune_repair.engine.stats import channel as stats_module
from engine_helpers import inputs_for, tiny_models


def two_step(model, data, **options):
    """The sites traced on two samples, then measured in a pass of their own."""
    first = data if isinstance(data, (torch.Tensor, dict)) else data[0]
    sites = find_sites(model, head(first, 2), select=options.get("select"),
                       include_classifier=options.get("include_classifier", False),
                       blocks=options.get("block_outputs"))
    return collect_stats(model, data, sites=sites)


def discovered(model, data, **options):
    """collect_stats' one pass; fails the test if it handed the work back to the two-step way."""
    found = activation._discover(model, data if isinstance(data, (torch.Tensor, dict)) else data[0],
                                 options.get("select"), options.get("include_classifier", False),
                                 options.get("block_outputs"), None)
    assert found is not None, "the one pass did not measure every site"
    return collect_stats(model, data, **options)


def assert_same(one, two):
    assert one.sites == two.sites
    for fqn in two:
        assert one[fqn].count == two[fqn].count, fqn
        assert_close(one[fqn].mean, two[fqn].mean, rtol=1e-6, atol=1e-9)
        assert_close(one[fqn].var, two[fqn].var, rtol=1e-6, atol=1e-9)


class Attention(nn.Module):
    """A packed nn.MultiheadAttention, an F.linear site (the weight of a layer called as a
    function, as swin_t does) and a LayerNorm that takes a linear site."""

    def __init__(self, d=8):
        super().__init__()
        self.embed, self.mha = nn.Linear(3, d), nn.MultiheadAttention(d, 2, batch_first=True)
        self.fc, self.norm, self.head = nn.Linear(d, d), nn.LayerNorm(d), nn.Linear(d, 2)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.mha(h, h, h, need_weights=False)[0]
        h = self.norm(F.linear(h, self.fc.weight, self.fc.bias))
        return self.head(h)


class InPlace(nn.Module):
    """A conv whose next registered module is a BatchNorm that does not read its output, which
    an in-place ReLU changes before the next hooked call."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.conv2 = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = F.relu_(self.conv(x))
        y = self.bn(self.conv2(y))
        return self.fc(y.mean((2, 3)))


@pytest.mark.parametrize("name", ["mlp", "cnn", "cnn-bn", "resnet-bn", "resnet-ln", "tokens"])
def test_one_pass_finds_and_measures_what_tracing_first_does(name):
    model, x = tiny_models()[name], inputs_for(name, 24)
    data = [x[:10], x[10:]]
    assert_same(discovered(model, data), two_step(model, data))
    assert_same(discovered(model, x, include_classifier=True), two_step(model, x, include_classifier=True))


def test_blocks_and_selections_are_found_as_find_sites_finds_them():
    model, x = tiny_models()["resnet-bn"], inputs_for("resnet-bn", 12)
    for options in ({"block_outputs": ["layer1.0", "layer2.0"]}, {"select": "re:^layer2"},
                    {"select": ["layer1.0.conv2"], "include_classifier": True}):
        assert_same(discovered(model, x, **options), two_step(model, x, **options))
    assert [s.kind for s in discovered(model, x, block_outputs=["layer1.0"]).sites].count("block") == 1


def test_attention_function_calls_and_layer_norm_sites_match_the_traced_ones():
    torch.manual_seed(0)
    model, x = Attention().double().eval(), torch.randn(6, 5, 3, dtype=torch.float64)
    one, two = discovered(model, [x[:4], x[4:]]), two_step(model, [x[:4], x[4:]])
    assert [s.fqn for s in one.sites] == ["embed", "mha.in_proj:q", "mha.in_proj:k", "mha.in_proj:v",
                                          "mha.out_proj", "norm"]
    assert_same(one, two)


def test_an_output_changed_in_place_before_it_is_measured_sends_it_back_to_tracing_first():
    torch.manual_seed(0)
    model, x = InPlace().double().eval(), torch.randn(8, 1, 9, 9, dtype=torch.float64)
    seen = {}
    found = Discovery(model, lambda key, y, mask: seen.setdefault(key, y.clone()))
    found.run(x)
    assert not found.complete  # conv's output waited for the BatchNorm and was changed by relu_
    assert activation._discover(model, x, None, False, None, None) is None
    stats, expected = collect_stats(model, x), two_step(model, x)
    assert_same(stats, expected)
    raw = model.conv(x)  # measured before the in-place ReLU, as a hook sees it
    assert_close(stats["conv"].mean, raw.transpose(0, 1).reshape(4, -1).mean(1))


def test_padded_tokens_are_left_out_by_the_one_pass():
    torch.manual_seed(0)

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.fc, self.out = nn.Embedding(20, 8), nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, input_ids, attention_mask=None):
            return self.out(torch.relu(self.fc(self.wte(input_ids))))

    model = Tokens().double().eval()
    ids = torch.randint(1, 20, (4, 6))
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[:, 4:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    stats = discovered(model, batch)
    assert_same(stats, two_step(model, batch))
    real = model.fc(model.wte(ids))[mask.bool()]
    assert stats["fc"].count == real.shape[0]
    assert_close(stats["fc"].mean, real.mean(0))


@pytest.mark.parametrize("shape", [(64, 6, 2, 2), (5, 3, 7, 1), (40, 8, 31)])
def test_short_feature_maps_keep_float64_grade_precision(monkeypatch, shape):
    monkeypatch.setattr(stats_module, "CHUNK_ELEMENTS", {"cpu": 500})  # several chunks
    torch.manual_seed(0)
    y = torch.randn(shape) * 0.01 + 1000.0
    s = ChannelStats.of(y, 1)
    exact = y.double().movedim(1, -1).reshape(-1, shape[1])
    assert s.count == exact.shape[0]
    assert_close(s.mean, exact.mean(0), rtol=1e-10, atol=0)
    assert_close(s.var, exact.var(0, unbiased=False), rtol=1e-6, atol=0)
    h = (y[:, :, :1] - 1000).half()  # half precision reduces through float32
    assert_close(ChannelStats.of(h, 1).mean, h.double().movedim(1, -1).reshape(-1, shape[1]).mean(0))


def test_folding_row_by_row_gives_the_values_of_the_one_float64_product(monkeypatch):
    from prune_repair.engine.sites import fold

    monkeypatch.setattr(fold, "FOLD_CHUNK", 7)  # several blocks of rows
    torch.manual_seed(0)
    scale = torch.rand(6, dtype=torch.float64) * 3 + 0.1
    for weight in (torch.randn(6, 5), torch.randn(6, 3, 2, 2), torch.randn(5, 6).t(),
                   torch.randn(6, 3, 2, 2).contiguous(memory_format=torch.channels_last), torch.randn(6, 40).half()):
        expected, _ = fold.fold_affine(weight, None, scale, None)
        got = weight.clone() if weight.is_contiguous() else weight
        fold.scale_rows_(got, scale)
        assert torch.equal(got, expected)


def test_the_finite_check_finds_nan_and_inf_and_lets_huge_finite_values_pass():
    from prune_repair.engine.checks import is_finite

    assert is_finite(torch.full((4,), 3e38)) and is_finite(torch.full((3,), 6e4).half())
    assert not is_finite(torch.tensor([1.0, float("inf"), -float("inf")]))
    assert not is_finite(torch.tensor([float("nan"), 1.0]).half())
