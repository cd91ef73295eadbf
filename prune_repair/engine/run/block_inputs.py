"""The inputs of the current segment of a :class:`~prune_repair.engine.run.block_chain.BlockChain`
for every calibration batch, and how to run a segment (the stem, one block, the tail).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from .block_chain import find_block_chain
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 8), nn.ReLU()), nn.Linear(8, 2))
    >>> x = torch.randn(5, 4)
    >>> chain = find_block_chain(model, x)
    >>> store = BlockInputs(chain, [x])
    >>> with torch.no_grad():
    ...     for s in range(len(chain.names) + 1):  # the stem, then each block
    ...         _ = store.run_segment(s, 0)         # stores its output ...
    ...         store.advance()                     # ... as the next segment's input
    ...     out = store.run_segment(len(chain.names) + 1, 0)  # the tail: the model's output
    >>> torch.allclose(out, model(x))
    True
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from .forward import StopForward, first_tensor
from .block_chain import BlockChain


class BlockInputs:
    """The current segment's inputs for every calibration batch, and how to run a segment.

    Segment 0 is the stem (the model's forward, stopped at the first block's input), segment
    ``k`` (1..n) the ``k``-th block, segment ``n + 1`` the tail (the model's forward with the
    blocks skipped and the last one answering with its stored output).

    Args:
        offload: where block inputs wait: ``None`` (where they are, e.g. on the GPU),
            ``"cpu"`` (host memory) or a folder (one file per batch, removed afterwards).
    """

    def __init__(self, chain: BlockChain, batches: Sequence[Any], offload: str | Path | None = None):
        self.chain, self.batches = chain, list(batches)
        self.extra: list[tuple[tuple, dict] | None] = [None] * len(self.batches)  # the first block's other arguments
        self.current: list[Any] = [None] * len(self.batches)  # the current segment's inputs
        self.next: list[Any] = [None] * len(self.batches)
        self.device: torch.device | None = None
        self.folder: Path | None = None
        self.offload = offload
        self._made: list[Path] = []  # folders this store created (removed by close)
        if offload not in (None, "cpu"):
            root = Path(offload).expanduser()
            missing = [p for p in [root, *root.parents] if not p.exists()]
            root.mkdir(parents=True, exist_ok=True)
            self.folder = Path(tempfile.mkdtemp(prefix="blockwise-", dir=root))
            self._made = [self.folder, *missing]

    def close(self) -> None:
        """Drop every stored input and remove the offload files."""
        self.current = self.next = [None] * len(self.batches)
        if self.folder is not None:
            for f in self.folder.glob("*.pt"):
                f.unlink()
            self.folder.rmdir()
            for folder in self._made[1:]:  # parents it made: kept while another store still uses them
                if not any(folder.iterdir()):
                    folder.rmdir()
            self.folder, self._made = None, []

    def _put(self, x: torch.Tensor) -> Any:
        self.device = x.device
        if self.folder is not None:
            path = self.folder / f"{uuid.uuid4().hex}.pt"
            torch.save(x, path)
            return path
        return x.to("cpu") if self.offload == "cpu" else x

    def _get(self, stored: Any) -> torch.Tensor:
        if isinstance(stored, Path):
            return torch.load(stored, weights_only=True, map_location=self.device)
        return stored.to(self.device)

    def _drop(self, stored: Any) -> None:
        if isinstance(stored, Path):
            stored.unlink(missing_ok=True)

    def advance(self) -> None:
        """Make the outputs stored by the last :meth:`run_segment` calls (``store=True``) the inputs."""
        for stored in self.current:
            self._drop(stored)
        self.current, self.next = self.next, [None] * len(self.batches)

    def run_segment(self, s: int, i: int, *, store: bool = True) -> Any:
        """Run segment ``s`` on batch ``i``; with ``store``, its output replaces batch ``i``'s input
        (made the current one by :meth:`advance`).

        Returns the segment's output (the model's output for the tail), or None when a hook stopped it.
        """
        n = len(self.chain.blocks)
        if s == 0:
            return self._stem(i, store)
        if s == n + 1:
            return self._tail(i)
        args, kwargs = _fresh(self.extra[i])
        x = self._get(self.current[i])
        output = self.chain.blocks[s - 1](x, *args, **kwargs)
        y = first_tensor(output)
        if store:  # the input is not needed again: only one block input per batch stays alive
            self._drop(self.current[i])
            self.current[i] = None
            self.next[i] = self._put(y)
        return y

    def _stem(self, i: int, store: bool) -> torch.Tensor | None:
        got: list[torch.Tensor] = []

        def catch(module, args, kwargs):
            got.append(args[0])
            self.extra[i] = _fresh((args[1:], kwargs))
            raise StopForward

        handle = self.chain.blocks[0].register_forward_pre_hook(catch, with_kwargs=True)
        try:
            self.chain.forward_fn(self.chain.model, self.batches[i])
        except StopForward:
            pass
        finally:
            handle.remove()
        if not got:
            return None
        if store:
            self.next[i] = self._put(got[0])
        return got[0]

    def _tail(self, i: int) -> Any:
        last = self._get(self.current[i])
        with _skipping_blocks(self.chain, last):
            return self.chain.forward_fn(self.chain.model, self.batches[i])


def _fresh(value: Any) -> Any:
    """``value`` with every object that is not a tensor, a plain value or a container of them
    deep-copied: a state the blocks update as they run (a key/value cache) is replayed to each
    block as it was before the first one."""
    if isinstance(value, (torch.Tensor, str, int, float, bool, type(None), torch.dtype, torch.device)):
        return value
    if isinstance(value, (tuple, list)):
        return type(value)(_fresh(v) for v in value)
    if isinstance(value, dict):
        return {k: _fresh(v) for k, v in value.items()}
    return copy.deepcopy(value)


@contextlib.contextmanager
def _skipping_blocks(chain: BlockChain, last_output: torch.Tensor) -> Iterator[None]:
    """Every block passes its input through; the last answers ``last_output`` (as it would)."""
    n = len(chain.blocks)

    def skip(k: int):
        def forward(x, *args, **kwargs):
            y = last_output if k == n - 1 else x
            rest = chain.tuple_rest[k]
            return y if rest is None else (y, *rest)
        return forward

    saved = [block.__dict__.get("forward") for block in chain.blocks]
    for k, block in enumerate(chain.blocks):
        block.forward = skip(k)
    try:
        yield
    finally:
        for block, own in zip(chain.blocks, saved):
            if own is None:
                del block.forward
            else:
                block.forward = own
