"""Folding: pure tensor functions and module wrappers give the same function, in float64."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from prune_repair import Correction, find_sites, fold_affine, fold_affine_into_bn, fold_corrections, fuse_batchnorm, fuse_bn
from engine_helpers import inputs_for, tiny_models

torch.manual_seed(0)
D = torch.float64


def test_fold_affine_into_a_conv_equals_scaling_its_output():
    conv = nn.Conv2d(3, 5, 3).double()
    x = torch.randn(4, 3, 8, 8, dtype=D)
    scale, shift = torch.rand(5, dtype=D) + 0.5, torch.randn(5, dtype=D)
    w, b = fold_affine(conv.weight, conv.bias, scale, shift)
    expected = conv(x) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    assert_close(F.conv2d(x, w, b), expected)


def test_fold_affine_keeps_zeros_and_makes_a_bias_from_the_shift():
    weight = torch.tensor([[0.0, 2.0], [3.0, 0.0]], dtype=D)
    w, b = fold_affine(weight, None, torch.tensor([2.0, -1.0], dtype=D), torch.tensor([1.0, 0.5], dtype=D))
    assert torch.equal(w == 0, weight == 0)
    assert_close(b, torch.tensor([1.0, 0.5], dtype=D))


@pytest.mark.parametrize("affine", [True, False])
def test_fold_affine_into_batchnorm(affine):
    bn = nn.BatchNorm1d(4, affine=affine).double().eval()
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    x = torch.randn(10, 4, dtype=D)
    scale, shift = torch.rand(4, dtype=D) + 0.5, torch.randn(4, dtype=D)
    expected = bn(x) * scale + shift
    w, b, rm, rv = fold_affine_into_bn(bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps, scale, shift)
    assert_close(F.batch_norm(x, rm, rv, w, b, False, 0.0, bn.eps), expected)


def test_fold_bn_equals_conv_then_batchnorm():
    conv, bn = nn.Conv2d(2, 3, 3, bias=False).double(), nn.BatchNorm2d(3).double().eval()
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(2, 2, 6, 6, dtype=D)
    w, b = fuse_bn(conv.weight, None, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
    assert_close(F.conv2d(x, w, b), bn(conv(x)))


@pytest.mark.parametrize("name", ["cnn-bn", "resnet-bn", "resnet18"])
def test_fuse_batchnorm_model_computes_the_same_function(name):
    model, x = tiny_models()[name], inputs_for(name, 4)
    folded = fuse_batchnorm(model, x)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    assert_close(folded(x), model(x))
    assert any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_fuse_returns_a_corrected_copy_and_leaves_the_input_alone():
    model, x = tiny_models()["mlp"], inputs_for("mlp")
    sites = find_sites(model, x)
    before = copy.deepcopy(model.state_dict())
    corrections = {s.fqn: Correction(torch.full((s.channels,), 2.0, dtype=D), torch.ones(s.channels, dtype=D))
                   for s in sites[:1]}
    fused = fold_corrections(model, corrections, sites)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    expected = model.features.fc1(x.flatten(1)) * 2 + 1
    assert_close(fused.features.fc1(x.flatten(1)), expected)


def test_float32_weights_take_float32_scales_in_place_with_the_float64_products_values():
    from prune_repair.engine.sites.fold import scale_rows_

    scale = (torch.rand(64, dtype=D) * 3 + 0.1).float().double()  # float32 holds each scale exactly
    for weight in (torch.randn(64, 300), torch.randn(64, 3, 3, 3).contiguous(memory_format=torch.channels_last),
                   torch.randn(300, 64).t()):
        expected, _ = fold_affine(weight, None, scale, None)
        got = weight.clone() if weight.is_contiguous() else weight
        assert scale_rows_(got, scale) is got and torch.equal(got, expected)


def test_a_float32_repair_folds_float32_scales_and_a_float64_one_keeps_its_own():
    import prune_repair as pr

    for dtype in (torch.float32, D):
        model, x = copy.deepcopy(tiny_models()["mlp"]).to(dtype), inputs_for("mlp").to(dtype)
        goal = pr.collect_stats(model, x)
        with torch.no_grad():
            model.features.fc1.weight.mul_(torch.rand_like(model.features.fc1.weight) * 2)
        scales = [c.scale for c in pr.repair_(model, goal, x, repair="repair").corrections.values()]
        exact = [torch.equal(s.float().double(), s) for s in scales]
        assert all(exact) if dtype == torch.float32 else not all(exact)
