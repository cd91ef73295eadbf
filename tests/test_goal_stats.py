"""Goal statistics without calibration data (rethinking-rebasin G.4): batchnorm_goal,
RecordStats, and ``--goal-stats FILE|batchnorm`` of ``prune`` / ``repair``."""

import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from prune_repair import zoo
from prune_repair.cli import main
from prune_repair.engine import ActivationStats, collect_stats, repair_
from prune_repair.engine.stats.goal import RecordStats, batchnorm_goal, match_goal
from prune_repair.io.data import calibration_batch, load_dataset
from prune_repair.prune import prune_


def bn_net() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 3, bias=False),
                          nn.BatchNorm2d(6, eps=1e-3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 5)).double()
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.weight.copy_(torch.randn_like(bn.weight))  # negative gammas too
            bn.bias.copy_(torch.randn_like(bn.bias))
    return model.eval()


def set_running_to_batch_stats(model: nn.Module, x: torch.Tensor) -> None:
    """Each BN's running stats := the exact (population) batch stats of its eval-mode input."""
    for bn in [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]:
        seen = {}
        handle = bn.register_forward_pre_hook(lambda m, inp: seen.setdefault("x", inp[0]))
        with torch.no_grad():
            model(x)
        handle.remove()
        var, mean = torch.var_mean(seen["x"], dim=(0, 2, 3), correction=0)
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)


def test_batchnorm_goal_equals_measured_bn_outputs_when_running_stats_are_the_batch_stats():
    model, x = bn_net(), torch.randn(32, 2, 8, 8, dtype=torch.float64) * 3 + 1
    set_running_to_batch_stats(model, x)
    goal = batchnorm_goal(model, torch.randn(2, 2, 8, 8, dtype=torch.float64))  # random input: tracing only
    measured = collect_stats(model, x)
    assert list(goal) == list(measured) == ["1", "4"]
    for fqn in goal:
        torch.testing.assert_close(goal[fqn].mean, measured[fqn].mean, rtol=0, atol=1e-10)
        torch.testing.assert_close(goal[fqn].std, measured[fqn].std, rtol=0, atol=1e-10)


def test_batchnorm_goal_names_sites_without_batchnorm():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match=r"no BatchNorm .* site\(s\) '3'"):
        batchnorm_goal(model, x)
    with pytest.warns(UserWarning, match="no BatchNorm at 3"):
        goal = batchnorm_goal(model, x, skip_missing=True)
    assert list(goal) == ["1"] and goal.skipped == ["3"]
    with pytest.raises(ValueError, match="no site after a BatchNorm"):
        batchnorm_goal(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), x, skip_missing=True)
    with pytest.raises(ValueError, match="example_inputs"):
        batchnorm_goal(model)


def mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 3)).double()


def test_record_stats_equals_collect_stats_over_the_same_batches(tmp_path):
    model = mlp().train()
    batches = [torch.randn(16, 6, dtype=torch.float64) * (i + 1) for i in range(5)]
    with RecordStats(model, batches[0], window=None) as rec:
        for b in batches:
            model(b).sum().backward()
        with torch.no_grad():  # validation passes are not recorded by default
            model.eval()(torch.randn(8, 6, dtype=torch.float64) + 100)
            model.train()
    assert rec.batches == 5
    expected = collect_stats(model, batches)
    got = rec.stats()
    for fqn in expected:
        assert got[fqn].count == expected[fqn].count
        torch.testing.assert_close(got[fqn].mean, expected[fqn].mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got[fqn].var, expected[fqn].var, rtol=1e-12, atol=1e-12)
    assert not model._forward_hooks and not model[0]._forward_hooks  # hooks removed

    with RecordStats(model, batches[0], window=2) as last:  # the window keeps the last 2 passes
        for b in batches:
            model(b)
    tail = collect_stats(model, batches[-2:])
    torch.testing.assert_close(last.stats()["2"].var, tail["2"].var, rtol=1e-12, atol=1e-12)

    path = tmp_path / "goal.pt"
    rec.save(path)
    raw = torch.load(path, weights_only=True)  # plain tensors and dicts only
    loaded = RecordStats.load(path)
    assert isinstance(loaded, ActivationStats) and loaded.sites == got.sites and "sites" in raw
    for fqn in got:
        assert torch.equal(loaded[fqn].mean, got[fqn].mean) and torch.equal(loaded[fqn].m2, got[fqn].m2)
    # a saved goal repairs like the in-memory one
    a, b = mlp(), mlp()
    with torch.no_grad():
        a[0].weight.mul_(3)
        b[0].weight.mul_(3)
    repair_(a, got, batches[0], repair="repair")
    repair_(b, loaded, batches[0], repair="repair")
    assert torch.equal(a[0].weight, b[0].weight)


def test_record_stats_errors():
    model = mlp()
    with pytest.raises(ValueError, match="window"):
        RecordStats(model, torch.randn(2, 6, dtype=torch.float64), window=0)
    with RecordStats(model, torch.randn(2, 6, dtype=torch.float64)) as rec, torch.no_grad():
        model(torch.randn(4, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="nothing recorded at site '0'"):
        rec.stats()


def test_match_goal_errors():
    model = mlp()
    x = torch.randn(4, 6, dtype=torch.float64)
    goal = collect_stats(model, x)
    other = collect_stats(nn.Sequential(nn.Linear(6, 7), nn.ReLU(), nn.Linear(7, 2)).double(), x)
    with pytest.raises(ValueError, match="have 7 channels at site '0' but the model has 12"):
        match_goal(other, goal.sites)
    with pytest.raises(ValueError, match="no site '2'"):
        match_goal(ActivationStats(goal.sites[:1], {"0": goal["0"]}), goal.sites)


# ---- command line -------------------------------------------------------------------------------------------


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """512 mnist:test samples as a .pt file: --data and (all of it) the evaluation set, for speed."""
    x, y = load_dataset("mnist:test")
    path = tmp_path_factory.mktemp("data") / "mnist512.pt"
    torch.save({"x": x[:512].clone(), "y": y[:512].clone()}, path)
    return path


@pytest.fixture(scope="module")
def calib_x(small_data):
    d = torch.load(small_data, weights_only=True)
    return calibration_batch(d["x"], d["y"], 64, 0)[0]


def calib(data):
    return ["--data", data, "--calib-size", 64]


def test_cli_prune_goal_batchnorm(tmp_path, small_data):
    report = tmp_path / "r.json"
    result = run("prune", "zoo:mnist-cnn-bn", *calib(small_data), "--sparsity", 0.9, "--goal-stats", "batchnorm",
                 "--repair", "repair", "--out", tmp_path / "o.pt", "--report", report)
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["goal_stats"] == {"source": "batchnorm", "sites": 2}
    row = data["results"][0]
    assert row["acc_repaired"] > row["acc_pruned"] + 0.05


def test_cli_repair_goal_file_equals_measuring_the_reference(tmp_path, small_data, calib_x):
    pruned = tmp_path / "pruned.pt"
    model = zoo.load("mnist-cnn-bn")
    prune_(model, 0.9, "global-magnitude")
    torch.save(model.state_dict(), pruned)
    goal = tmp_path / "goal.pt"
    collect_stats(zoo.load("mnist-cnn-bn"), calib_x).save(goal)
    a, b, report = tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "r.json"
    base = ["repair", pruned, "--reference", "zoo:mnist-cnn-bn", *calib(small_data), "--repair", "repair"]
    result = run(*base, "--goal-stats", goal, "--out", a, "--report", report)
    assert result.exit_code == 0, result.output
    assert run(*base, "--out", b).exit_code == 0
    assert a.read_bytes() == b.read_bytes()  # same goal as measuring --reference on the same batch
    assert json.loads(report.read_text())["goal_stats"] == {"source": str(goal), "sites": 2}


def test_cli_goal_stats_errors(tmp_path, small_data, calib_x):
    wrong = tmp_path / "mlp.pt"
    collect_stats(zoo.load("mnist-mlp"), calib_x).save(wrong)
    narrow = tmp_path / "narrow.pt"
    stats = collect_stats(zoo.load("mnist-cnn-bn"), calib_x).state_dict()
    stats["sites"][0]["channels"] = 8
    for key in ("mean", "m2"):
        stats["stats"]["features.bn1"][key] = stats["stats"]["features.bn1"][key][:8]
    torch.save(stats, narrow)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    out = tmp_path / "o.pt"
    cases = [
        ("zoo:mnist-cnn-bn", wrong, [], "name site 'features.fc1', which the model does not have"),
        ("zoo:mnist-cnn-bn", narrow, [], "8 channels at site 'features.bn1' but the model has 16"),
        ("zoo:mnist-cnn-bn", garbage, [], "is not a statistics file"),
        ("zoo:mnist-cnn-bn", tmp_path / "missing.pt", [], "no such file"),
        ("zoo:mnist-cnn", "batchnorm", [], "reads the goal from BatchNorm layers, and this model has none"),
        ("zoo:mnist-cnn-bn", "batchnorm", ["--repair", "reconstruct"], "cannot use --goal-stats"),
    ]
    for ckpt, goal, extra, message in cases:
        result = run("prune", ckpt, *calib(small_data), "--sparsity", 0.9, "--goal-stats", goal, *extra, "--out", out)
        assert result.exit_code == 2, (goal, result.output)
        assert message in " ".join(result.output.split()), result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
        assert not out.exists()
