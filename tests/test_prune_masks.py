"""Masks survive repair and fusion; torch.nn.utils.prune masks are kept valid."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.utils.prune as torch_prune

import prune_repair as pr
from prune_repair.zoo.models import MLP, PlainCNN, ResNetMini
from prune_repair.prune import (
    MaskStyle,
    PruneError,
    apply_masks_,
    find_targets,
    measure_sparsity,
    prune_,
    remove_reparametrization_,
)


def zero_positions(model):
    return {t.fqn: (t.weight == 0).clone() for t in find_targets(model)}


@pytest.mark.parametrize("make", [
    lambda: MLP(widths=(32, 32), in_features=20),
    lambda: PlainCNN(channels=(4, 8), batch_norm=True),
    lambda: ResNetMini(width=4, blocks_per_stage=(1, 1), norm="ln"),
])
@pytest.mark.parametrize("mode", ["auto", "repair", "rescale", "reset"])
def test_zeros_stay_zeros_through_repair_and_fusion(make, mode):
    torch.manual_seed(0)
    model = make().double()
    batch = model.example_inputs(32)
    reference = pr.collect_stats(model, batch)
    report = prune_(model, 0.9)
    zeros = zero_positions(model)
    if mode == "reset" and not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()):
        with pytest.raises(ValueError, match="no site of this model is followed by a BatchNorm"):
            pr.repair_(model, reference, batch, repair=mode)
        return
    pr.repair_(model, reference, batch, repair=mode)
    after = zero_positions(model)
    for fqn, z in zeros.items():
        assert torch.equal(after[fqn], z), fqn  # exactly the same positions, no more, no fewer
    assert measure_sparsity(find_targets(model)).zeros == report.zeros
    fused = pr.fuse_batchnorm(model, batch)
    for fqn, z in zeros.items():
        assert bool((fused.get_submodule(fqn).weight[z] == 0).all())


def test_torch_style_masks_stay_valid_with_and_without_remove():
    torch.manual_seed(0)
    model = PlainCNN(channels=(4, 8), batch_norm=True).double()
    batch = model.example_inputs(32)
    reference = pr.collect_stats(model, batch)
    prune_(model, 0.9, style=MaskStyle.TORCH)
    masks = {n: b.clone() for n, b in model.named_buffers() if n.endswith("weight_mask")}
    assert set(masks) == {"features.conv1.weight_mask", "features.conv2.weight_mask", "classifier.weight_mask"}

    plain = copy.deepcopy(model)
    remove_reparametrization_(plain)  # prune.remove first, then repair
    pr.repair_(model, reference, batch, repair="repair")  # repair through weight_orig / weight_mask
    pr.repair_(plain, reference, batch, repair="repair")

    for name, mask in masks.items():
        assert torch.equal(dict(model.named_buffers())[name], mask)  # masks untouched
    with torch.no_grad():
        torch.testing.assert_close(model(batch), plain(batch))  # same function either way
    assert remove_reparametrization_(model) == 3
    assert set(model.state_dict()) == set(PlainCNN(channels=(4, 8), batch_norm=True).state_dict())
    for name, mask in masks.items():
        weight = model.get_submodule(name.rsplit(".", 1)[0]).weight
        assert bool((weight[mask == 0] == 0).all())


def test_torch_global_unstructured_then_repair():
    """The post-step use: torch's own pruner, then repair_ (masks kept), then prune.remove."""
    torch.manual_seed(1)
    model = MLP(widths=(32,), in_features=20).double()
    batch = model.example_inputs(64)
    reference = pr.collect_stats(model, batch)
    params = [(model.features.fc1, "weight"), (model.classifier, "weight")]
    torch_prune.global_unstructured(params, pruning_method=torch_prune.L1Unstructured, amount=0.8)
    before = measure_sparsity(find_targets(model))
    pr.repair_(model, reference, batch)
    after = pr.collect_stats(model, batch)["features.fc1"]
    torch.testing.assert_close(after.std, reference["features.fc1"].std, rtol=1e-6, atol=1e-9)
    assert measure_sparsity(find_targets(model)).zeros == before.zeros
    remove_reparametrization_(model)
    assert measure_sparsity(find_targets(model)).zeros == before.zeros


def test_prune_on_top_of_existing_torch_masks_combines_them():
    model = MLP(widths=(16,), in_features=10)
    torch_prune.l1_unstructured(model.features.fc1, "weight", amount=0.5)
    report = prune_(model, 0.75, style="torch")
    assert report.zeros == round(0.75 * report.prunable)
    mask = model.features.fc1.weight_mask
    assert int((mask == 0).sum()) >= 80  # the first mask is kept inside the new one


def test_mask_shape_mismatch():
    model = MLP(widths=(4,), in_features=3)
    with pytest.raises(PruneError, match="has shape .* but its weight has"):
        apply_masks_(find_targets(model), {"features.fc1": torch.ones(2, 2, dtype=torch.bool)})
