"""Magnitude pruning: exact sparsity, deterministic ties, layer selection, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prune_repair.zoo.models import MLP, PlainCNN
from prune_repair.prune import (
    PruneError,
    PruneMethod,
    find_targets,
    masks_from_scores,
    measure_sparsity,
    prune_,
    score_weights,
)


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.95, 0.98])
def test_global_magnitude_exact_sparsity_and_threshold(sparsity):
    torch.manual_seed(0)
    model = PlainCNN(channels=(4, 8))
    before = {t.fqn: t.weight.detach().abs().clone() for t in find_targets(model)}
    report = prune_(model, sparsity, "global-magnitude", floor=False)  # the plain threshold (no row floor)
    assert report.zeros == round(sparsity * report.prunable)
    assert report.achieved_sparsity == report.zeros / report.prunable
    if 0 < sparsity:
        pruned = torch.cat([before[f][~m] for f, m in report.masks.items()])
        kept = torch.cat([before[f][m] for f, m in report.masks.items()])
        assert pruned.max() <= kept.min()  # one global threshold


def test_layer_magnitude_same_sparsity_per_layer():
    torch.manual_seed(0)
    model = MLP(widths=(16, 16), in_features=20)
    report = prune_(model, 0.75, PruneMethod.LAYER_MAGNITUDE)
    for target in find_targets(model):
        assert report.per_layer[target.fqn] == round(0.75 * target.numel) / target.numel


def test_ties_broken_deterministically_and_exactly():
    scores = {"a": torch.ones(7), "b": torch.ones(5)}
    masks = masks_from_scores(scores, 0.5)
    assert masks["a"].tolist() == [False] * 6 + [True]  # earlier positions go first
    assert masks["b"].all()
    assert masks_from_scores(scores, 0.5)["a"].tolist() == masks["a"].tolist()


def test_skip_first_classifier_and_select():
    model = PlainCNN(channels=(4, 8))
    x = model.example_inputs(2)
    names = [t.fqn for t in find_targets(model, example_inputs=x)]
    assert names == ["features.conv1", "features.conv2", "classifier"]
    assert [t.fqn for t in find_targets(model, skip_first=True, skip_classifier=True)] == ["features.conv2"]
    report = prune_(model, 0.9, data=x, skip_first=True, skip_classifier=True)
    assert set(report.per_layer) == {"features.conv2"}
    assert not bool((model.classifier.weight == 0).any())
    assert [t.fqn for t in find_targets(model, select=r"re:conv\d")] == ["features.conv1", "features.conv2"]
    assert [t.fqn for t in find_targets(model, select=lambda m, fqn: isinstance(m, nn.Linear))] == ["classifier"]


def test_already_zero_weights_are_counted():
    model = nn.Sequential(nn.Linear(10, 10))
    with torch.no_grad():
        model[0].weight[:5] = 0
    assert measure_sparsity(find_targets(model)).fraction == 0.5
    assert prune_(model, 0.5).zeros == 50  # the existing zeros are the lowest scores


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, float("nan"), "half"])
def test_sparsity_outside_range(bad):
    model = nn.Sequential(nn.Linear(3, 3))
    with pytest.raises(PruneError, match=r"sparsity must be"):
        prune_(model, bad)


def test_unknown_method():
    with pytest.raises(PruneError, match=r"unknown pruning method 'snip': use one of global-magnitude, "):
        prune_(nn.Sequential(nn.Linear(3, 3)), 0.5, "snip")


def test_no_prunable_layer():
    with pytest.raises(PruneError, match="no prunable layer"):
        prune_(nn.Sequential(nn.ReLU(), nn.LayerNorm(3)), 0.5)
    with pytest.raises(PruneError, match="no prunable layer after skip"):
        prune_(nn.Sequential(nn.Linear(3, 3)), 0.5, skip_classifier=True)


def test_selection_matches_a_stable_sort_with_ties_and_small_brackets(monkeypatch):
    """The chunked selection prunes exactly the k lowest (ties by position), like a stable sort."""
    import random

    from prune_repair.prune import select

    monkeypatch.setattr(select, "CHUNK", 1000)
    monkeypatch.setattr(select, "SAMPLE", 256)
    monkeypatch.setattr(select, "MIN_CAP", 50)  # force the bracket search on small inputs
    rng = random.Random(0)
    torch.manual_seed(0)
    for trial in range(60):
        kind = trial % 4
        scores = []
        for _ in range(rng.randint(1, 3)):
            n = rng.randint(1, 4000)
            s = [torch.randn(n), torch.randint(0, 5, (n,)).float(),
                 torch.randn(n).abs() * (torch.rand(n) > 0.7), torch.randn(n, dtype=torch.float64)][kind]
            scores.append(s)
        flat = torch.cat([s.double() for s in scores])
        k = rng.randint(0, flat.numel())
        expected = torch.ones(flat.numel(), dtype=torch.bool)
        expected[torch.sort(flat, stable=True).indices[:k]] = False
        got = torch.cat(select.keep_masks(scores, k))
        assert torch.equal(got, expected), (trial, k)


def test_pruned_weights_are_plain_zeros():
    model = nn.Sequential(nn.Linear(8, 8))
    prune_(model, 0.5)
    assert int((model[0].weight == 0).sum()) == 32 and not bool(torch.signbit(model[0].weight[model[0].weight == 0]).any())


@pytest.mark.parametrize("method", ["global-magnitude", "layer-magnitude"])
def test_masks_from_the_weights_equal_masks_from_score_tensors(method):
    """prune_ takes |w| chunk by chunk from the weights; precomputed |w| scores give the same masks."""
    torch.manual_seed(0)
    model = PlainCNN()
    with torch.no_grad():
        model.features.conv2.weight[:, :2] = 0.01  # ties across a layer
    copy_ = PlainCNN()
    copy_.load_state_dict(model.state_dict())
    direct = prune_(model, 0.7, method)
    scored = prune_(copy_, 0.7, method, scores=score_weights(copy_, method))
    assert direct.masks.keys() == scored.masks.keys()
    for fqn in direct.masks:
        assert torch.equal(direct.masks[fqn], scored.masks[fqn]), fqn
