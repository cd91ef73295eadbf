"""A reference model run beside the calibrated one: its outputs at named modules, per batch.

A layer-by-layer refit compares the operated model's layer with the same layer of the
reference on the same batch. :class:`ReferenceOutputs` hands out those outputs on demand,
``outputs(batch_index, i)`` for the ``i``-th name, in two ways:

- :meth:`ReferenceOutputs.streaming`: the reference runs ONCE per batch, in a thread that
  pauses at each named module until its output is asked for
  (:class:`~prune_repair.engine.run.lockstep.Stream`): one output alive at a time, nothing
  re-run (one inline pass, or batches in lockstep). The output asked for is handed out as the
  reference formed it, not copied (``lend``): it stays as it is until the next output is asked
  for, since the reference waits at that module until then;
- otherwise a prefix pass of the reference caches the outputs of upcoming modules up to a
  memory budget; a further pass refills the cache only when the budget was reached (one
  prefix pass per step, one batch at a time).

Example:
    >>> import torch
    >>> from torch import nn
    >>> reference = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> x = torch.randn(5, 3)
    >>> outputs = ReferenceOutputs(reference, [x], ["0", "2"])
    >>> with torch.no_grad():
    ...     torch.equal(outputs(0, 1), reference(x))
    True
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from .forward import ForwardFn, StopForward, first_tensor, hooked_pass
from .lockstep import Stream

Keep = Callable[[str, nn.Module, torch.Tensor], torch.Tensor]
"""``keep(name, module, output)``: the part of a module's output to hand out (a copy)."""


Capture = Callable[[nn.Module, Sequence[str], Callable[[str, nn.Module, torch.Tensor], None]],
                   AbstractContextManager[Callable[[Callable[[], Any]], Any]]]
"""``capture(model, names, emit)``: a context within which ``emit(name, module, output)`` is called
as each named layer of ``model`` forms its output; it yields ``within(fn)``, which runs one forward
``fn()`` (in the thread that runs it: e.g. under a TorchFunctionMode). Default: :func:`module_outputs`."""


@contextlib.contextmanager
def module_outputs(model: nn.Module, names: Sequence[str],
                   emit: Callable[[str, nn.Module, torch.Tensor], None]) -> Iterator[Callable[[Callable[[], Any]], Any]]:
    """The :data:`Capture` of modules' outputs: a forward hook on each named module."""
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"the reference has no module '{missing[0]}': pass a reference of the same architecture")
    handles = [modules[n].register_forward_hook(lambda m, a, o, n=n: emit(n, m, first_tensor(o))) for n in names]
    try:
        yield lambda fn: fn()
    finally:
        for handle in handles:
            handle.remove()


def copy_output(name: str, module: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """The whole output, copied (a later in-place op, e.g. ``ReLU(inplace=True)``, must not change it)."""
    return y.clone()


def whole_output(name: str, module: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """The whole output itself (lent while the streamed reference waits at its module)."""
    return y


class ReferenceOutputs:
    """Outputs of the reference model's modules named ``names``, per batch (see the module doc).

    ``keep`` chooses what is kept of each output (default: a copy of all of it); ``lend``, the
    same part without a copy, for the output asked for while the streamed reference waits at its
    module (default: the output itself for the default ``keep``, else ``keep``): the caller uses it
    before asking for the next one. ``max_bytes`` bounds what the cached (not streamed) mode holds
    ahead; ``capture`` reaches the named outputs (default: forward hooks on modules of those names).
    """

    def __init__(self, reference: nn.Module, batches: Sequence[Any], names: Sequence[str], *,
                 keep: Keep = copy_output, forward_fn: ForwardFn | None = None, max_bytes: int = 2**30,
                 capture: Capture | None = None, lend: Keep | None = None):
        self.reference, self.batches, self.names = reference, list(batches), list(names)
        self.keep, self.forward_fn, self.max_bytes = keep, forward_fn, max_bytes
        self.lend = lend if lend is not None else (whole_output if keep is copy_output else keep)
        self.capture = capture or module_outputs
        self.per_batch = max(1, max_bytes // max(1, len(self.batches)))
        self.cache: dict[tuple[int, int], torch.Tensor] = {}
        self.passes = 0
        self._streams: dict[int, Stream] | None = None
        self._produce: Callable[[int], Callable] | None = None

    def __call__(self, b: int, i: int) -> torch.Tensor:
        for key in [k for k in self.cache if k[0] == b and k[1] < i]:
            del self.cache[key]  # modules already done
        if self._streams is not None:
            self._pull(b, i)
        elif (b, i) not in self.cache:
            self._fill(b, i)
        return self.cache.pop((b, i))

    def _capture(self, names: Sequence[str], on_output: Callable[[int, str, nn.Module, torch.Tensor], None]
                 ) -> AbstractContextManager[Callable[[Callable[[], Any]], Any]]:
        index = {n: j for j, n in enumerate(self.names)}
        return self.capture(self.reference, names, lambda name, module, y: on_output(index[name], name, module, y))

    @contextlib.contextmanager
    def streaming(self) -> Iterator["ReferenceOutputs"]:
        """Within the block, each batch's reference forward runs once, paused at every named
        module until its output is asked for; the paused forwards are stopped on exit."""
        local = threading.local()
        with (hooked_pass(self.reference, forward_fn=self.forward_fn) as run,
              self._capture(self.names, lambda *output: local.emit(output)) as within):

            def produce(b: int) -> Callable:
                def forward(emit: Callable[[Any], None]) -> None:
                    local.emit = emit
                    within(lambda: run(self.batches[b]))
                return forward

            self._streams, self._produce = {}, produce
            try:
                yield self
            finally:
                streams, self._streams, self._produce = self._streams, None, None
                for stream in streams.values():
                    stream.close()

    def _pull(self, b: int, i: int) -> None:
        while (b, i) not in self.cache:
            if b not in self._streams:
                self._streams[b] = Stream(self._produce(b))
                self.passes += 1
            more, item = self._streams[b].next()
            if not more:
                raise ValueError(f"layer '{self.names[i]}' of the reference did not run on the calibration data")
            j, name, module, y = item
            if j == i:  # used before the next output is asked for, while the reference waits here
                self.cache[(b, j)] = self.lend(name, module, y)
            elif j > i:  # kept while the reference goes on (an earlier module is not needed any more)
                self.cache[(b, j)] = self.keep(name, module, y)

    def _fill(self, b: int, i: int) -> None:
        used = 0

        def keep(j: int, name: str, module: nn.Module, y: torch.Tensor) -> None:
            nonlocal used
            y = self.cache[(b, j)] = self.keep(name, module, y)
            used += y.numel() * y.element_size()
            if used >= self.per_batch and j >= i or j == len(self.names) - 1:
                raise StopForward

        with (hooked_pass(self.reference, forward_fn=self.forward_fn) as run,
              self._capture(self.names[i:], keep) as within):
            within(lambda: run(self.batches[b]))
        self.passes += 1
        if (b, i) not in self.cache:
            raise ValueError(f"layer '{self.names[i]}' of the reference did not run on the calibration data")
