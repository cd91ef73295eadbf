"""merge(): interpolation, repair variants, several models, bad input; barrier curves."""

from __future__ import annotations

import hashlib
import sys

import pytest
import torch
from torch import nn

from prune_repair import collect_stats
from prune_repair.merge import (ArchitectureMismatch, BarrierCurve, CurvePoint, PlotError, barrier, barrier_curve,
                                lerp_state_dicts, merge, merge_many, plot_curve, prepare_merge, site_moments)
from prune_repair.zoo.models import MLP, PlainCNN


def state_hash(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode() + v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def pair(factory, seeds=(0, 1)):
    models = []
    for s in seeds:
        torch.manual_seed(s)
        models.append(factory().double().eval())
    return models


@pytest.fixture
def mlps():
    return pair(lambda: MLP(widths=(16, 16)))


@pytest.fixture
def x():
    torch.manual_seed(5)
    return torch.randn(128, 1, 28, 28, dtype=torch.float64)


def test_merge_returns_a_new_model_and_leaves_inputs_alone(mlps, x):
    a, b = mlps
    a.train()
    hashes = state_hash(a), state_hash(b)
    merged = merge(a, b, x, alpha=0.3, align="activation", repair="repair")
    assert merged is not a and merged is not b
    assert (state_hash(a), state_hash(b)) == hashes and a.training and not b.training
    assert set(merged.state_dict()) == set(a.state_dict())


def test_endpoints_of_the_path_are_the_models(mlps, x):
    a, b = mlps
    at0 = merge(a, b, x, alpha=0.0, align="weight", repair="none")
    assert all(torch.equal(v, a.state_dict()[k]) for k, v in at0.state_dict().items())
    at1 = merge(a, b, x, alpha=1.0, align="activation", repair="none")
    torch.testing.assert_close(at1(x), b(x))  # the aligned b computes what b computes


def test_lerp_averages_buffers_and_keeps_integer_buffers():
    models = pair(lambda: PlainCNN(channels=(4, 8), batch_norm=True), seeds=(0, 1, 2))
    for i, m in enumerate(models):
        m.features.bn1.running_var.fill_(float(i + 1))
        m.features.bn1.num_batches_tracked.fill_(10 * (i + 1))
    hashes = [state_hash(m) for m in models]
    out = lerp_state_dicts([m.state_dict() for m in models], [0.5, 0.25, 0.25])
    assert [state_hash(m) for m in models] == hashes
    assert torch.allclose(out["features.bn1.running_var"], torch.full((4,), 1.75, dtype=torch.float64))
    assert int(out["features.bn1.num_batches_tracked"]) == 10
    with pytest.raises(ValueError, match="sum to 1"):
        lerp_state_dicts([m.state_dict() for m in models], [0.5, 0.5, 0.5])


def test_exact_repair_reaches_the_interpolated_statistics(mlps, x):
    a, b = mlps
    plan = prepare_merge([a, b], x, align="activation")
    merged, report = plan.merged([0.6, 0.4], repair="repair")
    goal = plan.moments().goal([0.6, 0.4])
    measured = collect_stats(merged, x)
    assert [s.fqn for s in report.sites] == ["features.fc1", "features.fc2"]
    for fqn in goal:
        torch.testing.assert_close(measured[fqn].mean, goal[fqn].mean, rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(measured[fqn].std, goal[fqn].std, rtol=1e-8, atol=1e-8)


def test_goal_statistics_match_the_endpoints(mlps, x):
    a, b = mlps
    plan = prepare_merge([a, b], x, align="none")
    for k, model in enumerate((a, b)):
        direct = collect_stats(model, x)
        for fqn, s in plan.moments().stats(k).items():
            torch.testing.assert_close(s.mean, direct[fqn].mean)
            torch.testing.assert_close(s.std, direct[fqn].std)


def test_closed_form_is_exact_on_the_first_layer(x):
    a, b = pair(lambda: MLP(widths=(16,)))
    plan = prepare_merge([a, b], x, align="activation")
    merged, report = plan.merged([0.5, 0.5], repair="repair", variant="closed-form")
    assert report.variant == "closed-form" and report.passes == 0
    goal, measured = plan.moments().goal([0.5, 0.5])["features.fc1"], collect_stats(merged, x)["features.fc1"]
    torch.testing.assert_close(measured.std, goal.std, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(measured.mean, goal.mean, rtol=1e-8, atol=1e-8)


def test_site_moments_cross_covariance(mlps, x):
    a, b = mlps
    sites = collect_stats(a, x).sites
    moments = site_moments([a, b], [x[:50], x[50:]], sites)
    ya, yb = (m.features.fc1(m.features.flatten(x)) for m in (a, b))
    expected = ((ya - ya.mean(0)) * (yb - yb.mean(0))).mean(0)
    torch.testing.assert_close(moments.cov["features.fc1"][0, 1], expected)


def test_bn_networks_reset_and_merge_many():
    models = pair(lambda: PlainCNN(channels=(4, 8), batch_norm=True), seeds=(0, 1, 2))
    torch.manual_seed(0)
    x = torch.randn(64, 1, 28, 28, dtype=torch.float64)
    merged = merge_many(models, x, align="weight", repair="reset")
    assert torch.isfinite(merged(x)).all()
    with torch.no_grad():
        h = merged.features.conv1(x)
    torch.testing.assert_close(merged.features.bn1.running_mean, h.mean((0, 2, 3)))  # reset to the batch
    torch.testing.assert_close(merged.features.bn1.running_var, h.var((0, 2, 3), correction=0))
    with pytest.raises(ValueError, match="one weight per model"):
        merge_many(models, x, [0.5, 0.5])


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan"), True])
def test_alpha_outside_the_unit_interval(mlps, x, alpha):
    with pytest.raises(ValueError, match=r"alpha must be a number in \[0, 1\]"):
        merge(*mlps, x, alpha=alpha)


def test_different_architectures_name_the_first_differing_key(x):
    a = MLP(widths=(16, 16)).double()
    b = MLP(widths=(16, 8)).double()
    with pytest.raises(ArchitectureMismatch, match=r"'features.fc2.weight' is \[16, 16\] in model 0 and \[8, 16\]"):
        merge(a, b, x)


def test_other_bad_input(mlps, x):
    a, b = mlps
    with pytest.raises(ValueError, match="reset recomputes"):
        merge(a, b, x, repair="reset", variant="closed-form")
    with pytest.raises(ValueError, match="at least 2 samples"):
        merge(a, b, x[:1])
    with pytest.raises(ValueError, match="at least two models"):
        merge_many([a], x)
    broken = MLP(widths=(16, 16)).double()
    with torch.no_grad():
        broken.features.fc1.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="model 1: .*NaN"):
        merge(a, broken, x)


def test_barrier_definition():
    assert barrier([0, 0.5, 1], [1.0, 3.0, 2.0], (1.0, 2.0)) == pytest.approx(1.5)
    assert barrier([0, 0.5, 1], [0.9, 0.6, 0.8], (0.9, 0.8), higher_is_better=True) == pytest.approx(0.25)
    curve = BarrierCurve([{"acc": 0.9, "loss": 0.3}] * 3, [CurvePoint(None, 0.6, 0.9, 0.85, 0.4)], "repair")
    assert curve.barrier == pytest.approx({"acc_raw": 0.3, "acc": 0.05, "loss_raw": 0.6, "loss": 0.1})


def test_barrier_curve_and_plot(mlps, x, tmp_path, monkeypatch):
    y = torch.randint(0, 10, (128,))
    hashes = [state_hash(m) for m in mlps]
    curve = barrier_curve(*mlps, x, x, y, alphas=3, align="weight", repair="repair")
    assert [state_hash(m) for m in mlps] == hashes
    assert [p.alpha for p in curve.points] == [0.0, 0.5, 1.0]
    assert curve.points[0].acc_raw == curve.endpoints[0]["acc"]
    assert set(curve.to_dict()) == {"endpoints", "curve", "barrier", "seconds"}
    plot_curve(curve, tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(PlotError, match="needs matplotlib.*pip install matplotlib"):
        plot_curve(curve, tmp_path / "d.png")
    assert not (tmp_path / "d.png").exists()
