"""Whole attention heads removed (LLaMA-style attention, MHA and grouped-query)."""

from __future__ import annotations

import copy

import pytest
import torch

from prune_repair.prune import PruneError
from prune_repair.prune.structured_mlp import prune_mlps_
from prune_repair.prune.structured_run import structured_prune
from prune_repair.zoo.models import TokenMLP

transformers = pytest.importorskip("transformers")


def llama(heads: int, kv: int) -> torch.nn.Module:
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=heads, num_key_value_heads=kv, vocab_size=64,
                                      max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def tokens(n: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(0, 64, (n, 16), generator=g), "attention_mask": torch.ones(n, 16, dtype=torch.long)}


@pytest.mark.parametrize("heads,kv,left", [(4, 4, (2, 2)), (4, 2, (2, 1))])
def test_heads_shrink_and_reload(heads, kv, left, tmp_path):
    dense, batch = llama(heads, kv), tokens()
    model = copy.deepcopy(dense)
    result = prune_mlps_(model, dense, batch, 0.25, heads=0.5)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == left
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.out_features == attn.o_proj.in_features == left[0] * 8
    assert attn.k_proj.out_features == left[1] * 8 and model.config.intermediate_size == 48
    assert [r["kind"] for r in result.layers] == ["heads", "mlp"] * 2
    model.save_pretrained(tmp_path)
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits)


@pytest.mark.parametrize("damping", [0.0, 1e-2, 1.0])
def test_heads_refit_never_worse_than_dropping(damping):
    dense, batch = llama(4, 4).double(), tokens(16)
    refit, dropped = copy.deepcopy(dense), copy.deepcopy(dense)
    result = prune_mlps_(refit, dense, batch, 0.0, heads=0.5, damping=damping)
    prune_mlps_(dropped, dense, batch, 0.0, heads=0.5, refit="none", kept=result.kept)
    first = result.layers[0]
    assert first["kind"] == "heads" and first["error"] <= first["error_dropped"] + 1e-12


def test_heads_that_do_not_divide_are_refused():
    dense = llama(4, 2)
    with pytest.raises(PruneError, match="removes 0.6 of the 2 key/value groups"):
        prune_mlps_(copy.deepcopy(dense), dense, tokens(), 0.0, heads=0.3)
    with pytest.raises(PruneError, match="outside \\[0, 1\\)"):
        prune_mlps_(copy.deepcopy(dense), dense, tokens(), 0.0, heads=1.0)


def test_heads_on_models_without_llama_attention_are_refused():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=64)).eval()
    with pytest.raises(PruneError, match="LLaMA-style attention"):
        prune_mlps_(copy.deepcopy(gpt2), gpt2, tokens(), 0.25, heads=0.5)
    model = TokenMLP(dim=8, depth=1).eval()
    with pytest.raises(PruneError, match="HF models"):
        structured_prune(model, torch.randn(4, 1, 28, 28), 0.25, heads=0.5)
