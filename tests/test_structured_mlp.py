"""Structured MLP pruning (prune_mlps_): shapes, saved outputs, ratio 0, the refit's guarantee."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision

from prune_repair.prune import PruneError
from prune_repair.prune.mlp_units import find_mlps
from prune_repair.prune.structured import load_structured_, save_structured
from prune_repair.prune.structured_mlp import prune_mlps_
from prune_repair.zoo.models import PlainCNN, TokenMLP

transformers = pytest.importorskip("transformers")


def tiny_vit() -> torch.nn.Module:
    return torchvision.models.VisionTransformer(image_size=28, patch_size=7, num_layers=2, num_heads=2,
                                                hidden_dim=16, mlp_dim=32, num_classes=10).eval()


def tiny_lm(kind: str) -> torch.nn.Module:
    if kind == "gpt2":
        config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32)
        return transformers.GPT2LMHeadModel(config).eval()
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(config).eval()


def tokens(n: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 64, (n, 16), generator=g), "attention_mask": torch.ones(n, 16, dtype=torch.long)}


@pytest.mark.parametrize("kind,key,width", [("gpt2", "n_inner", 128), ("llama", "intermediate_size", 64)])
def test_hf_lm_shrinks_and_reloads(kind, key, width, tmp_path):
    torch.manual_seed(0)
    dense = tiny_lm(kind)
    model, batch = copy.deepcopy(dense), tokens()
    result = prune_mlps_(model, dense, batch, 0.25)
    assert result.config_key == key and getattr(model.config, key) == width * 3 // 4
    assert [r["kept"] for r in result.layers] == [width * 3 // 4] * 2
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in dense.parameters())
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits)


def test_vit_save_structured_reloads(tmp_path):
    torch.manual_seed(0)
    dense, x = tiny_vit(), torch.randn(16, 3, 28, 28)
    model = copy.deepcopy(dense)
    result = prune_mlps_(model, dense, x, 0.5)
    assert model.encoder.layers[0].mlp[0].out_features == 16 and model.encoder.layers[1].mlp[3].in_features == 16
    save_structured(model, tmp_path / "vit.pt", result.history, x[:1])
    loaded = load_structured_(tmp_path / "vit.pt", tiny_vit())
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_ratio_zero_changes_nothing():
    torch.manual_seed(0)
    dense = tiny_lm("llama")
    model = copy.deepcopy(dense)
    prune_mlps_(model, dense, tokens(), 0.0)
    for (name, a), b in zip(dense.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


def _consumer_error(model, dense, x) -> float:
    """||fc2(model) - fc2(dense)|| of the first block on ``x`` (measured by running both)."""
    seen = []
    hooks = [m.blocks[0].fc2.register_forward_hook(lambda _m, _i, out: seen.append(out)) for m in (model, dense)]
    with torch.no_grad():
        model(x), dense(x)
    for h in hooks:
        h.remove()
    return float((seen[0] - seen[1]).norm())


@pytest.mark.parametrize("seed,damping", [(0, 0.0), (1, 1e-2), (2, 1.0), (3, 1e-2)])
def test_ridge_never_worse_than_dropping(seed, damping):
    """The ridge pulls toward the kept weights, so the drop is a candidate with no penalty: at
    any damping the first block's consumer output error cannot exceed the plain drop's."""
    torch.manual_seed(seed)
    dense = TokenMLP(dim=8, depth=1).double().eval()
    x = torch.randn(128, 1, 28, 28, dtype=torch.float64)
    refit, dropped = copy.deepcopy(dense), copy.deepcopy(dense)
    result = prune_mlps_(refit, dense, x, 0.5, damping=damping)
    prune_mlps_(dropped, dense, x, 0.5, refit="none", kept={"blocks.0": result.kept["blocks.0"]})
    assert _consumer_error(refit, dense, x) <= _consumer_error(dropped, dense, x) * (1 + 1e-9)
    row = result.layers[0]
    assert row["error"] <= row["error_dropped"] + 1e-12


def test_bias_fold_keeps_the_mean_output():
    """FLAP's compensation: the consumer's mean output on the calibration data is the dense one."""
    torch.manual_seed(0)
    dense = TokenMLP(dim=8, depth=1).double().eval()
    x = torch.randn(64, 1, 28, 28, dtype=torch.float64)
    model = copy.deepcopy(dense)
    prune_mlps_(model, dense, x, 0.5, refit="bias")
    outs = []
    hooks = [m.blocks[0].fc2.register_forward_hook(lambda _m, _i, out: outs.append(out)) for m in (model, dense)]
    with torch.no_grad():
        model(x), dense(x)
    for h in hooks:
        h.remove()
    torch.testing.assert_close(outs[0].mean((0, 1)), outs[1].mean((0, 1)))


def test_bad_input():
    dense = TokenMLP(dim=8, depth=1).eval()
    x = torch.randn(8, 1, 28, 28)
    with pytest.raises(PruneError, match="outside \\[0, 1\\)"):
        prune_mlps_(copy.deepcopy(dense), dense, x, 1.0)
    cnn = PlainCNN(channels=(4, 8)).eval()
    assert find_mlps(cnn) == []
    with pytest.raises(PruneError, match="no recognizable MLP"):
        prune_mlps_(copy.deepcopy(cnn), cnn, x, 0.25)
