"""``prune-repair merge hf:A hf:B --data tokens.jsonl``: an HF directory out, perplexity along
the curve (and its plot), a permuted copy merged back exactly, one-line refusals."""

import json

import pytest
import torch
from click.testing import CliRunner

transformers = pytest.importorskip("transformers")

from prune_repair.cli.main import main  # noqa: E402
from prune_repair.merge import find_groups, permute, random_perms  # noqa: E402

VOCAB = 40


def gpt2(seed, heads=2):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_positions=32, n_embd=16, n_layer=2, n_head=heads, vocab_size=VOCAB,
                                     bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("hfmerge")
    g = torch.Generator().manual_seed(0)
    lines = [json.dumps({"input_ids": torch.randint(1, VOCAB, (int(n),), generator=g).tolist()})
             for n in torch.randint(4, 12, (24,), generator=g)]
    (root / "t.jsonl").write_text("\n".join(lines) + "\n")
    a = gpt2(0)
    a.save_pretrained(root / "a")
    gpt2(1).save_pretrained(root / "b")
    groups = find_groups(a, {"input_ids": torch.randint(1, VOCAB, (2, 6))})
    permute(a, groups, random_perms(groups, torch.Generator().manual_seed(3))).save_pretrained(root / "a_perm")
    gpt2(2, heads=4).save_pretrained(root / "four_heads")
    return root


def run(*args):
    return CliRunner().invoke(main, ["merge", *[str(a) for a in args]])


def test_merge_writes_an_hf_directory_and_reports_perplexity_along_the_curve(files, tmp_path):
    out, rep = tmp_path / "merged", tmp_path / "r.json"
    res = run(f"hf:{files / 'a'}", f"hf:{files / 'b'}", "--data", files / "t.jsonl", "--calib-size", 16,
              "--curve", 3, "--out", out, "--report", rep)
    assert res.exit_code == 0, res.output
    merged = transformers.GPT2LMHeadModel.from_pretrained(str(out), local_files_only=True)
    assert merged.config.n_head == 2
    r = json.loads(rep.read_text())
    assert [p["alpha"] for p in r["curve"]] == [0.0, 0.5, 1.0] and r["metric"] == "ppl"
    assert set(r["barrier"]) == {"ppl_raw", "ppl", "loss_raw", "loss"} and r["endpoints"][0]["ppl"] > 1
    assert abs(r["curve"][0]["ppl_raw"] - r["endpoints"][0]["ppl"]) < 1e-6 * r["endpoints"][0]["ppl"]


@pytest.mark.parametrize("align", ["weight", "activation"])
def test_a_permuted_copy_merges_back_to_the_model_along_the_whole_curve(files, tmp_path, align):
    rep = tmp_path / "r.json"
    res = run(f"hf:{files / 'a'}", f"hf:{files / 'a_perm'}", "--data", files / "t.jsonl", "--calib-size", 16, "--align", align,
              "--repair", "none", "--curve", 3, "--out", tmp_path / "m", "--report", rep)
    assert res.exit_code == 0, res.output
    r = json.loads(rep.read_text())
    ppl = r["endpoints"][0]["ppl"]
    for p in r["curve"]:
        assert abs(p["ppl_raw"] - ppl) < 1e-5 * ppl, p  # float32 model: float32 rounding


def test_models_with_other_head_counts_are_refused_in_one_line(files, tmp_path):
    res = run(f"hf:{files / 'a'}", f"hf:{files / 'four_heads'}", "--data", files / "t.jsonl", "--calib-size", 16, "--align", "weight",
              "--out", tmp_path / "m")
    assert res.exit_code == 2 and "n_head=2" in res.output and "same heads" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "m").exists()


def test_plot_draws_perplexity_along_the_curve(files, tmp_path):
    pytest.importorskip("matplotlib")
    png, rep = tmp_path / "c.png", tmp_path / "r.json"
    res = run(f"hf:{files / 'a'}", f"hf:{files / 'b'}", "--data", files / "t.jsonl", "--calib-size", 16,
              "--plot", png, "--curve", 3, "--out", tmp_path / "m", "--report", rep)
    assert res.exit_code == 0, res.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and len(json.loads(rep.read_text())["curve"]) == 3
