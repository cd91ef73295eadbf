"""Running a model on calibration data with hooks that are always removed.

Every pass the engine makes over a model goes through :func:`hooked_pass`: it
puts the model in eval mode, registers the given hooks, runs ``forward_fn`` on
each batch under ``torch.no_grad()`` and, whatever happens, removes the hooks
and restores the train/eval flag of every submodule.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(3, 2)).train()
    >>> seen = []
    >>> with hooked_pass(model) as run:
    ...     _ = run(torch.randn(4, 3))
    >>> model.training
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

ForwardFn = Callable[[nn.Module, Any], Any]
"""``forward_fn(model, batch)``: how one batch is fed to the model."""


def default_forward(model: nn.Module, batch: Any) -> Any:
    """Feed ``batch`` to ``model``: a tensor as is, a tuple/list by its first item
    (``(x, y)`` pairs), a dict as keyword arguments. Floating tensors are moved to the
    model's device and dtype (float32 data into a float16 model just works)."""
    if isinstance(batch, torch.Tensor):
        return model(to_model(model, batch))
    if isinstance(batch, (tuple, list)):
        return model(to_model(model, batch[0]))
    if isinstance(batch, dict):
        return model(**{k: to_model(model, v) for k, v in batch.items()})
    raise TypeError(
        f"cannot feed a batch of type {type(batch).__name__} to the model: "
        "pass a tensor, an (x, y) tuple, a dict, or a forward_fn(model, batch)"
    )


def to_model(model: nn.Module, value: Any) -> Any:
    """``value`` on the model's device; floating tensors also in the model's dtype."""
    if not isinstance(value, torch.Tensor):
        return value
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    if param is None:
        return value
    if value.is_floating_point():
        return value.to(device=param.device, dtype=param.dtype)
    return value.to(device=param.device)


def as_batches(data: Any) -> list[Any]:
    """Calibration data as a list of batches: one tensor/tuple/dict is one batch,
    any other iterable (a DataLoader, a list of tensors) is a sequence of batches."""
    if isinstance(data, (torch.Tensor, dict, tuple)):
        return [data]
    if isinstance(data, Iterable):
        batches = list(data)
        if not batches:
            raise ValueError("the calibration data is empty: pass at least one batch")
        return batches
    raise TypeError(f"calibration data of type {type(data).__name__} is neither a batch nor an iterable of batches")


def batch_size_of(batch: Any) -> int:
    """Number of samples in a batch (first dim of its first tensor)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() > 0 else 0
    if isinstance(batch, (tuple, list)) and batch:
        return batch_size_of(batch[0])
    if isinstance(batch, dict) and batch:
        return batch_size_of(next(iter(batch.values())))
    return 0


def batch_mask(batch: Any) -> torch.Tensor | None:
    """The ``attention_mask`` of a dict batch as bool (True = a real token), else None."""
    if isinstance(batch, dict) and isinstance(batch.get("attention_mask"), torch.Tensor):
        mask = batch["attention_mask"]
        return mask.bool() if mask.dim() == 2 else None
    return None


def head(batch: Any, n: int) -> Any:
    """The first ``n`` samples of a batch (tensors sliced on dim 0; other values kept)."""
    size = batch_size_of(batch)
    if isinstance(batch, torch.Tensor):
        return batch[:n] if batch.dim() > 0 else batch
    if isinstance(batch, (tuple, list)):
        return type(batch)(head(b, n) if isinstance(b, torch.Tensor) and b.dim() and len(b) == size else b
                           for b in batch)
    if isinstance(batch, dict):
        return {k: head(v, n) if isinstance(v, torch.Tensor) and v.dim() and len(v) == size else v
                for k, v in batch.items()}
    return batch


class StopForward(Exception):
    """Raised by a hook to end a forward pass early (nothing downstream is needed)."""


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block; every submodule's train/eval flag is
    restored afterwards, also when the block raises.

    >>> m = nn.Sequential(nn.Linear(2, 2), nn.Dropout()).train()
    >>> with eval_mode(m):
    ...     m.training
    False
    >>> m.training, m[1].training
    (True, True)
    """
    modes = [(m, m.training) for m in model.modules()]
    try:
        if any(training for _, training in modes):  # already in eval mode: nothing to set (nor restore)
            model.eval()
        yield model
    finally:
        for module, training in modes:
            if module.training is not training:
                module.training = training


@contextlib.contextmanager
def hooked_pass(
    model: nn.Module,
    forward_hooks: dict[nn.Module, Callable] | None = None,
    pre_hooks: dict[nn.Module, Callable] | None = None,
    forward_fn: ForwardFn | None = None,
) -> Iterator[Callable[[Any], Any]]:
    """Context manager yielding ``run(batch)``, a no-grad eval-mode forward with hooks.

    ``run`` returns the model output, or ``None`` when a hook raised
    :class:`StopForward`. Hooks are removed and train/eval flags restored on exit,
    also when the forward raises.
    """
    forward_fn = forward_fn or default_forward
    handles = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(eval_mode(model))
        stack.callback(lambda: [handle.remove() for handle in handles])
        for module, hook in (forward_hooks or {}).items():
            handles.append(module.register_forward_hook(hook))
        for module, hook in (pre_hooks or {}).items():
            handles.append(module.register_forward_pre_hook(hook))

        def run(batch: Any) -> Any:
            with torch.no_grad():
                try:
                    return forward_fn(model, batch)
                except StopForward:
                    return None

        yield run


def first_tensor(output: Any) -> torch.Tensor | None:
    """The tensor a module produced (the first one when it returns a tuple)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None
