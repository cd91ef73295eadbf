"""ImageFolder data on the CLI: --preprocess, streaming, --batch-size, --eval-size, --workers;
merge --align-size (the CLI contract in ARCHITECTURE.md)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from prune_repair.cli import main

SIZES = [(40, 36), (48, 48), (36, 52)]  # three sizes: any draw of more than 8 of 12 mixes them
ARCH = ["--arch", "prune_repair.zoo.models:ResNetMini", "--arch-kwargs",
        '{"num_classes": 3, "in_channels": 3, "input_size": 32, "width": 8}']
RESNET18 = ["--arch", "resnet18", "--arch-kwargs", '{"num_classes": 3}']
SMALL = "resize=36,crop=32,mean=0.5/0.5/0.5,std=0.25/0.25/0.25"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A 3-class ImageFolder of 12 RGB images in three sizes."""
    root = tmp_path_factory.mktemp("imgs")
    g = torch.Generator().manual_seed(0)
    for i in range(12):
        d = root / f"class{i % 3}"
        d.mkdir(exist_ok=True)
        w, h = SIZES[(i // 3) % 3]
        pixels = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(d / f"img{i}.png")
    return root


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from prune_repair.zoo.models import ResNetMini

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "mini.pt"
    torch.save(ResNetMini(num_classes=3, in_channels=3, input_size=32, width=8).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def resnet18(tmp_path_factory):
    import torchvision

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "resnet18.pt"
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), path)  # a plain state_dict, as torchvision's
    return path


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


def prune(folder, ckpt, tmp_path, *extra, arch=ARCH):
    out, report = tmp_path / "pruned.pt", tmp_path / "report.json"
    result = run("prune", ckpt, *arch, "--data", folder, "--sparsity", "0.5", "--out", out, "--report", report,
                 "--workers", "0", *extra)
    return result, (json.loads(report.read_text()) if report.exists() else None)


def test_explicit_preprocess_mixed_sizes_batches(folder, ckpt, tmp_path):
    result, report = prune(folder, ckpt, tmp_path, "--preprocess", SMALL, "--calib-size", "4", "--eval-size", "6",
                           "--batch-size", "4")
    assert result.exit_code == 0, result.output
    assert report["preprocess"]["resize"] == [36] and report["preprocess"]["crop"] == [32]
    assert report["batch_size"] == 4 and report["eval_size"] == 6 and report["eval_samples"] == 6
    assert report["workers"] == 0
    assert "6 samples" in result.stdout  # the table is on stdout, with the evaluation count
    assert "wrote checkpoint" in result.stdout and "wrote report" in result.stdout
    from prune_repair.zoo.models import ResNetMini

    state = torch.load(tmp_path / "pruned.pt", weights_only=True)
    ResNetMini(num_classes=3, in_channels=3, input_size=32, width=8).load_state_dict(state, strict=True)


def test_preprocess_by_weights_name(folder, tmp_path):
    # the weights' transforms() only (no download): resize 232, crop 224, ImageNet mean/std
    from prune_repair.zoo.models import ResNetMini

    ckpt = tmp_path / "mini224.pt"
    torch.save(ResNetMini(num_classes=3, in_channels=3, input_size=224, width=4).state_dict(), ckpt)
    arch = ["--arch", "prune_repair.zoo.models:ResNetMini", "--arch-kwargs",
            '{"num_classes": 3, "in_channels": 3, "input_size": 224, "width": 4}']
    result, report = prune(folder, ckpt, tmp_path, "--preprocess", "ResNet18_Weights.IMAGENET1K_V1",
                           "--calib-size", "4", "--eval-size", "4", arch=arch)
    assert result.exit_code == 0, result.output
    assert report["preprocess"]["weights"] == "ResNet18_Weights.IMAGENET1K_V1"
    assert report["preprocess"]["crop"] == [224] and report["preprocess"]["mean"] == [0.485, 0.456, 0.406]


def test_streaming_opens_only_the_files_used(folder, ckpt, tmp_path, monkeypatch):
    opened = set()
    real_open = Image.open

    def counting_open(fp, *args, **kwargs):
        opened.add(str(fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", counting_open)
    result, report = prune(folder, ckpt, tmp_path, "--preprocess", SMALL, "--calib-size", "3", "--eval-size", "4")
    assert result.exit_code == 0, result.output
    assert 0 < len(opened) <= 3 + 4 < 12  # never the whole folder


def test_mixed_sizes_without_preprocess_is_one_line_error(folder, ckpt, tmp_path):
    result, _ = prune(folder, ckpt, tmp_path, "--calib-size", "9")
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "--preprocess" in lines[0] and "differ in size" in lines[0], result.output
    assert not (tmp_path / "pruned.pt").exists()


def test_preprocess_on_tensor_data_is_an_error(tmp_path):
    result = run("prune", "zoo:mnist-mlp", "--data", "mnist:test", "--sparsity", "0.5", "--preprocess", SMALL,
                 "--out", tmp_path / "p.pt")
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "--preprocess applies to ImageFolder" in lines[0], result.output


@pytest.mark.parametrize("spec, words", [("Foo_Weights.X", "not a torchvision weights name"),
                                         ("resize=abc", "not a size"), ("mean=0.5", "mean and std together"),
                                         ("size=3", "cannot read")])
def test_bad_preprocess_is_one_line_error(folder, ckpt, tmp_path, spec, words):
    result, _ = prune(folder, ckpt, tmp_path, "--preprocess", spec)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], result.output


def test_eval_size_and_batch_size_on_tensor_data(tmp_path):
    report = tmp_path / "r.json"
    result = run("repair", "zoo:mnist-mlp", "--reference", "zoo:mnist-mlp", "--data", "mnist:test", "--eval-size",
                 "500", "--batch-size", "100", "--out", tmp_path / "r.pt", "--report", report)
    assert result.exit_code == 0, result.output
    rep = json.loads(report.read_text())
    assert rep["eval_size"] == 500 and rep["batch_size"] == 100 and rep["preprocess"] is None
    assert "500" in result.stdout and "wrote checkpoint" in result.stdout
    too_many = run("repair", "zoo:mnist-mlp", "--reference", "zoo:mnist-mlp", "--data", "mnist:test", "--eval-size",
                   "20000", "--out", tmp_path / "r2.pt")
    assert too_many.exit_code == 2 and "--eval-size" in too_many.output


def test_merge_align_size(tmp_path):
    report = tmp_path / "m.json"
    result = run("merge", "zoo:mnist-mlp6-a", "zoo:mnist-mlp6-b", "--data", "mnist:test", "--align-size", "1000",
                 "--calib-size", "64", "--batch-size", "128", "--eval-size", "500", "--out", tmp_path / "m.pt",
                 "--report", report)
    assert result.exit_code == 0, result.output
    rep = json.loads(report.read_text())
    assert rep["align_size"] == 1000 and rep["calib_size"] == 64 and rep["batch_size"] == 128
    assert rep["align"] == "activation" and rep["eval_size"] == 500
    bad = run("merge", "zoo:mnist-mlp6-a", "zoo:mnist-mlp6-b", "--data", "mnist:test", "--align", "weight",
              "--align-size", "100", "--out", tmp_path / "m2.pt")
    assert bad.exit_code == 2 and "--align-size" in bad.output


def test_align_size_streams_batches(monkeypatch):
    """Activation matching reads an iterable batch by batch (never list()s it)."""
    import importlib

    am = importlib.import_module("prune_repair.merge.activation_matching")
    from prune_repair.merge.find_groups import find_groups
    from prune_repair.zoo.models import MLP

    a, b = MLP(widths=(8,)), MLP(widths=(8,))
    x = torch.randn(64, 1, 28, 28)
    groups = find_groups(a, x)
    seen = []

    def gen():
        for i in range(4):
            seen.append(i)
            yield x[16 * i : 16 * (i + 1)]

    lazy = am.activation_matching(a, b, gen(), groups)
    full = am.activation_matching(a, b, x, groups)
    assert seen == [0, 1, 2, 3]
    assert all(torch.equal(lazy.perms[g.name], full.perms[g.name]) for g in groups)


@pytest.mark.slow
def test_torchvision_resnet18_state_dict_end_to_end(folder, resnet18, tmp_path):
    """The README's ImageNet command on a torchvision model and a plain state_dict file."""
    result, report = prune(folder, resnet18, tmp_path, "--preprocess", "ResNet18_Weights.IMAGENET1K_V1",
                           "--calib-size", "4", "--eval-size", "4", "--batch-size", "2", arch=RESNET18)
    assert result.exit_code == 0, result.output
    assert report["results"][0]["achieved_sparsity"] == pytest.approx(0.5, abs=0.01)


@pytest.mark.slow
def test_workers_stream_images(folder, ckpt, tmp_path):
    out, report = tmp_path / "pruned.pt", tmp_path / "report.json"
    result = run("prune", ckpt, *ARCH, "--data", folder, "--sparsity", "0.5", "--out", out, "--report", report,
                 "--workers", "2", "--preprocess", SMALL, "--calib-size", "4", "--batch-size", "3")
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["workers"] == 2
