"""repair_ refuses weights with NaN/Inf wherever they are: the site producers' through the statistics
of the pass (engine/correct/finite_sites.py), every other tensor before the pass."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from prune_repair import collect_stats, repair_
from engine_helpers import damage_, inputs_for, tiny_models

MODELS = tiny_models()


def broken(name: str, tensor: str, value: float):
    model = copy.deepcopy(MODELS[name])
    damage_(model)
    with torch.no_grad():
        model.get_parameter(tensor).view(-1)[3] = value
    return model


@pytest.mark.parametrize("name, tensor, mode", [
    ("cnn-bn", "features.conv1.weight", "auto"),      # a producer whose BatchNorm is reset: its input says
    ("cnn-bn", "features.conv2.weight", "repair"),    # a producer under its BatchNorm's site
    ("cnn-bn", "features.bn1.weight", "auto"),        # a BatchNorm being reset: checked before the pass
    ("cnn-bn", "classifier.bias", "auto"),            # after the last site: checked before the pass
    ("resnet-ln", "layer1.0.norm1.weight", "repair"),
    ("mlp", "features.fc1.bias", "repair"),
])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_weight_is_named_and_the_model_left_as_it_was(name, tensor, mode, value):
    x = inputs_for(name)
    goal = collect_stats(MODELS[name], x)
    model = broken(name, tensor, value)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=f"NaN/Inf in {tensor} \\(1 values\\): repair needs finite weights"):
        repair_(model, goal, x, repair=mode)
    after = model.state_dict()
    for k in before:
        assert_close(after[k], before[k], rtol=0, atol=0, equal_nan=True)


class CallsWeights(nn.Module):
    """A parent that calls its child's weight through F.linear (as swin_t does), then self-attention."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(4, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(F.linear(x, self.inner.weight, self.inner.bias))
        return self.out(self.attn(h, h, h, need_weights=False)[0])


@pytest.mark.parametrize("tensor", ["inner.weight", "inner.bias", "attn.in_proj_weight", "attn.in_proj_bias",
                                    "attn.out_proj.weight"])
def test_a_non_finite_weight_of_a_call_caught_by_its_weight_is_named(tensor):
    torch.manual_seed(0)
    model, x = CallsWeights().double().eval(), torch.randn(6, 5, 4, dtype=torch.float64)
    goal = collect_stats(model, x)
    assert {s.call for s in goal.sites} == {"function", "attention"}
    with torch.no_grad():
        model.get_parameter(tensor).view(-1)[3] = float("nan")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=f"NaN/Inf in {tensor} \\(1 values\\): repair needs finite weights"):
        repair_(model, goal, x)
    for k, v in model.state_dict().items():
        assert_close(v, before[k], rtol=0, atol=0, equal_nan=True)


def test_finite_weights_with_overflowing_statistics_still_repair():
    name = "mlp"
    x = inputs_for(name)
    goal = collect_stats(MODELS[name], x)
    model = copy.deepcopy(MODELS[name])
    with torch.no_grad():
        model.features.fc1.weight[0].fill_(1e300)  # float64: finite weights, an infinite spread at one site
    report = repair_(model, goal, x, repair="repair")
    assert report.sites and all(torch.isfinite(p).all() for p in model.parameters())


def test_huge_finite_tensors_whose_sums_overflow_pass_the_check_before_the_pass():
    from torch import nn

    from prune_repair.engine.correct.finite_sites import check_unvouched

    model = nn.Sequential(nn.Linear(2, 4), nn.LayerNorm(4)).half()
    with torch.no_grad():
        model[1].weight.fill_(6e4)  # finite in float16; their float16 sum is not
    check_unvouched(model, set())
    with torch.no_grad():
        model[1].bias[1] = float("inf")
    with pytest.raises(ValueError, match=r"NaN/Inf in 1\.bias \(1 values\)"):
        check_unvouched(model, set())


def test_reset_reports_channels_with_no_spread_and_keeps_the_running_statistics_of_none():
    name = "cnn-bn"
    x = inputs_for(name)
    goal = collect_stats(MODELS[name], x)
    model = copy.deepcopy(MODELS[name])
    with torch.no_grad():
        model.features.conv1.weight[[1, 4]] = 0.0  # those channels' BatchNorm input is 0: no spread
    report = repair_(model, goal, x, repair="reset")
    assert report.dead_channels == {"features.bn1": [1, 4]}
    assert torch.equal(model.features.bn1.running_var[[1, 4]], torch.zeros(2, dtype=torch.float64))
