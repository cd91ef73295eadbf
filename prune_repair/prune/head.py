"""The output head of a language model stays dense unless asked (as SparseGPT and Wanda do).

A language model's head (``lm_head``, tied to the token embedding or not) maps the last
hidden state to every vocabulary logit; pruning it hurts far more than any other layer of
its size. :func:`output_head` finds it (``model.get_output_embeddings()``, the HF
convention), and :func:`head_filter` adds "not the head" to a layer selection unless the
head is asked for (``prune_head=True``, or named by a sparsity config). Vision classifiers
are not language-model heads: their behaviour is unchanged (``skip_classifier`` is the
switch there).

Example:
    >>> from torch import nn
    >>> class LM(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.body, self.lm_head = nn.Linear(4, 4), nn.Linear(4, 9)
    ...     def get_output_embeddings(self):
    ...         return self.lm_head
    >>> model = LM()
    >>> output_head(model), head_filter(model, None)(model.body, "body"), head_filter(model, None)(model.lm_head, "lm_head")
    ('lm_head', True, False)
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from ..engine.sites.find import FilterFn, Selector, make_filter
from .sparsity_config import config_selects


def output_head(model: nn.Module) -> str | None:
    """FQN of a language model's output head, or None (no ``get_output_embeddings`` head)."""
    getter = getattr(model, "get_output_embeddings", None)
    if not callable(getter):
        return None
    try:
        head = getter()
    except (NotImplementedError, AttributeError):
        return None
    if not isinstance(head, nn.Module):
        return None
    return next((fqn for fqn, m in model.named_modules() if m is head), None)


def head_filter(model: nn.Module, select: Selector, prune_head: bool = False,
                config: Mapping[str, float] | None = None) -> Selector:
    """``select`` with a language model's output head left out, unless ``prune_head`` or
    ``config`` names it; ``select`` unchanged for other models."""
    head = output_head(model)
    if head is None or prune_head or config_selects(config, head):
        return select
    base: FilterFn | None = make_filter(select)

    def filter_fn(module: nn.Module, fqn: str) -> bool:
        return fqn != head and (base is None or base(module, fqn))

    return filter_fn
