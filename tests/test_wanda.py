"""Wanda: |W| x input-norm scores from one hooked pass, compared within each output row."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

from prune_repair.cli import main
from prune_repair.engine.refit.gram import row_view
from prune_repair.prune import PruneMethod, find_targets, prune_
from prune_repair.prune.wanda import attention_context, input_norms, wanda_scores

from prune_models import images, tiny_gpt2, tiny_llama, tiny_vit, tokens

transformers = pytest.importorskip("transformers")


class TokenModel(nn.Module):
    """Embedding -> linear, fed as model(**batch) like an HF model."""

    def __init__(self):
        super().__init__()
        self.emb, self.fc = nn.Embedding(32, 6), nn.Linear(6, 4)

    def forward(self, input_ids, attention_mask=None):
        return self.fc(self.emb(input_ids))


def test_linear_norms_leave_padded_tokens_out():
    torch.manual_seed(0)
    model, batch = TokenModel().double(), tokens()
    norms = input_norms(model, find_targets(model), batch)
    x = model.emb(batch["input_ids"])[batch["attention_mask"].bool()]
    torch.testing.assert_close(norms["fc"], x.detach().norm(dim=0))
    everything = model.emb(batch["input_ids"]).reshape(-1, 6).detach().norm(dim=0)
    assert not torch.allclose(norms["fc"], everything)  # the padding would have counted


@pytest.mark.parametrize("groups", [1, 2])
def test_conv_norms_are_the_im2col_column_norms(groups):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, stride=2, groups=groups).double()
    x = torch.randn(5, 4, 7, 7, dtype=torch.float64)
    norms = input_norms(conv, find_targets(conv), x)[""]
    cols = F.unfold(x, 3, padding=1, stride=2)  # (N, C*9, L), channel-major like weight.reshape(out, -1)
    expected = cols.square().sum((0, 2)).sqrt().reshape(groups, -1)
    torch.testing.assert_close(norms, expected)
    scores = wanda_scores(conv, find_targets(conv), x)[""]
    per_row = expected.repeat_interleave(6 // groups, 0)  # output channel o reads its group's columns
    torch.testing.assert_close(scores.double(), (conv.weight.abs().reshape(6, -1) * per_row).reshape(6, 4 // groups,
                               3, 3), rtol=1e-6, atol=1e-6)


class CrossAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        q, k, v = x, 2 * x + 1, x.flip(1)
        return self.mha(q, k, v, need_weights=False)[0]


def test_attention_q_k_v_rows_use_their_own_inputs_and_out_proj_the_context():
    torch.manual_seed(0)
    model, x = CrossAttention().double().eval(), torch.randn(3, 5, 8, dtype=torch.float64)
    norms = input_norms(model, find_targets(model), x)
    q, k, v = x, 2 * x + 1, x.flip(1)
    torch.testing.assert_close(norms["mha"], torch.stack([t.reshape(-1, 8).norm(dim=0) for t in (q, k, v)]))
    context = attention_context(model.mha, q, k, v)
    torch.testing.assert_close(model.mha.out_proj(context), model(x))
    torch.testing.assert_close(norms["mha.out_proj"], context.reshape(-1, 8).norm(dim=0))


def test_every_row_loses_the_same_fraction_and_input_norm_decides():
    layer = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]]))
    x = torch.diag(torch.tensor([100.0, 1.0, 1.0, 1.0]))  # feature 0 is loud
    report = prune_(layer, 0.5, "wanda", x)
    assert report.layers == [{"fqn": "", "sparsity": 0.5, "pattern": "unstructured"}]
    assert (layer.weight != 0).tolist() == [[True, False, False, True], [True, True, False, False]]
    assert PruneMethod.WANDA.scope == "row" and "wanda" in PruneMethod.choices()


@pytest.mark.parametrize("build, data", [(tiny_vit, images), (tiny_gpt2, tokens), (tiny_llama, tokens)])
def test_transformers_rows_are_pruned_to_the_asked_sparsity(build, data):
    model = build()
    report = prune_(model, 0.5, "wanda", data())
    modules = dict(model.named_modules())
    for layer in report.layers:
        module = modules[layer["fqn"]]
        weight = module.in_proj_weight if isinstance(module, nn.MultiheadAttention) else module.weight
        rows = row_view(module, weight.detach())
        assert bool(((rows == 0).sum(1) == round(0.5 * rows.shape[1])).all()), layer["fqn"]
    assert report.achieved_sparsity == 0.5
    if build is tiny_llama:
        assert bool((model.lm_head.weight != 0).all())  # the untied head stays dense by default


def test_wanda_needs_data():
    with pytest.raises(ValueError, match="calibration data"):
        prune_(nn.Linear(4, 2), 0.5, "wanda")


def test_cli_wanda_on_a_vision_model(tmp_path):
    report = tmp_path / "r.json"
    result = CliRunner().invoke(main, ["prune", "zoo:mnist-mlp", "--data", "mnist:test", "--calib-size", "64",
                                       "--sparsity", "0.5", "--method", "wanda", "--out", str(tmp_path / "o.pt"),
                                       "--report", str(report)])
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["method"] == "wanda" and abs(data["results"][0]["achieved_sparsity"] - 0.5) < 0.005
    assert [la["fqn"] for la in data["results"][0]["layers"]] == ["features.fc1", "features.fc2", "classifier"]
