"""``prune-repair prune --structured``: smaller outputs that load as they are, reports, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from prune_repair.cli import main
from prune_repair.metrics import evaluate
from prune_repair.metrics.lm import perplexity
from prune_repair.prune.structured import load_structured_
from prune_repair.zoo.models import MLP, PlainCNN

transformers = pytest.importorskip("transformers")
VOCAB = 50


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _error(result) -> str:
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and len(lines) == 1, result.output
    return lines[0]


@pytest.fixture(scope="module")
def lm_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    T = transformers
    configs = {"gpt2": (T.GPT2LMHeadModel, T.GPT2Config(n_positions=32, n_embd=16, n_layer=2, n_head=2,
                                                         vocab_size=VOCAB)),
               "llama": (T.LlamaForCausalLM, T.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                                            num_attention_heads=2, num_key_value_heads=2,
                                                            max_position_embeddings=32, vocab_size=VOCAB))}
    out = {}
    for name, (cls, config) in configs.items():
        torch.manual_seed(0)
        cls(config).eval().save_pretrained(root / name)
        out[name] = root / name
    g = torch.Generator().manual_seed(0)
    data = root / "tokens.pt"
    torch.save({"input_ids": torch.randint(1, VOCAB, (12, 10), generator=g),
                "attention_mask": torch.ones(12, 10, dtype=torch.long)}, data)
    return out, data


@pytest.mark.parametrize("name,key,width", [("gpt2", "n_inner", 64), ("llama", "intermediate_size", 32)])
def test_hf_lm_output_is_smaller_and_loads(lm_dirs, tmp_path, name, key, width):
    dirs, data = lm_dirs
    out, report = tmp_path / "out", tmp_path / "r.json"
    result = run("prune", f"hf:{dirs[name]}", "--data", data, "--structured", "0.25", "--calib-size", 8,
                 "--out", out, "--report", report)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config[key] == width * 3 // 4
    model = getattr(transformers, config["architectures"][0]).from_pretrained(str(out), local_files_only=True).eval()
    r = json.loads(report.read_text())
    row = r["results"][0]
    assert row["params_after"] == sum(p.numel() for p in model.parameters()) < row["params_before"]
    assert row["latency_ratio"] > 0 and r["repair"] == "reconstruct" and r["metric"] == "ppl"
    tokens = torch.load(data, weights_only=True)
    assert math.isclose(perplexity(model, [tokens])["ppl"], row["ppl_repaired"], rel_tol=1e-4)
    assert "ppl_pruned" in row and "acc_repaired" not in row


def test_hf_llama_heads(lm_dirs, tmp_path):
    dirs, data = lm_dirs
    out, report = tmp_path / "out", tmp_path / "r.json"
    result = run("prune", f"hf:{dirs['llama']}", "--data", data, "--structured-heads", "0.5", "--calib-size", 8,
                 "--out", out, "--report", report)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["intermediate_size"]) == (1, 1, 32)
    r = json.loads(report.read_text())
    assert r["structured_heads"] == 0.5 and r["results"][0]["params_after"] < r["results"][0]["params_before"]
    msg = _error(run("prune", f"hf:{dirs['llama']}", "--data", data, "--structured-heads", "0.3",
                     "--out", tmp_path / "o2"))
    assert "not a whole number" in msg and not (tmp_path / "o2").exists()
    msg = _error(run("prune", f"hf:{dirs['gpt2']}", "--data", data, "--structured-heads", "0.5",
                     "--out", tmp_path / "o3"))
    assert "LLaMA-style attention" in msg and not (tmp_path / "o3").exists()


@pytest.fixture(scope="module")
def cnn_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cnn")
    torch.manual_seed(0)
    torch.save(PlainCNN(channels=(8, 16)).state_dict(), root / "cnn.pt")
    torch.save(MLP(widths=(16,), in_features=784).state_dict(), root / "mlp.pt")
    g = torch.Generator().manual_seed(0)
    torch.save({"x": torch.randn(48, 1, 28, 28, generator=g), "y": torch.randint(0, 10, (48,), generator=g)},
               root / "data.pt")
    return root


CNN = ["--arch", "prune_repair.zoo.models:PlainCNN", "--arch-kwargs", '{"channels": [8, 16]}']


@pytest.mark.parametrize("extra", [[], ["--sparsity", "0.5", "--repair", "none"]])
def test_cnn_output_loads_with_load_structured(cnn_files, tmp_path, extra):
    out, report = tmp_path / "s.pt", tmp_path / "r.json"
    result = run("prune", cnn_files / "cnn.pt", *CNN, "--data", cnn_files / "data.pt", "--structured", "0.5",
                 "--calib-size", 32, "--out", out, "--report", report, *extra)
    assert result.exit_code == 0, result.output
    model = load_structured_(out, PlainCNN(channels=(8, 16)))
    assert model.features.conv1.out_channels == 4 and model.features.conv2.out_channels == 8
    data = torch.load(cnn_files / "data.pt", weights_only=True)
    row = json.loads(report.read_text())["results"][-1]
    assert math.isclose(evaluate(model, data["x"], data["y"])["acc"], row["acc_repaired"])
    assert row["params_after"] == sum(p.numel() for p in model.parameters())
    if extra:
        assert row["sparsity"] == 0.5 and row["achieved_sparsity"] > 0.45


@pytest.mark.parametrize("args,message", [
    (["--structured", "1.0"], "outside [0, 1)"),
    (["--structured", "-0.1"], "outside [0, 1)"),
    ([], "--sparsity is missing"),
])
def test_bad_ratio_is_one_line_and_writes_nothing(cnn_files, tmp_path, args, message):
    out = tmp_path / "s.pt"
    msg = _error(run("prune", cnn_files / "cnn.pt", *CNN, "--data", cnn_files / "data.pt", "--out", out, *args))
    assert message in msg and not out.exists()


def test_model_without_mlp_or_channels_is_refused(cnn_files, tmp_path):
    out = tmp_path / "s.pt"
    msg = _error(run("prune", cnn_files / "mlp.pt", "--arch", "prune_repair.zoo.models:MLP", "--arch-kwargs",
                     '{"widths": [16], "in_features": 784}', "--data", cnn_files / "data.pt", "--structured", "0.25",
                     "--out", out))
    assert "no recognizable MLP" in msg and not out.exists()
