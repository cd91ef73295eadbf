"""Real effect on MNIST: two MLPs from different seeds merge well only after alignment + repair.

Two 6x128 MLPs are trained for 6 epochs on 20,000 MNIST training images (about 10 s on one
thread) and evaluated on the first 2,000 test images.
"""

from __future__ import annotations


import pytest
import torch

from prune_repair.data import calibration_batch, load_dataset
from prune_repair.evaluate import evaluate
from prune_repair.merge import prepare_merge
from prune_repair.models import MLP

from prune_repair.training import train


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops on a shared 2-core machine run faster on one thread
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(one_thread):
    x, y = load_dataset("mnist:train")
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(train(MLP(widths=(128,) * 6), x[:20000], y[:20000], epochs=6, lr=0.1, seed=seed,
                            batch_size=128))
    calib, _ = calibration_batch(x, y, 512, seed=0)
    x_test, y_test = load_dataset("mnist:test")
    return models, calib, x_test[:2000], y_test[:2000]


def test_aligned_and_repaired_midpoint_is_close_to_the_endpoints(trained):
    models, calib, x, y = trained
    ends = [evaluate(m, x, y)["acc"] for m in models]
    assert min(ends) > 0.93
    plan = prepare_merge(models, calib, align="activation")
    raw = evaluate(plan.merged([0.5, 0.5], repair="none")[0], x, y)["acc"]
    repaired = evaluate(plan.merged([0.5, 0.5], repair="repair")[0], x, y)["acc"]
    assert raw < min(ends) - 0.05, (ends, raw)  # variance collapse: clearly worse
    assert repaired > min(ends) - 0.03, (ends, raw, repaired)  # within a few points
    naive = evaluate(prepare_merge(models, calib, align="none").merged([0.5, 0.5], repair="none")[0], x, y)["acc"]
    assert naive < raw


def test_weight_matching_and_repair_also_help(trained):
    models, calib, x, y = trained
    plan = prepare_merge(models, calib, align="weight")
    raw = evaluate(plan.merged([0.5, 0.5], repair="none")[0], x, y)["acc"]
    repaired = evaluate(plan.merged([0.5, 0.5], repair="repair")[0], x, y)["acc"]
    assert repaired > raw + 0.05, (raw, repaired)
