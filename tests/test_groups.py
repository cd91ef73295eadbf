"""Permutation groups found from the graph: permuting leaves the function unchanged."""

from __future__ import annotations

import hashlib

import pytest
import torch
import torchvision
from torch import nn

from prune_repair.merge.find_groups import find_groups
from prune_repair.merge.groups import GroupError, groups_from_spec
from prune_repair.merge.permute import permute, permute_state_dict, random_perms
from prune_repair.zoo.models import MLP, PlainCNN, ResNetMini, TokenMLP


def state_hash(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def gn_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(),
                         nn.Conv2d(8, 6, 3, padding=1), nn.GroupNorm(6, 6), nn.ReLU(),
                         nn.Flatten(), nn.Linear(6 * 6 * 6, 3))


def build(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model, x = {
        "mlp": lambda: (MLP(widths=(16, 16)), None),
        "vgg": lambda: (PlainCNN(channels=(8, 16)), None),
        "vgg-bn": lambda: (PlainCNN(channels=(8, 16), batch_norm=True), None),
        "resnet20-bn": lambda: (ResNetMini(width=4, blocks_per_stage=(3, 3, 3), norm="bn"), None),
        "resnet-ln": lambda: (ResNetMini(width=4, blocks_per_stage=(1, 1), norm="ln"), None),
        "groupnorm": lambda: (gn_cnn(), torch.randn(4, 1, 6, 6)),
        "tokens-ln": lambda: (TokenMLP(dim=8, depth=2), None),
        "resnet18": lambda: (torchvision.models.resnet18(num_classes=10), torch.randn(2, 3, 32, 32)),
    }[name]()
    model.double()
    for m in model.modules():  # non-trivial norm parameters and running statistics
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = model.example_inputs(4) if x is None else x
    return model.eval(), x.double()


ALL = ["mlp", "vgg", "vgg-bn", "resnet20-bn", "resnet-ln", "groupnorm", "tokens-ln", "resnet18"]


@pytest.mark.parametrize("name", ALL)
def test_random_permutations_leave_the_function_unchanged(name):
    model, x = build(name)
    groups = find_groups(model, x)
    assert groups
    with torch.no_grad():
        ref = model(x)
        for seed in range(2):
            perms = random_perms(groups, torch.Generator().manual_seed(seed))
            before = state_hash(model)
            permuted = permute(model, groups, perms)
            assert state_hash(model) == before != state_hash(permuted)
            torch.testing.assert_close(permuted(x), ref, rtol=1e-10, atol=1e-10)


def test_batchnorm_buffers_and_flatten_blocks_are_in_the_groups():
    model, x = build("vgg-bn")
    groups = find_groups(model, x)
    last = next(g for g in groups if any(a.key == "classifier.weight" for a in g.axes))
    keys = {a.key for a in last.axes}
    assert {"features.bn2.running_mean", "features.bn2.running_var", "features.bn2.weight"} <= keys
    flat = next(a for a in last.axes if a.key == "classifier.weight")
    assert flat.dim == 1 and flat.index.shape == (16, 7 * 7)
    assert flat.index[1].tolist() == list(range(49, 98))  # channel 1 owns the second block of H*W columns


def test_residual_stream_is_one_group():
    model, x = build("resnet20-bn")
    groups = find_groups(model, x)
    stem = next(g for g in groups if any(a.key == "conv1.weight" and a.dim == 0 for a in g.axes))
    writers = {a.key for a in stem.axes if a.dim == 0 and a.key.endswith("conv2.weight")}
    assert writers == {f"layer1.{i}.conv2.weight" for i in range(3)}
    assert all(not any(a.key.startswith("fc.") and a.dim == 0 for a in g.axes) for g in groups)  # logits stay


def test_groupnorm_groups_restrict_permutations_to_their_groups():
    model, x = build("groupnorm")
    group = find_groups(model, x)[0]
    assert group.labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    perm = random_perms([group], torch.Generator().manual_seed(3))[group.name]
    assert torch.equal(group.labels[perm], group.labels)


def test_find_groups_leaves_the_model_unchanged():
    model, x = build("resnet-ln")
    model.train()
    model.conv1.weight.requires_grad_(False)
    before = state_hash(model)
    find_groups(model, x)
    assert state_hash(model) == before and model.training and not model.conv1.weight.requires_grad


def test_hand_written_groups_override_the_traced_ones():
    model, x = build("mlp")
    spec = {"hidden1": ["features.fc1.weight:0", "features.fc1.bias:0", "features.fc2.weight:1"]}
    groups = find_groups(model, x, groups=spec)
    assert [g.name for g in groups] == ["hidden1"]
    perms = random_perms(groups, torch.Generator().manual_seed(0))
    torch.testing.assert_close(permute(model, groups, perms)(x), model(x))


def test_hand_written_flatten_block():
    model, x = build("vgg")
    spec = {"c2": ["features.conv2.weight:0", "features.conv2.bias:0", "classifier.weight:1:49"]}
    groups = groups_from_spec(spec, model.state_dict())
    state = permute_state_dict(model.state_dict(), groups, random_perms(groups, torch.Generator().manual_seed(0)))
    permuted = PlainCNN(channels=(8, 16)).double().eval()
    permuted.load_state_dict(state)
    torch.testing.assert_close(permuted(x), model(x))


def test_a_wrong_hand_written_group_is_caught():
    model, x = build("mlp")
    with pytest.raises(GroupError, match=r"changes the output of layer 'features.fc2' \(Linear\).*by hand"):
        find_groups(model, x, groups={"bad": ["features.fc1.weight:0", "features.fc1.bias:0"]})


@pytest.mark.parametrize("spec, message", [
    ({"g": ["nope.weight:0"]}, "lacks"),
    ({"g": ["features.fc1.weight"]}, "key:dim"),
    ({"g": ["features.fc1.weight:0", "features.fc2.weight:0"]}, "positions"),
    ({"a": ["features.fc1.weight:0"], "b": ["features.fc1.weight:0"]}, "claimed twice"),
])
def test_bad_hand_written_groups(spec, message):
    model, x = build("mlp")
    model.features.fc2 = nn.Linear(16, 8).double()
    with pytest.raises(GroupError, match=message):
        groups_from_spec(spec, model.state_dict())


class Roll(nn.Module):
    def forward(self, x):
        return torch.roll(x, 1, dims=-1)


def test_an_op_the_tracer_misreads_is_named():
    model = nn.Sequential(nn.Linear(4, 8), Roll(), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(GroupError, match=r"layer '1' \(Roll\).*pass groups by hand: groups=groups_from_spec"):
        find_groups(model, torch.randn(5, 4))


def test_a_model_that_stops_tracing_is_named():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(6, 3))
    with pytest.raises(GroupError, match=r"stopped at layer '2' \(Linear\).*by hand"):
        find_groups(model, torch.randn(5, 4))
