"""How good a model is: accuracy and loss of classifiers, perplexity of causal LMs.

Used by the command line and the benchmarks; the engine never evaluates a model.

Example:
    >>> import torch
    >>> from prune_repair.metrics import evaluate
    >>> model = torch.nn.Linear(4, 3)
    >>> sorted(evaluate(model, torch.randn(10, 4), torch.randint(0, 3, (10,))))
    ['acc', 'loss']
"""

from .classify import evaluate
from .lm import accuracy, perplexity

__all__ = ["accuracy", "evaluate", "perplexity"]
