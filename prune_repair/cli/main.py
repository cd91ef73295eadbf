"""The ``prune-repair`` click group: one-line errors, SIGTERM handled like Ctrl-C."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator

import click

from .. import __version__

__all__ = ["main"]


class OneLineErrorGroup(click.Group):
    """A group whose usage errors are one line on stderr with exit code 2 (no usage dump),
    and under which SIGTERM cleans up like Ctrl-C (see :class:`.errors.Terminated`)."""

    def main(self, *args, **kwargs):
        from .errors import EXIT_INTERRUPTED, one_line
        from .output import console

        kwargs["standalone_mode"] = False
        try:
            with _sigterm_as_exception():
                return super().main(*args, **kwargs)
        except click.ClickException as err:
            from rich.markup import escape

            hint = " (see --help)" if isinstance(err, click.UsageError) else ""
            console.print(f"[bold red]error:[/] {escape(one_line(err.format_message()))}{hint}",
                          highlight=False, soft_wrap=True)
            sys.exit(err.exit_code)
        except click.Abort:
            console.print("interrupted: nothing written", highlight=False)
            sys.exit(EXIT_INTERRUPTED)


@contextlib.contextmanager
def _sigterm_as_exception() -> Iterator[None]:
    """While a command runs, SIGTERM raises :class:`.errors.Terminated` (when the default
    action would kill the process), so temporary files are removed on the way out."""
    from .errors import Terminated

    def terminate(signum, frame):
        raise Terminated()

    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@click.group(cls=OneLineErrorGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="prune-repair")
def main() -> None:
    """Repair networks after weight surgery (pruning, merging).

    Measures per-channel activation statistics of a reference network on one
    calibration batch, corrects the operated network toward them, folds the
    correction into the weights and writes a plain checkpoint of the original
    architecture.

    \b
    Examples:
      prune-repair prune zoo:mnist-cnn --data mnist --sparsity 0.9 --out pruned.pt
      prune-repair repair pruned.pt --reference zoo:mnist-cnn --data mnist --out repaired.pt
      prune-repair merge a.pt b.pt --arch prune_repair.zoo.models:MLP --data mnist --out merged.pt
    """
