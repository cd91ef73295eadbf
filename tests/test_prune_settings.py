"""Issue 18: prune_and_repair's settings objects, Fisher / WoodFisher on HF models, and ``prune`` taking
``--passes`` / ``--offload`` / ``--batch-size`` like ``repair`` (HF models too). Tiny configs, no download."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

from prune_repair import FisherOptions, PruneError, prune_and_repair
from prune_repair.cli import main
from prune_repair.engine.correct.settings import RepairSettings
from prune_repair.prune import find_targets, gradient_chunks
from prune_repair.prune.grad_data import gradient_samples
from prune_repair.prune.settings import PruneSettings

from prune_models import VOCAB, tiny_gpt2, tokens

transformers = pytest.importorskip("transformers")


def tiny_bert() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                     max_position_embeddings=16, num_labels=3, vocab_size=VOCAB, pad_token_id=0)
    return transformers.BertForSequenceClassification(config).eval()


def no_eval(model: nn.Module) -> dict[str, float]:
    return {"acc": 0.0, "loss": 0.0}


@pytest.mark.parametrize("method", ["fisher", "woodfisher"])
@pytest.mark.parametrize("build", [tiny_gpt2, tiny_bert])
def test_gradient_scorers_on_hf_models_reach_the_asked_sparsity(build, method):
    model, batch = build(), tokens(n=8)
    labels = torch.arange(8) % 3 if build is tiny_bert else None  # a classifier's labels; an LM's own tokens
    options = FisherOptions(block_size=16, rank=4) if method == "woodfisher" else None
    run = prune_and_repair(model, (batch, labels), [0.5], method=method, options=options, repair="none",
                           eval_data=no_eval)
    assert abs(run.rows[0].achieved_sparsity - 0.5) < 1e-3
    assert run.model is not model and bool((model.state_dict()[next(iter(_conv_or_linear(model)))] != 0).all())


def _conv_or_linear(model: nn.Module) -> list[str]:
    return [n + ".weight" for n, m in model.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]


def test_lm_gradients_are_of_the_next_token_loss_without_padded_positions():
    model, batch = tiny_gpt2().double(), tokens(n=4)
    targets = find_targets(model, example_inputs={k: v[:2] for k, v in batch.items()})
    grads = next(gradient_chunks(model, targets, batch, chunk=4))
    fqn = targets[0].fqn
    layer = dict(model.named_modules())[fqn]
    for i in range(4):  # by hand: one sequence's mean cross-entropy over its real next tokens
        ids, mask = batch["input_ids"][i:i + 1], batch["attention_mask"][i:i + 1]
        logits = model(input_ids=ids, attention_mask=mask).logits
        keep = mask[:, 1:].bool()
        loss = F.cross_entropy(logits[:, :-1][keep], ids[:, 1:][keep])
        expected = torch.autograd.grad(loss, layer.weight)[0]
        order = torch.randperm(4, generator=torch.Generator().manual_seed(0)).tolist()
        torch.testing.assert_close(grads[fqn][order.index(i)], expected, rtol=1e-9, atol=1e-12)
    padded = {**batch, "input_ids": batch["input_ids"] + 5 * (1 - batch["attention_mask"])}  # other ids where padded
    again = next(gradient_chunks(model, targets, padded, chunk=4))
    torch.testing.assert_close(again[fqn], grads[fqn], rtol=1e-9, atol=1e-12)


def test_a_classifier_without_labels_is_refused_in_one_line():
    with pytest.raises(PruneError, match=r"not \(N, T, vocab\)"):
        prune_and_repair(tiny_bert(), (tokens(n=8), None), [0.5], method="fisher", eval_data=no_eval)
    with pytest.raises(PruneError, match="needs labelled calibration data"):
        gradient_samples((torch.randn(4, 3), None))


def test_settings_refuse_what_would_be_ignored():
    with pytest.raises(ValueError, match="applies to passes='blockwise' only"):
        RepairSettings(offload="cpu")
    with pytest.raises(ValueError, match="cannot use goal statistics"):
        RepairSettings("reconstruct", goal=object())
    with pytest.raises(ValueError, match="apply to the reconstruct modes only"):
        RepairSettings("repair", reconstruct={"max_gram_bytes": 1})
    model, x = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), torch.randn(16, 4)
    with pytest.raises(PruneError, match="not of 'global-magnitude'"):
        prune_and_repair(model, (x, torch.zeros(16, dtype=torch.long)), [0.5], options=FisherOptions())


def test_batches_and_strategies_give_the_same_run():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)).double()
    x, y = torch.randn(48, 6, dtype=torch.float64), torch.randint(0, 3, (48,))
    runs = [prune_and_repair(model, (x, y), [0.6], repair=settings, prune=PruneSettings(skip_classifier=True))
            for settings in (RepairSettings("repair"), RepairSettings("repair", batch_size=16, passes="per-site"))]
    for key, value in runs[0].model.state_dict().items():
        torch.testing.assert_close(runs[1].model.state_dict()[key], value, rtol=1e-9, atol=1e-12)


# --- the CLI -------------------------------------------------------------------------------


def run(*args):
    return CliRunner().invoke(main, ["prune", *[str(a) for a in args]])


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("prune_settings")
    tiny_gpt2().save_pretrained(root / "gpt2")
    tiny_bert().save_pretrained(root / "bert")
    torch.save(tokens(n=16), root / "lm.pt")
    torch.save({**tokens(n=16), "labels": torch.arange(16) % 3}, root / "cls.pt")
    return root


@pytest.mark.parametrize("method", ["fisher", "woodfisher"])
def test_hf_prune_cli_takes_the_gradient_scorers(hf_dirs, tmp_path, method):
    for model, data in (("gpt2", "lm.pt"), ("bert", "cls.pt")):
        report = tmp_path / f"{model}.json"
        result = run(f"hf:{hf_dirs / model}", "--data", hf_dirs / data, "--sparsity", "0.5", "--calib-size", 8,
                     "--method", method, "--block-size", 16, "--out", tmp_path / model, "--report", report)
        assert result.exit_code == 0, result.output
        row = json.loads(report.read_text())["results"][0]
        assert abs(row["achieved_sparsity"] - 0.5) < 1e-3 and json.loads(report.read_text())["fisher"]["samples"] == 8


def _same_dirs(a, b):
    load = transformers.AutoModelForCausalLM.from_pretrained
    sa, sb = load(str(a), local_files_only=True).state_dict(), load(str(b), local_files_only=True).state_dict()
    return all(torch.allclose(sa[k], sb[k], rtol=1e-5, atol=1e-6) for k in sa)


@pytest.mark.parametrize("repair", ["repair", "reconstruct"])
def test_hf_prune_per_site_writes_the_same_model_as_lockstep(hf_dirs, tmp_path, repair):
    base = [f"hf:{hf_dirs / 'gpt2'}", "--data", hf_dirs / "lm.pt", "--sparsity", "0.3,0.5", "--calib-size", 16,
            "--batch-size", 4, "--repair", repair]
    assert run(*base, "--out", tmp_path / "lockstep").exit_code == 0
    result = run(*base, "--passes", "per-site", "--out", tmp_path / "per-site", "--report", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    assert _same_dirs(tmp_path / "lockstep", tmp_path / "per-site")
    assert json.loads((tmp_path / "r.json").read_text())["passes"] == "per-site"
    if repair == "reconstruct":  # GPT-2's head is the token embedding: said once, with the flags that change it
        assert result.output.count("its weight is tied") == 1 and "--include-tied" in result.output


@pytest.mark.parametrize("args", [["--repair", "auto"], ["--repair", "reconstruct"], ["--method", "obs"]])
def test_prune_blockwise_writes_the_same_checkpoint_as_lockstep(tmp_path, args):
    base = ["zoo:mnist-cnn", "--data", "mnist:test", "--eval-size", 64, "--calib-size", 64, "--batch-size", 16,
            "--sparsity", "0.8", *args]
    assert run(*base, "--out", tmp_path / "a.pt").exit_code == 0
    spill = tmp_path / "spill"
    result = run(*base, "--passes", "blockwise", "--offload", spill, "--out", tmp_path / "b.pt",
                 "--report", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    a, b = torch.load(tmp_path / "a.pt", weights_only=True), torch.load(tmp_path / "b.pt", weights_only=True)
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)
    assert json.loads((tmp_path / "r.json").read_text())["passes"] == "blockwise" and not spill.exists()


def bad_combinations(hf_dirs, tmp_path):
    gpt2, bert, lm = f"hf:{hf_dirs / 'gpt2'}", f"hf:{hf_dirs / 'bert'}", hf_dirs / "lm.pt"
    afile = tmp_path / "afile"
    afile.write_text("x")
    cnn = ["zoo:mnist-cnn", "--data", "mnist:test", "--calib-size", 16, "--sparsity", "0.5"]
    hf = [gpt2, "--data", lm, "--calib-size", 8, "--sparsity", "0.5"]
    return [
        ([*cnn, "--offload", "cpu"], "--offload applies to --passes blockwise only"),
        ([*cnn, "--passes", "blockwise", "--offload", afile], "is a file"),
        ([*hf, "--offload", tmp_path / "spill"], "--offload applies to --passes blockwise only"),
        ([*hf, "--passes", "blockwise"], "no chain of blocks found.*--passes per-site"),
        ([*cnn, "--structured", "0.25", "--passes", "blockwise"], "do not combine with --structured"),
        ([*hf, "--goal-stats", "batchnorm"], "has none"),
        ([bert, "--data", lm, "--calib-size", 8, "--sparsity", "0.5", "--method", "fisher"],
         "labels"),
        ([*hf, "--preprocess", "resize=16"], "does not apply to hf models"),
    ]


@pytest.mark.parametrize("case", range(8))
def test_bad_combinations_exit_2_with_one_line_and_write_nothing(hf_dirs, tmp_path, case):
    args, message = bad_combinations(hf_dirs, tmp_path)[case]
    before = sorted(p.name for p in tmp_path.iterdir())
    result = run(*args, "--out", tmp_path / "out", "--report", tmp_path / "r.json")
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert re.search(message, lines[0]), lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_hf_merge_takes_align_size(hf_dirs, tmp_path):
    from prune_repair.merge import find_groups, permute, random_perms
    a = tiny_gpt2()
    groups = find_groups(a, {"input_ids": torch.randint(1, VOCAB, (2, 6))})
    permute(a, groups, random_perms(groups, torch.Generator().manual_seed(3))).save_pretrained(tmp_path / "perm")
    report = tmp_path / "r.json"
    result = CliRunner().invoke(main, ["merge", f"hf:{hf_dirs / 'gpt2'}", f"hf:{tmp_path / 'perm'}", "--data",
                                       str(hf_dirs / "lm.pt"), "--calib-size", "8", "--align-size", "12",
                                       "--repair", "none", "--out", str(tmp_path / "m"), "--report", str(report)])
    assert result.exit_code == 0, result.output
    r = json.loads(report.read_text())
    assert r["align_size"] == 12  # matching on 12 sequences finds the permutation back: the merge is the model
    assert abs(r["curve"][0]["ppl_raw"] - r["endpoints"][0]["ppl"]) < 1e-5 * r["endpoints"][0]["ppl"]


@pytest.mark.slow
def test_hf_prune_under_torchrun_matches_one_process(hf_dirs, tmp_path):
    import os
    import socket
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    states = {}
    for world in (1, 2):
        out, report = tmp_path / f"out{world}", tmp_path / f"r{world}.json"
        args = ["-m", "prune_repair", "prune", f"hf:{hf_dirs / 'gpt2'}", "--data", str(hf_dirs / "lm.pt"),
                "--calib-size", "16", "--sparsity", "0.5", "--method", "fisher", "--repair", "repair",
                "--device", "cpu", "--out", str(out), "--report", str(report)]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        launch = [sys.executable] if world == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                                                      "2", "--master-addr", "127.0.0.1", "--master-port", str(port)]
        result = subprocess.run(launch + args, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert json.loads(report.read_text())["world_size"] == world
        states[world] = transformers.GPT2LMHeadModel.from_pretrained(str(out), local_files_only=True).state_dict()
    for key, value in states[1].items():
        assert torch.equal(value == 0, states[2][key] == 0), key  # the same Fisher mask
        torch.testing.assert_close(states[2][key], value, rtol=1e-4, atol=1e-5)  # the same pooled repair


def test_hf_goal_stats_file_is_the_goal(hf_dirs, tmp_path):
    from prune_repair import collect_stats

    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dirs / "gpt2"), local_files_only=True).eval()
    goal = tmp_path / "goal.pt"
    collect_stats(model, tokens(n=16)).save(goal)
    report = tmp_path / "r.json"
    result = run(f"hf:{hf_dirs / 'gpt2'}", "--data", hf_dirs / "lm.pt", "--calib-size", 8, "--sparsity", "0.5",
                 "--repair", "repair", "--goal-stats", goal, "--out", tmp_path / "o", "--report", report)
    assert result.exit_code == 0, result.output
    r = json.loads(report.read_text())
    assert r["goal_stats"]["source"] == str(goal) and r["goal_stats"]["sites"] == len(r["results"][0]["sites"])


def test_fisher_on_an_hf_image_classifier_uses_its_labels():
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=16, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=32, num_labels=3)
    model = transformers.ViTForImageClassification(config).eval()
    x, y = {"pixel_values": torch.randn(8, 3, 16, 16)}, torch.arange(8) % 3
    run_ = prune_and_repair(model, (x, y), [0.5], method="fisher", repair="none", eval_data=no_eval)
    assert abs(run_.rows[0].achieved_sparsity - 0.5) < 1e-3


def test_obs_leaves_a_tied_head_alone_unless_asked():
    from prune_repair import prune_

    batch = tokens(n=16)
    model = tiny_gpt2()
    embedding = model.transformer.wte.weight.detach().clone()
    with pytest.warns(UserWarning, match="tied"):
        prune_and_repair(model, (batch, None), [0.5], method="obs", prune=PruneSettings(prune_head=True),
                         eval_data=no_eval)
    report = prune_(model, 0.5, "obs", batch, prune_head=True)
    assert "lm_head" not in {la["fqn"] for la in report.layers}
    assert torch.equal(model.transformer.wte.weight, embedding)
    report = prune_(model, 0.5, "obs", batch, prune_head=True, include_tied=True)
    assert "lm_head" in {la["fqn"] for la in report.layers}
    assert bool((model.transformer.wte.weight == 0).any())  # the embedding it is tied to is pruned with it
