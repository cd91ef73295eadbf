"""``prune-repair merge`` on torchvision ViT checkpoints: a permuted copy is aligned back (weight
or activation matching over head-aware groups) and the merge scores as the model all along the
curve; --align none with a correction runs."""

import json

import pytest
import torch
from click.testing import CliRunner

from prune_repair.cli.main import main
from prune_repair.merge import find_groups, permute, random_perms
from prune_repair.zoo.vit import mnist_vit

TINY = {"num_layers": 2, "hidden_dim": 16, "num_heads": 2, "mlp_dim": 32}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("vitmerge")
    torch.manual_seed(0)
    a = mnist_vit(**TINY).eval()
    with torch.no_grad():  # a non-zero classifier, so the accuracy depends on every weight
        a.heads.head.weight.normal_()
    groups = find_groups(a, torch.randn(2, 1, 28, 28))
    b = permute(a, groups, random_perms(groups, torch.Generator().manual_seed(1)))
    torch.save(a.state_dict(), root / "a.pt")
    torch.save(b.state_dict(), root / "b.pt")
    return root


def run(root, tmp_path, *extra):
    rep = tmp_path / "r.json"
    res = CliRunner().invoke(main, ["merge", str(root / "a.pt"), str(root / "b.pt"), "--arch",
                                    "prune_repair.zoo.vit:mnist_vit", "--arch-kwargs", json.dumps(TINY), "--data",
                                    "mnist:train", "--eval-data", "mnist:test", "--eval-size", "300", "--calib-size",
                                    "32", "--out", str(tmp_path / "m.pt"), "--report", str(rep), *extra])
    assert res.exit_code == 0, res.output
    return json.loads(rep.read_text())


@pytest.mark.parametrize("align", ["weight", "activation"])
def test_a_permuted_vit_checkpoint_merges_back_along_the_curve(ckpts, tmp_path, align):
    r = run(ckpts, tmp_path, "--align", align, "--repair", "none", "--curve", 3)
    end = r["endpoints"][0]
    assert r["endpoints"][1] == pytest.approx(end, abs=1e-6)
    for p in r["curve"]:
        assert p["acc_raw"] == pytest.approx(end["acc"], abs=1e-9)
        assert p["loss_raw"] == pytest.approx(end["loss"], rel=1e-5)


@pytest.mark.parametrize("repair", ["repair", "rescale", "auto"])
def test_align_none_with_a_correction_runs_on_a_vit(ckpts, tmp_path, repair):
    r = run(ckpts, tmp_path, "--align", "none", "--repair", repair)
    assert r["curve"][0]["acc"] is not None and r["repair"] == repair
