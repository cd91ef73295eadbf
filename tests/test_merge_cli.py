"""`prune-repair merge` (the CLI contract in ARCHITECTURE.md): report keys, exit code 2 with one line, nothing written."""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from prune_repair.cli import main
from prune_repair.zoo.models import MLP

ARCH = ["--arch", "prune_repair.zoo.models:MLP", "--arch-kwargs", '{"widths": [16, 16]}']


class RollNet(nn.Module):
    """A model whose channel roll the graph tracer cannot see through."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(784, 8), nn.Linear(8, 10)

    def forward(self, x):
        return self.fc2(torch.roll(torch.relu(self.fc1(x.flatten(1))), 1, dims=-1))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    paths = []
    for seed in range(3):
        torch.manual_seed(seed)
        paths.append(root / f"m{seed}.pt")
        torch.save(MLP(widths=(16, 16)).state_dict(), paths[-1])
    torch.save(MLP(widths=(16, 8)).state_dict(), root / "other.pt")
    for seed in range(2):
        torch.manual_seed(seed)
        torch.save(RollNet().state_dict(), root / f"roll{seed}.pt")
    return root


def run(*args):
    return CliRunner().invoke(main, ["merge", *[str(a) for a in args]])


def snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_merge_writes_checkpoint_report_and_plot(ckpts, tmp_path):
    out, report, plot = tmp_path / "m.pt", tmp_path / "r.json", tmp_path / "c.png"
    result = run(ckpts / "m0.pt", ckpts / "m1.pt", *ARCH, "--data", "mnist:test", "--calib-size", 64,
                 "--curve", 3, "--out", out, "--report", report, "--plot", plot)
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert {"endpoints", "curve", "barrier", "seconds", "world_size"} <= set(data) and data["world_size"] == 1
    assert len(data["endpoints"]) == 2 and all(set(e) == {"acc", "loss"} for e in data["endpoints"])
    assert [p["alpha"] for p in data["curve"]] == [0.0, 0.5, 1.0]
    assert all(set(p) == {"alpha", "acc_raw", "loss_raw", "acc", "loss"} for p in data["curve"])
    assert set(data["barrier"]) == {"acc_raw", "acc", "loss_raw", "loss"}
    assert set(data["seconds"]) == {"align", "repair"}
    assert all(0 <= p["acc"] <= 1 for p in data["curve"])
    MLP(widths=(16, 16)).load_state_dict(torch.load(out, weights_only=True), strict=True)
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_merge_of_three_checkpoints(ckpts, tmp_path):
    out, report = tmp_path / "m.pt", tmp_path / "r.json"
    result = run(*(ckpts / f"m{i}.pt" for i in range(3)), *ARCH, "--data", "mnist:test", "--align", "weight",
                 "--repair", "rescale", "--out", out, "--report", report)
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert len(data["endpoints"]) == 3 and data["curve"][0]["alpha"] is None


@pytest.mark.parametrize("extra, message", [
    (["--alpha", "1.5"], r"alpha must be a number in \[0, 1\]"),
    (["--curve", "1"], "at least 2 points"),
    (["--repair", "reset", "--variant", "closed-form"], "reset recomputes"),
])
def test_bad_options_exit_2_with_one_line(ckpts, tmp_path, extra, message):
    before = snapshot(ckpts)
    result = run(ckpts / "m0.pt", ckpts / "m1.pt", *ARCH, "--data", "mnist:test", "--out", tmp_path / "m.pt",
                 "--report", tmp_path / "r.json", *extra)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert re.search(message, lines[0]), lines[0]
    assert list(tmp_path.iterdir()) == [] and snapshot(ckpts) == before


def test_different_architectures_name_the_key_and_both_shapes(ckpts, tmp_path):
    result = run(ckpts / "m0.pt", ckpts / "other.pt", *ARCH, "--data", "mnist:test", "--out", tmp_path / "m.pt")
    assert result.exit_code == 2
    assert "key 'features.fc2.weight' is [16, 16] in" in result.output and "[8, 16] in" in result.output
    assert len(result.output.strip().splitlines()) == 1 and list(tmp_path.iterdir()) == []


def test_groups_that_cannot_be_found_name_the_layer_and_the_way_out(ckpts, tmp_path):
    result = run(ckpts / "roll0.pt", ckpts / "roll1.pt", "--arch", f"{__name__}:RollNet", "--data", "mnist:test",
                 "--out", tmp_path / "m.pt")
    assert result.exit_code == 2, result.output
    assert "changes the output of layer 'fc2'" in result.output and "--groups" in result.output
    assert list(tmp_path.iterdir()) == []


def test_hand_written_groups_file(ckpts, tmp_path):
    groups = tmp_path / "g.json"
    groups.write_text(json.dumps({"h": ["fc1.weight:0", "fc1.bias:0", "fc2.weight:1"]}))
    out = tmp_path / "m.pt"
    result = run(ckpts / "roll0.pt", ckpts / "roll1.pt", "--arch", f"{__name__}:RollNet", "--data", "mnist:test",
                 "--groups", groups, "--out", out)
    assert result.exit_code == 2 and "changes the output" in result.output  # the roll breaks any permutation
    groups.write_text("[1, 2]")
    result = run(ckpts / "m0.pt", ckpts / "m1.pt", *ARCH, "--data", "mnist:test", "--groups", groups, "--out", out)
    assert result.exit_code == 2 and "JSON object" in result.output and not out.exists()


def test_missing_matplotlib_is_one_line(ckpts, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = run(ckpts / "m0.pt", ckpts / "m1.pt", *ARCH, "--data", "mnist:test", "--out", tmp_path / "m.pt",
                 "--plot", tmp_path / "c.png")
    assert result.exit_code == 2 and "needs matplotlib, which is not installed: pip install matplotlib" in result.output
    assert list(tmp_path.iterdir()) == []
