"""Evaluation of models fed dict batches: perplexity of causal LMs, accuracy of classifiers.

:func:`perplexity` is ``exp`` of the mean cross-entropy of next-token prediction over every
predicted position whose target is a real token (``attention_mask`` 1 and label not -100);
the logits at position ``t`` predict the token at ``t + 1``. It returns ``{"ppl", "loss"}``.

Example:
    >>> import torch
    >>> from torch import nn
    >>> class Uniform(nn.Module):
    ...     def forward(self, input_ids, attention_mask=None):
    ...         return torch.zeros(*input_ids.shape, 7)
    >>> batch = {"input_ids": torch.tensor([[1, 2, 3]]), "attention_mask": torch.tensor([[1, 1, 0]])}
    >>> round(perplexity(Uniform(), [batch])["ppl"], 6)  # uniform over 7 tokens
    7.0
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.run.forward import default_forward, eval_mode
from ..io.errors import DataError

IGNORE_INDEX = -100


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a model output: a tensor, an HF ``ModelOutput`` (``.logits``) or a tuple's first item."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, dict) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise DataError(f"the model output ({type(output).__name__}) has no logits: check --arch")


def _inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k != "labels"}


def perplexity(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, float]:
    """``{"ppl": exp(loss), "loss": mean next-token cross-entropy}`` over ``batches`` (see the module docstring).

    Targets are ``batch["labels"]`` (N, T) when given, else ``input_ids``; positions with
    ``attention_mask`` 0 or label -100 are excluded.
    """
    loss_sum, count = 0.0, 0
    with eval_mode(model), torch.no_grad():
        for batch in batches:
            logits = logits_of(default_forward(model, _inputs(batch)))
            targets = batch.get("labels", batch["input_ids"]).to(logits.device)
            if targets.dim() != 2:
                raise DataError("perplexity needs token targets: give 'labels' of shape (N, T) or none")
            keep = targets[:, 1:] != IGNORE_INDEX
            if "attention_mask" in batch:
                keep &= batch["attention_mask"][:, 1:].to(logits.device).bool()
            pred = logits[:, :-1][keep].double()
            loss_sum += float(F.cross_entropy(pred, targets[:, 1:][keep], reduction="sum"))
            count += int(keep.sum())
    if count == 0:
        raise DataError("no token to predict: perplexity needs sequences with at least 2 real tokens")
    loss = loss_sum / count
    return {"ppl": math.exp(loss) if loss < 700 else math.inf, "loss": loss}


def accuracy(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], labels: Iterable[torch.Tensor]) -> dict[str, float]:
    """``{"acc", "loss"}`` of a classifier fed dict batches, against one class label per sample."""
    correct, loss_sum, n = 0, 0.0, 0
    with eval_mode(model), torch.no_grad():
        for batch, y in zip(batches, labels):
            logits = logits_of(default_forward(model, _inputs(batch)))
            y = y.to(logits.device)
            if logits.dim() != 2:
                raise DataError(f"the model outputs logits of shape {list(logits.shape)}, not (N, classes): "
                                "accuracy needs a classifier")
            if y.numel() and int(y.max()) >= logits.shape[1]:
                raise DataError(f"the data has label {int(y.max())} but the model outputs {logits.shape[1]} classes: "
                                "check the data and the model's num_labels")
            loss_sum += float(F.cross_entropy(logits.double(), y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            n += len(y)
    if n == 0:
        raise DataError("cannot evaluate on empty data: give at least one sample")
    return {"acc": correct / n, "loss": loss_sum / n}
