"""Diagonal Fisher: per-sample gradients checked against a plain autograd loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune as torch_prune

from prune_repair.zoo.models import PlainCNN
from prune_repair.prune import fisher as fisher_module
from prune_repair.prune.grad_data import gradient_samples
from prune_repair.prune import PruneError, find_targets, fisher_scores, gradient_chunks, prune_


def model_and_data():
    torch.manual_seed(0)
    model = PlainCNN(channels=(3, 4), batch_norm=True).double().eval()
    x = torch.randn(10, 1, 28, 28, dtype=torch.float64)
    y = torch.randint(0, 10, (10,))
    return model, x, y


def loop_fisher(model, x, y):
    targets = find_targets(model)
    weights = [t.stored for t in targets]
    sq = [torch.zeros_like(w) for w in weights]
    for i in range(len(x)):
        grads = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), weights)
        for s, g in zip(sq, grads):
            s += g.square()
    return {t.fqn: t.weight.detach() ** 2 * s / len(x) / 2 for t, s in zip(targets, sq)}


def test_fisher_scores_match_loop():
    model, x, y = model_and_data()
    scores = fisher_scores(model, find_targets(model), (x, y), chunk=4)
    expected = loop_fisher(model, x, y)
    for fqn, want in expected.items():
        torch.testing.assert_close(scores[fqn], want, rtol=1e-9, atol=1e-14)
    assert not model.training  # mode restored


def test_fisher_under_torch_prune_reparametrization():
    model, x, y = model_and_data()
    torch_prune.l1_unstructured(model.features.conv2, "weight", amount=0.5)
    scores = fisher_scores(model, find_targets(model), (x, y))
    mask = model.features.conv2.weight_mask.bool()
    assert bool((scores["features.conv2"][~mask] == 0).all())
    torch.testing.assert_close(scores["features.conv2"], loop_fisher(model, x, y)["features.conv2"])


def test_loop_fallback_equals_vmap():
    model, x, y = model_and_data()
    targets = find_targets(model)
    via_vmap = next(gradient_chunks(model, targets, (x, y), chunk=10, seed=5))
    order = fisher_module._sample_order(len(x), len(x), seed=5)
    groups = list(zip(x[order].unsqueeze(1), y[order].unsqueeze(1)))
    via_loop = fisher_module._loop_grads(model, targets, groups, gradient_samples((x, y)), F.cross_entropy)
    for fqn in via_vmap:
        torch.testing.assert_close(via_vmap[fqn], via_loop[fqn], rtol=1e-9, atol=1e-12)


def test_fisher_prune_exact_sparsity_and_progress():
    model, x, y = model_and_data()
    seen = []
    report = prune_(model, 0.8, "fisher", (x, y), progress=lambda done, total: seen.append((done, total)))
    assert report.zeros == round(0.8 * report.prunable)
    assert seen[-1] == (10, 10)


@pytest.mark.parametrize("data", [None, "x-only", "float-labels"])
def test_fisher_needs_labels(data):
    model, x, y = model_and_data()
    value = {None: None, "x-only": x, "float-labels": (x, y.double())}[data]
    with pytest.raises(PruneError, match="fisher pruning needs"):
        prune_(model, 0.5, "fisher", value)
    assert not any(bool((t.weight == 0).any()) for t in find_targets(model))
