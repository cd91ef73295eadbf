"""The engine's exact properties, in float64."""

import copy

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from prune_repair import RepairMode, collect_stats, repair_
from engine_helpers import damage_, inputs_for, run_with_corrections, tiny_models

MODELS = tiny_models()
AFFINE_NAMES = ["mlp", "cnn", "cnn-bn", "resnet-bn", "resnet-ln", "tokens", "resnet18"]


def operated(name):
    model = copy.deepcopy(MODELS[name])
    damage_(model)
    return model


@pytest.mark.parametrize("name", AFFINE_NAMES)
def test_after_exact_repair_every_site_matches_its_goal(name):
    x = inputs_for(name)
    goal = collect_stats(MODELS[name], x)
    model = operated(name)
    report = repair_(model, goal, x, repair="repair")
    after = collect_stats(model, x, sites=goal.sites)
    for site in report.sites:
        if not site.shift_dropped:  # convs without bias before a GroupNorm cannot hold a shift
            assert_close(after[site.fqn].mean, goal[site.fqn].mean, rtol=1e-9, atol=1e-9)
        assert_close(after[site.fqn].std, goal[site.fqn].std, rtol=1e-9, atol=1e-9)
    assert len(report.sites) == len(goal.sites)


@pytest.mark.parametrize("name", AFFINE_NAMES)
def test_fused_model_equals_unfused_corrections(name):
    x = inputs_for(name)
    goal = collect_stats(MODELS[name], x)
    model = operated(name)
    unfused = copy.deepcopy(model)
    report = repair_(model, goal, x, repair="repair", variant="all-at-once")
    assert_close(model(x), run_with_corrections(unfused, goal.sites, report.corrections, x))


@pytest.mark.parametrize("name", AFFINE_NAMES)
@pytest.mark.parametrize("mode", ["repair", "rescale", "auto"])
def test_repairing_toward_own_statistics_is_a_no_op(name, mode):
    x = inputs_for(name)
    model = copy.deepcopy(MODELS[name])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    repair_(model, collect_stats(model, x), x, repair=mode)
    for key, value in model.state_dict().items():
        if mode == "auto" and "running_" in key:
            continue  # reset replaces running stats with the calibration batch's
        assert_close(value, before[key], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mode", ["repair", "rescale", "rescale-layer", "reshift", "reset", "auto"])
def test_sparsity_is_identical_before_and_after(mode):
    x = inputs_for("resnet-bn")
    goal = collect_stats(MODELS["resnet-bn"], x)
    model = operated("resnet-bn")
    zeros = {k: (v == 0) for k, v in model.state_dict().items() if k.endswith("weight") and v.dim() > 1}
    repair_(model, goal, x, repair=mode)
    for key, mask in zeros.items():
        assert torch.equal(model.state_dict()[key] == 0, mask), key


def test_rescale_matches_std_and_reshift_matches_mean():
    x = inputs_for("mlp")
    goal = collect_stats(MODELS["mlp"], x)
    rescaled, reshifted = operated("mlp"), operated("mlp")
    repair_(rescaled, goal, x, repair="rescale")
    repair_(reshifted, goal, x, repair="reshift")
    first = goal.sites[0].fqn
    assert_close(collect_stats(rescaled, x, sites=goal.sites)[first].std, goal[first].std)
    assert_close(collect_stats(reshifted, x, sites=goal.sites)[first].mean, goal[first].mean)


def test_rescale_layer_gives_every_channel_the_layer_average_goal_std():
    x = inputs_for("mlp")
    goal = collect_stats(MODELS["mlp"], x)
    model = operated("mlp")
    repair_(model, goal, x, repair="rescale-layer")
    first = goal.sites[0].fqn
    std = collect_stats(model, x, sites=goal.sites)[first].std
    assert_close(std, torch.full_like(std, float(goal[first].std.mean())))


def test_reset_sets_batchnorm_running_stats_to_the_batch_statistics():
    x = inputs_for("cnn-bn")
    model = operated("cnn-bn")
    report = repair_(model, collect_stats(MODELS["cnn-bn"], x), x, repair="reset")
    assert {s.mode for s in report.sites} == {"reset"} and not report.corrections
    conv_out = {}
    model.features.conv1.register_forward_hook(lambda m, i, o: conv_out.setdefault("y", o))
    model(x)
    y = conv_out["y"]
    assert_close(model.features.bn1.running_mean, y.mean(dim=(0, 2, 3)))
    assert_close(model.features.bn1.running_var, y.var(dim=(0, 2, 3), unbiased=False))


def test_auto_resets_batchnorm_sites_and_repairs_the_rest():
    x = inputs_for("cnn-bn")
    report = repair_(operated("cnn-bn"), collect_stats(MODELS["cnn-bn"], x), x, repair="auto")
    assert {s.mode for s in report.sites} == {"reset"}
    report = repair_(operated("mlp"), collect_stats(MODELS["mlp"], inputs_for("mlp")), inputs_for("mlp"))
    assert {s.mode for s in report.sites} == {"repair"}


def test_exact_over_several_batches_equals_exact_over_their_union():
    x = inputs_for("resnet-bn", 48)
    goal = collect_stats(MODELS["resnet-bn"], x)
    one, many = operated("resnet-bn"), operated("resnet-bn")
    repair_(one, goal, x, repair="repair")
    report = repair_(many, goal, [x[:20], x[20:]], repair="repair")
    assert report.passes == 1  # one forward per batch, the batches in lockstep (tests/test_lockstep.py)
    assert_close(many(x), one(x))


def test_all_at_once_differs_from_exact_but_matches_the_first_site():
    x = inputs_for("mlp")
    goal = collect_stats(MODELS["mlp"], x)
    model = operated("mlp")
    repair_(model, goal, x, repair="repair", variant="all-at-once")
    after = collect_stats(model, x, sites=goal.sites)
    first, last = goal.sites[0].fqn, goal.sites[-1].fqn
    assert_close(after[first].std, goal[first].std)
    assert not torch.allclose(after[last].std, goal[last].std)


def test_dead_channels_are_left_alone_and_reported():
    x = inputs_for("mlp")
    goal = collect_stats(MODELS["mlp"], x)
    model = operated("mlp")
    with torch.no_grad():
        model.features.fc1.weight[[2, 5]] = 0
        model.features.fc1.bias[[2, 5]] = 0
    report = repair_(model, goal, x, repair="repair")
    assert report.dead_channels["features.fc1"] == [2, 5]
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    assert torch.equal(model.features.fc1.weight[[2, 5]], torch.zeros(2, 784, dtype=torch.float64))


def test_layer_without_bias_gets_the_scale_only_unless_asked_to_add_one():
    model = nn.Sequential(nn.Linear(6, 8, bias=False), nn.ReLU(), nn.Linear(8, 2)).double()
    x = torch.randn(40, 6, dtype=torch.float64)
    goal = collect_stats(model, x)
    damaged = copy.deepcopy(model)
    damage_(damaged)
    plain = copy.deepcopy(damaged)
    report = repair_(plain, goal, x, repair="repair")
    assert report.sites[0].shift_dropped and "0.bias" not in plain.state_dict()
    assert_close(collect_stats(plain, x)["0"].std, goal["0"].std)
    with_bias = copy.deepcopy(damaged)
    repair_(with_bias, goal, x, repair="repair", add_bias=True)
    assert_close(collect_stats(with_bias, x)["0"].mean, goal["0"].mean)


def test_float16_model_keeps_its_dtype():
    model = copy.deepcopy(MODELS["mlp"]).float()
    x = inputs_for("mlp").float()
    goal = collect_stats(model, x)
    half = copy.deepcopy(model).to(torch.bfloat16)
    repair_(half, goal, x.to(torch.bfloat16), repair="repair")
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    assert all(torch.isfinite(p).all() for p in half.parameters())


def test_hooks_removed_and_modes_restored_when_forward_raises():
    model = operated("cnn-bn").train()
    goal = collect_stats(MODELS["cnn-bn"], inputs_for("cnn-bn"))

    def broken_forward(m, batch):
        m(batch)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        repair_(model, goal, inputs_for("cnn-bn"), forward_fn=broken_forward)
    assert all(m.training for m in model.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_mode_none_changes_nothing():
    x = inputs_for("mlp")
    model = operated("mlp")
    before = copy.deepcopy(model.state_dict())
    report = repair_(model, collect_stats(MODELS["mlp"], x), x, repair=RepairMode.NONE)
    assert report.passes == 0 and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bad_inputs_get_clear_errors():
    x = inputs_for("mlp")
    goal = collect_stats(MODELS["mlp"], x)
    with pytest.raises(ValueError, match="at least 2 samples"):
        repair_(operated("mlp"), goal, x[:1])
    broken = operated("mlp")
    with torch.no_grad():
        broken.features.fc2.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf in features.fc2.weight"):
        repair_(broken, goal, x)
    with pytest.raises(ValueError, match="does not have"):
        repair_(operated("cnn"), goal, inputs_for("cnn"))
    with pytest.raises(ValueError, match="unknown correction 'rescue': use one of auto, repair"):
        repair_(operated("mlp"), goal, x, repair="rescue")


def test_float32_data_repairs_a_float16_model():
    model = copy.deepcopy(MODELS["cnn-bn"]).float()
    x = inputs_for("cnn-bn").float()
    goal = collect_stats(model, x)
    half = copy.deepcopy(model).half()
    damage_(half)
    report = repair_(half, goal, x, repair="repair")
    assert report.sites and all(p.dtype == torch.float16 for p in half.parameters())


class Branchy(nn.Module):
    """An MLP whose second branch runs only for inputs with a positive first feature sum."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        if bool(x[:, 0].sum() > 0):
            h = torch.relu(self.b(h))
        return self.head(h)


@pytest.mark.parametrize("split", [1, 2], ids=["one-batch", "two-batches"])
def test_a_site_that_never_runs_is_reported_skipped_not_repaired(split):
    torch.manual_seed(0)
    model = Branchy().double()
    reach = torch.randn(40, 6, dtype=torch.float64).abs()  # takes the branch: b is a site
    goal = collect_stats(model, reach)
    assert [s.fqn for s in goal.sites] == ["a", "b"]
    miss = -reach  # never takes the branch
    damage_(model)
    before = model.b.weight.clone()
    data = miss if split == 1 else [miss[:20], miss[20:]]
    with pytest.warns(UserWarning, match="1 of 2 sites were not corrected: 'b' \\(it never ran"):
        report = repair_(model, goal, data, repair="repair")
    by_fqn = {s.fqn: s for s in report.sites}
    assert by_fqn["a"].mode == "repair" and by_fqn["b"].mode == "skipped"
    assert "b" not in report.corrections and report.skipped == {"b": by_fqn["b"].skipped}
    assert torch.equal(model.b.weight, before)


def test_reset_without_batchnorm_is_an_error_and_partial_reset_is_reported():
    x = inputs_for("mlp")
    with pytest.raises(ValueError, match="no site of this model is followed by a BatchNorm"):
        repair_(operated("mlp"), collect_stats(MODELS["mlp"], x), x, repair="reset")
    x = inputs_for("cnn-bn")
    goal = collect_stats(MODELS["cnn-bn"], x, include_classifier=True)  # the classifier has no BN
    with pytest.warns(UserWarning, match="no BatchNorm to reset there"):
        report = repair_(operated("cnn-bn"), goal, x, repair="reset")
    assert {s.mode for s in report.sites} == {"reset", "skipped"}


def test_no_sites_is_an_error():
    x = inputs_for("mlp")
    goal = collect_stats(MODELS["mlp"], x)
    empty = type(goal)([], {})
    with pytest.raises(ValueError, match="hold no sites, so there is nothing to correct"):
        repair_(operated("mlp"), empty, x)


def test_select_channels_keeps_the_site_kind():
    model = MODELS["resnet-bn"]
    x = inputs_for("resnet-bn")
    stats = collect_stats(model, x, block_outputs="re:^layer\\d\\.\\d$")
    block = next(s for s in stats.sites if s.kind == "block")
    picked = stats.select_channels({block.fqn: torch.tensor([0, 1])})
    assert picked.site(block.fqn).kind == "block" and picked.site(block.fqn).channels == 2
