"""Remove a fraction of the output channels of a CNN through torch-pruning's dependency graph.

Channels coupled by the graph (a residual stream, a BatchNorm, a flatten into a linear
layer) form one group and are removed together, so the pruned model still runs. A
channel's score is the one of the MLP units (:mod:`.structured_mlp`) summed over the
layers that read it: ``sqrt(E[x_c^2]) * ||W[:, c]||``, the activation energy of the
channel where a consumer reads it (after BatchNorm and ReLU) times the norm of the
consumer's weights on it, from one pass over the calibration data. The last conv/linear
layer (the classifier) keeps its outputs. The history torch-pruning records
(``pruner.pruning_history()``) is what :func:`~prune_repair.prune.structured.save_structured`
stores and :func:`~prune_repair.prune.structured.repair_structured_` maps statistics through.

Example:
    >>> import torch
    >>> from prune_repair.zoo.models import ResNetMini
    >>> model, x = ResNetMini(width=8).eval(), torch.randn(16, 1, 28, 28)
    >>> history = prune_channels_(model, x, 0.5)
    >>> model.conv1.out_channels, model(x).shape
    (4, torch.Size([16, 10]))
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..engine.run.forward import ForwardFn, as_batches, hooked_pass
from ..engine.sites.find import PRODUCER_TYPES
from .structured import History, _example
from .targets import PruneError


def input_energy(model: nn.Module, data: Any, forward_fn: ForwardFn | None = None) -> dict[nn.Module, torch.Tensor]:
    """``E[x_c^2]`` of the input of every conv/linear layer, per input channel (float64)."""
    sums: dict[nn.Module, torch.Tensor] = {}
    counts: dict[nn.Module, int] = {}

    def hook(module, inp):
        x = inp[0].detach().to(torch.float64)
        if isinstance(module, nn.Linear):
            rows = x.reshape(-1, x.shape[-1])
        else:
            rows = x.transpose(0, 1).reshape(x.shape[1], -1).T
        sums[module] = sums.get(module, 0) + rows.square().sum(0)
        counts[module] = counts.get(module, 0) + rows.shape[0]

    layers = [m for m in model.modules() if isinstance(m, PRODUCER_TYPES)]
    with hooked_pass(model, pre_hooks={m: hook for m in layers}, forward_fn=forward_fn) as run:
        for batch in as_batches(data):
            run(batch)
    return {m: sums[m] / max(counts[m], 1) for m in sums}


def _in_norms(layer: nn.Module) -> torch.Tensor | None:
    """``||W[:, c]||`` per input channel of a conv (groups 1) or linear layer."""
    w = layer.weight.detach().to(torch.float64)
    if isinstance(layer, nn.Linear):
        return w.norm(dim=0)
    if getattr(layer, "groups", 1) != 1 or getattr(layer, "transposed", False):
        return None
    return w.transpose(0, 1).flatten(1).norm(dim=1)


class EnergyImportance:
    """torch-pruning importance: per root channel, the sum over the group's consumers of
    ``sqrt(E[x_c^2]) * ||W[:, c]||`` (see the module doc)."""

    def __init__(self, energy: dict[nn.Module, torch.Tensor]):
        self.energy = energy

    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor | None:
        import torch_pruning as tp

        reads = (tp.pruner.function.prune_conv_in_channels, tp.pruner.function.prune_linear_in_channels)
        total = None
        for i, (dep, idxs) in enumerate(group):
            layer, root_idxs = dep.layer, group[i].root_idxs
            if dep.pruning_fn not in reads or layer not in self.energy or any(r is None for r in root_idxs):
                continue
            norms = _in_norms(layer)
            if norms is None or len(norms) != len(self.energy[layer]):
                continue
            local = (self.energy[layer].to(norms.device).clamp_min(0).sqrt() * norms)[torch.as_tensor(idxs)]
            if total is None:
                total = torch.zeros(len(group[0].idxs), dtype=torch.float64, device=local.device)
            total.scatter_add_(0, torch.as_tensor(root_idxs, device=local.device), local)
        return total


def classifier_layer(model: nn.Module) -> nn.Module | None:
    """The last conv/linear layer in module order (its outputs are the model's, never pruned)."""
    layers = [m for m in model.modules() if isinstance(m, PRODUCER_TYPES)]
    return layers[-1] if layers else None


def prune_channels_(model: nn.Module, data: Any, ratio: float, *, forward_fn: ForwardFn | None = None) -> History:
    """Remove ``ratio`` of the output channels of every prunable group of ``model`` in place
    (see the module doc); returns torch-pruning's pruning history."""
    import torch_pruning as tp

    if not 0 <= ratio < 1:
        raise PruneError(f"--structured {ratio} is outside [0, 1): give the fraction of channels to remove, e.g. 0.25")
    last = classifier_layer(model)
    if last is None or not any(isinstance(m, (nn.Conv1d, nn.Conv2d)) for m in model.modules()):
        raise PruneError("no recognizable MLP or conv channel group in the model: --structured needs transformer "
                         "MLPs or conv layers")
    if ratio == 0:
        return []
    energy = input_energy(model, data, forward_fn)
    try:
        pruner = tp.pruner.MetaPruner(model, _example(data), importance=EnergyImportance(energy), pruning_ratio=ratio,
                                      ignored_layers=[last], forward_fn=forward_fn)
        pruner.step()
    except (RuntimeError, ValueError, KeyError, IndexError) as err:
        raise PruneError(f"torch-pruning could not trace the model's channel groups ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}): --structured needs a traceable model") from None
    history = [(str(n), bool(o), [int(i) for i in idx]) for n, o, idx in pruner.pruning_history()]
    if not history:
        raise PruneError("torch-pruning found no channel group to prune in the model: --structured does not apply")
    return history
