"""Reconstruction and OBS on attention layers (float64, tiny models built from configs, no download).

Packed ``nn.MultiheadAttention`` in_proj q/k/v rows and ``out_proj`` (torchvision ViT,
``nn.TransformerEncoderLayer`` sequence-first), HF GPT-2 ``Conv1D`` and LLaMA separate q/k/v
projections, and swin_t's ``F.linear`` sites. What is asserted is guaranteed:
- toward a dense copy of the model itself the refit is a fixed point (up to the damping);
- per layer, least squares with the current weights as prior never ends worse than those
  weights on the calibration rows; zeros stay zero; the packed layout is the same tensor;
- OBS reaches the asked sparsity over the selected layers and keeps an N:M pattern.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torchvision.models import VisionTransformer

from prune_repair import prune_
from prune_repair.engine.refit.reconstruct import reconstruct_
from prune_repair.engine.refit.shared_gram import SharedInputs

PARTS = ("in_proj:q", "in_proj:k", "in_proj:v")


class SeqFirst(nn.Module):
    """Two sequence-first ``nn.TransformerEncoderLayer`` on (T, N, D) tokens, then a head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.layers = nn.ModuleList(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0) for _ in range(2))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h)
        return self.head(h.mean(0))


def _randomized(model: nn.Module) -> nn.Module:
    """Every parameter drawn at random (zero-initialized heads, biases and tokens would leave targets zero)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return model.double().eval()


def _hf(kind: str) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    if kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=24, n_positions=16, n_embd=8, n_layer=2, n_head=2, bos_token_id=0,
                                         eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return transformers.GPT2LMHeadModel(config)
    config = transformers.LlamaConfig(vocab_size=24, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16,
                                      tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config)


def _case(name: str) -> tuple[nn.Module, object, list[str]]:
    """A float64 model, its calibration data, and the attention layers that must be refitted."""
    torch.manual_seed(0)
    if name == "vit":
        model = VisionTransformer(image_size=8, patch_size=4, num_layers=2, num_heads=2, hidden_dim=8, mlp_dim=16,
                                  num_classes=3)
        mha = [f"encoder.layers.encoder_layer_{i}.self_attention" for i in range(2)]
        return _randomized(model), torch.randn(48, 3, 8, 8, dtype=torch.float64), _attention(mha)
    if name == "seq-first":
        mha = [f"layers.{i}.self_attn" for i in range(2)]
        return _randomized(SeqFirst()), torch.randn(7, 24, 6, dtype=torch.float64), _attention(mha)
    ids = {"input_ids": torch.randint(0, 24, (24, 8), generator=torch.Generator().manual_seed(2))}
    if name == "gpt2":
        layers = [f"transformer.h.{i}.{p}" for i in range(2) for p in ("attn.c_attn", "attn.c_proj")]
    else:
        layers = [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkvo"]
    return _randomized(_hf(name)), ids, layers


def _attention(mha: list[str]) -> list[str]:
    return [f"{m}.{p}" for m in mha for p in (*PARTS, "out_proj")]


def _forward(model, batch):
    return model(**batch) if isinstance(batch, dict) else model(batch)


def _reconstruct(model, reference, data, **kw):
    forward_fn = (lambda m, b: m(**b)) if isinstance(data, dict) else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # under-determined / tied-weight notes are not what is tested here
        return reconstruct_(model, reference, data, forward_fn=forward_fn, **kw)


CASES = ["vit", "seq-first", "gpt2", "llama"]


@pytest.mark.parametrize("name", CASES)
def test_reconstruct_toward_the_model_itself_is_a_fixed_point(name):
    model, data, attention = _case(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = _reconstruct(model, copy.deepcopy(model), data, damping=1e-8)
    assert set(attention) <= {layer.fqn for layer in report.layers}
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=1e-5 * (1 + before[key].abs().max().item()))


def _prune_half_(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name and "wte" not in name and "wpe" not in name:
                p.mul_(torch.rand(p.shape, generator=g, dtype=p.dtype) > 0.5)


@pytest.mark.parametrize("name", CASES)
def test_after_pruning_every_attention_layer_is_refitted_and_its_error_never_grows(name):
    reference, data, attention = _case(name)
    model = copy.deepcopy(reference)
    _prune_half_(model)
    zeros = {k: v == 0 for k, v in model.state_dict().items() if v.dim() == 2}
    storage = {k: v.data_ptr() for k, v in model.state_dict().items()}
    report = _reconstruct(model, reference, data, damping=1e-8)
    by_name = {layer.fqn: layer for layer in report.layers}
    assert set(attention) <= set(by_name), f"not refitted: {set(attention) - set(by_name)}"
    for layer in report.layers:
        assert layer.error_after <= layer.error_before + 1e-9, layer
    assert any(by_name[f].error_after < by_name[f].error_before - 1e-3 for f in attention)
    for key, mask in zeros.items():
        assert bool((model.state_dict()[key][mask] == 0).all()), f"{key}: a pruned weight came back"
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == storage  # packed layout written in place


@pytest.mark.parametrize("name", ["vit", "llama"])
def test_layers_reading_the_same_input_share_one_gram(name, monkeypatch):
    model, data, _ = _case(name)
    reference = copy.deepcopy(model)
    _prune_half_(model)
    hits = []
    lookup = SharedInputs.lookup

    def counted(self, gram, x, mask):
        found = lookup(self, gram, x, mask)
        hits.append(found is not None)
        return found

    monkeypatch.setattr(SharedInputs, "lookup", counted)
    _reconstruct(model, reference, data)
    per_layer = 2 if name == "vit" else 3  # k, v reuse q's X^T X (and LLaMA's up reuses gate's)
    assert sum(hits) == 2 * per_layer


def test_swin_f_linear_sites_are_reconstructed():
    from torchvision.models import SwinTransformer
    torch.manual_seed(0)
    reference = _randomized(SwinTransformer(patch_size=[2, 2], embed_dim=8, depths=[2], num_heads=[2],
                                            window_size=[2, 2], num_classes=3))
    model = copy.deepcopy(reference)
    _prune_half_(model)
    report = _reconstruct(model, reference, torch.randn(16, 3, 8, 8, dtype=torch.float64), damping=1e-8)
    names = {layer.fqn for layer in report.layers}
    assert {f"features.1.{i}.attn.{p}" for i in range(2) for p in ("qkv", "proj")} <= names
    assert not report.skipped
    assert all(layer.error_after <= layer.error_before + 1e-9 for layer in report.layers)


def _vit_layers(model) -> dict[str, torch.Tensor]:
    out = {}
    for i in range(2):
        attn = model.encoder.layers[i].self_attention
        out[f"{i}.in_proj"], out[f"{i}.out_proj"] = attn.in_proj_weight, attn.out_proj.weight
    return out


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_obs_prunes_attention_projections_to_the_asked_sparsity(sparsity):
    model, data, attention = _case("vit")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no layer left dense
        report = prune_(model, sparsity, method="obs", data=data, skip_classifier=True)
    assert set(attention) <= set(report.per_layer)
    assert abs(report.achieved_sparsity - sparsity) <= 0.005
    counted = sum(int((p == 0).sum()) for p in _vit_layers(model).values())
    reported = sum(round(report.per_layer[f] * 64) for f in attention)
    assert counted == reported


def test_obs_keeps_an_n_m_pattern_on_attention_projections():
    model, data, attention = _case("vit")
    report = prune_(model, "2:4", method="obs", data=data)
    assert set(attention) <= set(report.per_layer) and report.pattern == "2:4"
    for name, weight in _vit_layers(model).items():
        groups = (weight != 0).reshape(weight.shape[0], -1, 4).sum(-1)
        assert int(groups.max()) <= 2, name


@pytest.mark.parametrize("passes", ["lockstep", "per-site", "blockwise"])
def test_every_pass_strategy_equals_the_inline_pass_on_attention_layers(passes):
    from prune_repair.prune.obs import obs_prune_
    reference, data, _ = _case("vit")
    pruned = copy.deepcopy(reference)
    _prune_half_(pruned)
    inline, split = copy.deepcopy(pruned), copy.deepcopy(pruned)
    _reconstruct(inline, reference, data)
    _reconstruct(split, reference, list(data.split(16)), passes=passes)
    for key, value in inline.state_dict().items():
        torch.testing.assert_close(split.state_dict()[key], value, rtol=0, atol=1e-9)
    inline, split = copy.deepcopy(reference), copy.deepcopy(reference)
    obs_prune_(inline, data, 0.6)
    obs_prune_(split, list(data.split(16)), 0.6, passes=passes)
    for key, value in inline.state_dict().items():
        torch.testing.assert_close(split.state_dict()[key], value, rtol=0, atol=1e-9)


def test_torch_prune_masks_on_attention_are_kept_and_the_weights_used_are_the_refitted_ones():
    reference, data, attention = _case("vit")
    model = copy.deepcopy(reference)
    prune_(model, 0.5, method="global-magnitude", style="torch")
    report = _reconstruct(model, reference, data, damping=1e-8)
    assert set(attention) <= {layer.fqn for layer in report.layers}
    for i in range(2):
        attn = model.encoder.layers[i].self_attention
        torch.testing.assert_close(attn.out_proj.weight, attn.out_proj.weight_orig * attn.out_proj.weight_mask)
    plain = copy.deepcopy(model)
    for module in plain.modules():
        for name in ("weight", "in_proj_weight"):
            if hasattr(module, name + "_mask"):
                torch.nn.utils.prune.remove(module, name)
    with torch.no_grad():
        torch.testing.assert_close(model(data), plain(data), rtol=0, atol=1e-12)
    assert all(layer.error_after <= layer.error_before + 1e-9 for layer in report.layers)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_obs_n_m_on_hf_projections_along_each_layers_input(name):
    from prune_repair.prune.obs import obs_prune_
    model, data, attention = _case(name)
    report = obs_prune_(model, data, "2:4", forward_fn=lambda m, b: m(**b))
    assert set(attention) <= {layer.fqn for layer in report.layers} and report.achieved_sparsity == 0.5
    for layer in report.layers:
        weight = model.get_submodule(layer.fqn).weight
        rows = weight.T if type(model.get_submodule(layer.fqn)).__name__ == "Conv1D" else weight
        assert int((rows != 0).reshape(rows.shape[0], -1, 4).sum(-1).max()) <= 2, layer.fqn


def test_attention_with_separate_qkv_weights_is_named_in_a_warning():
    class CrossAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, kdim=6, vdim=6, batch_first=True)
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            memory = x[..., :6]
            return self.fc(self.attn(x, memory, memory, need_weights=False)[0])

    model = CrossAttention()
    with pytest.warns(UserWarning, match=r"separate q/k/v weights .* only their out_proj: attn"):
        report = prune_(model, 0.5, data=torch.randn(4, 5, 8))
    assert {layer["fqn"] for layer in report.layers} == {"attn.out_proj", "fc"}
