"""Structured channel pruning of CNNs (torch-pruning groups, energy importance)."""

from __future__ import annotations

import pytest
import torch

from prune_repair.prune import load_structured_, save_structured, structured_prune
from prune_repair.prune.structured_channels import input_energy, prune_channels_
from prune_repair.zoo.models import PlainCNN, ResNetMini


@pytest.mark.parametrize("repair", ["reconstruct", "auto", "none"])
def test_residual_cnn_shrinks_and_reloads(repair, tmp_path):
    torch.manual_seed(0)
    dense, x = ResNetMini(width=8).eval(), torch.randn(32, 1, 28, 28)
    result = structured_prune(dense, x, 0.5, repair=repair)
    model = result.model
    assert model.conv1.out_channels == 4 and model.layer2[0].conv2.out_channels == 8
    assert model.layer2[0].shortcut.conv.out_channels == model.layer2[0].conv2.out_channels  # the residual group
    assert result.params_after < result.params_before and result.kind == "channels"
    save_structured(model, tmp_path / "s.pt", result.history, x[:1])
    loaded = load_structured_(tmp_path / "s.pt", ResNetMini(width=8))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_ratio_zero_leaves_the_cnn_as_it_is():
    torch.manual_seed(0)
    dense, x = PlainCNN(channels=(8, 16)).eval(), torch.randn(16, 1, 28, 28)
    result = structured_prune(dense, x, 0.0)
    assert result.history == []
    for a, b in zip(dense.state_dict().values(), result.model.state_dict().values()):
        assert torch.equal(a, b)


def test_channels_with_no_energy_go_first():
    """A channel that no consumer ever sees (all its inputs zero) scores zero and is removed."""
    torch.manual_seed(0)
    model, x = PlainCNN(channels=(8, 16)).eval(), torch.randn(16, 1, 28, 28)
    with torch.no_grad():
        model.features.conv1.weight[3] = 0
        model.features.conv1.bias[3] = -1.0  # ReLU(-1) = 0: channel 3 is dead downstream
    energy = input_energy(model, x)
    assert float(energy[model.features.conv2][3]) == 0.0
    history = prune_channels_(model, x, 0.125)
    removed = {tuple(idx) for name, out, idx in history if name == "features.conv1" and out}
    assert removed == {(3,)}
