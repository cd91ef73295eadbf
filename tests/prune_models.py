"""Tiny models for the N:M / Wanda / sparsity-config tests, built without any download."""

from __future__ import annotations

import torch
from torch import nn

VOCAB = 32


def tiny_vit() -> nn.Module:
    """torchvision ViT: conv_proj (Conv2d, 48 inputs per row), packed MHA in_proj, MLP linears, head."""
    from torchvision.models import VisionTransformer
    torch.manual_seed(0)
    model = VisionTransformer(image_size=16, patch_size=4, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16,
                              num_classes=4).eval()
    nn.init.normal_(model.heads.head.weight, std=0.3)  # torchvision starts it at zero: a trained head is not
    return model


def tiny_gpt2() -> nn.Module:
    """GPT-2: HF Conv1D layers, lm_head tied to the token embedding."""
    import transformers as T
    torch.manual_seed(0)
    config = T.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=1, n_head=2, bos_token_id=0,
                          eos_token_id=0, pad_token_id=0)
    return T.GPT2LMHeadModel(config).eval()


def tiny_llama() -> nn.Module:
    """LLaMA: bias-free projections, an untied lm_head."""
    import transformers as T
    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16,
                           bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=False)
    return T.LlamaForCausalLM(config).eval()


def tokens(n: int = 8, t: int = 10, seed: int = 0) -> dict[str, torch.Tensor]:
    """A padded token batch: ``input_ids`` and a right-padded ``attention_mask``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, t), generator=g)
    lengths = torch.randint(3, t + 1, (n,), generator=g)
    mask = (torch.arange(t)[None] < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


def images(n: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
