"""OBS mask candidates and gradual steps (prune/obs_layer.py, prune/obs.py): what the code guarantees.

- a layer keeps the candidate whose exact refit has the lowest error, so with ``magnitude``
  among the candidates its error is never above magnitude pruning + reconstruction's;
- ``candidates=("magnitude",)`` with the global allocation IS global magnitude pruning +
  ``reconstruct_`` (same masks, same weights);
- every step count reaches the asked sparsity exactly, and zeros stay zeros.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from prune_repair.cli import main
from prune_repair.engine.refit.reconstruct import reconstruct_
from prune_repair.prune import prune_
from prune_repair.prune.obs import obs_prune_
from prune_repair.prune.obs_budgets import step_sparsities
from prune_repair.prune.obs_layer import MaskCandidate, magnitude_keep, parse_candidates
from prune_repair.prune.targets import PruneError
from prune_repair.zoo.models import MLP

pytestmark = pytest.mark.usefixtures("float64_default")  # exact checks in float64


def _mlp(seed: int) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    return MLP(widths=(32, 16), in_features=20), torch.randn(300, 20)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_magnitude_candidate_alone_is_global_magnitude_plus_reconstruct(seed):
    dense, x = _mlp(seed)
    obs = copy.deepcopy(dense)
    obs_prune_(obs, x, 0.5, allocation="global", candidates=("magnitude",))
    magnitude = copy.deepcopy(dense)
    prune_(magnitude, 0.5, method="global-magnitude")
    reconstruct_(magnitude, dense, x)
    for (name, a), b in zip(obs.state_dict().items(), magnitude.state_dict().values()):
        assert torch.equal(a == 0, b == 0), name
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize("sparsity", [0.5, 0.9, "2:4"])
def test_the_kept_layer_error_is_the_lowest_candidates(sparsity):
    torch.manual_seed(3)
    layer = nn.Sequential(nn.Linear(16, 12))
    x = torch.randn(200, 16) @ torch.randn(16, 16)  # correlated inputs: the candidates differ
    alone = {c.value: obs_prune_(copy.deepcopy(layer), x, sparsity, candidates=(c,)).layers[0].error_after
             for c in MaskCandidate}
    report = obs_prune_(copy.deepcopy(layer), x, sparsity)
    chosen = report.layers[0]
    assert chosen.error_after == pytest.approx(min(alone.values()), abs=1e-12)
    assert chosen.error_after <= alone["magnitude"] + 1e-12
    assert alone[chosen.mask] == pytest.approx(chosen.error_after, abs=1e-12)


@pytest.mark.parametrize("allocation", ["uniform", "global"])
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_every_step_count_reaches_the_sparsity_exactly_and_zeros_stay(allocation, steps):
    model, x = _mlp(4)
    with torch.no_grad():
        model.features.fc1.weight[:, :3] = 0  # zeros on entry must stay zeros
    report = obs_prune_(model, x, 0.7, allocation=allocation, steps=steps)
    total = sum(layer.weights for layer in report.layers)
    zeros = sum(int((m.weight == 0).sum()) for m in model.modules() if isinstance(m, nn.Linear))
    assert report.achieved_sparsity == zeros / total == round(0.7 * total) / total
    assert bool((model.features.fc1.weight[:, :3] == 0).all())
    assert report.steps == steps and report.to_dict()["steps"] == steps
    if allocation == "uniform":
        assert all(abs(layer.sparsity - 0.7) < 1 / layer.weights + 1e-12 for layer in report.layers)


def test_step_sparsities_remove_the_same_fraction_each_step():
    for sparsity, steps in [(0.9, 4), (0.7, 3), (0.5, 1)]:
        schedule = step_sparsities(sparsity, steps)
        assert len(schedule) == steps and schedule[-1] == sparsity
        left = [1.0] + [1 - s for s in schedule]
        ratios = [b / a for a, b in zip(left, left[1:])]
        assert max(ratios) - min(ratios) < 1e-12


def test_magnitude_keep_keeps_forced_zeros_past_the_budget_and_n_m_groups():
    W = torch.tensor([[[4.0, 3.0, 2.0, 1.0]]])
    forced = torch.tensor([[[True, True, True, False]]])
    assert magnitude_keep(W, 1, forced).tolist() == [[[False, False, False, True]]]
    from prune_repair.prune.nm import NMPattern

    keep = magnitude_keep(torch.tensor([[[1.0, -5.0, 2.0, 0.5, 3.0, 1.0, -4.0, 2.0]]]), 0,
                          torch.zeros(1, 1, 8, dtype=torch.bool), NMPattern(2, 4))
    assert keep.int().tolist() == [[[0, 1, 1, 0, 1, 0, 1, 0]]]


def test_bad_options_are_one_line_errors():
    model, x = _mlp(5)
    with pytest.raises(PruneError, match="steps must be"):
        obs_prune_(copy.deepcopy(model), x, 0.5, steps=0)
    with pytest.raises(PruneError, match="one step"):
        obs_prune_(copy.deepcopy(model), x, "2:4", steps=2)
    with pytest.raises(PruneError, match="unknown obs mask candidate 'wanda'"):
        parse_candidates("obs,wanda")
    with pytest.raises(PruneError, match="each once"):
        parse_candidates("obs,obs")
    assert parse_candidates(" magnitude ,obs-damped") == (MaskCandidate.MAGNITUDE, MaskCandidate.OBS_DAMPED)


def test_cli_obs_steps_and_candidates(tmp_path):
    out, report = tmp_path / "out.pt", tmp_path / "report.json"
    base = ["prune", "zoo:mnist-mlp", "--data", "mnist:test", "--calib-size", "256", "--eval-size", "200",
            "--sparsity", "0.8", "--repair", "none", "--out", str(out)]
    result = CliRunner().invoke(main, [*base, "--method", "obs", "--obs-steps", "2", "--obs-candidates",
                                       "obs,magnitude", "--report", str(report)])
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["obs_steps"] == 2 and data["obs_candidates"] == ["obs", "magnitude"]
    assert {layer["mask"] for layer in data["results"][0]["layers"]} <= {"obs", "magnitude"}
    assert abs(data["results"][0]["achieved_sparsity"] - 0.8) < 1e-4
    for extra in (["--method", "wanda", "--obs-steps", "2"], ["--method", "obs", "--obs-candidates", "obs,foo"],
                  ["--structured", "0.25", "--obs-steps", "2"]):
        other = tmp_path / "other.pt"
        args = [*base[:-1], str(other), *extra]
        if "--structured" in extra:  # the obs flags belong to a --sparsity step, which this run lacks
            args = [a for i, a in enumerate(args) if a != "--sparsity" and args[i - 1] != "--sparsity"]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2 and not other.exists(), result.output
        assert len(result.output.strip().splitlines()) == 1


def test_cli_structured_sparsity_step_takes_the_method_flags(tmp_path):
    """--structured with --sparsity: obs runs with the flags given (here only the magnitude candidate), not its defaults."""
    out, report = tmp_path / "out.pt", tmp_path / "report.json"
    result = CliRunner().invoke(main, ["prune", "zoo:mnist-mlp", "--data", "mnist:test", "--calib-size", "256",
                                       "--structured", "0.25", "--sparsity", "0.8", "--method", "obs",
                                       "--obs-candidates", "magnitude", "--repair", "none", "--out", str(out),
                                       "--report", str(report)])
    assert result.exit_code == 0, result.output
    layers = json.loads(report.read_text())["results"][0]["layers"]
    assert layers and {layer["mask"] for layer in layers} == {"magnitude"}
