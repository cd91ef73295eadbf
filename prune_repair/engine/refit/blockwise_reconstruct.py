"""Layer-by-layer reconstruction one block at a time: for models whose activations do not fit.

:func:`blockwise_layerwise_` runs :func:`~prune_repair.engine.refit.layerwise.layerwise_` on each
segment of the forward (stem, blocks, tail; :mod:`~prune_repair.engine.run.block_chain`) of the
model and of the reference side by side: inside a segment, one prefix pass per layer and
batch (one batch in memory at a time; one pass when there is a single batch), the targets
being the reference segment's layer outputs; then both segments run once more to store
their outputs (the model's with its layers already refitted) as the next segment's inputs.
Memory: one block input per batch for each model, plus one batch inside one block.

Example:
    >>> import copy, torch
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> reference = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).double()
    >>> model = copy.deepcopy(reference)
    >>> with torch.no_grad():
    ...     _ = model[2].weight.mul_((torch.rand(8, 8) > 0.5).double())
    >>> x = torch.randn(64, 4, dtype=torch.float64)
    >>> seen = []
    >>> layers = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    >>> made, _ = blockwise_layerwise_(model, reference, [x[:32], x[32:]], layers,
    ...                                step=lambda i, gram: seen.append((i, gram.rows)))
    >>> seen
    [(0, 64), (1, 64), (2, 64)]
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..run.forward import ForwardFn, hooked_pass
from .layerwise import Layer, ReferenceOutputs, StepFn, layerwise_
from ..run.block_chain import BlockChain, find_block_chain
from ..run.block_inputs import BlockInputs
from .gram import DEFAULT_MAX_GRAM_BYTES
from ..run.lockstep import Passes
from ..sites.taps import batch_mask


def blockwise_layerwise_(model: nn.Module, reference: nn.Module, batches: Sequence[Any], layers: Sequence[Layer], *,
                         step: StepFn, kept: dict[str, torch.Tensor] | None = None,
                         forward_fn: ForwardFn | None = None, max_gram_bytes: int = DEFAULT_MAX_GRAM_BYTES,
                         reference_cache_bytes: int = 2**30, blocks: Sequence[str] | None = None,
                         offload: str | Path | None = None) -> tuple[int, int]:
    """``step(i, gram)`` for every layer in order, one segment at a time (see the module doc).

    Returns:
        the segment runs of the model and of the reference (each over one batch).
    """
    batches, layers = list(batches), list(layers)
    chain = find_block_chain(model, batches[0], forward_fn=forward_fn, blocks=blocks)
    try:
        theirs = BlockChain(reference, chain.names, [reference.get_submodule(n) for n in chain.names],
                            chain.tuple_rest, chain.forward_fn)
    except AttributeError:
        raise ValueError("the reference does not have the model's blocks: pass a reference of the same "
                         "architecture") from None
    segments = chain.split([fqn for fqn, _ in layers])
    mine, ref = BlockInputs(chain, batches, offload), BlockInputs(theirs, batches, offload)
    tokens = [{"index": b, **({"attention_mask": m} if (m := batch_mask(batch)) is not None else {})}
              for b, batch in enumerate(batches)]
    passes = Passes.PER_SITE if len(batches) > 1 else Passes.LOCKSTEP  # one batch: one inline pass
    made = ref_made = 0
    try:
        for s, indices in enumerate(segments):
            last = s == len(segments) - 1
            run_mine = lambda _, t, s=s: mine.run_segment(s, t["index"], store=False)  # noqa: E731
            run_ref = lambda _, t, s=s: ref.run_segment(s, t["index"], store=False)  # noqa: E731
            if indices:
                targets = ReferenceOutputs(reference, tokens, [layers[k][0] for k in indices], kept=kept,
                                           forward_fn=run_ref, max_bytes=reference_cache_bytes)
                made += layerwise_(model, tokens, [layers[k] for k in indices],
                                   step=lambda i, gram, indices=indices: step(indices[i], gram), target=targets,
                                   forward_fn=run_mine, max_gram_bytes=max_gram_bytes, passes=passes)
                ref_made += targets.passes
            if not last:
                for store, net in ((mine, model), (ref, reference)):
                    keep = lambda _, t, s=s, store=store: store.run_segment(s, t["index"], store=True)  # noqa: E731
                    with hooked_pass(net, forward_fn=keep) as run:
                        for token in tokens:
                            run(token)
                    store.advance()
                made, ref_made = made + len(tokens), ref_made + len(tokens)
    finally:
        ref.close()  # made second: closed first, so the first can remove the folders it made
        mine.close()
    return made, ref_made
