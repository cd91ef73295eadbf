"""The zoo's transformers: MNIST ViTs (torchvision) and byte-level LMs (HF directories), loaded
strictly, evaluated, and pruned end to end by the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from prune_repair import zoo
from prune_repair.cli import main
from prune_repair.io import pysrc
from prune_repair.io.data import load_dataset
from prune_repair.io.hf import hf_dir, is_hf_spec
from prune_repair.metrics.classify import evaluate
from prune_repair.zoo.lm import lm_dir, lm_names

VITS = ["mnist-vit", "mnist-vit-b"]
LM_CLASSES = {"py-gpt2": "GPT2LMHeadModel", "py-gpt2-b": "GPT2LMHeadModel", "py-llama": "LlamaForCausalLM"}


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def mnist_slice() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_dataset("mnist:test")
    return x[::20], y[::20]  # 500 images spread over the test set


@pytest.mark.parametrize("name", VITS)
def test_vit_loads_strictly_and_keeps_its_recorded_accuracy(name, mnist_slice) -> None:
    from torchvision.models import VisionTransformer

    model = zoo.build(name)
    state = torch.load(zoo.weights_path(name), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    assert isinstance(model, VisionTransformer) and model.conv_proj.in_channels == 1
    recorded = zoo.entry(name).test_acc
    assert recorded is not None and 0.95 <= recorded <= 1.0
    assert abs(evaluate(model.eval(), *mnist_slice)["acc"] - recorded) <= 0.03  # 500 images: a few errors either way


def test_the_two_vits_differ() -> None:
    a, b = (torch.load(zoo.weights_path(n), weights_only=True) for n in VITS)
    assert a.keys() == b.keys() and not torch.equal(a["conv_proj.weight"], b["conv_proj.weight"])


def test_the_two_gpt2s_differ_and_share_a_config() -> None:
    from safetensors.torch import load_file

    a, b = (load_file(str(lm_dir(n) / "model.safetensors")) for n in ("py-gpt2", "py-gpt2-b"))
    assert a.keys() == b.keys() and not torch.equal(a["transformer.wte.weight"], b["transformer.wte.weight"])
    configs = [json.loads((lm_dir(n) / "config.json").read_text()) for n in ("py-gpt2", "py-gpt2-b")]
    assert configs[0] == configs[1]


def test_zoo_lm_names_are_hf_specs() -> None:
    assert lm_names() == sorted(LM_CLASSES)
    for name in lm_names():
        assert is_hf_spec(f"zoo:{name}") and hf_dir(f"zoo:{name}") == str(lm_dir(name))
    assert not is_hf_spec("zoo:mnist-vit") and not is_hf_spec("py-gpt2")


@pytest.mark.parametrize("name", sorted(LM_CLASSES))
def test_lm_loads_strictly_as_float32_and_predicts_python_source(name) -> None:
    transformers = pytest.importorskip("transformers")
    cls = getattr(transformers, LM_CLASSES[name])
    model, info = cls.from_pretrained(str(lm_dir(name)), local_files_only=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.dtype == torch.float32 and model.config.vocab_size == 256
    ids = pysrc.load_pysrc("pysrc:eval")["input_ids"][:4]
    with torch.no_grad():
        loss = float(model.eval()(input_ids=ids, labels=ids).loss)
    recorded = json.loads((zoo.WEIGHTS_DIR / zoo.METRICS_FILE).read_text())[name]
    assert recorded["eval_data"] == "pysrc:eval" and recorded["eval_ppl"] < 10  # a uniform guess is 256
    assert loss < 3.0  # 4 sequences of the evaluation split; log(256) = 5.5 for a uniform guess


def test_cli_prunes_the_zoo_vit(tmp_path, mnist_slice) -> None:
    x, y = mnist_slice
    torch.save({"x": x[:128], "y": y[:128]}, tmp_path / "eval.pt")
    out, report = tmp_path / "vit.pt", tmp_path / "vit.json"
    result = _cli("prune", "zoo:mnist-vit", "--data", "mnist:test", "--eval-data", tmp_path / "eval.pt",
                  "--sparsity", "0.5", "--calib-size", "16", "--out", out, "--report", report)
    assert result.exit_code == 0, result.output
    rep = json.loads(report.read_text())
    assert 0.45 <= rep["results"][0]["achieved_sparsity"] <= 0.55
    model = zoo.build("mnist-vit")
    model.load_state_dict(torch.load(out, weights_only=True), strict=True)


@pytest.mark.parametrize("name", ["py-gpt2", "py-llama"])
def test_cli_prunes_a_zoo_lm_on_pysrc(tmp_path, name) -> None:
    pytest.importorskip("transformers")
    ids = pysrc.load_pysrc("pysrc:eval")["input_ids"][::32]  # 8 sequences
    torch.save({"input_ids": ids}, tmp_path / "eval.pt")
    out, report = tmp_path / name, tmp_path / f"{name}.json"
    result = _cli("prune", f"zoo:{name}", "--data", "pysrc:calib", "--eval-data", tmp_path / "eval.pt",
                  "--sparsity", "0.5", "--calib-size", "8", "--out", out, "--report", report)
    assert result.exit_code == 0, result.output
    rep = json.loads(report.read_text())
    assert rep["task"] == "lm" and rep["dense"]["ppl"] < rep["results"][0]["ppl_pruned"]
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert lm_dir(name).is_dir()  # the shipped model is untouched


def test_pysrc_is_evaluated_on_its_evaluation_split_by_default() -> None:
    pytest.importorskip("transformers")
    from prune_repair.cli.hf_cmd import load_hf_data
    from prune_repair.io.hf import load_hf_dir

    model = load_hf_dir("zoo:py-gpt2")
    d = load_hf_data(model, "pysrc", None, 4, 0, torch.device("cpu"))
    assert d.task == "lm" and d.eval_name == "pysrc:eval" and d.eval_count == pysrc.MAX_SEQUENCES["eval"]
    assert d.calib["input_ids"].shape == (4, pysrc.SEQ_LEN)


def test_a_wrong_pysrc_split_is_one_line(tmp_path) -> None:
    pytest.importorskip("transformers")
    result = _cli("prune", "zoo:py-gpt2", "--data", "pysrc:valid", "--sparsity", "0.5", "--out", tmp_path / "o")
    assert result.exit_code == 2 and not (tmp_path / "o").exists()
    assert "unknown pysrc split 'valid': use pysrc:train, pysrc:calib or pysrc:eval" in result.output
    assert "Traceback" not in result.output
