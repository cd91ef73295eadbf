"""N:M semi-structured masks: the pattern on every layer kind, for every method, kept by every correction."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from prune_repair import repair_
from prune_repair.cli import main
from prune_repair.engine.refit.attention_layers import layer_module
from prune_repair.engine.refit.gram import row_view
from prune_repair.engine.stats.activation import collect_stats
from prune_repair.prune import PruneError, prune_
from prune_repair.prune.nm import NMPattern, follows_pattern, nm_keep_rows, parse_pattern, parse_sparsity
from prune_repair.prune.obs import obs_rows
from prune_repair.prune.pipeline import parse_sparsities

from prune_models import images, tiny_gpt2, tiny_llama, tiny_vit, tokens

transformers = pytest.importorskip("transformers")


def _layers_follow(model: nn.Module, fqns: list[str], pattern: NMPattern) -> None:
    for fqn in fqns:
        module = layer_module(model, fqn)  # obs reports a packed in-projection's rows as '<attention>.in_proj:q|k|v'
        weight = module.in_proj_weight if isinstance(module, nn.MultiheadAttention) else module.weight
        rows = row_view(module, weight.detach())
        assert follows_pattern(rows, pattern), fqn
        assert int((rows != 0).sum()) <= rows.numel() * pattern.n // pattern.m, fqn


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 4)).eval()


@pytest.mark.parametrize("text, message", [("3:2", "0 < N < M"), ("0:4", "0 < N < M"), ("4:4", "0 < N < M"),
                                           ("a:b", "two integers"), ("2:4:8", "two integers")])
def test_bad_patterns_are_refused(text, message):
    with pytest.raises(PruneError, match=message):
        parse_pattern(text)


def test_a_pattern_mixes_with_nothing_else():
    assert parse_sparsities("2:4") == [NMPattern(2, 4)]
    with pytest.raises(PruneError, match="mixes with nothing else"):
        parse_sparsities("0.5,2:4")
    assert parse_sparsity("1:8").sparsity == pytest.approx(0.875)


def test_keep_rows_is_the_n_largest_of_each_group():
    torch.manual_seed(0)
    scores = torch.randn(5, 24)
    keep = nm_keep_rows(scores, NMPattern(3, 8))
    groups, kept = scores.reshape(5, 3, 8), keep.reshape(5, 3, 8)
    assert bool((kept.sum(-1) == 3).all())
    smallest_kept = groups.masked_fill(~kept, float("inf")).min(-1).values
    largest_dropped = groups.masked_fill(kept, -float("inf")).max(-1).values
    assert bool((smallest_kept >= largest_dropped).all())


@pytest.mark.parametrize("method", ["global-magnitude", "layer-magnitude", "wanda", "obs", "fisher"])
def test_every_method_gives_the_pattern_on_a_cnn(method):
    model, x = _cnn(), torch.randn(16, 4, 4, 4)
    data = (x, torch.randint(0, 4, (16,)))
    report = prune_(model, "1:4", method, data)
    fqns = [layer["fqn"] for layer in report.layers]
    assert fqns == ["0", "3", "6"] and {layer["pattern"] for layer in report.layers} == {"1:4"}
    assert report.pattern == "1:4" and report.achieved_sparsity == pytest.approx(0.75, abs=1e-12)
    _layers_follow(model, fqns, NMPattern(1, 4))


@pytest.mark.parametrize("build, data", [(tiny_vit, images), (tiny_gpt2, tokens), (tiny_llama, tokens)])
@pytest.mark.parametrize("method", ["global-magnitude", "wanda", "obs"])
def test_transformers_get_the_pattern_on_every_pruned_layer(build, data, method):
    model = build()
    report = prune_(model, "2:4", method, data())
    fqns = [layer["fqn"] for layer in report.layers]
    _layers_follow(model, fqns, NMPattern(2, 4))
    assert report.achieved_sparsity == 0.5
    assert not any("lm_head" in f for f in fqns)  # a language model's head stays dense by default


def test_a_pattern_that_does_not_divide_a_layer_is_refused():
    model = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 2))
    with pytest.raises(PruneError, match=r"layer '0'.*6 inputs, not a multiple of 4"):
        prune_(model, "2:4")
    with pytest.raises(PruneError, match=r"layer '0'.*not a multiple of 4"):
        prune_(model, "2:4", "obs", torch.randn(8, 6))
    assert bool((model[0].weight != 0).all())  # nothing pruned


def test_obs_with_an_identity_hessian_is_magnitude_n_m():
    """H = I: no compensation between columns, so the OBS N:M choice is the magnitude one (float64, exact)."""
    torch.manual_seed(0)
    W = torch.randn(1, 6, 16, dtype=torch.float64)
    H = torch.eye(16, dtype=torch.float64)[None]
    pruned, keep = obs_rows(W, H, 0, 16, block_size=5, nm=NMPattern(2, 4))
    expected = nm_keep_rows(W[0].abs(), NMPattern(2, 4))
    assert torch.equal(keep[0], expected)
    torch.testing.assert_close(pruned[0], W[0] * expected)


def test_obs_n_m_choice_happens_inside_the_sweep():
    """With a correlated Gram matrix the update moves later columns before their group is chosen."""
    torch.manual_seed(0)
    x = torch.randn(256, 8, dtype=torch.float64)
    x[:, 4:] += 2 * x[:, :4]
    H = (x.T @ x)[None]
    W = torch.randn(1, 3, 8, dtype=torch.float64)
    pruned, keep = obs_rows(W, H, 0, 8, nm=NMPattern(2, 4))
    assert follows_pattern(keep[0], NMPattern(2, 4)) and bool((keep[0].sum(1) == 4).all())
    assert bool((pruned[0][~keep[0]] == 0).all())
    err = lambda w: float(((w - W[0]) @ H[0] @ (w - W[0]).T).trace())  # noqa: E731
    assert err(pruned[0]) <= err(W[0] * keep[0]) + 1e-9  # compensated: no worse than zeroing alone


@pytest.mark.parametrize("mode", ["auto", "repair", "rescale", "reset", "reconstruct", "reconstruct+repair"])
@pytest.mark.parametrize("build, data", [(tiny_vit, images), (tiny_gpt2, tokens), (tiny_llama, tokens), (_cnn, None)])
def test_corrections_keep_the_pattern(build, data, mode):
    """Each layer kind: conv, linear, MHA in_proj (ViT), HF Conv1D (GPT-2), bias-free projections (LLaMA)."""
    if mode == "reset" and build is not _cnn:
        pytest.skip("reset needs BatchNorm sites")
    reference = build()
    x = data() if data is not None else torch.randn(32, 4, 4, 4)
    model = copy.deepcopy(reference)
    fqns = [layer["fqn"] for layer in prune_(model, "2:4", "global-magnitude", x).layers]
    zeros = {f: (dict(model.named_modules())[f].state_dict()[k] == 0).clone()
             for f in fqns for k in ("weight", "in_proj_weight") if k in dict(model.named_modules())[f].state_dict()}
    goal = reference if mode.startswith("reconstruct") else collect_stats(reference, x)
    repair_(model, goal, x, repair=mode)
    _layers_follow(model, fqns, NMPattern(2, 4))
    modules = dict(model.named_modules())
    for f, was_zero in zeros.items():
        weight = modules[f].state_dict().get("weight", modules[f].state_dict().get("in_proj_weight"))
        assert bool((weight[was_zero] == 0).all()), f


def test_cli_two_four_report_and_bad_input(tmp_path):
    out, report = tmp_path / "o.pt", tmp_path / "r.json"
    base = ["prune", "zoo:mnist-mlp", "--data", "mnist:test", "--calib-size", "64", "--out", str(out)]
    result = CliRunner().invoke(main, [*base, "--sparsity", "2:4", "--method", "wanda", "--report", str(report)])
    assert result.exit_code == 0, result.output
    row = json.loads(report.read_text())["results"][0]
    assert row["pattern"] == "2:4" and row["achieved_sparsity"] == 0.5
    assert {la["pattern"] for la in row["layers"]} == {"2:4"} and all(la["sparsity"] == 0.5 for la in row["layers"])
    for bad, message in (("3:2", "0 < N < M"), ("0.5,2:4", "mixes with nothing else")):
        out2 = tmp_path / "never.pt"
        result = CliRunner().invoke(main, [*base[:-1], str(out2), "--sparsity", bad])
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.output
        assert not out2.exists()
    result = CliRunner().invoke(main, ["prune", "zoo:mnist-cnn", "--data", "mnist:test", "--calib-size", "64",
                                       "--out", str(tmp_path / "c.pt"), "--sparsity", "2:4"])
    assert result.exit_code == 2 and "not a multiple of 4" in result.output and not (tmp_path / "c.pt").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["global-magnitude", "wanda", "obs"])
def test_n_m_on_cuda(method):
    model, batch = tiny_gpt2().cuda(), {k: v.cuda() for k, v in tokens().items()}
    report = prune_(model, "2:4", method, batch)
    assert report.achieved_sparsity == 0.5
    _layers_follow(model, [layer["fqn"] for layer in report.layers], NMPattern(2, 4))
