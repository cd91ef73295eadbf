"""`prune-repair repair`: the post-step for checkpoints pruned elsewhere (the CLI contract in ARCHITECTURE.md)."""

import json
import re

import pytest
import torch
import torch.nn.utils.prune as torch_prune
from click.testing import CliRunner
from torch import nn

from prune_repair import zoo
from prune_repair.cli import main


@pytest.fixture(scope="module")
def pruned_ckpt(tmp_path_factory):
    """A zoo CNN pruned to 90% by torch.nn.utils.prune, saved with its masks."""
    model = zoo.load("mnist-cnn")
    params = [(m, "weight") for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    torch_prune.global_unstructured(params, pruning_method=torch_prune.L1Unstructured, amount=0.9)
    path = tmp_path_factory.mktemp("ckpt") / "pruned.pt"
    torch.save(model.state_dict(), path)
    return path


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def base_args(pruned, out):
    """Evaluation on 500 of the 10,000 test images: most of a run's time was the three full evaluations."""
    return [pruned, "--reference", "zoo:mnist-cnn", "--data", "mnist:test", "--calib-size", 64, "--eval-size", 500,
            "--out", out]


def test_repair_writes_a_plain_checkpoint_and_the_report(pruned_ckpt, tmp_path):
    out, report = tmp_path / "out.pt", tmp_path / "report.json"
    result = run("repair", *base_args(pruned_ckpt, out), "--report", report)
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert set(data["reference"]) == set(data["before"]) == set(data["after"]) == {"acc", "loss"}
    assert 0 <= data["after"]["acc"] <= 1 and data["seconds"]["repair"] > 0
    assert data["after"]["loss"] < data["before"]["loss"]
    state = torch.load(out, weights_only=True)
    model = zoo.build("mnist-cnn")
    model.load_state_dict(state, strict=True)
    original = torch.load(pruned_ckpt, weights_only=True)
    mask = original["features.conv2.weight_mask"] == 0
    assert torch.all(state["features.conv2.weight"][mask] == 0)


def test_output_is_deterministic(pruned_ckpt, tmp_path):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    assert run("repair", *base_args(pruned_ckpt, a)).exit_code == 0
    assert run("repair", *base_args(pruned_ckpt, b)).exit_code == 0
    assert a.read_bytes() == b.read_bytes()


class Payload:
    def __reduce__(self):
        return (print, ("pwned",))


def bad_inputs(tmp_path, pruned_ckpt):
    """(name, args, expected message) for each user mistake."""
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(pruned_ckpt.read_bytes()[:300])
    pickled = tmp_path / "pickled.pt"
    torch.save({"features.conv1.weight": torch.zeros(1), "x": Payload()}, pickled)
    wrong = tmp_path / "wrong.pt"
    state = zoo.load("mnist-cnn").state_dict()
    state["classifier.weight"] = torch.zeros(10, 7)
    torch.save(state, wrong)
    nan = tmp_path / "nan.pt"
    state = zoo.load("mnist-cnn").state_dict()
    state["features.conv2.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, nan)
    small = tmp_path / "small.pt"
    torch.save({"x": torch.randn(80, 1, 14, 14), "y": torch.zeros(80, dtype=torch.long)}, small)
    out = tmp_path / "out.pt"
    ref = ["--reference", "zoo:mnist-cnn"]
    data = ["--data", "mnist:test"]
    return [
        ("missing", [tmp_path / "nope.pt", *ref, *data, "--out", out], "does not exist"),
        ("corrupt", [corrupt, *ref, *data, "--out", out], "corrupt or not a torch checkpoint"),
        ("pickle", [pickled, *ref, *data, "--out", out], "need pickle to load: refused"),
        ("directory", [tmp_path, *ref, *data, "--out", out], "is not a file"),
        ("arch", [pruned_ckpt, "--reference", pruned_ckpt, "--arch", "nosuch.module:Net", *data, "--out", out],
         "cannot import 'nosuch.module'"),
        ("shape", [wrong, *ref, *data, "--out", out], r"'classifier.weight' is \[10, 7\] but the architecture expects \[10, 1568\]"),
        ("nan", [nan, *ref, *data, "--out", out], "NaN/Inf in features.conv2.weight"),
        ("data", [pruned_ckpt, *ref, "--data", small, "--out", out], r"shape \[1, 14, 14\] do not fit the model"),
        ("calib", [pruned_ckpt, *ref, *data, "--calib-size", 1, "--out", out], "at least 2 samples"),
        ("out=input", [pruned_ckpt, *ref, *data, "--out", pruned_ckpt], "is also an input"),
        ("mode", [pruned_ckpt, *ref, *data, "--repair", "rescue", "--out", out], "Invalid value for '--repair'"),
        ("offload", [pruned_ckpt, *ref, *data, "--offload", tmp_path / "spill", "--out", out],
         "--offload applies to --passes blockwise only"),
        ("offload-file", [pruned_ckpt, *ref, *data, "--passes", "blockwise", "--offload", corrupt, "--out", out],
         "is a file: give a folder"),
    ]


@pytest.mark.parametrize("case", range(13))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, tmp_path, pruned_ckpt):
    name, args, message = bad_inputs(tmp_path, pruned_ckpt)[case]
    before = {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    pruned_bytes = pruned_ckpt.read_bytes()
    result = run("repair", *args)
    assert result.exit_code == 2, (name, result.output)
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert re.search(message, result.output), (name, result.output)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before
    assert pruned_ckpt.read_bytes() == pruned_bytes


@pytest.mark.parametrize("mode", ["auto", "reconstruct"])
def test_blockwise_passes_write_the_same_checkpoint_and_leave_no_files(pruned_ckpt, tmp_path, mode):
    lockstep, blockwise, spill = tmp_path / "lockstep.pt", tmp_path / "blockwise.pt", tmp_path / "spill"
    batches = ["--batch-size", 16, "--repair", mode]
    assert run("repair", *base_args(pruned_ckpt, lockstep), *batches).exit_code == 0
    result = run("repair", *base_args(pruned_ckpt, blockwise), *batches, "--passes", "blockwise", "--offload", spill,
                 "--report", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    a, b = torch.load(lockstep, weights_only=True), torch.load(blockwise, weights_only=True)
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)
    assert json.loads((tmp_path / "r.json").read_text())["passes"] == "blockwise"
    assert not spill.exists()  # the folder it made for the block inputs is gone


def test_existing_out_needs_force(pruned_ckpt, tmp_path):
    out = tmp_path / "out.pt"
    out.write_bytes(b"keep me")
    result = run("repair", *base_args(pruned_ckpt, out))
    assert result.exit_code == 2 and "--force" in result.output and out.read_bytes() == b"keep me"
    assert run("repair", *base_args(pruned_ckpt, out), "--force").exit_code == 0
    assert out.read_bytes() != b"keep me"


def test_reconstruct_a_checkpoint_pruned_elsewhere(pruned_ckpt, tmp_path):
    """torch.nn.utils.prune masks (90%) of the zoo CNN: the zeros are kept, accuracy rises."""
    out, report = tmp_path / "out.pt", tmp_path / "report.json"
    result = run("repair", pruned_ckpt, "--reference", "zoo:mnist-cnn", "--data", "mnist:test", "--calib-size", 512,
                 "--eval-size", 2000, "--repair", "reconstruct", "--out", out, "--report", report)
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["after"]["acc"] > data["before"]["acc"] and data["repair"] == "reconstruct"
    assert [layer["fqn"] for layer in data["reconstruct"]["layers"]] == ["features.conv1", "features.conv2", "classifier"]
    saved = torch.load(pruned_ckpt, weights_only=True)
    state = torch.load(out, weights_only=True)
    for key in ("features.conv1", "features.conv2", "classifier"):
        assert torch.equal(state[f"{key}.weight"] == 0, saved[f"{key}.weight_mask"] == 0), key


def test_merge_refuses_reconstruct(tmp_path):
    result = run("merge", "zoo:mnist-mlp6-a", "zoo:mnist-mlp6-b", "--data", "mnist:test", "--repair", "reconstruct",
                 "--out", tmp_path / "m.pt")
    assert result.exit_code == 2 and "'--repair': 'reconstruct' is not one of" in result.output
