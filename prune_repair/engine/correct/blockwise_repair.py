"""The exact repair one block at a time: for models whose activations do not fit at once.

:func:`blockwise_repair_pass` cuts the forward into stem, blocks and tail
(:mod:`~prune_repair.engine.run.block_chain`) and repairs segment by segment: inside a segment
each site is decided from all batches with the corrections before it applied (one prefix
pass of the segment per site, one batch at a time; with a single batch one inline pass),
then one more pass stores the corrected segment's outputs as the next segment's inputs.
Memory: one block input per batch (on the device, in host memory or in files) plus one
batch's activations inside one block. Time: about ``1 + sites per block / 2`` forwards.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from .modes import RepairMode
    >>> from .site_plan import make_plans
    >>> from ..stats.activation import collect_stats
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).double()
    >>> x = torch.randn(40, 4, dtype=torch.float64)
    >>> goal = collect_stats(model, x)
    >>> with torch.no_grad():
    ...     _ = model[0].weight.mul_(3.0)
    >>> plans, _ = make_plans(model, goal, RepairMode.REPAIR, add_bias=False)
    >>> blockwise_repair_pass(model, plans, [x[:15], x[15:]])["blocks"]
    5
    >>> [p.affine is not None for p in plans]
    [True, True]
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ..run.forward import ForwardFn, hooked_pass
from ..run.block_chain import BlockChain, find_block_chain
from ..run.block_inputs import BlockInputs
from .site_plan import SitePlan, plan_hooks
from ..sites.taps import SiteTaps, batch_mask


def segments_of(model: nn.Module, chain: BlockChain, plans: Sequence[SitePlan]) -> list[list[SitePlan]]:
    """The plans of each segment (stem, blocks, tail), in order.

    Raises:
        ValueError: a site outside the blocks runs between two blocks.
    """
    names = {module: name for name, module in model.named_modules()}
    where = chain.split([names.get(plan.module, "") for plan in plans], [plan.site.fqn for plan in plans], "site")
    return [[plans[k] for k in indices] for indices in where]


def blockwise_repair_pass(model: nn.Module, plans: Sequence[SitePlan], batches: Sequence[Any],
                          forward_fn: ForwardFn | None = None, *, blocks: Sequence[str] | None = None,
                          offload: str | Path | None = None, inline: bool = False) -> dict[str, Any]:
    """Measure, decide and apply every plan, one segment of the forward at a time.

    Args:
        blocks: the chain's module names, in call order (found when omitted).
        offload: where the block inputs wait: ``None`` (where they are), ``"cpu"``, or a folder.
        inline: decide each site inside the one pass of its segment (right for ONE batch only).

    Returns:
        ``{"blocks": n, "segment_passes": passes of a segment over the data, in all, "max_passes": most
        passes one segment needed}``. Plans no batch reached keep ``acc=None``.
    """
    batches = list(batches)
    chain = find_block_chain(model, batches[0], forward_fn=forward_fn, blocks=blocks)
    segments = segments_of(model, chain, plans)
    outside = len(segments[0]) + len(segments[-1])
    if blocks is None and 2 * outside > len(plans):
        warnings.warn(f"the chain of blocks found ({chain.names[0]} ... {chain.names[-1]}) holds only "
                      f"{len(plans) - outside} of the {len(plans)} sites; the others run in the stem and tail, one "
                      "prefix pass per site: name the model's blocks with blocks=[...]", stacklevel=3)
    store = BlockInputs(chain, batches, offload)
    counts = [0] * len(segments)

    def run(s: int, seg: list[SitePlan], measuring: set, applying: set, stop_after: SitePlan | None,
            keep: bool) -> None:
        counts[s] += 1
        pre, sites, observe, correction = plan_hooks(seg, measuring, inline, applying, stop_after)
        with (hooked_pass(model, pre_hooks=pre, forward_fn=lambda _, b: store.run_segment(s, b["index"], store=keep))
              as forward, SiteTaps(model, sites, observe, correction).attached(forward) as tapped):
            for i, batch in enumerate(batches):
                mask = batch_mask(batch)
                tapped({"index": i, **({"attention_mask": mask} if mask is not None else {})})

    try:
        for s, seg in enumerate(segments):
            last = s == len(segments) - 1
            if inline:
                if seg or not last:
                    run(s, seg, set(seg), set(), None, keep=not last)
            else:
                for k, plan in enumerate(seg):
                    run(s, seg, {plan}, {p for p in seg[:k] if p.affine is not None}, plan, keep=False)
                    plan.finalize()
                if not last:
                    run(s, seg, set(), {p for p in seg if p.affine is not None}, None, keep=True)
            store.advance()
    finally:
        store.close()
    return {"blocks": len(chain.blocks), "segment_passes": sum(counts), "max_passes": max(counts)}
