"""Progress of a calibration pass: one tick per decided site / layer, per block when blockwise.

``progress`` arguments across the engine take one of:

- ``None`` or ``False``: silent (the library default);
- ``True``: shown on stderr, a rich progress bar on a terminal, plain lines otherwise (at
  most one every :data:`PLAIN_EVERY_S` seconds, the first after that long, plus the last of a
  pass that printed one: a pass shorter than that prints nothing); under
  ``torch.distributed`` by rank 0 only;
- a callable ``progress(done, total)``: called after each step.

Example:
    >>> seen = []
    >>> with Progress("reconstruct", 2, lambda done, total: seen.append((done, total))) as bar:
    ...     bar.advance("0")
    ...     bar.advance("2")
    >>> seen
    [(1, 2), (2, 2)]
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from . import distributed

ProgressArg = bool | Callable[[int, int], None] | None
PLAIN_EVERY_S = 5.0


class Progress:
    """Counts decided steps of a pass named ``what`` and shows them as ``progress`` asks (module doc)."""

    def __init__(self, what: str, total: int, progress: ProgressArg = None):
        if progress is not None and not isinstance(progress, bool) and not callable(progress):
            raise TypeError(f"progress must be True, False, None or a callable(done, total), got {progress!r}")
        self.what, self.total, self.done = what, total, 0
        self.callback = progress if callable(progress) and not isinstance(progress, bool) else None
        self.shown = progress is True and distributed.is_main_process()
        self.where = ""  # the block being worked on, when blockwise
        self._bar: Any = None
        self._last = time.monotonic()  # plain lines: when the last one was printed (or the pass began)
        self._printed = False

    def __enter__(self) -> "Progress":
        self._last = time.monotonic()
        if self.shown and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/"
                                     "{task.total}"), TimeElapsedColumn(), console=Console(stderr=True),
                                     transient=True)
            self._bar.start()
            self._task = self._bar.add_task(self.what, total=self.total)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def block(self, k: int, blocks: int, name: str) -> None:
        """Say that block ``k`` of ``blocks`` (``name``; 0 the stem, ``blocks + 1`` the tail) starts."""
        self.where = "stem" if k == 0 else "tail" if k == blocks + 1 else f"block {k}/{blocks} ({name})"

    def advance(self, name: str) -> None:
        """One more step (``name``: the site or layer) decided."""
        self.done += 1
        if self.callback is not None:
            self.callback(self.done, self.total)
        if not self.shown:
            return
        label = f"{self.what}: {self.where + ', ' if self.where else ''}'{name}'"
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, description=label)
        elif time.monotonic() - self._last >= PLAIN_EVERY_S or (self.done == self.total and self._printed):
            self._last, self._printed = time.monotonic(), True
            print(f"{label} [{self.done}/{self.total}]", file=sys.stderr, flush=True)
