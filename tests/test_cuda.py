"""The CUDA path gives the CPU's results (float64), when a GPU is present; skipped otherwise.

CI has no GPU, so these run only on a machine with one (``pytest -m cuda``).
"""

from __future__ import annotations

import copy

import pytest
import torch

import prune_repair as pr
from engine_helpers import damage_, inputs_for, tiny_models

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

NAMES = ["mlp", "cnn-bn", "resnet-bn", "resnet-ln", "tokens"]


@pytest.fixture(scope="module")
def models():
    return tiny_models()


@pytest.mark.parametrize("name", NAMES)
def test_collect_stats_on_cuda_equals_cpu(models, name):
    model, x = models[name], inputs_for(name)
    cpu = pr.collect_stats(model, x)
    gpu = pr.collect_stats(copy.deepcopy(model).cuda(), x.cuda())
    for fqn in cpu:
        torch.testing.assert_close(gpu[fqn].mean.cpu(), cpu[fqn].mean, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(gpu[fqn].std.cpu(), cpu[fqn].std, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("repair", ["repair", "rescale", "auto"])
@pytest.mark.parametrize("name", NAMES)
def test_repair_on_cuda_equals_cpu(models, name, repair):
    x = inputs_for(name)
    goal = pr.collect_stats(models[name], x)
    operated = copy.deepcopy(models[name])
    damage_(operated)
    on_gpu = copy.deepcopy(operated).cuda()
    pr.repair_(operated, goal, x, repair=repair)
    pr.repair_(on_gpu, goal, x.cuda(), repair=repair)
    for (key, want), got in zip(operated.state_dict().items(), on_gpu.state_dict().values()):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-9, atol=1e-11, msg=key)


def test_float32_cuda_statistics_stay_close(models):
    model = copy.deepcopy(models["cnn-bn"]).float()
    x = inputs_for("cnn-bn").float()
    cpu = pr.collect_stats(model, x)
    gpu = pr.collect_stats(model.cuda(), x.cuda())
    for fqn in cpu:
        assert gpu[fqn].mean.dtype == torch.float64  # accumulated in float64 on the device too
        torch.testing.assert_close(gpu[fqn].std.cpu(), cpu[fqn].std, rtol=1e-4, atol=1e-6)
