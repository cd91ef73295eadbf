"""A model's forward cut into a chain of blocks, run one block at a time over the data.

Large models are calibrated the way the LLM one-shot compressors do it: the calibration
batches go through the *stem* (everything before the first block) and stop there; then each
block runs over all batches, its outputs kept (on the device, in host memory or in files)
as the next block's inputs; the *tail* (everything after the last block) runs last. Only
one block's inputs and one batch's activations are alive at a time.

:func:`find_block_chain` finds the blocks: the children of ``nn.Sequential`` /
``nn.ModuleList`` containers (nested containers flattened, so ResNet's ``layer1`` ...
``layer4`` give one chain of residual blocks) that a traced forward calls one after the
other, each taking the previous one's output as its first argument, with nothing else
computed in between, the same extra arguments (an attention mask ...) and no later use of
an inner block's output. The run holding the most conv/linear layers is the chain.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 8), nn.ReLU()), nn.Linear(8, 2))
    >>> chain = find_block_chain(model, torch.randn(3, 4))
    >>> chain.names
    ['0', '1', '2.0', '2.1', '3']

:class:`~prune_repair.engine.run.block_inputs.BlockInputs` runs the segments.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .forward import ForwardFn, default_forward, eval_mode, first_tensor, head
from ..producers import is_producer

NO_CHAIN = ("the model's layers are not run as a chain of blocks in an nn.Sequential / nn.ModuleList (each "
            "taking the previous one's output, nothing computed in between)")


@dataclass
class BlockChain:
    """The blocks of a forward, in call order (see :func:`find_block_chain`)."""

    model: nn.Module
    names: list[str]
    blocks: list[nn.Module]
    tuple_rest: list[tuple | None]  # per block: None if it returns a tensor, else the rest of its tuple
    forward_fn: ForwardFn = default_forward

    def segment_of(self, module_name: str) -> int | None:
        """``1 + index`` of the block holding the module named ``module_name``, or None."""
        for k, name in enumerate(self.names):
            if module_name == name or module_name.startswith(name + "."):
                return k + 1
        return None

    def split(self, module_names: Sequence[str], labels: Sequence[str] | None = None,
              what: str = "layer") -> list[list[int]]:
        """Indices into ``module_names`` (in run order) for each segment: stem, each block, tail.

        Modules before the first block go to the stem, after the last to the tail; errors name
        the items by ``labels`` (default: the module names).

        Raises:
            ValueError: a module outside the blocks runs between two of them, or the order
                goes back to an earlier block.
        """
        n, labels = len(self.blocks), list(labels if labels is not None else module_names)
        inside = [self.segment_of(name) for name in module_names]
        first = next((k for k, s in enumerate(inside) if s is not None), len(inside))
        last = max((k for k, s in enumerate(inside) if s is not None), default=-1)
        segments: list[list[int]] = [[] for _ in range(n + 2)]
        seen = 0
        for k, s in enumerate(inside):
            if s is None:
                if first < k < last:
                    raise ValueError(f"{what} '{labels[k]}' runs between the blocks {self.names[0]} ... "
                                     f"{self.names[-1]} but is in none of them: name the blocks with blocks=[...] "
                                     "or use passes='per-site'")
                s = 0 if k < first else n + 1
            if s < seen:
                raise ValueError(f"{what} '{labels[k]}' of block '{self.names[s - 1]}' comes after a later "
                                 "block's: the order is not the one the blocks run in; use passes='per-site'")
            seen = s
            segments[s].append(k)
        return segments


def candidate_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Children of the outermost ``nn.Sequential`` / ``nn.ModuleList`` containers (nested ones flattened)."""
    found: list[tuple[str, nn.Module]] = []

    def visit(module: nn.Module, prefix: str) -> None:
        container = isinstance(module, (nn.Sequential, nn.ModuleList))
        for name, child in module.named_children():
            fqn = f"{prefix}.{name}" if prefix else name
            if container and not isinstance(child, (nn.Sequential, nn.ModuleList)):
                found.append((fqn, child))
            else:
                visit(child, fqn)

    visit(model, "")
    return found


@dataclass
class _Call:
    name: str
    module: nn.Module
    args: tuple
    kwargs: dict
    output: Any = None
    ops_before: int = 0  # tensor ops run outside every block before this call started
    escaped: bool = False  # its output was read by an op outside the blocks


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    try:
        return bool(a == b)
    except Exception:
        return False


def _linked(prev: _Call, call: _Call, first: _Call) -> bool:
    """Whether ``call`` may follow ``prev`` in a chain that starts at ``first``."""
    out = first_tensor(prev.output)
    if out is None or not call.args or call.args[0] is not out or prev.escaped:
        return False
    if call.ops_before != prev.ops_before or _rest(prev.output) is False:
        return False
    if len(call.args) != len(first.args) or set(call.kwargs) != set(first.kwargs):
        return False
    return (all(_same(a, b) for a, b in zip(call.args[1:], first.args[1:]))
            and all(_same(call.kwargs[k], first.kwargs[k]) for k in call.kwargs))


def _rest(output: Any) -> tuple | None | bool:
    """None for a tensor output, the non-tensor rest of a ``(tensor, ...)`` tuple, False otherwise."""
    if isinstance(output, torch.Tensor):
        return None
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        rest = output[1:]
        return False if any(isinstance(r, torch.Tensor) for r in rest) else tuple(rest)
    return False


def _trace(model: nn.Module, batch: Any, candidates: list[tuple[str, nn.Module]], forward_fn: ForwardFn) -> list[_Call]:
    calls: list[_Call] = []
    open_calls: list[_Call] = []
    outputs: dict[int, _Call] = {}
    ops = [0]
    names = {id(m): n for n, m in candidates}

    def pre(module, args, kwargs):
        call = _Call(names[id(module)], module, args, kwargs, ops_before=ops[0])
        calls.append(call)
        open_calls.append(call)

    def post(module, args, kwargs, output):
        call = open_calls.pop()
        call.output = output
        if first_tensor(output) is not None:
            outputs[id(first_tensor(output))] = call

    class OutsideOps(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not open_calls and isinstance(out, torch.Tensor):
                ops[0] += 1
                for a in list(args) + list((kwargs or {}).values()):
                    if isinstance(a, torch.Tensor) and id(a) in outputs:
                        outputs[id(a)].escaped = True
            return out

    handles = []
    try:
        for _, module in candidates:
            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(module.register_forward_hook(post, with_kwargs=True))
        with eval_mode(model), torch.no_grad(), OutsideOps():
            forward_fn(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def find_block_chain(model: nn.Module, batch: Any, *, forward_fn: ForwardFn | None = None,
                     blocks: Sequence[str] | None = None) -> BlockChain:
    """The chain of blocks of ``model``'s forward on ``batch`` (traced on its first 2 samples).

    Args:
        blocks: the chain's module names, in call order, instead of finding them; they must
            form a chain (see the module docstring).

    Raises:
        ValueError: no chain (or ``blocks`` do not form one), naming the fix.
    """
    forward_fn = forward_fn or default_forward
    if blocks is not None:
        try:
            candidates = [(name, model.get_submodule(name)) for name in blocks]
        except AttributeError as e:
            raise ValueError(f"blocks: {e}: name the blocks as model.named_modules() does") from None
    else:
        candidates = candidate_blocks(model)
    calls = _trace(model, head(batch, 2), candidates, forward_fn)
    counts: dict[str, int] = {}
    for call in calls:
        counts[call.name] = counts.get(call.name, 0) + 1
    runs: list[list[_Call]] = []
    for call in calls:
        if counts[call.name] != 1:
            continue
        if runs and _linked(runs[-1][-1], call, runs[-1][0]):
            runs[-1].append(call)
        else:
            runs.append([call])
    runs = [r[:-1] if _rest(r[-1].output) is False else r for r in runs]
    if blocks is not None:
        if len(runs) != 1 or [c.name for c in runs[0]] != list(blocks):
            raise ValueError(f"blocks={list(blocks)} do not form a chain: {NO_CHAIN}; check the names and their order")
    runs = [r for r in runs if len(r) >= 2]
    if not runs:
        raise ValueError(f"no chain of blocks found: {NO_CHAIN}; name them with blocks=[...], or use passes='per-site'")
    best = max(runs, key=lambda r: sum(is_producer(m) for c in r for m in c.module.modules()))
    return BlockChain(model, [c.name for c in best], [c.module for c in best], [_rest(c.output) for c in best],
                      forward_fn)
