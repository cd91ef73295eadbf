"""The pretrained MNIST zoo: registry, loading, specs for the CLI, recorded accuracy."""

from __future__ import annotations

import importlib
import json

import pytest
import torch

from prune_repair import zoo
from prune_repair.io.data import load_dataset
from prune_repair.metrics.classify import evaluate
from prune_repair.zoo.models import MLP, PlainCNN

NAMES = ["mnist-cnn", "mnist-cnn-bn", "mnist-mlp", "mnist-mlp6-a", "mnist-mlp6-b"]


@pytest.fixture(scope="module")
def test_slice() -> tuple[torch.Tensor, torch.Tensor]:
    """Every 5th test image: 2000 samples spread over the whole test set (its first
    2000 images are harder than average, so a head slice would be biased)."""
    x, y = load_dataset("mnist:test")
    return x[::5], y[::5]


def test_zoo_names() -> None:
    assert zoo.zoo_names() == NAMES + ["mnist-vit", "mnist-vit-b"]  # the ViTs: tests/test_zoo_transformers.py


def test_build_gives_the_registered_untrained_architecture() -> None:
    mlp = zoo.build("mnist-mlp")
    assert isinstance(mlp, MLP) and mlp.features.fc1.out_features == 128 and mlp.features.fc2.out_features == 128
    cnn = zoo.build("mnist-cnn")
    assert isinstance(cnn, PlainCNN) and cnn.features.conv1.out_channels == 16 and not hasattr(cnn.features, "bn1")
    cnn_bn = zoo.build("zoo:mnist-cnn-bn")
    assert isinstance(cnn_bn, PlainCNN) and hasattr(cnn_bn.features, "bn1")
    assert cnn_bn.training


@pytest.mark.parametrize("name", NAMES)
def test_load_reaches_recorded_accuracy(name: str, test_slice) -> None:
    model = zoo.load(name)
    assert not model.training
    recorded = zoo.entry(name).test_acc
    assert recorded is not None and 0.97 <= recorded <= 1.0
    measured = evaluate(model, *test_slice)["acc"]
    assert abs(measured - recorded) <= 0.01


@pytest.mark.parametrize("name", NAMES)
def test_arch_spec_and_kwargs_rebuild_the_checkpoint_architecture(name: str) -> None:
    spec = zoo.arch_spec(f"zoo:{name}")
    module_name, _, factory_name = spec.partition(":")
    factory = getattr(importlib.import_module(module_name), factory_name)
    kwargs = zoo.arch_kwargs(name)
    assert json.loads(json.dumps(kwargs)) == kwargs
    model = factory(**kwargs)
    state = torch.load(zoo.weights_path(name), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    assert all(t.dtype == torch.float32 for t in state.values() if t.is_floating_point())


def test_arch_kwargs_returns_a_copy() -> None:
    zoo.arch_kwargs("mnist-mlp")["widths"].append(1)
    assert zoo.arch_kwargs("mnist-mlp") == {"widths": [128, 128]}


def test_unknown_name_lists_known_models() -> None:
    for call in (zoo.build, zoo.load, zoo.arch_spec, zoo.arch_kwargs):
        with pytest.raises(ValueError, match="unknown zoo model 'resnet50': known models are mnist-cnn, mnist-cnn-bn, mnist-mlp, mnist-mlp6-a, mnist-mlp6-b"):
            call("resnet50")


def test_metrics_file_records_every_model() -> None:
    records = json.loads((zoo.WEIGHTS_DIR / zoo.METRICS_FILE).read_text())
    for name in NAMES:
        assert records[name]["arch"] == zoo.arch_spec(name)
        assert records[name]["kwargs"] == zoo.arch_kwargs(name)
        assert 0.0 < records[name]["test_loss"] == zoo.entry(name).test_loss


def test_weights_are_small() -> None:
    total = sum(zoo.weights_path(name).stat().st_size for name in NAMES)
    assert total < 3 * 1024 * 1024
