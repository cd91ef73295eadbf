"""OBS pruning (prune/obs.py): exact sparsity, exact single-removal update, refit, real effect."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.utils.prune as torch_prune
from torch import nn

from prune_repair.prune.obs import obs_prune_, obs_rows
from prune_repair.prune.targets import PruneError
from prune_repair.zoo.models import MLP, PlainCNN


pytestmark = pytest.mark.usefixtures("float64_default")  # exact checks in float64


def _spd(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * n, n, generator=g)
    return x.T @ x + 0.1 * torch.eye(n)


def test_one_removal_is_the_exact_constrained_optimum():
    H = _spd(6)[None]
    W = torch.randn(1, 3, 6)
    forced = torch.zeros(1, 3, 6, dtype=torch.bool)
    forced[:, :, 0] = True  # remove column 0 from every row: all later columns compensate
    new, keep = obs_rows(W, H, 3, 6, block_size=4, forced=forced)
    Hinv = torch.linalg.inv(H[0])
    expected = W[0] - (W[0][:, :1] / Hinv[0, 0]) * Hinv[0][None, :]
    torch.testing.assert_close(new[0], expected)
    assert bool((new[..., 0] == 0).all()) and int((~keep).sum()) == 3


def test_no_pruning_leaves_the_weights():
    W = torch.randn(2, 4, 5)
    new, keep = obs_rows(W, torch.stack([_spd(5, 1), _spd(5, 2)]), 0, 5, block_size=2)
    torch.testing.assert_close(new, W)
    assert bool(keep.all())


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_sparsity_is_exact_and_zeros_and_keys_hold(allocation):
    torch.manual_seed(0)
    model = PlainCNN(channels=(4, 8)).eval()
    keys = {k: (v.shape, v.dtype) for k, v in model.state_dict().items()}
    report = obs_prune_(model, torch.randn(96, 1, 28, 28), 0.8, allocation=allocation, block_size=16)
    assert {k: (v.shape, v.dtype) for k, v in model.state_dict().items()} == keys
    total = sum(layer.weights for layer in report.layers)
    zeros = sum(int((m.weight == 0).sum()) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert report.achieved_sparsity == zeros / total == round(0.8 * total) / total
    if allocation == "uniform":
        assert all(abs(layer.sparsity - 0.8) < 1 / layer.weights + 1e-12 for layer in report.layers)
    assert set(report.to_dict()) == {"sparsity", "achieved_sparsity", "allocation", "layers", "seconds", "steps",
                                     "candidates"}


def test_global_allocation_follows_the_global_magnitude_profile():
    from prune_repair.prune import prune_

    torch.manual_seed(1)
    model = MLP(widths=(32, 16), in_features=20)
    by_magnitude = prune_(copy.deepcopy(model), 0.7, method="global-magnitude").per_layer
    report = obs_prune_(model, torch.randn(200, 20), 0.7, allocation="global")
    assert {layer.fqn: layer.sparsity for layer in report.layers} == pytest.approx(by_magnitude, abs=1e-12)


def test_refit_never_raises_the_error_and_skip_options_work():
    torch.manual_seed(2)
    base = MLP(widths=(32, 16), in_features=20)
    x = torch.randn(400, 20)
    with_refit = obs_prune_(copy.deepcopy(base), x, 0.8, target="layer", damping=1e-8)
    without = obs_prune_(copy.deepcopy(base), x, 0.8, target="layer", damping=1e-8, refit=False)
    assert with_refit.layers[0].error_after <= without.layers[0].error_after + 1e-9
    skipped = obs_prune_(copy.deepcopy(base), x, 0.5, skip_first=True, skip_classifier=True)
    assert [layer.fqn for layer in skipped.layers] == ["features.fc2"]
    with pytest.raises(PruneError, match="no layer to prune"):
        obs_prune_(copy.deepcopy(base), x, 0.5, select="nothing")


def test_torch_prune_reparametrization_gets_the_new_mask():
    torch.manual_seed(3)
    model = MLP(widths=(16,), in_features=10)
    torch_prune.identity(model.features.fc1, "weight")
    obs_prune_(model, torch.randn(100, 10), 0.5, select=["features.fc1"])
    mask = model.features.fc1.weight_mask
    assert int((mask == 0).sum()) == 80
    assert bool((model.features.fc1.weight[mask == 0] == 0).all())


def test_real_effect_on_the_zoo_mlp_at_95_percent():
    """mnist-mlp, 95%, 1024 calibration samples, first 2000 test images.

    Measured (torch threads 1 and 2, calibration seeds 0 and 1; identical across threads):
    global magnitude pruning alone 0.7975; obs_prune_(allocation="global") 0.9240 / 0.9270
    (seed 0 / 1): a gap of at least 0.126. Asserted: half of that gap.
    """
    from prune_repair import zoo
    from prune_repair.metrics.classify import evaluate
    from prune_repair.io.data import calibration_batch, load_dataset
    from prune_repair.prune import prune_

    torch.set_default_dtype(torch.float32)
    xtr, ytr = load_dataset("mnist:train")
    xte, yte = load_dataset("mnist:test")
    xte, yte = xte[:2000], yte[:2000]
    magnitude = zoo.load("mnist-mlp")
    prune_(magnitude, 0.95, method="global-magnitude")
    model = zoo.load("mnist-mlp")
    obs_prune_(model, calibration_batch(xtr, ytr, 1024, seed=0)[0], 0.95, allocation="global")
    assert evaluate(model, xte, yte)["acc"] - evaluate(magnitude, xte, yte)["acc"] > 0.063
