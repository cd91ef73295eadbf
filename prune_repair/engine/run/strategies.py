"""The pass strategies of the calibration pipeline (:mod:`.pipeline`), each written once for every method.

:class:`Runner` holds the model, the batches, the method and the bookkeeping (which steps are
decided, the passes made, progress); each strategy is one method of it. A pass attaches the
method's hooks for the ``active`` steps and runs every batch; the strategy's ``arrive`` says
when a step contributes, when it is decided, and when a forward may stop early.

Example:
    >>> from .lockstep import Passes
    >>> [p.value for p in Passes]
    ['lockstep', 'per-site', 'blockwise']
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from . import distributed
from .block_chain import BlockChain, find_block_chain
from .block_inputs import BlockInputs
from .forward import ForwardFn, StopForward, batch_mask, hooked_pass
from .lockstep import Lockstep
from .steps import Arrive, Context, Method, PassLog, Reference
from .progress import Progress
from .reference import ReferenceOutputs


class Runner:
    """Runs one method over the batches; see the module doc."""

    def __init__(self, model: nn.Module, batches: list[Any], method: Method, forward_fn: ForwardFn | None,
                 reference: Reference | None, progress: Progress):
        self.model, self.batches, self.method, self.forward_fn = model, batches, method, forward_fn
        self.steps, self.reference, self.progress = list(method.steps), reference, progress
        self.context = Context([batch_mask(batch) for batch in batches])
        self.decided: set[int] = set()
        self.log = PassLog()

    # -- bookkeeping --

    def decide(self, k: int) -> None:
        """Pool step ``k``'s statistics over ranks, decide and apply it; once."""
        if k in self.decided:
            return
        if distributed.is_distributed():
            self.steps[k].pool()
        self.steps[k].decide()
        self.decided.add(k)
        self.progress.advance(self.steps[k].name)

    def decide_rest(self) -> None:
        """Decide, in order, the steps no batch reached (each says what that means for it)."""
        for k in range(len(self.steps)):
            self.decide(k)

    def one_pass(self, active: Sequence[int], arrive: Arrive, *, forward_fn: ForwardFn | None = None,
                 inputs: Sequence[Any] | None = None, segment: int = 0, lockstep: Lockstep | None = None) -> None:
        """Every batch once through the model with the ``active`` steps hooked (side by side in ``lockstep``)."""
        inputs = self.batches if inputs is None else inputs
        self.log.passes[segment] += 1
        self.log.forwards += len(inputs)
        with (hooked_pass(self.model, forward_fn=forward_fn or self.forward_fn) as forward,
              self.method.attach(forward, active, arrive, self.context) as run):

            def task(b: int) -> Any:
                self.context.batch = b
                return run(inputs[b])

            if lockstep is not None:
                lockstep.run([lambda b=b: task(b) for b in range(len(inputs))])
            else:
                for b in range(len(inputs)):
                    task(b)

    def targets(self, active: Sequence[int], inputs: Sequence[Any], forward_fn: ForwardFn | None
                ) -> ReferenceOutputs | None:
        """The reference's outputs at the ``active`` steps' modules for this stretch of passes."""
        self.context.targets, self.context.index_of = None, {}
        if self.reference is None or not active:
            return None
        self.context.index_of = {k: i for i, k in enumerate(active)}
        self.context.targets = ReferenceOutputs(
            self.reference.model, inputs, [self.steps[k].where for k in active], keep=self.reference.keep,
            forward_fn=forward_fn, max_bytes=self.reference.cache_bytes, capture=self.reference.capture,
            lend=self.reference.lend)
        return self.context.targets

    def _count_reference(self, targets: ReferenceOutputs | None) -> None:
        if targets is not None:
            self.log.reference += targets.passes

    # -- strategies --

    def inline(self, active: Sequence[int] | None = None, *, stop: bool = False, segment: int = 0,
               forward_fn: ForwardFn | None = None, inputs: Sequence[Any] | None = None,
               reference_fn: ForwardFn | None = None) -> None:
        """One pass when there is ONE batch (of the model, or of a segment): each step contributes
        and is decided inside its hook; with ``stop``, the forward ends at the last step."""
        active = list(range(len(self.steps))) if active is None else list(active)
        left = set(active)

        def arrive(k: int, contribute: Callable[[], None]) -> bool:
            if k in self.decided:
                return False
            contribute()
            self.decide(k)
            left.discard(k)
            if stop and not left:
                raise StopForward  # every step is decided: nothing downstream is needed
            return True

        targets = self.targets(active, inputs or self.batches, reference_fn or self.forward_fn)
        with (targets.streaming() if targets is not None else contextlib.nullcontext()):
            self.one_pass(active, arrive, forward_fn=forward_fn, inputs=inputs, segment=segment)
        self._count_reference(targets)

    def lockstep(self) -> None:
        """One pass per batch, all batches in step: each step decided once every batch contributed."""
        active = list(range(len(self.steps)))
        lock = Lockstep(self.method.point)

        def arrive(k: int, contribute: Callable[[], None]) -> bool:
            lock.meet(k, self.steps[k].name, contribute, lambda: self.decide(k))
            if lock.all_decided(len(active)):
                raise StopForward  # every step is decided: nothing downstream is needed
            return True

        targets = self.targets(active, self.batches, self.forward_fn)
        with (targets.streaming() if targets is not None else contextlib.nullcontext()):
            self.one_pass(active, arrive, lockstep=lock)
        self._count_reference(targets)

    def per_site(self, active: Sequence[int] | None = None, *, segment: int = 0, forward_fn: ForwardFn | None = None,
                 inputs: Sequence[Any] | None = None, reference_fn: ForwardFn | None = None) -> None:
        """One prefix pass per step over all batches (one batch in memory at a time), then its decision."""
        active = list(range(len(self.steps))) if active is None else list(active)
        targets = self.targets(active, inputs or self.batches, reference_fn or self.forward_fn)
        for k in active:

            def arrive(j: int, contribute: Callable[[], None], k: int = k) -> bool:
                if j != k:
                    return False
                contribute()
                raise StopForward  # nothing after step k is needed in this pass

            self.one_pass(active, arrive, forward_fn=forward_fn, inputs=inputs, segment=segment)
            self.decide(k)
        self._count_reference(targets)

    def all_at_once(self) -> None:
        """One pass in which every step observes the model as it is; then every step is decided."""
        def arrive(k: int, contribute: Callable[[], None]) -> bool:
            contribute()
            return False  # nothing is decided during the pass

        self.one_pass(range(len(self.steps)), arrive)
        self.decide_rest()

    def blockwise(self, several: bool, blocks: Sequence[str] | None, offload: str | Path | None) -> None:
        """One segment (stem, each block, tail) at a time over all batches; see :mod:`.block_chain`."""
        chain = find_block_chain(self.model, self.batches[0], forward_fn=self.forward_fn, blocks=blocks)
        segments = chain.split([s.where for s in self.steps], [s.name for s in self.steps], self.method.point)
        outside = len(segments[0]) + len(segments[-1])
        if blocks is None and 2 * outside > len(self.steps):
            warnings.warn(f"the chain of blocks found ({chain.names[0]} ... {chain.names[-1]}) holds only "
                          f"{len(self.steps) - outside} of the {len(self.steps)} {self.method.point}s; the others "
                          "run in the stem and tail, one prefix pass each: name the model's blocks with "
                          "blocks=[...]", stacklevel=4)
        self.log.passes, self.log.blocks = [0] * len(segments), len(chain.blocks)
        mine, theirs = BlockInputs(chain, self.batches, offload), None
        if self.reference is not None:
            theirs = BlockInputs(_same_blocks(chain, self.reference.model), self.batches, offload)
        tokens = [{"index": b, **({"attention_mask": m} if m is not None else {})}
                  for b, m in enumerate(self.context.masks)]
        try:
            for s, seg in enumerate(segments):
                self.progress.block(s, len(chain.blocks), chain.names[s - 1] if 0 < s <= len(chain.blocks) else "")
                self._segment(s, seg, s == len(segments) - 1, several, mine, theirs, tokens)
        finally:
            if theirs is not None:
                theirs.close()  # made second: closed first, so the first can remove the folders it made
            mine.close()

    def _segment(self, s: int, seg: list[int], last: bool, several: bool, mine: BlockInputs,
                 theirs: BlockInputs | None, tokens: list[dict]) -> None:
        """Decide the steps of segment ``s``, then store its outputs (of the reference too) for the next."""

        def runs(store: BlockInputs, keep: bool) -> ForwardFn:
            return lambda _, token: store.run_segment(s, token["index"], store=keep)

        reference_fn = runs(theirs, False) if theirs is not None else None
        if not several:  # one batch: the segment's one pass decides inline and stores its outputs
            if seg or not last:
                self.inline(seg, segment=s, forward_fn=runs(mine, not last), inputs=tokens,
                            reference_fn=reference_fn)
        else:
            self.per_site(seg, segment=s, forward_fn=runs(mine, False), inputs=tokens, reference_fn=reference_fn)
            if not last:
                self.one_pass(seg, lambda k, contribute: False, forward_fn=runs(mine, True), inputs=tokens, segment=s)
        if not last and theirs is not None:
            with hooked_pass(self.reference.model, forward_fn=runs(theirs, True)) as run:
                for token in tokens:
                    run(token)
            self.log.reference += len(tokens)
        mine.advance()
        if theirs is not None:
            theirs.advance()


def _same_blocks(chain: BlockChain, reference: nn.Module) -> BlockChain:
    """The reference's chain of the blocks of the same names."""
    try:
        blocks = [reference.get_submodule(name) for name in chain.names]
    except AttributeError:
        raise ValueError("the reference does not have the model's blocks: pass a reference of the same "
                         "architecture") from None
    return BlockChain(reference, chain.names, blocks, chain.tuple_rest, chain.forward_fn)
