"""Real effect on MNIST: the zoo's two ViTs (``mnist-vit`` / ``mnist-vit-b``, seeds 0 and 1,
trained once by ``benchmarks/train_transformers.py`` and committed) merge far better after
head-aware activation matching + REPAIR than averaged as they are. First 2,000 test images.

Margins measured with 1 thread and calibration seeds 0 and 1 (512 images): endpoints
0.9735 / 0.9695; unaligned midpoint 0.2565; activation-aligned midpoint raw 0.4505-0.4555,
repaired 0.666-0.6755, i.e. a barrier at alpha 0.5 of 0.296-0.306 against naive 0.715 (0.42x).
Each bound below keeps at least half the measured gap as slack.
"""

from __future__ import annotations

import pytest

from prune_repair import zoo
from prune_repair.io.data import calibration_batch, load_dataset
from prune_repair.merge import prepare_merge
from prune_repair.metrics.classify import evaluate

pytestmark = pytest.mark.slow  # real MNIST merges of the zoo's ViT pair (about 10 s each)


@pytest.mark.parametrize("seed", [0, 1], ids=lambda seed: f"calib-seed{seed}")
def test_aligned_and_repaired_vits_beat_plain_averaging(seed):
    x, y = load_dataset("mnist:train")
    calib, _ = calibration_batch(x, y, 512, seed=seed)
    x_test, y_test = load_dataset("mnist:test")
    x_test, y_test = x_test[:2000], y_test[:2000]
    models = [zoo.load("mnist-vit"), zoo.load("mnist-vit-b")]
    line = sum(evaluate(m, x_test, y_test)["acc"] for m in models) / 2
    naive = evaluate(prepare_merge(models, calib, align="none").merged([0.5, 0.5], repair="none")[0],
                     x_test, y_test)["acc"]
    plan = prepare_merge(models, calib, align="activation")
    raw, repaired = (evaluate(plan.merged([0.5, 0.5], repair=r)[0], x_test, y_test)["acc"] for r in ("none", "repair"))
    assert raw > naive + 0.10  # alignment alone (measured +0.19)
    assert repaired > raw + 0.10  # repair on top (measured +0.21)
    assert line - repaired < 0.7 * (line - naive)  # barrier at alpha 0.5 (measured 0.42x)
