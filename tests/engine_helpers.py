"""Shared helpers for the engine tests: tiny float64 models and a hooked 'unfused' run."""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from prune_repair.engine.run.forward import hooked_pass
from prune_repair.zoo.models import MLP, PlainCNN, ResNetMini, TokenMLP


def tiny_models() -> dict[str, nn.Module]:
    """One of each kind the engine must handle, randomly initialised, float64, with
    BatchNorm running statistics made non-trivial."""
    torch.manual_seed(0)
    models = {
        "mlp": MLP(widths=(32, 32)),
        "cnn": PlainCNN(channels=(8, 16)),
        "cnn-bn": PlainCNN(channels=(8, 16), batch_norm=True),
        "resnet-bn": ResNetMini(width=8, blocks_per_stage=(1, 1), norm="bn"),
        "resnet-ln": ResNetMini(width=8, blocks_per_stage=(1, 1), norm="ln"),
        "tokens": TokenMLP(dim=16, depth=1),
        "resnet18": torchvision.models.resnet18(num_classes=10),
    }
    for model in models.values():
        model.double()
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.5, 0.5)
        model.eval()
    return models


def inputs_for(name: str, n: int = 32) -> torch.Tensor:
    n = min(n, 12) if name == "resnet18" else n  # float64 resnet18 is the slow one
    torch.manual_seed(1)
    size = 32 if name == "resnet18" else 28
    channels = 3 if name == "resnet18" else 1
    return torch.randn(n, channels, size, size, dtype=torch.float64)


def damage_(model: nn.Module, sparsity: float = 0.5, seed: int = 2) -> None:
    """Zero a random fraction of every conv/linear weight and scale the rest (weight surgery)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                keep = torch.rand(m.weight.shape, generator=g) >= sparsity
                m.weight.mul_(keep.to(m.weight.dtype) * 1.7)


def run_with_corrections(model: nn.Module, sites, corrections, x: torch.Tensor) -> torch.Tensor:
    """Output of ``model`` with each site's affine applied by a hook (the unfused form)."""
    modules = dict(model.named_modules())
    hooks = {}
    for site in sites:
        if site.fqn not in corrections:
            continue
        c = corrections[site.fqn]

        def hook(module, inputs, output, c=c, site=site):
            view = [1] * output.dim()
            view[site.channel_dim] = -1
            return output * c.scale.to(output.dtype).view(view) + c.shift.to(output.dtype).view(view)

        hooks[modules[site.fqn]] = hook
    with hooked_pass(model, forward_hooks=hooks) as run:
        return run(x)
