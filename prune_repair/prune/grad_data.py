"""The samples and loss a gradient scorer (Fisher, WoodFisher) differentiates.

:func:`gradient_samples` reads calibration data as :class:`GradientSamples`: labelled
``(x, y)`` tensors (cross-entropy on the class labels), an HF input dict with one class label
per sequence (a sequence classifier: cross-entropy on its labels), or an HF input dict alone
(a causal LM: its own next-token loss on its tokens, padded positions and label ``-100`` left
out, as :func:`~prune_repair.metrics.lm.perplexity` counts them). Dict batches run through the
same ``forward_fn`` as every other pass (:func:`~prune_repair.engine.run.forward.default_forward`).

Example:
    >>> import torch
    >>> samples = gradient_samples({"input_ids": torch.tensor([[1, 2, 3], [4, 5, 0]]),
    ...                             "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]])})
    >>> len(samples), samples.kind
    (2, 'tokens')
    >>> class Uniform(torch.nn.Module):
    ...     def forward(self, input_ids, attention_mask=None):
    ...         return torch.zeros(*input_ids.shape, 7)
    >>> inputs, labels = samples.take(torch.tensor([0, 1]))
    >>> round(float(samples.loss(Uniform(), inputs, labels).exp()), 4)  # 3 predicted tokens, uniform over 7
    7.0
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.run.forward import ForwardFn, default_forward
from ..metrics.lm import IGNORE_INDEX, logits_of
from .targets import PruneError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class GradientSamples:
    """Calibration samples of a gradient scorer: ``inputs`` (a tensor or a dict of per-sample tensors) and
    ``labels`` (one class per sample, or None: the next-token loss of a causal LM on ``input_ids``)."""

    inputs: torch.Tensor | dict[str, torch.Tensor]
    labels: torch.Tensor | None
    forward_fn: ForwardFn = default_forward

    @property
    def kind(self) -> str:
        """``"classes"`` (cross-entropy on labels) or ``"tokens"`` (next-token loss)."""
        return "tokens" if self.labels is None else "classes"

    @property
    def plain(self) -> bool:
        """Tensor inputs with class labels: per-sample gradients can be vectorized (``vmap``)."""
        return torch.is_tensor(self.inputs) and self.labels is not None

    def __len__(self) -> int:
        return len(self.inputs) if torch.is_tensor(self.inputs) else len(self.inputs["input_ids" if "input_ids" in
                                                                                    self.inputs else
                                                                                    next(iter(self.inputs))])

    def take(self, idx: torch.Tensor, like: torch.Tensor | None = None) -> tuple[Any, torch.Tensor | None]:
        """The samples at ``idx`` on the device of ``like`` (floating inputs in its dtype)."""
        def move(t: torch.Tensor) -> torch.Tensor:
            t = t[idx.to(t.device)]
            if like is None:
                return t
            return t.to(like.device, dtype=like.dtype if t.is_floating_point() else None)

        inputs = move(self.inputs) if torch.is_tensor(self.inputs) else {k: move(v) for k, v in self.inputs.items()}
        labels = None if self.labels is None else self.labels[idx.to(self.labels.device)]
        return inputs, None if labels is None or like is None else labels.to(like.device)

    def loss(self, model: nn.Module, inputs: Any, labels: torch.Tensor | None, loss_fn: LossFn | None = None
             ) -> torch.Tensor:
        """The mean loss of ``model`` on these samples (see the module doc)."""
        logits = logits_of(self.forward_fn(model, inputs))
        if labels is not None:
            return (loss_fn or F.cross_entropy)(logits, labels)
        if logits.dim() != 3:
            raise PruneError(f"the model outputs logits of shape {list(logits.shape)}, not (N, T, vocab): without "
                             "class labels the gradients are of a causal LM's next-token loss; give labels (one class "
                             "per sequence) for a classifier")
        targets = inputs["input_ids"]
        keep = targets[:, 1:] != IGNORE_INDEX
        if "attention_mask" in inputs:
            keep &= inputs["attention_mask"][:, 1:].bool()
        if not bool(keep.any()):
            return logits.sum() * 0.0  # no token to predict in this group: a zero gradient
        return F.cross_entropy(logits[:, :-1][keep], targets[:, 1:][keep])


def gradient_samples(data: Any, method: str = "fisher") -> GradientSamples:
    """``data`` as :class:`GradientSamples`, or a :class:`PruneError` saying what the method needs."""
    if isinstance(data, dict) and "x" in data and "y" in data:
        data = (data["x"], data["y"])
    if isinstance(data, dict):
        data = (data, None)
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise PruneError(f"{method} pruning needs labelled calibration data: pass data=(x, y) with integer class "
                         "labels y (or an HF input dict)")
    x, y = data
    if isinstance(x, dict):
        labels = x.get("labels")
        if y is None and torch.is_tensor(labels) and labels.dim() == 1:
            y = labels
        x = {k: v for k, v in x.items() if not (k == "labels" and torch.is_tensor(v) and v.dim() == 1)}
        if y is None and "input_ids" not in x:
            raise PruneError(f"{method} pruning of a model fed {', '.join(x) or 'nothing'} needs one class label per "
                             "sample (data with labels)")
    elif not torch.is_tensor(x) or y is None:
        raise PruneError(f"{method} pruning needs labelled calibration data: pass data=(x, y) with integer class "
                         "labels y")
    samples = GradientSamples(x, y)
    if y is not None and (not torch.is_tensor(y) or y.dim() != 1 or y.is_floating_point() or len(y) != len(samples)):
        shape = list(y.shape) if torch.is_tensor(y) else type(y).__name__
        raise PruneError(f"{method} pruning needs one integer class label per sample: got labels of shape {shape} "
                         f"and dtype {getattr(y, 'dtype', None)} for {len(samples)} samples")
    if len(samples) == 0:
        raise PruneError(f"{method} pruning needs calibration samples: the data is empty")
    return samples
