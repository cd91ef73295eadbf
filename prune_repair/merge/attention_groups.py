"""Permutation groups of transformers: heads as units, the residual stream, MLP hidden units.

The dependency graph cannot see that attention's channels come in heads, so transformer
groups are read from the model's blocks, then checked like any traced group (a random
permutation of every group must leave the output unchanged, see
:func:`~prune_repair.merge.find_groups.find_groups`):

- the residual stream: the patch/token embedding, class token and positional embedding,
  every LayerNorm/RMSNorm weight and bias, the input columns of every block's q/k/v and
  MLP input projection and the rows of its attention-output and MLP-output projection,
  the final norm and the classifier's input columns: one group;
- per attention, two head groups tied together (:mod:`.heads`): the q and k rows of each
  head, and the v rows with the out-projection's input columns; heads move as units, and
  the dims inside a head may be permuted too (never with rotary embeddings);
- per block, the MLP hidden units.

Supported: torchvision ``VisionTransformer`` (subclasses included) and Swin v1
(:mod:`.swin_groups`), HF GPT-2 (``Conv1D``) and
LLaMA (bias-free, RMSNorm, rotary: whole heads only, grouped-query attention) and BERT
(separate q/k/v linears, post-LayerNorm); see :data:`SUPPORTED`.

Example:
    >>> import torch
    >>> from torchvision.models import VisionTransformer
    >>> vit = VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16)
    >>> [(g.name, g.size, g.head_size) for g in transformer_groups(vit)]  # doctest: +NORMALIZE_WHITESPACE
    [('residual', 8, None), ('encoder.layers.encoder_layer_0.self_attention:qk', 8, 4),
     ('encoder.layers.encoder_layer_0.self_attention:vo', 8, 4), ('encoder.layers.encoder_layer_0.mlp', 16, None)]
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .groups import Axis, GroupError, PermGroup

SUPPORTED = "torchvision VisionTransformer and Swin (v1), HF GPT-2, LLaMA and BERT"
"""The transformers whose head-aware groups are built here (named in refusals)."""


def _block(key: str, dim: int, channels: int, offset: int = 0) -> Axis:
    return Axis.block(key, dim, channels, 1, offset)


def _vit_attention(name: str, mha: nn.MultiheadAttention, inner: bool) -> list[PermGroup]:
    """The tied q/k and v/out head groups of one torchvision ``MultiheadAttention``."""
    e, h = mha.embed_dim, mha.num_heads
    if not mha._qkv_same_embed_dim or mha.in_proj_weight is None:
        raise GroupError(f"attention '{name}' has separate q/k/v weights of different widths: head groups are "
                         "built for a packed in_proj_weight; align='none'")
    if mha.bias_k is not None or mha.add_zero_attn:
        raise GroupError(f"attention '{name}' adds learned key/value biases (add_bias_kv) or zero attention, "
                         "which head groups do not cover: align='none'")
    w, b = f"{name}.in_proj_weight", f"{name}.in_proj_bias"
    biased = mha.in_proj_bias is not None
    qk = [_block(w, 0, e, 0), _block(w, 0, e, e)] + ([_block(b, 0, e, 0), _block(b, 0, e, e)] if biased else [])
    vo = [_block(w, 0, e, 2 * e)] + ([_block(b, 0, e, 2 * e)] if biased else []) + [
        _block(f"{name}.out_proj.weight", 1, e)]
    d = e // h
    return [PermGroup(f"{name}:qk", qk, head_size=d, tie=name, inner=inner),
            PermGroup(f"{name}:vo", vo, head_size=d, tie=name, inner=inner)]


def vit_groups(model: nn.Module, *, inner: bool = True) -> list[PermGroup]:
    """Groups of a torchvision ``VisionTransformer`` (``inner``: also permute the dims inside heads)."""
    e = model.hidden_dim
    stream = [_block("conv_proj.weight", 0, e), _block("class_token", 2, e),
              _block("encoder.pos_embedding", 2, e)]
    if model.conv_proj.bias is not None:
        stream.insert(1, _block("conv_proj.bias", 0, e))
    blocks: list[PermGroup] = []
    for name, layer in model.encoder.layers.named_children():
        p = f"encoder.layers.{name}"
        stream += [_block(f"{p}.ln_1.weight", 0, e), _block(f"{p}.ln_1.bias", 0, e),
                   _block(f"{p}.self_attention.in_proj_weight", 1, e),
                   _block(f"{p}.self_attention.out_proj.weight", 0, e),
                   _block(f"{p}.self_attention.out_proj.bias", 0, e),
                   _block(f"{p}.ln_2.weight", 0, e), _block(f"{p}.ln_2.bias", 0, e),
                   _block(f"{p}.mlp.0.weight", 1, e), _block(f"{p}.mlp.3.weight", 0, e),
                   _block(f"{p}.mlp.3.bias", 0, e)]
        hidden = layer.mlp[0].out_features
        blocks += _vit_attention(f"{p}.self_attention", layer.self_attention, inner)
        blocks.append(PermGroup(f"{p}.mlp", [_block(f"{p}.mlp.0.weight", 0, hidden),
                                             _block(f"{p}.mlp.0.bias", 0, hidden),
                                             _block(f"{p}.mlp.3.weight", 1, hidden)]))
    stream += [_block("encoder.ln.weight", 0, e), _block("encoder.ln.bias", 0, e)]
    heads = dict(model.heads.named_children())
    if "pre_logits" in heads:
        rep = heads["pre_logits"].out_features
        stream.append(_block("heads.pre_logits.weight", 1, e))
        blocks.append(PermGroup("heads.pre_logits", [_block("heads.pre_logits.weight", 0, rep),
                                                     _block("heads.pre_logits.bias", 0, rep),
                                                     _block("heads.head.weight", 1, rep)]))
    else:
        stream.append(_block("heads.head.weight", 1, e))
    return [PermGroup("residual", stream)] + blocks


def _maybe(state: dict, key: str, dim: int, channels: int, block: int = 1) -> list[Axis]:
    """``[Axis]`` for ``key`` when the model has it (optional biases), else ``[]``."""
    return [Axis.block(key, dim, channels, block)] if key in state else []


def _grouped(key: str, dim: int, kv_heads: int, per_kv: int, d: int) -> Axis:
    """Channel ``(h, i)`` (kv head h, dim i) owns dim i of each of the ``per_kv`` query heads
    of kv head h (grouped-query attention; one position when ``per_kv`` is 1)."""
    import torch

    h, j, i = torch.meshgrid(torch.arange(kv_heads), torch.arange(per_kv), torch.arange(d), indexing="ij")
    index = ((h * per_kv + j) * d + i).permute(0, 2, 1).reshape(kv_heads * d, per_kv)
    return Axis(key, dim, index)


def gpt2_groups(model: nn.Module, *, inner: bool = True) -> list[PermGroup]:
    """Groups of an HF GPT-2 (``Conv1D`` layers: weights ``[in, out]``; ``c_attn`` holds q, k, v)."""
    base = "transformer." if hasattr(model, "transformer") else ""
    core, state = model.transformer if base else model, model.state_dict()
    e, h = core.config.n_embd, core.config.n_head
    stream = [Axis.block(f"{base}wte.weight", 1, e), Axis.block(f"{base}wpe.weight", 1, e)]
    blocks: list[PermGroup] = []
    for i in range(len(core.h)):
        p = f"{base}h.{i}"
        stream += [Axis.block(f"{p}.{k}", 0, e) for k in ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight",
                                                           "attn.c_proj.bias", "ln_2.weight", "ln_2.bias",
                                                           "mlp.c_fc.weight", "mlp.c_proj.bias")]
        stream += [Axis.block(f"{p}.attn.c_proj.weight", 1, e), Axis.block(f"{p}.mlp.c_proj.weight", 1, e)]
        w, b = f"{p}.attn.c_attn.weight", f"{p}.attn.c_attn.bias"
        qk = [_block(w, 1, e, 0), _block(w, 1, e, e), _block(b, 0, e, 0), _block(b, 0, e, e)]
        vo = [_block(w, 1, e, 2 * e), _block(b, 0, e, 2 * e), _block(f"{p}.attn.c_proj.weight", 0, e)]
        blocks += [PermGroup(f"{p}.attn:qk", qk, head_size=e // h, tie=f"{p}.attn", inner=inner),
                   PermGroup(f"{p}.attn:vo", vo, head_size=e // h, tie=f"{p}.attn", inner=inner)]
        hidden = state[f"{p}.mlp.c_fc.weight"].shape[1]
        blocks.append(PermGroup(f"{p}.mlp", [Axis.block(f"{p}.mlp.c_fc.weight", 1, hidden),
                                             Axis.block(f"{p}.mlp.c_fc.bias", 0, hidden),
                                             Axis.block(f"{p}.mlp.c_proj.weight", 0, hidden)]))
    stream += [Axis.block(f"{base}ln_f.weight", 0, e), Axis.block(f"{base}ln_f.bias", 0, e)]
    stream += _maybe(state, "lm_head.weight", 1, e)
    return [PermGroup("residual", stream)] + blocks


def llama_groups(model: nn.Module) -> list[PermGroup]:
    """Groups of an HF LLaMA (bias-free linears, RMSNorm, rotary embeddings: whole heads only;
    grouped-query attention: the query heads of one kv head move with it)."""
    base = "model." if hasattr(model, "model") else ""
    core, state, cfg = model.model if base else model, model.state_dict(), model.config
    e, heads = cfg.hidden_size, cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    d = getattr(cfg, "head_dim", None) or e // heads
    stream = [Axis.block(f"{base}embed_tokens.weight", 1, e)]
    blocks: list[PermGroup] = []
    for i in range(len(core.layers)):
        p = f"{base}layers.{i}"
        a, m = f"{p}.self_attn", f"{p}.mlp"
        stream += [Axis.block(f"{p}.{k}", 1, e) for k in ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                                           "self_attn.v_proj.weight", "mlp.gate_proj.weight",
                                                           "mlp.up_proj.weight")]
        stream += [Axis.block(f"{p}.{k}", 0, e) for k in ("input_layernorm.weight", "post_attention_layernorm.weight",
                                                           "self_attn.o_proj.weight", "mlp.down_proj.weight")]
        stream += _maybe(state, f"{a}.o_proj.bias", 0, e) + _maybe(state, f"{m}.down_proj.bias", 0, e)
        qk = [_grouped(f"{a}.q_proj.weight", 0, kv, heads // kv, d), Axis.block(f"{a}.k_proj.weight", 0, kv * d)]
        vo = [Axis.block(f"{a}.v_proj.weight", 0, kv * d), _grouped(f"{a}.o_proj.weight", 1, kv, heads // kv, d)]
        if f"{a}.q_proj.bias" in state:
            qk += [_grouped(f"{a}.q_proj.bias", 0, kv, heads // kv, d), Axis.block(f"{a}.k_proj.bias", 0, kv * d)]
            vo += [Axis.block(f"{a}.v_proj.bias", 0, kv * d)]
        blocks += [PermGroup(f"{a}:qk", qk, head_size=d, tie=a, inner=False),  # rotary pairs: whole heads only
                   PermGroup(f"{a}:vo", vo, head_size=d, tie=a, inner=False)]
        hidden = state[f"{m}.up_proj.weight"].shape[0]
        blocks.append(PermGroup(m, [Axis.block(f"{m}.gate_proj.weight", 0, hidden),
                                    Axis.block(f"{m}.up_proj.weight", 0, hidden),
                                    Axis.block(f"{m}.down_proj.weight", 1, hidden)]
                                + _maybe(state, f"{m}.gate_proj.bias", 0, hidden)
                                + _maybe(state, f"{m}.up_proj.bias", 0, hidden)))
    stream += [Axis.block(f"{base}norm.weight", 0, e)] + _maybe(state, "lm_head.weight", 1, e)
    return [PermGroup("residual", stream)] + blocks


def _linear_heads(q: str, k: str, v: str, o: str, state: dict, e: int, d: int, tie: str,
                  inner: bool) -> list[PermGroup]:
    """Tied q/k and v/o head groups of attention with separate ``nn.Linear`` projections."""
    qk = [Axis.block(f"{q}.weight", 0, e), Axis.block(f"{k}.weight", 0, e)]
    qk += _maybe(state, f"{q}.bias", 0, e) + _maybe(state, f"{k}.bias", 0, e)
    vo = [Axis.block(f"{v}.weight", 0, e)] + _maybe(state, f"{v}.bias", 0, e) + [Axis.block(f"{o}.weight", 1, e)]
    return [PermGroup(f"{tie}:qk", qk, head_size=d, tie=tie, inner=inner),
            PermGroup(f"{tie}:vo", vo, head_size=d, tie=tie, inner=inner)]


def bert_groups(model: nn.Module, *, inner: bool = True) -> list[PermGroup]:
    """Groups of an HF BERT (post-LayerNorm blocks; the pooler's units are a group of their own)."""
    base = "bert." if hasattr(model, "bert") else ""
    core, state, cfg = model.bert if base else model, model.state_dict(), model.config
    e, d = cfg.hidden_size, cfg.hidden_size // cfg.num_attention_heads
    emb = f"{base}embeddings"
    stream = [Axis.block(f"{emb}.{k}_embeddings.weight", 1, e) for k in ("word", "position", "token_type")]
    stream += [Axis.block(f"{emb}.LayerNorm.{k}", 0, e) for k in ("weight", "bias")]
    blocks: list[PermGroup] = []
    for i in range(len(core.encoder.layer)):
        p = f"{base}encoder.layer.{i}"
        a, o = f"{p}.attention.self", f"{p}.attention.output"
        stream += [Axis.block(f"{a}.{k}.weight", 1, e) for k in ("query", "key", "value")]
        stream += [Axis.block(f"{o}.dense.{k}", 0, e) for k in ("weight", "bias")]
        stream += [Axis.block(f"{o}.LayerNorm.{k}", 0, e) for k in ("weight", "bias")]
        stream += [Axis.block(f"{p}.intermediate.dense.weight", 1, e)]
        stream += [Axis.block(f"{p}.output.{k}", 0, e) for k in ("dense.weight", "dense.bias", "LayerNorm.weight",
                                                                  "LayerNorm.bias")]
        blocks += _linear_heads(f"{a}.query", f"{a}.key", f"{a}.value", f"{o}.dense", state, e, d,
                                f"{p}.attention", inner)
        hidden = state[f"{p}.intermediate.dense.weight"].shape[0]
        blocks.append(PermGroup(f"{p}.mlp", [Axis.block(f"{p}.intermediate.dense.weight", 0, hidden),
                                             Axis.block(f"{p}.intermediate.dense.bias", 0, hidden),
                                             Axis.block(f"{p}.output.dense.weight", 1, hidden)]))
    if f"{base}pooler.dense.weight" in state:
        stream.append(Axis.block(f"{base}pooler.dense.weight", 1, e))
        pooler = [Axis.block(f"{base}pooler.dense.weight", 0, e), Axis.block(f"{base}pooler.dense.bias", 0, e)]
        blocks.append(PermGroup(f"{base}pooler", pooler + _maybe(state, "classifier.weight", 1, e)))
    return [PermGroup("residual", stream)] + blocks


def transformer_groups(model: nn.Module, *, inner: bool = True) -> list[PermGroup] | None:
    """Head-aware groups of a supported transformer, or None when ``model`` is not one (the
    caller then traces the graph, which refuses attention in one line); an HF model with
    attention heads of another family is refused here."""
    from torchvision.models.swin_transformer import SwinTransformer
    from torchvision.models.vision_transformer import VisionTransformer

    from .swin_groups import swin_groups

    if isinstance(model, VisionTransformer):
        return vit_groups(model, inner=inner)
    if isinstance(model, SwinTransformer):
        return swin_groups(model, inner=inner)
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind == "gpt2" and type(model).__name__ in ("GPT2Model", "GPT2LMHeadModel"):
        return gpt2_groups(model, inner=inner)
    if kind == "llama" and type(model).__name__ in ("LlamaModel", "LlamaForCausalLM"):
        return llama_groups(model)
    if kind == "bert" and type(model).__name__ in ("BertModel", "BertForSequenceClassification"):
        return bert_groups(model, inner=inner)
    if kind is not None and any(getattr(config, k, None) for k in ("num_attention_heads", "n_head", "num_heads")):
        raise GroupError(f"{type(model).__name__} ({kind}) is an HF model whose head-aware permutation groups are "
                         f"not built here (only {SUPPORTED}): use align='none'")
    return None


def check_same_heads(models: Sequence[nn.Module], names: Sequence[str]) -> None:
    """Raise ``ValueError`` naming the first attention whose head count differs between models
    (same weight shapes, different heads: the heads would not line up)."""
    configs = [getattr(m, "config", None) for m in models]
    for key in ("n_head", "num_attention_heads", "num_key_value_heads"):
        counts = [getattr(c, key, None) for c in configs]
        for c, name in zip(counts[1:], names[1:]):
            if c != counts[0]:
                raise ValueError(f"the configs set {key}={counts[0]} in {names[0]} and {c} in {name}: merge models "
                                 "with the same heads")
    first = {n: getattr(m, "num_heads", None) for n, m in models[0].named_modules()
             if isinstance(m, nn.MultiheadAttention)}
    for model, name in zip(models[1:], names[1:]):
        for n, m in model.named_modules():
            if n in first and getattr(m, "num_heads", None) != first[n]:
                raise ValueError(f"attention '{n}' has {first[n]} heads in {names[0]} and {m.num_heads} in {name}: "
                                 "merge models with the same heads")
