"""Alignment: weight and activation matching recover a known permutation exactly."""

from __future__ import annotations

import hashlib
import importlib

import pytest
import torch
from torch import nn

from prune_repair.merge import activation_matching, invert, permute, random_perms, weight_matching
from prune_repair.merge.cross_moments import CrossMoments
from prune_repair.merge.find_groups import find_groups
from prune_repair.zoo.models import MLP, PlainCNN, ResNetMini


def state_hash(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode() + v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = {"mlp": lambda: MLP(widths=(24, 24, 24)),
             "vgg-bn": lambda: PlainCNN(channels=(8, 16), batch_norm=True),
             "resnet-bn": lambda: ResNetMini(width=4, blocks_per_stage=(2, 2), norm="bn")}[name]()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    return model.double().eval()


def match(method: str, a: nn.Module, b: nn.Module, groups, x):
    if method == "weight":
        return weight_matching(a, b, groups, seed=1)
    return activation_matching(a, b, x, groups)


@pytest.mark.parametrize("method", ["weight", "activation"])
@pytest.mark.parametrize("name", ["mlp", "vgg-bn", "resnet-bn"])
def test_aligning_a_permuted_copy_recovers_the_permutation(name, method):
    a = build(name)
    x = a.example_inputs(128)
    groups = find_groups(a, x)
    perms = random_perms(groups, torch.Generator().manual_seed(7))
    b = permute(a, groups, perms)
    hashes = state_hash(a), state_hash(b)
    alignment = match(method, a, b, groups, x)
    assert (state_hash(a), state_hash(b)) == hashes  # inputs untouched
    for g in groups:
        assert torch.equal(alignment.perms[g.name], invert(perms[g.name])), g.name
    realigned = permute(b, groups, alignment.perms)
    for key, value in a.state_dict().items():
        assert torch.equal(realigned.state_dict()[key], value), key


@pytest.mark.parametrize("method", ["weight", "activation"])
def test_aligning_a_model_with_itself_is_the_identity(method):
    a = build("vgg-bn")
    x = a.example_inputs(64)
    groups = find_groups(a, x)
    alignment = match(method, a, a, groups, x)
    assert all(torch.equal(p, torch.arange(p.numel())) for p in alignment.perms.values())


def test_weight_matching_stops_and_improves_the_objective():
    torch.manual_seed(0)
    a, b = MLP(widths=(32, 32)), MLP(widths=(32, 32))
    groups = find_groups(a, a.example_inputs(2))
    start = weight_matching(a, b, groups, max_sweeps=1, seed=0)
    full = weight_matching(a, b, groups, max_sweeps=50, seed=0)
    identity = float(sum((a.state_dict()[k] * b.state_dict()[k]).sum() for k in {x.key for g in groups
                                                                              for x in g.axes}))
    assert full.objective >= start.objective > identity
    assert 1 <= full.sweeps < 50
    again = weight_matching(a, b, groups, max_sweeps=50, seed=0)
    assert all(torch.equal(again.perms[k], v) for k, v in full.perms.items())
    with pytest.raises(ValueError, match="max_sweeps"):
        weight_matching(a, b, groups, max_sweeps=0)


class Counting(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


def test_activation_matching_makes_one_pass_for_all_groups():
    torch.manual_seed(0)
    a, b = Counting(MLP(widths=(16, 16, 16))), Counting(MLP(widths=(16, 16, 16)))
    batches = [torch.randn(32, 1, 28, 28) for _ in range(3)]
    groups = find_groups(a, batches[0])
    a.calls = b.calls = 0
    alignment = activation_matching(a, b, batches, groups)
    assert (a.calls, b.calls) == (3, 3) and len(alignment.perms) == 3


def test_tie_breakers_are_measured_only_where_a_unit_can_be_dead(monkeypatch):
    """fc1 has a unit that never fires, fc2 none: only fc1's group measures its producers' tie-breaking
    correlations, and the permutations are those found with every tie-breaker measured."""
    module = importlib.import_module("prune_repair.merge.activation_matching")
    torch.manual_seed(0)
    a = MLP(widths=(8, 8)).double()
    with torch.no_grad():
        a.features.fc1.weight[2].zero_()
        a.features.fc1.bias[2] = -1.0  # unit 2 never fires
    groups = find_groups(a, torch.randn(2, 1, 28, 28, dtype=torch.float64))
    perms = random_perms(groups, torch.Generator().manual_seed(1))
    b = permute(a, groups, perms)
    xs = [torch.randn(32, 1, 28, 28, dtype=torch.float64) for _ in range(2)]
    measured = []
    monkeypatch.setattr(module, "CrossMoments", lambda *args: measured.append(1) or CrossMoments(*args))
    gated = activation_matching(a, b, xs, groups)
    ties = {g.name: sum(p.weight != 1.0 for p in module.probes_of(a, g)) for g in groups}
    mains = sum(len(module.probes_of(a, g)) - ties[g.name] for g in groups)
    assert ties["features.fc1"] > 0 and ties["features.fc2"] > 0
    assert len(measured) == mains + ties["features.fc1"]  # fc2's tie-breakers were skipped
    monkeypatch.setattr(module, "FLAT", float("inf"))  # every group keeps its tie-breakers
    measured.clear()
    every = activation_matching(a, b, xs, groups)
    assert len(measured) == mains + sum(ties.values())
    assert all(torch.equal(gated.perms[g], every.perms[g]) for g in gated.perms)
    assert all(torch.equal(gated.perms[g.name][perms[g.name]], torch.arange(g.size)) for g in groups)


def test_activation_matching_handles_dead_units():
    torch.manual_seed(0)
    a, b = MLP(widths=(8, 8)).double(), MLP(widths=(8, 8)).double()
    with torch.no_grad():
        for m in (a, b):
            m.features.fc1.weight[2].zero_()
            m.features.fc1.bias[2] = -1.0  # unit 2 never fires
    x = torch.randn(64, 1, 28, 28, dtype=torch.float64)
    groups = find_groups(a, x)
    alignment = activation_matching(a, b, x, groups)
    assert alignment.dead_units["features.fc1"] >= 1
    for p in alignment.perms.values():
        assert torch.equal(p.sort().values, torch.arange(8))
