"""HF transformers models on the CLI (issue 9, "Transformers and HF checkpoints"): ``--arch hf:DIR``,
tokenized data, perplexity, HF directories written back. Tiny random configs built here."""

import json
import math

import pytest
import torch
from click.testing import CliRunner
from torch import nn

transformers = pytest.importorskip("transformers")

from prune_repair import collect_stats  # noqa: E402
from prune_repair.cli import main  # noqa: E402
from prune_repair.metrics.lm import perplexity  # noqa: E402
from prune_repair.io import tokens as tok  # noqa: E402

VOCAB = 40


def _configs():
    T = transformers
    common = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return {
        "bert": (T.BertForSequenceClassification, T.BertConfig(
            hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=32, num_labels=3, vocab_size=VOCAB, pad_token_id=0)),
        "gpt2": (T.GPT2LMHeadModel, T.GPT2Config(n_positions=32, n_embd=16, n_layer=2, n_head=2, **common)),
        "vit": (T.ViTForImageClassification, T.ViTConfig(
            image_size=16, patch_size=8, num_channels=3, hidden_size=16, num_hidden_layers=2,
            num_attention_heads=2, intermediate_size=32, num_labels=3)),
        "llama": (T.LlamaForCausalLM, T.LlamaConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=32, **common)),
    }


def _tokens(n=16, t=10, seed=0, labels=False):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, t), generator=g)
    lengths = torch.randint(4, t + 1, (n,), generator=g)
    mask = (torch.arange(t)[None] < lengths[:, None]).long()
    data = {"input_ids": ids * mask, "attention_mask": mask}
    if labels:
        data["labels"] = torch.randint(0, 3, (n,), generator=g)
    return data


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """name -> (model dir, data file) for each tiny config."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name, (cls, config) in _configs().items():
        torch.manual_seed(0)
        model = cls(config).eval()
        model.save_pretrained(root / name)
        if name == "vit":
            g = torch.Generator().manual_seed(0)
            data = root / "images.pt"
            torch.save({"x": torch.randn(12, 3, 16, 16, generator=g), "y": torch.randint(0, 3, (12,), generator=g)}, data)
        elif name == "bert":
            data = root / "bert.pt"
            torch.save(_tokens(labels=True), data)
        elif name == "llama":
            import numpy as np
            data = root / "llama.npz"
            np.savez(data, **{k: v.numpy() for k, v in _tokens().items()})
        else:
            data = root / "gpt2.jsonl"
            d = _tokens()
            lines = [json.dumps({"input_ids": ids[m.bool()].tolist(), "attention_mask": m[m.bool()].tolist()})
                     for ids, m in zip(d["input_ids"], d["attention_mask"])]
            data.write_text("\n".join(lines) + "\n")
        out[name] = (root / name, data)
    return out


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _load(path):
    """What a user does with the output: from_pretrained with the class the config names."""
    name = json.loads((path / "config.json").read_text())["architectures"][0]
    return getattr(transformers, name).from_pretrained(str(path), local_files_only=True).eval()


def _prunable(model):
    return {n: m.weight for n, m in model.named_modules()
            if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"}


LM = {"gpt2", "llama"}


@pytest.mark.parametrize("name", ["bert", "gpt2", "vit", "llama"])
def test_prune_writes_an_hf_directory_with_the_right_metric(hf_models, tmp_path, name):
    model_dir, data = hf_models[name]
    out, report = tmp_path / "out", tmp_path / "r.json"
    result = run("prune", f"hf:{model_dir}", "--data", data, "--sparsity", "0.5", "--calib-size", 8,
                 "--out", out, "--report", report)
    assert result.exit_code == 0, result.output
    original, pruned = _load(model_dir), _load(out)
    assert type(pruned) is type(original)
    ref_state, state = original.state_dict(), pruned.state_dict()
    assert sorted(state) == sorted(ref_state)
    assert all(state[k].shape == ref_state[k].shape for k in state)
    r = json.loads(report.read_text())
    row = r["results"][0]
    assert abs(row["achieved_sparsity"] - 0.5) < 0.02
    assert row["sites"] and all(s["mode"] == "repair" for s in row["sites"])
    metric = "ppl" if name in LM else "acc"
    assert r["metric"] == metric and set(r["dense"]) == {metric, "loss"}
    assert f"{metric}_pruned" in row and f"{metric}_repaired" in row
    assert ("acc_pruned" in row) == (metric == "acc")
    if metric == "ppl":
        assert math.isclose(r["dense"]["ppl"], math.exp(r["dense"]["loss"]))
        assert "perplexity" in result.output
    # zeros stay zeros: the repaired layers are still half zeros
    zeros = sum(int((w == 0).sum()) for w in _prunable(pruned).values() if w is not state.get("lm_head.weight"))
    assert zeros > 0


def _prune_by_hand(model_dir, dest, seed=0):
    model = _load(model_dir)
    g = torch.Generator().manual_seed(seed)
    tied = {id(p) for n, p in model.named_parameters() if "embed" in n or "wte" in n}
    with torch.no_grad():
        for w in _prunable(model).values():
            if id(w) not in tied:
                w.mul_((torch.rand(w.shape, generator=g) > 0.5).to(w.dtype))
    model.save_pretrained(dest)
    return model


@pytest.mark.parametrize("name", ["bert", "gpt2", "vit", "llama"])
def test_repair_keeps_keys_shapes_and_zeros(hf_models, tmp_path, name):
    model_dir, data = hf_models[name]
    pruned_model = _prune_by_hand(model_dir, tmp_path / "pruned")
    out, report = tmp_path / "out", tmp_path / "r.json"
    result = run("repair", tmp_path / "pruned", "--reference", f"hf:{model_dir}", "--data", data,
                 "--calib-size", 8, "--out", out, "--report", report)
    assert result.exit_code == 0, result.output
    repaired = _load(out)
    before, after = pruned_model.state_dict(), repaired.state_dict()
    assert sorted(after) == sorted(before) and all(after[k].shape == before[k].shape for k in after)
    for k, w in before.items():
        if w.is_floating_point() and w.dim() >= 2:  # weights (biases may take the shift)
            assert bool((after[k][w == 0] == 0).all()), k
    assert any(not torch.equal(after[k], before[k]) for k in after)  # not a silent no-op
    r = json.loads(report.read_text())
    metric = "ppl" if name in LM else "acc"
    assert set(r["reference"]) == set(r["after"]) == {metric, "loss"}
    fqns = [s["fqn"] for s in r["sites"]]
    assert fqns and all(s["mode"] == "repair" for s in r["sites"])
    if name == "llama":  # bias-free projections inside the decoder layers are sites: scale only
        assert "model.layers.0.self_attn.q_proj" in fqns and "model.layers.1.mlp.down_proj" in fqns
        assert all(s["shift_dropped"] for s in r["sites"])


def test_exact_repair_in_float64_matches_the_goal(tmp_path):
    cls, config = _configs()["gpt2"]
    torch.manual_seed(1)
    cls(config).double().save_pretrained(tmp_path / "ref")
    data = tmp_path / "tok.pt"
    torch.save(_tokens(n=12), data)
    _prune_by_hand(tmp_path / "ref", tmp_path / "pruned")
    result = run("repair", f"hf:{tmp_path / 'pruned'}", "--reference", f"hf:{tmp_path / 'ref'}", "--data", data,
                 "--repair", "repair", "--calib-size", 10, "--seed", 3, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    ref, repaired = _load(tmp_path / "ref"), _load(tmp_path / "out")
    assert next(repaired.parameters()).dtype == torch.float64
    batch = tok.draw(tok.load_tokens(data), 10, seed=3)  # the calibration draw of the command
    goal, got = collect_stats(ref, batch), collect_stats(repaired, batch)
    assert len(goal) == 8
    for fqn in goal:
        torch.testing.assert_close(got[fqn].std, goal[fqn].std, atol=1e-8, rtol=1e-8)
        torch.testing.assert_close(got[fqn].mean, goal[fqn].mean, atol=1e-8, rtol=0)


def test_perplexity_matches_a_hand_computation(hf_models, tmp_path):
    model_dir, data = hf_models["gpt2"]
    model = _load(model_dir).double()
    batch = tok.load_tokens(data)
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
            n = int(mask.sum())  # right padding: the real tokens come first
            logits = model(input_ids=ids[None, :n]).logits[0]
            logp = torch.log_softmax(logits, -1)
            for t in range(n - 1):
                total -= float(logp[t, ids[t + 1]])
                count += 1
    hand = math.exp(total / count)
    assert math.isclose(perplexity(model, [batch])["ppl"], hand, rel_tol=1e-9)
    result = run("repair", f"hf:{model_dir}", "--reference", f"hf:{model_dir}", "--data", data, "--calib-size", 8,
                 "--out", tmp_path / "out", "--report", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    r = json.loads((tmp_path / "r.json").read_text())
    assert math.isclose(r["reference"]["ppl"], hand, rel_tol=1e-5)  # float32 model


def test_jsonl_is_padded_to_the_longest_with_the_mask(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text('{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}\n\n{"input_ids": [8], "attention_mask": [1]}\n'
                 .replace('"labels": [5, 6, 7]', '"attention_mask": [1, 1, 1]'))
    data = tok.load_tokens(f)
    assert data["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert data["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert tok.select(data, slice(1, 2))["input_ids"].tolist() == [[8]]  # a batch is trimmed to its longest
    a, b = tok.draw(data, 1, seed=5), tok.draw(data, 1, seed=5)
    assert torch.equal(a["input_ids"], b["input_ids"])


@pytest.mark.parametrize("line, key", [('{"input_ids": [1, 2.5, 3]}', "input_ids"),
                                       ('{"input_ids": [1, 2], "attention_mask": [1, true]}', "attention_mask"),
                                       ('{"input_ids": [1, 2], "labels": ["a", 2]}', "labels")])
def test_jsonl_token_ids_must_be_whole_numbers_as_in_pt_and_npz(tmp_path, line, key):
    f = tmp_path / "t.jsonl"
    f.write_text(line + "\n")
    with pytest.raises(tok.DataError, match=f"line 1: '{key}' must hold integers"):
        tok.load_tokens(f)
    f.write_text('{"input_ids": [1.0, 2, 3]}\n')  # a whole number written as a float is a whole number
    assert tok.load_tokens(f)["input_ids"].tolist() == [[1, 2, 3]]


def _error(result):
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and len(lines) == 1, result.output
    return lines[0]


def test_user_mistakes_are_one_line(hf_models, tmp_path):
    model_dir, data = hf_models["gpt2"]
    base = ["--data", data, "--sparsity", "0.5", "--calib-size", 4]
    msg = _error(run("prune", f"hf:{tmp_path / 'nope'}", *base, "--out", tmp_path / "o"))
    assert "does not exist" in msg
    (tmp_path / "exists").mkdir()
    msg = _error(run("prune", f"hf:{model_dir}", *base, "--out", tmp_path / "exists", "--force"))
    assert "not an HF model directory" in msg
    ok = run("prune", f"hf:{model_dir}", *base, "--out", tmp_path / "o")
    assert ok.exit_code == 0, ok.output
    msg = _error(run("prune", f"hf:{model_dir}", *base, "--out", tmp_path / "o"))
    assert "--force" in msg
    again = run("prune", f"hf:{model_dir}", *base, "--out", tmp_path / "o", "--force")
    assert again.exit_code == 0, again.output
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left
    msg = _error(run("prune", f"hf:{model_dir}", "--data", hf_models["vit"][1], "--sparsity", "0.5",
                     "--out", tmp_path / "o2"))
    assert "input_ids" in msg
    msg = _error(run("prune", f"hf:{model_dir}", *base, "--goal-stats", "batchnorm", "--out", tmp_path / "o3"))
    assert "has none" in msg and "--goal-stats FILE" in msg
    assert not (tmp_path / "o3").exists()
    msg = _error(run("prune", f"hf:{model_dir}", *base, "--out", tmp_path / "o4", "--arch-kwargs", '{"a": 1}'))
    assert "--arch-kwargs" in msg


def test_a_state_dict_file_loads_into_the_hf_arch(hf_models, tmp_path):
    model_dir, data = hf_models["gpt2"]
    model = _prune_by_hand(model_dir, tmp_path / "pruned")
    torch.save(model.state_dict(), tmp_path / "pruned.pt")
    result = run("repair", tmp_path / "pruned.pt", "--reference", model_dir, "--arch", f"hf:{model_dir}",
                 "--data", data, "--calib-size", 8, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_reconstruct_refits_conv1d_and_bias_free_projections(hf_models, tmp_path, name):
    model_dir, data = hf_models[name]
    pruned_model = _prune_by_hand(model_dir, tmp_path / "pruned")
    out, report = tmp_path / "out", tmp_path / "r.json"
    result = run("repair", tmp_path / "pruned", "--reference", f"hf:{model_dir}", "--data", data,
                 "--repair", "reconstruct", "--calib-size", 16, "--out", out, "--report", report)
    assert result.exit_code == 0, result.output
    before, after = pruned_model.state_dict(), _load(out).state_dict()
    for k, w in before.items():
        if w.is_floating_point() and w.dim() >= 2:
            assert bool((after[k][w == 0] == 0).all()), k
    layers = {entry["fqn"]: entry for entry in json.loads(report.read_text())["reconstruct"]["layers"]}
    expected = "transformer.h.0.attn.c_attn" if name == "gpt2" else "model.layers.0.self_attn.q_proj"
    assert expected in layers
    assert all(e["error_after"] <= e["error_before"] + 1e-6 for e in layers.values())
    if name == "llama":  # no bias and no BatchNorm: solved without an intercept
        assert layers[expected]["intercept"] == "none"
    else:  # GPT-2's lm_head is the token embedding: never refitted
        assert "lm_head" not in layers
        torch.testing.assert_close(after["transformer.wte.weight"], before["transformer.wte.weight"], rtol=0, atol=0)
