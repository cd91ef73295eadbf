"""Statistics collection on the calibration pipeline: every pass strategy equals the inline pass.

``collect_stats`` runs observe-only steps (``engine/stats/collect.py``) on the pipeline. On the
four small float64 models of ``test_pipeline_matrix`` (an MLP, a CNN with BatchNorm, a ViT
encoder, a GPT-2-shaped HF model with padded tokens), the statistics over three batches under
every ``Passes`` strategy (blockwise with its inputs on the device, in host memory or in files)
equal those of the three batches as ONE batch, to 1e-9, and the model is left as it was; an
option that does not apply is refused in one line.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from prune_repair import Passes, collect_stats
from prune_repair.engine.stats.goal import RecordStats
from test_pipeline_matrix import _model, _split

STRATEGIES = [({}, "one pass"), *[({"passes": p}, p.value) for p in Passes],
              ({"passes": "blockwise", "offload": "cpu"}, "blockwise/cpu"),
              ({"passes": "blockwise", "offload": "FILES"}, "blockwise/files")]


@pytest.mark.parametrize("name", ["mlp", "cnn-bn", "vit-block", pytest.param("gpt2", marks=pytest.mark.slow)])
def test_statistics_under_every_strategy_equal_the_inline_pass(name, tmp_path):
    model, x = _model(name)
    before = copy.deepcopy(model.state_dict())
    inline = collect_stats(model, x)
    assert len(inline) >= 2
    for options, what in STRATEGIES:
        if options.get("offload") == "FILES":
            options = {**options, "offload": tmp_path / "blocks"}
        got = collect_stats(model, _split(x), **options)
        assert list(got) == list(inline), what
        for fqn, want in inline.items():
            assert got[fqn].count == want.count, f"{what}: {fqn}"
            assert_close(got[fqn].mean, want.mean, rtol=1e-9, atol=1e-9, msg=f"{what}: {fqn} mean")
            assert_close(got[fqn].m2, want.m2, rtol=1e-9, atol=1e-9, msg=f"{what}: {fqn} m2")
    assert not (tmp_path / "blocks").exists()  # the offload folder is removed afterwards
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)  # observing changes nothing


def test_padded_positions_are_left_out_under_every_strategy():
    model, x = _model("gpt2")
    rows = {k: v[2:4] for k, v in x.items()}  # sample 2 is whole, sample 3 padded after 5 tokens
    kept = collect_stats(model, rows)
    site = next(iter(kept))
    assert kept[site].count == int(x["attention_mask"][2:4].sum()) == 7 + 5
    for passes in Passes:
        got = collect_stats(model, [{k: v[:1] for k, v in rows.items()}, {k: v[1:] for k, v in rows.items()}],
                            passes=passes)
        assert got[site].count == kept[site].count, passes.value
        assert_close(got[site].mean, kept[site].mean, rtol=1e-9, atol=1e-9)


def test_progress_ticks_once_per_site_and_the_train_mode_is_restored(capsys, monkeypatch):
    from prune_repair.engine.run import progress

    model, x = _model("cnn-bn")
    model.train()
    for passes in (None, *Passes):
        seen = []
        stats = collect_stats(model, _split(x), passes=passes, progress=lambda done, total: seen.append((done, total)))
        assert seen == [(k + 1, len(stats)) for k in range(len(stats))], passes
        assert model.training and all(m.training for m in model.modules())
    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 0.0)  # a line per site
    collect_stats(model, _split(x), passes="blockwise", progress=True)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == len(stats) and all(re.match(r"statistics: block \d+/9 \(\d\), '\d'", s) for s in lines)
    collect_stats(model, _split(x))  # silent unless asked
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("options, why", [
    ({"blocks": ["1"]}, re.escape("blocks= and offload= apply to passes='blockwise' only")),
    ({"offload": "cpu"}, re.escape("blocks= and offload= apply to passes='blockwise' only")),
    ({"passes": "per-site", "offload": "cpu"}, re.escape("blocks= and offload= apply to passes='blockwise' only")),
    ({"passes": "sideways"}, "sideways"),
    ({"passes": "blockwise", "blocks": ["nothing.here"]}, "has no attribute `nothing`"),
])
def test_options_that_do_not_apply_are_refused_in_one_line(options, why):
    model, x = _model("mlp")
    with pytest.raises(ValueError, match=why) as error:
        collect_stats(model, _split(x), **options)
    assert "\n" not in str(error.value)


def test_recorded_goal_uses_the_same_steps_and_equals_the_collected_statistics():
    model, x = _model("vit-block")
    batches = _split(x)
    with RecordStats(model, x, window=None, record="eval") as rec, torch.no_grad():
        for batch in batches:
            model(batch)
    collected = collect_stats(model, batches, passes="per-site")
    recorded = rec.stats()
    assert list(recorded) == list(collected) and rec.batches == len(batches)
    for fqn in collected:
        assert recorded[fqn].count == collected[fqn].count
        assert_close(recorded[fqn].mean, collected[fqn].mean, rtol=1e-12, atol=1e-12)
        assert_close(recorded[fqn].m2, collected[fqn].m2, rtol=1e-12, atol=1e-12)
    assert not any(isinstance(m, nn.Module) and m._forward_hooks for m in model.modules())  # hooks removed


def _pair(name: str) -> tuple[nn.Module, nn.Module, object]:
    a, x = _model(name)
    b = copy.deepcopy(a)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return a, b, x


@pytest.mark.parametrize("name", ["mlp", "cnn-bn", "vit-block", pytest.param("gpt2", marks=pytest.mark.slow)])
def test_merge_co_moments_under_every_strategy_equal_the_one_pass(name, tmp_path):
    from prune_repair import find_sites
    from prune_repair.merge import site_moments

    a, b, x = _pair(name)
    sites = [s for s in find_sites(a, _split(x)[0]) if s.call == "module"]  # the model beside hands out modules'
    want = site_moments([a, b], x, sites)
    for options, what in STRATEGIES:
        if options.get("offload") == "FILES":
            options = {**options, "offload": tmp_path / "blocks"}
        got = site_moments([a, b], _split(x), sites, **{"progress": lambda done, total: None, **options})
        for s in sites:
            assert got.count[s.fqn] == want.count[s.fqn], f"{what}: {s.fqn}"
            assert_close(got.mean[s.fqn], want.mean[s.fqn], rtol=1e-9, atol=1e-9, msg=f"{what}: {s.fqn} mean")
            assert_close(got.cov[s.fqn], want.cov[s.fqn], rtol=1e-9, atol=1e-9, msg=f"{what}: {s.fqn} cov")


def test_merge_co_moments_on_the_pipeline_refuse_what_they_cannot_run_in_one_line():
    from prune_repair import find_sites
    from prune_repair.merge import site_moments

    a, b, x = _pair("vit-block")
    sites = find_sites(a, x[:2])
    assert any(s.call == "attention" for s in sites)
    for models, why in [([a, b], "is computed inside its parent"), ([a, b, a], "takes two models, not 3")]:
        with pytest.raises(ValueError, match=why) as error:
            site_moments(models, _split(x), sites, passes="per-site")
        assert "\n" not in str(error.value)
