"""--sparsity-config: per-layer sparsities from a JSON or YAML file of layer FQN / re: pattern -> sparsity."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from prune_repair.cli import main
from prune_repair.prune import PruneError, find_targets, prune_
from prune_repair.prune.sparsity_config import layer_sparsities, load_sparsity_config

from prune_models import tiny_llama, tokens


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


def test_exact_name_wins_over_a_pattern_then_file_order():
    targets = find_targets(_mlp())
    assert layer_sparsities(targets, {"re:^[0-9]$": 0.5, "4": 0.25, "re:^2$": 0.75}) == {"0": 0.5, "2": 0.5, "4": 0.25}


@pytest.mark.parametrize("method", ["global-magnitude", "layer-magnitude", "wanda", "obs"])
def test_named_layers_get_their_sparsity_the_others_share_the_rest(method):
    model, x = _mlp(), torch.randn(64, 8)
    report = prune_(model, 0.5, method, x, sparsity_config={"2": 0.75, "re:^4$": 0.25})
    per_layer = {la["fqn"]: la["sparsity"] for la in report.layers}
    assert per_layer["2"] == 0.75 and per_layer["4"] == 0.25
    assert per_layer["0"] == 0.5  # the only layer left: it gets the run's sparsity


@pytest.mark.parametrize("config, message", [
    ({"fc9": 0.5}, "names no prunable layer"), ({"re:^nope": 0.5}, "names no prunable layer"),
    ({}, "non-empty mapping"), ({"0": 1.5}, r"\[0, 1\)"), ({"0": "2:4"}, "N:M patterns go in --sparsity"),
    ({"re:(": 0.5}, "not a valid regular expression"),
])
def test_bad_configs_are_refused(config, message):
    with pytest.raises(PruneError, match=message):
        prune_(_mlp(), 0.5, sparsity_config=config)


def test_a_config_does_not_mix_with_n_m():
    with pytest.raises(PruneError, match="does not mix"):
        prune_(_mlp(), "2:4", sparsity_config={"0": 0.5})


def test_json_and_yaml_files(tmp_path, monkeypatch):
    (tmp_path / "c.json").write_text(json.dumps({"re:^0$": 0.5}))
    assert load_sparsity_config(tmp_path / "c.json") == {"re:^0$": 0.5}
    (tmp_path / "c.yaml").write_text("re:^0$: 0.5\n'2': 0.25\n")
    pytest.importorskip("yaml")
    assert load_sparsity_config(tmp_path / "c.yaml") == {"re:^0$": 0.5, "2": 0.25}
    monkeypatch.setitem(sys.modules, "yaml", None)  # as if PyYAML were not installed
    with pytest.raises(PruneError, match="pip install pyyaml"):
        load_sparsity_config(tmp_path / "c.yaml")
    (tmp_path / "bad.json").write_text("{0.5}")
    with pytest.raises(PruneError, match="not valid JSON"):
        load_sparsity_config(tmp_path / "bad.json")


def test_a_config_can_name_the_output_head_of_a_language_model():
    model = tiny_llama()
    report = prune_(model, 0.5, "global-magnitude", tokens(), sparsity_config={"lm_head": 0.3})
    per_layer = {la["fqn"]: la["sparsity"] for la in report.layers}
    assert per_layer["lm_head"] == pytest.approx(0.3, abs=1e-3)


def test_cli_config_and_its_mistakes(tmp_path):
    config, report, out = tmp_path / "c.json", tmp_path / "r.json", tmp_path / "o.pt"
    config.write_text(json.dumps({"classifier": 0.2}))
    base = ["prune", "zoo:mnist-mlp", "--data", "mnist:test", "--calib-size", "64", "--sparsity", "0.9"]
    result = CliRunner().invoke(main, [*base, "--sparsity-config", str(config), "--out", str(out),
                                       "--report", str(report)])
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    layers = {la["fqn"]: la["sparsity"] for la in data["results"][0]["layers"]}
    assert layers["classifier"] == pytest.approx(0.2, abs=1e-3) and data["sparsity_config"] == {"classifier": 0.2}
    config.write_text(json.dumps({"features.fc7": 0.2}))
    never = tmp_path / "never.pt"
    result = CliRunner().invoke(main, [*base, "--sparsity-config", str(config), "--out", str(never)])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "names no prunable layer" in lines[0], result.output
    assert not never.exists()
