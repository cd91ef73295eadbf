"""Silent failures of issue 9: HF Conv1D layers, tied embeddings, "0 sites", the classifier of
models with auxiliary heads, padding tokens in statistics."""

import copy
import warnings

import pytest
import torch
import torchvision
from torch import nn

from prune_repair import collect_stats, find_sites, repair_
from prune_repair.prune import find_targets, prune_


class Conv1D(nn.Module):
    """The HF GPT-2 layer, re-written: weight [in, out], y = x @ W + b."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) / nx ** 0.5)
        self.bias = nn.Parameter(torch.randn(nf))

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.weight).view(*x.shape[:-1], self.nf)


class TinyLM(nn.Module):
    """Embedding -> Conv1D -> GELU -> Conv1D -> tied lm_head; position-wise, so padding never
    changes the real tokens' activations."""

    def __init__(self, vocab=20, d=8):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.c_fc, self.c_proj = Conv1D(16, d), Conv1D(d, 16)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, input_ids, attention_mask=None):
        h = self.wte(input_ids)
        return self.lm_head(h + self.c_proj(nn.functional.gelu(self.c_fc(h))))


def tokens(n=6, t=10, pad_to=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, t + 1, (n,), generator=g)
    width = pad_to or t
    ids = nn.functional.pad(torch.randint(1, 20, (n, t), generator=g), (0, width - t))  # same tokens, more padding
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


def lm():
    torch.manual_seed(0)
    return TinyLM().double().eval()


def test_conv1d_layers_are_sites_with_channels_on_the_last_dim():
    sites = find_sites(lm(), tokens())
    assert [(s.fqn, s.channels, s.channel_dim) for s in sites] == [("c_fc", 16, -1), ("c_proj", 8, -1)]


def test_conv1d_exact_repair_folds_into_weight_columns():
    model, batch = lm(), tokens()
    ref = collect_stats(model, batch)
    with torch.no_grad():
        model.c_fc.weight.mul_((torch.rand_like(model.c_fc.weight) > 0.5).double() * 2.5)
    zeros = model.c_fc.weight == 0
    repair_(model, ref, batch, repair="repair")
    after = collect_stats(model, batch)
    for fqn in ref:
        torch.testing.assert_close(after[fqn].std, ref[fqn].std, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(after[fqn].mean, ref[fqn].mean, atol=1e-10, rtol=0)
    assert bool((model.c_fc.weight[zeros] == 0).all()) and model.c_fc.weight.shape == (8, 16)


def test_tied_weight_is_not_pruned_unless_asked():
    model = lm()
    with pytest.warns(UserWarning, match=r"tied weight.*lm_head\.weight = wte\.weight"):
        names = [t.fqn for t in find_targets(model)]
    assert names == ["c_fc", "c_proj"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "lm_head" in [t.fqn for t in find_targets(model, include_tied=True)]
    embedding = model.wte.weight.clone()
    with pytest.warns(UserWarning, match="tied"):
        prune_(model, 0.9)
    assert torch.equal(model.wte.weight, embedding)


def test_no_site_is_an_error_with_the_fix():
    with pytest.raises(ValueError, match="found no site.*include_classifier=True"):
        find_sites(nn.Sequential(nn.Linear(4, 2)), torch.randn(3, 4))
    with pytest.raises(ValueError, match="found no site"):
        collect_stats(nn.Sequential(nn.ReLU()), torch.randn(3, 4))
    with pytest.raises(ValueError, match="selection 'nope' matches no site"):
        collect_stats(lm(), tokens(), select="nope")


def test_padding_is_excluded_from_statistics():
    model = lm()
    short, long = tokens(pad_to=16), tokens(pad_to=64)
    a, b = collect_stats(model, short), collect_stats(model, long)
    for fqn in a:
        assert a[fqn].count == b[fqn].count == int(short["attention_mask"].sum())
        torch.testing.assert_close(a[fqn].mean, b[fqn].mean, atol=1e-12, rtol=0)
        torch.testing.assert_close(a[fqn].std, b[fqn].std, atol=1e-12, rtol=0)
    unmasked = collect_stats(model, {"input_ids": long["input_ids"]})
    assert not torch.allclose(unmasked["c_fc"].mean, b["c_fc"].mean)


def test_repair_measures_without_padding():
    model, ref_batch, batch = lm(), tokens(pad_to=16), tokens(pad_to=64)
    ref = collect_stats(model, ref_batch)
    with torch.no_grad():
        model.c_fc.weight.mul_(3.0)
    repair_(model, ref, batch, repair="repair")
    after = collect_stats(model, ref_batch)
    torch.testing.assert_close(after["c_fc"].std, ref["c_fc"].std, atol=1e-10, rtol=1e-10)


def test_googlenet_classifier_is_fc_not_an_auxiliary_head():
    model = torchvision.models.googlenet(num_classes=10, aux_logits=True, init_weights=False).eval()
    x = torch.randn(2, 3, 64, 64)
    names = [t.fqn for t in find_targets(model, skip_classifier=True, example_inputs=x)]
    assert "fc" not in names and "aux2.fc2" in names and "aux1.fc2" in names
    assert "fc" not in [s.producer for s in find_sites(model, x)]


transformers = pytest.importorskip("transformers", reason="the transformers extra is not installed")


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=20, n_positions=64, n_embd=16, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).double().eval()


def test_gpt2_conv1d_sites_exact_repair_and_tied_head():
    from transformers.pytorch_utils import Conv1D as HFConv1D

    model, batch = gpt2(), tokens(pad_to=16)
    sites = find_sites(model, batch)
    assert [s.fqn for s in sites][:4] == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
                                          "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]
    assert isinstance(model.get_submodule(sites[0].fqn), HFConv1D) and sites[0].channels == 48
    with pytest.warns(UserWarning, match="tied"):
        names = [t.fqn for t in find_targets(model)]
    assert "lm_head" not in names and len(names) == 8
    ref = collect_stats(model, batch)
    pruned = copy.deepcopy(model)
    report = prune_(pruned, 0.5)  # a language model's head (here tied) is left out by default, without a warning
    assert "lm_head" not in {layer["fqn"] for layer in report.layers}
    assert torch.equal(pruned.transformer.wte.weight, model.transformer.wte.weight)
    repair_(pruned, ref, tokens(pad_to=32), repair="repair")
    after = collect_stats(pruned, batch)
    for fqn in ref:
        torch.testing.assert_close(after[fqn].std, ref[fqn].std, atol=1e-10, rtol=1e-10)
