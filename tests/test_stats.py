"""ChannelStats: float64, streaming and mergeable; ActivationStats serializes."""

import torch
from torch.testing import assert_close

from prune_repair import ActivationStats, ChannelStats, collect_stats
from engine_helpers import inputs_for, tiny_models


def test_merged_batches_equal_the_pooled_statistics():
    torch.manual_seed(0)
    y = torch.randn(50, 6, 3, 3) * 4 + 2
    whole = ChannelStats.of(y, 1)
    parts = ChannelStats.of(y[:7], 1).merge(ChannelStats.of(y[7:30], 1)).merge(ChannelStats.of(y[30:], 1))
    assert whole.mean.dtype == torch.float64
    assert_close(parts.mean, whole.mean)
    assert_close(parts.var, whole.var)
    assert_close(whole.var, y.double().transpose(0, 1).reshape(6, -1).var(dim=1, unbiased=False))


def test_token_outputs_use_the_last_dim():
    y = torch.randn(5, 7, 3, dtype=torch.float64)
    s = ChannelStats.of(y, -1)
    assert s.count == 35 and s.mean.shape == (3,)
    assert_close(s.mean, y.reshape(-1, 3).mean(0))


def test_collect_over_batches_equals_one_big_batch():
    model, x = tiny_models()["cnn-bn"], inputs_for("cnn-bn", 48)
    one = collect_stats(model, x)
    many = collect_stats(model, [x[:16], x[16:32], x[32:]])
    for fqn in one:
        assert_close(many[fqn].mean, one[fqn].mean)
        assert_close(many[fqn].std, one[fqn].std)


def test_stats_round_trip_through_a_weights_only_file(tmp_path):
    model, x = tiny_models()["resnet-bn"], inputs_for("resnet-bn")
    stats = collect_stats(model, x)
    stats.save(tmp_path / "stats.pt")
    loaded = ActivationStats.load(tmp_path / "stats.pt")
    assert loaded.sites == stats.sites
    for fqn in stats:
        assert_close(loaded[fqn].std, stats[fqn].std)


def test_interpolation_lerps_means_and_stds_not_variances():
    a = ActivationStats([], {"s": ChannelStats.from_moments(torch.tensor([0.0]), torch.tensor([1.0]))})
    b = ActivationStats([], {"s": ChannelStats.from_moments(torch.tensor([4.0]), torch.tensor([5.0]))})
    goal = a.interpolate(b, 0.25)["s"]
    assert_close(goal.mean, torch.tensor([1.0], dtype=torch.float64))
    assert_close(goal.std, torch.tensor([2.0], dtype=torch.float64))


def test_select_channels_keeps_the_named_channels():
    model, x = tiny_models()["mlp"], inputs_for("mlp")
    stats = collect_stats(model, x)
    kept = stats.select_channels({"features.fc1": torch.tensor([3, 0, 5])})
    assert kept.site("features.fc1").channels == 3
    assert_close(kept["features.fc1"].mean, stats["features.fc1"].mean[[3, 0, 5]])


def test_float32_feature_maps_keep_float64_grade_precision_far_from_zero():
    torch.manual_seed(0)
    y = torch.randn(64, 8, 12, 12) * 0.01 + 1000.0
    s = ChannelStats.of(y, 1)
    exact = y.double().transpose(0, 1).reshape(8, -1)
    assert_close(s.mean, exact.mean(1), rtol=1e-10, atol=0)
    assert_close(s.var, exact.var(1, unbiased=False), rtol=1e-6, atol=0)


def test_channel_last_and_chunked_outputs_keep_float64_grade_precision(monkeypatch):
    from prune_repair.engine.stats import channel as stats_module

    monkeypatch.setattr(stats_module, "CHUNK_ELEMENTS", {"cpu": 1000})  # many chunks
    torch.manual_seed(0)
    for y, cdim in [(torch.randn(6, 37, 5, 24) * 0.01 + 1000.0, -1), (torch.randn(203, 24) * 3 - 7, -1),
                    (torch.randn(64, 8, 12, 12) * 0.01 + 1000.0, 1),
                    (torch.randn(32, 8, 6, 6).contiguous(memory_format=torch.channels_last) * 2 + 5, 1)]:
        s = ChannelStats.of(y, cdim)
        exact = y.double().movedim(cdim, -1).reshape(-1, y.shape[cdim])
        assert s.count == exact.shape[0]
        assert_close(s.mean, exact.mean(0), rtol=1e-10, atol=1e-7 * float(exact.std()))  # float32 runs of <= 16 values
        assert_close(s.var, exact.var(0, unbiased=False), rtol=1e-6, atol=0)
