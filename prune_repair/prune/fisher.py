"""Per-sample gradients of the prunable weights, and the diagonal-Fisher score.

:func:`gradient_chunks` yields gradients of the loss with respect to every target
weight, one gradient per group of ``group_size`` samples (1 = per-sample, the
empirical Fisher), computed with ``torch.func.vmap(grad(...))`` over
``functional_call`` (a per-sample loop is the fallback for models vmap cannot
trace). The model runs in eval mode (BatchNorm uses its running statistics) and
is left unchanged. Data is labelled ``(x, y)``, or an HF input dict: a sequence classifier's
labels or a causal LM's own next-token loss (:mod:`~prune_repair.prune.grad_data`).

Diagonal Fisher score of weight q: ``w_q**2 * mean_n(g_nq**2) / 2``.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from .targets import find_targets
    >>> model = nn.Sequential(nn.Linear(4, 3))
    >>> x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    >>> fisher_scores(model, find_targets(model), (x, y))["0"].shape
    torch.Size([3, 4])
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from ..engine.run import distributed
from ..engine.run.forward import eval_mode
from ..engine.run.progress import Progress as ShownProgress
from ..engine.run.progress import ProgressArg
from .grad_data import GradientSamples, LossFn, gradient_samples
from .targets import PruneError, Target, effective_weights

Progress = Callable[[int, int], None]
"""``progress(done, total)``: called after each chunk of gradients."""


def labeled_data(data: Any, method: str = "fisher") -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` tensors from ``data``, or a :class:`PruneError` saying labels are needed."""
    if isinstance(data, dict) and "x" in data and "y" in data:
        data = (data["x"], data["y"])
    if (
        isinstance(data, (tuple, list)) and len(data) == 2
        and all(isinstance(t, torch.Tensor) for t in data)
    ):
        x, y = data
        if y.dim() != 1 or y.is_floating_point() or len(y) != len(x):
            raise PruneError(
                f"{method} pruning needs one integer class label per sample: got labels of shape "
                f"{list(y.shape)} and dtype {y.dtype} for {len(x)} samples"
            )
        if len(x) == 0:
            raise PruneError(f"{method} pruning needs calibration samples: the data is empty")
        return x, y
    raise PruneError(
        f"{method} pruning needs labelled calibration data: pass data=(x, y) with integer class labels y"
    )


def local_share(num_grads: int | None) -> int | None:
    """This rank's share of ``num_grads`` gradients (all of them without a process group).

    >>> local_share(400), local_share(None)
    (400, None)
    """
    if num_grads is None or not distributed.is_distributed():
        return num_grads
    part = distributed.shard(int(num_grads))
    return part.stop - part.start


def _sample_order(n: int, needed: int, seed: int) -> torch.Tensor:
    """Indices of ``needed`` samples: seeded permutations of ``range(n)``, repeated when needed > n."""
    generator = torch.Generator().manual_seed(int(seed))
    parts = [torch.randperm(n, generator=generator) for _ in range(-(-needed // n))]
    return torch.cat(parts)[:needed]


def gradient_chunks(
    model: nn.Module,
    targets: list[Target],
    data: Any,
    *,
    num_grads: int | None = None,
    group_size: int = 1,
    chunk: int = 32,
    seed: int = 0,
    loss_fn: LossFn | None = None,
    progress: Progress | None = None,
    method: str = "fisher",
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield ``{fqn: (k, *weight.shape)}`` gradient chunks, ``num_grads`` gradients in all.

    ``data``: labelled ``(x, y)``, or an HF input dict (with or without class labels, see
    :func:`~prune_repair.prune.grad_data.gradient_samples`). Each gradient is of the mean loss
    over ``group_size`` samples. ``num_grads`` defaults to ``len(x) // group_size``; when more
    samples are needed than the data holds, seeded permutations of it are repeated.
    """
    samples = gradient_samples(data, method)
    if group_size < 1 or chunk < 1:
        raise PruneError(f"group_size and chunk must be at least 1, got {group_size} and {chunk}")
    num_grads = len(samples) // group_size if num_grads is None else int(num_grads)
    if num_grads < 1:
        raise PruneError(f"{method} needs at least one gradient: {len(samples)} samples < mini-batch size {group_size}")
    param = next(iter(model.parameters()))
    order = _sample_order(len(samples), num_grads * group_size, seed)
    names = {t.stored_name: t.fqn for t in targets}
    state = {**{n: p.detach() for n, p in model.named_parameters()}, **dict(model.named_buffers())}
    use_vmap = samples.plain  # dict batches (HF models) take the per-group loop: their forward is not vmap-safe
    with eval_mode(model):
        for start in range(0, num_grads, chunk):
            k = min(chunk, num_grads - start)
            idx = order[start * group_size:(start + k) * group_size]
            if use_vmap:
                xb, yb = samples.take(idx, param)
                try:
                    grads = _vmap_grads(model, state, names, xb.reshape(k, group_size, *xb.shape[1:]),
                                        yb.reshape(k, group_size), loss_fn or F.cross_entropy)
                except (RuntimeError, NotImplementedError) as err:
                    warnings.warn(f"vmap cannot trace this model ({str(err).splitlines()[0]}): using a per-sample loop")
                    use_vmap = False
            if not use_vmap:
                groups = [samples.take(part, param) for part in idx.view(k, group_size)]
                grads = _loop_grads(model, targets, groups, samples, loss_fn)
            yield grads
            if progress is not None:
                progress(start + k, num_grads)


def _vmap_grads(model, state, names, xb, yb, loss_fn) -> dict[str, torch.Tensor]:
    wanted = {n: state[n] for n in names}
    rest = {n: t for n, t in state.items() if n not in wanted}

    def loss(weights: dict[str, torch.Tensor], xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        return loss_fn(functional_call(model, {**rest, **weights}, (xs,)), ys)

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(wanted, xb, yb)
    return {names[n]: g.detach() for n, g in grads.items()}


def _loop_grads(model: nn.Module, targets: list[Target], groups: list[tuple[Any, Any]], samples: GradientSamples,
                loss_fn: LossFn | None) -> dict[str, torch.Tensor]:
    """One gradient per group of samples, by autograd (any model, any batch form)."""
    stored = [t.stored for t in targets]
    flags = [p.requires_grad for p in stored]
    try:
        for p in stored:
            p.requires_grad_(True)
        rows = []
        for inputs, labels in groups:
            rows.append(torch.autograd.grad(samples.loss(model, inputs, labels, loss_fn), stored, allow_unused=True))
    finally:
        for p, flag in zip(stored, flags):
            p.requires_grad_(flag)
    return {
        t.fqn: torch.stack([g if g is not None else torch.zeros_like(t.stored) for g in (row[i] for row in rows)])
        for i, t in enumerate(targets)
    }


def gradient_progress(progress: ProgressArg, what: str) -> Progress | None:
    """A ``progress(done, total)`` callback for the gradients from an engine ``progress`` argument
    (``True``: shown on stderr as the calibration passes are, e.g. ``fisher: 'gradients' [400/400]``).

    >>> seen = []
    >>> gradient_progress(lambda done, total: seen.append(done), "fisher")(3, 8); seen
    [3]
    """
    if progress is None or progress is False:
        return None
    if progress is not True:
        return progress
    shown: dict[str, Any] = {}

    def update(done: int, total: int) -> None:
        bar = shown.get("bar")
        if bar is None:
            bar = shown["bar"] = ShownProgress(what, total, True).__enter__()
        while bar.done < done:
            bar.advance("gradients")
        if done >= total:
            bar.__exit__(None, None, None)
            shown.clear()

    return update


def fisher_scores(
    model: nn.Module,
    targets: list[Target],
    data: Any,
    *,
    num_grads: int | None = None,
    chunk: int = 32,
    seed: int = 0,
    loss_fn: LossFn | None = None,
    progress: Progress | None = None,
) -> dict[str, torch.Tensor]:
    """Diagonal empirical-Fisher saliency ``w**2 * mean(g**2) / 2`` from per-sample gradients.

    Args:
        model, targets: the model and its prunable layers (:func:`find_targets`).
        data: ``(x, y)`` calibration tensors; labels are required.
        num_grads: number of per-sample gradients (default: every sample once).
        chunk: gradients computed per vmap call (memory: ``chunk * prunable weights``).
        seed, loss_fn, progress: sample order, loss (default cross-entropy), callback.

    Under ``torch.distributed`` each rank passes its shard of the data and computes its
    share of ``num_grads`` (all of them in total); the squared gradients are summed over
    ranks (one collective). With every sample used once (``num_grads`` None or equal to
    the number of samples) this equals the one-process result up to rounding.
    """
    num_grads = local_share(num_grads)
    sq = {t.fqn: torch.zeros(t.stored.shape, dtype=torch.float64, device=t.stored.device) for t in targets}
    count = 0
    for grads in gradient_chunks(model, targets, data, num_grads=num_grads, chunk=chunk, seed=seed,
                                 loss_fn=loss_fn, progress=progress, method="fisher"):
        for fqn, g in grads.items():
            sq[fqn] += g.to(torch.float64).square().sum(0)
        count += next(iter(grads.values())).shape[0]
    if distributed.is_distributed():
        flat = torch.cat([v.flatten() for v in sq.values()] + [torch.tensor([float(count)], dtype=torch.float64,
                                                                            device=next(iter(sq.values())).device)])
        distributed.all_reduce_sum_(flat)
        count, offset = int(flat[-1].item()), 0
        for fqn, v in sq.items():
            v.copy_(flat[offset:offset + v.numel()].view(v.shape))
            offset += v.numel()
    weights = effective_weights(targets)
    return {fqn: weights[fqn].to(torch.float64).square() * (sq[fqn] / count) / 2 for fqn in sq}
