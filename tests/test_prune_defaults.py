"""Defaults that fit the method: the row floor of global thresholds, a language model's head left
dense, no statistics correction on top of obs by default, the notes prune prints; HF obs / wanda."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from prune_repair.cli import main
from prune_repair.cli.prune_notes import prune_notes
from prune_repair.engine.refit.gram import row_view
from prune_repair.prune import PruneError, find_targets, prune_
from prune_repair.prune.pipeline import prune_and_repair

from prune_models import tiny_gpt2, tiny_llama, tokens

transformers = pytest.importorskip("transformers")


def _lopsided() -> nn.Module:
    """The last layer's weights are 1000x smaller: one global threshold would empty it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    with torch.no_grad():
        model[2].weight.mul_(1e-3)
    return model


@pytest.mark.parametrize("method", ["global-magnitude", "fisher", "obs"])
def test_global_thresholds_keep_a_weight_in_every_row_and_the_total_exact(method):
    model, x = _lopsided(), torch.randn(24, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no layer ends all zero: no warning
        report = prune_(model, 0.9, method, (x, torch.randint(0, 4, (24,))))
    assert report.zeros == round(0.9 * report.prunable)
    for target in find_targets(model):
        rows = row_view(target.module, target.weight).ne(0)
        if method == "obs":  # obs's floor is on its per-layer budget: at least one weight per row is left
            assert int(rows.sum()) >= rows.shape[0], target.fqn
        else:
            assert bool(rows.any(1).all()), target.fqn


def test_without_the_floor_a_layer_can_empty_and_is_warned_about():
    model = _lopsided()
    with pytest.warns(UserWarning, match=r"pruned layer\(s\) are all zero \(2\)"):
        prune_(model, 0.9, floor=False)
    assert not bool(model[2].weight.any())


def test_the_floor_refuses_a_sparsity_it_cannot_reach():
    with pytest.raises(PruneError, match="empty output rows"):
        prune_(nn.Sequential(nn.Linear(2, 8), nn.Linear(8, 2)), 0.95)


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama])
def test_a_language_models_head_stays_dense_unless_asked(build):
    model = build()
    report = prune_(model, 0.5, "global-magnitude", tokens())
    assert "lm_head" not in {la["fqn"] for la in report.layers}
    assert bool((model.lm_head.weight != 0).all())
    if build is tiny_llama:  # untied: --prune-head prunes it
        model = build()
        report = prune_(model, 0.5, "global-magnitude", tokens(), prune_head=True)
        assert "lm_head" in {la["fqn"] for la in report.layers}


def test_auto_after_obs_applies_no_correction_and_says_so():
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), torch.randn(64, 8)
    run = prune_and_repair(model, (x, torch.randint(0, 4, (64,))), [0.5], method="obs")
    assert run.repair == "none" and "auto after obs applies no correction" in run.notes[0]
    assert run.rows[0].acc_repaired == run.rows[0].acc_pruned
    asked = prune_and_repair(model, (x, torch.randint(0, 4, (64,))), [0.5], method="obs", repair="repair")
    assert asked.repair == "repair" and not asked.notes


def test_prune_says_when_a_correction_could_only_scale():
    model = tiny_llama()
    batch = tokens()
    run = prune_and_repair(model, (batch, None), [0.5], repair="repair", eval_data=lambda m: {"acc": 0.0, "loss": 0.0})
    notes = prune_notes(run)
    assert any("the correction applied the scale only" in n for n in notes), notes


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_defaults")
    out = {}
    for build in (tiny_gpt2, tiny_llama):
        build().save_pretrained(root / build.__name__)
        torch.save(tokens(n=12), root / f"{build.__name__}.pt")
        out[build.__name__] = (root / build.__name__, root / f"{build.__name__}.pt")
    return out


@pytest.mark.parametrize("name", ["tiny_gpt2", "tiny_llama"])
@pytest.mark.parametrize("method, sparsity", [("obs", "0.5"), ("wanda", "2:4"), ("obs", "2:4")])
def test_hf_models_take_obs_and_wanda(hf_dirs, tmp_path, name, method, sparsity):
    model_dir, data = hf_dirs[name]
    report = tmp_path / "r.json"
    result = CliRunner().invoke(main, ["prune", f"hf:{model_dir}", "--data", str(data), "--calib-size", "8",
                                       "--sparsity", sparsity, "--method", method, "--out", str(tmp_path / "o"),
                                       "--report", str(report)])
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    row = data["results"][0]
    assert row["achieved_sparsity"] == pytest.approx(0.5, abs=0.005) and "ppl_repaired" in row
    assert row["layers"] and "lm_head" not in {la["fqn"] for la in row["layers"]}
    if method == "obs":
        assert data["repair"] == "none" and "after obs" in result.output


def test_prune_head_on_the_cli_prunes_an_untied_head(hf_dirs, tmp_path):
    model_dir, data = hf_dirs["tiny_llama"]
    report = tmp_path / "r.json"
    result = CliRunner().invoke(main, ["prune", f"hf:{model_dir}", "--data", str(data), "--calib-size", "8",
                                       "--sparsity", "0.5", "--method", "wanda", "--prune-head", "--repair", "none",
                                       "--out", str(tmp_path / "o"), "--report", str(report)])
    assert result.exit_code == 0, result.output
    layers = {la["fqn"]: la["sparsity"] for la in json.loads(report.read_text())["results"][0]["layers"]}
    assert layers["lm_head"] == 0.5


def test_notes_name_dead_channels_and_empty_layers():
    from prune_repair.prune.pipeline import PruneRow, PruneRun
    row = PruneRow(0.9, 0.9, 0.1, 0.0, 0.1, 0.0, {}, correction={"sites": [
        {"fqn": "fc1", "shift_dropped": False, "dead_channels": [0, 3]}]},
        layers=[{"fqn": "fc2", "sparsity": 1.0, "pattern": "unstructured"}])
    notes = prune_notes(PruneRun("global-magnitude", "repair", {}, [row], notes=["chosen"]))
    assert notes[0] == "chosen"
    assert "2 dead channel(s)" in notes[1] and "fc1" in notes[1]
    assert "1 layer(s) are all zero (fc2)" in notes[2]
