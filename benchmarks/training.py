"""Seeded, deterministic training of small classifiers, used by the zoo, the benchmarks and the tests.

``train`` runs SGD with Nesterov momentum and a triangular learning-rate schedule
(linear warm-up over the first 20% of steps, linear decay to zero), shuffling with
a ``torch.Generator`` seeded by ``seed``. The model's initial weights are the
caller's business (call ``torch.manual_seed`` before building it).
``load_or_train`` caches a trained state_dict on disk.

Example:
    >>> import torch
    >>> from prune_repair.zoo.models import MLP
    >>> x, y = torch.randn(256, 1, 28, 28), torch.randint(0, 10, (256,))
    >>> _ = torch.manual_seed(0)
    >>> model = train(MLP(widths=(16,)), x, y, epochs=1, lr=0.05, seed=0, batch_size=64)
    >>> model.training
    False
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    lr: float,
    seed: int,
    batch_size: int,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    warmup: float = 0.2,
    log: Callable[[str], None] | None = None,
) -> nn.Module:
    """Train ``model`` in place on ``(x, y)`` with cross-entropy and return it in eval mode.

    Deterministic for a given ``seed``, initial weights and thread count. ``log``
    receives one line per epoch (mean training loss and accuracy, seconds).
    """
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"need matching, non-empty x and y, got {len(x)} and {len(y)} samples")
    device = next(model.parameters()).device
    decay, no_decay = [], []
    for param in model.parameters():
        (decay if param.dim() > 1 else no_decay).append(param)
    optimizer = torch.optim.SGD(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        momentum=momentum,
        nesterov=momentum > 0,
    )
    steps_per_epoch = -(-len(x) // batch_size)
    total = epochs * steps_per_epoch
    warm = max(1, int(warmup * total))

    def lr_factor(step: int) -> float:
        return (step + 1) / warm if step < warm else max(0.0, (total - step) / max(1, total - warm))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(epochs):
        start, loss_sum, correct = time.perf_counter(), 0.0, 0
        order = torch.randperm(len(x), generator=generator)
        for first in range(0, len(x), batch_size):
            index = order[first : first + batch_size]
            xb, yb = x[index].to(device), y[index].to(device)
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += float(loss.detach()) * len(index)
            correct += int((logits.argmax(1) == yb).sum())
        if log is not None:
            log(
                f"epoch {epoch + 1}/{epochs}: loss {loss_sum / len(x):.4f} "
                f"acc {correct / len(x):.4f} ({time.perf_counter() - start:.1f} s)"
            )
    return model.eval()


def load_or_train(
    path: str | Path,
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    lr: float,
    seed: int,
    batch_size: int,
    **kwargs,
) -> nn.Module:
    """Load ``model``'s weights from ``path`` if it exists, else :func:`train` and save them there.

    The cache is a plain float state_dict, read back with ``weights_only=True``.
    Delete the file to retrain after changing any argument.
    """
    path = Path(path)
    if path.is_file():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()
    train(model, x, y, epochs, lr, seed, batch_size, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, path)
    return model
