"""Head-aware permutation groups of HF GPT-2 (Conv1D), LLaMA (RMSNorm, rotary, grouped-query
attention) and BERT (separate q/k/v, post-LayerNorm): a permuted copy is recovered exactly by
weight and by activation matching and merges back to the model at every alpha; padded tokens
are left out of the matching."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from prune_repair.merge import activation_matching, find_groups, invert, permute, prepare_merge  # noqa: E402
from prune_repair.merge import random_perms, weight_matching  # noqa: E402

VOCAB = 50
COMMON = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=0)


def gpt2(seed, heads=4):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_positions=32, n_embd=16, n_layer=2, n_head=heads, **COMMON)
    return transformers.GPT2LMHeadModel(config).double().eval()


def llama(seed, heads=4):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=heads, num_key_value_heads=heads // 2, max_position_embeddings=32,
                                      **COMMON)
    return transformers.LlamaForCausalLM(config).double().eval()


def tokens(seed=0, n=12, t=10, junk=None):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, t), generator=g)
    lengths = torch.randint(3, t + 1, (n,), generator=g)
    mask = (torch.arange(t)[None] < lengths[:, None]).long()
    fill = torch.randint(1, VOCAB, (n, t), generator=torch.Generator().manual_seed(junk)) if junk is not None else 0
    return {"input_ids": ids * mask + fill * (1 - mask), "attention_mask": mask}


def bert(seed, heads=4):
    torch.manual_seed(seed)
    config = transformers.BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=heads,
                                     intermediate_size=32, max_position_embeddings=32, num_labels=3,
                                     vocab_size=VOCAB, pad_token_id=0)
    return transformers.BertForSequenceClassification(config).double().eval()


# LLaMA's RMSNorm normalizes in float32 whatever the model's dtype: outputs agree to float32 rounding
OUTPUT_TOL = {"gpt2": 1e-10, "llama": 1e-5, "bert": 1e-10}


@pytest.mark.parametrize("name, build", [("gpt2", gpt2), ("llama", llama), ("bert", bert)])
@pytest.mark.parametrize("align", ["weight", "activation"])
def test_a_permuted_copy_is_recovered_and_merges_back_at_every_alpha(name, build, align):
    a, x = build(0), tokens()
    groups = find_groups(a, x)
    perms = random_perms(groups, torch.Generator().manual_seed(5))
    b = permute(a, groups, perms)
    al = weight_matching(a, b, groups) if align == "weight" else activation_matching(a, b, x, groups)
    for g in groups:
        assert torch.equal(al.perms[g.name], invert(perms[g.name])), g.name
    plan = prepare_merge([a, b], x, align=align)
    ref = a(**x).logits  # (BERT: the padding mask keeps padded tokens out of the real ones)
    for alpha in (0.0, 0.3, 0.5, 1.0):
        merged, _ = plan.merged([1 - alpha, alpha], repair="none")
        for key, value in a.state_dict().items():
            torch.testing.assert_close(merged.state_dict()[key], value, atol=1e-15, rtol=1e-15)
        tol = OUTPUT_TOL[name]
        torch.testing.assert_close(merged(**x).logits, ref, atol=tol, rtol=tol)


def test_llama_heads_move_whole_with_their_kv_head_and_never_inside():
    groups = find_groups(llama(0), tokens())
    qk = next(g for g in groups if g.name.endswith("layers.0.self_attn:qk"))
    assert not qk.inner and qk.size == 2 * 4 and qk.axes[0].index.shape == (8, 2)  # 2 query heads per kv head
    p = random_perms(groups, torch.Generator().manual_seed(0))[qk.name].view(2, 4)
    assert torch.equal(p, torch.tensor([[4, 5, 6, 7], [0, 1, 2, 3]]))


def test_padded_tokens_do_not_enter_activation_matching():
    a, b = gpt2(0), gpt2(1)
    x1, x2 = tokens(junk=1), tokens(junk=2)
    assert not torch.equal(x1["input_ids"], x2["input_ids"])
    groups = find_groups(a, x1)
    p1, p2 = activation_matching(a, b, x1, groups).perms, activation_matching(a, b, x2, groups).perms
    assert all(torch.equal(p1[k], p2[k]) for k in p1)


@pytest.mark.parametrize("build", [gpt2, llama, bert])
def test_models_whose_configs_set_other_head_counts_are_refused(build):
    with pytest.raises(ValueError, match=r"_heads?=4 in .* and 2 in .*same heads") as err:
        prepare_merge([build(0, heads=4), build(1, heads=2)], tokens(), align="weight")
    assert "\n" not in str(err.value)


def test_other_hf_attention_is_refused_in_one_line_and_hf_cnns_go_on_to_tracing():
    from prune_repair.merge import GroupError, transformer_groups

    resnet = transformers.ResNetForImageClassification(transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3))
    assert transformer_groups(resnet) is None
    vit = transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
    with pytest.raises(GroupError, match=r"ViTForImageClassification \(vit\) is an HF model whose head-aware") as err:
        transformer_groups(vit)
    assert "\n" not in str(err.value)
