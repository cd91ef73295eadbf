"""How a command ends: one line and exit code 2 for a user mistake, 130 / 143 for Ctrl-C / SIGTERM.

A user mistake ends with exit code 2 and one line ``error: ...`` (in command-line terms:
the option to change, not the API argument); Ctrl-C ends with exit code 130 (SIGTERM: 143)
and one line. Either way nothing is written: each command runs inside
:func:`~prune_repair.io.output_transaction`, so its outputs appear only together, when the
command succeeds.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch
from rich.markup import escape

from ..engine.run import distributed
from ..io import output_transaction
from ..merge.groups import HAND_HELP
from .data_loading import _LOADED
from .output import console, out_console

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class Terminated(KeyboardInterrupt):
    """Raised in place of the default action of SIGTERM, so outputs are cleaned up as on Ctrl-C."""


def one_line(message: str) -> str:
    """``message`` with every run of whitespace (newlines too) collapsed to one space."""
    return " ".join(str(message).split())


CLI_TERMS = {
    # the library's wording -> the option a command-line user changes
    "ask for at least one sample": "raise --calib-size",
    "ask for fewer samples": "lower --calib-size",
    HAND_HELP: "pass groups by hand with --groups FILE.json (see prune-repair merge --help)",
    "(the 'plot' extra)": "(the 'plot' extra), or drop --plot",
    "the same architecture and arguments": "the same --arch and --arch-kwargs",
    "use fewer gradients or more data": "lower --fisher-samples or give more --data",
    "pass include_tied=True to prune them anyway": "add --include-tied to prune them anyway",
    "name them with blocks=[...], or use passes='per-site'": "use --passes per-site (or lockstep)",
    "refitting it would change the other module too)": "refitting it would change the other module too; it is "
    "not pruned either, unless --prune-head --include-tied)",
}


def in_cli_terms(message: str) -> str:
    """A library error message with the command-line options named in place of API terms.

    >>> in_cli_terms("calibration size 9 exceeds the 5 samples in the data: ask for fewer samples")
    'calibration size 9 exceeds the 5 samples in the data: lower --calib-size'
    """
    for library, cli in CLI_TERMS.items():
        message = message.replace(library, cli)
    return message


def fail(message: str) -> None:
    """Print one line (in command-line terms) and exit with code 2."""
    console.quiet = False  # every rank reports its own error
    console.print(f"[bold red]error:[/] {escape(one_line(in_cli_terms(message)))}", highlight=False, soft_wrap=True)
    sys.exit(EXIT_USAGE)


def show_warnings_once() -> contextlib.AbstractContextManager:
    """Within the block, the package's warnings are printed on stderr in command-line terms, each distinct
    one once (a flow that repeats per sparsity or batch repeats none); other warnings as usual."""
    seen: set[str] = set()
    manager = warnings.catch_warnings()
    shown = warnings.showwarning

    def show(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        if "prune_repair" not in str(filename):
            return shown(message, category, filename, lineno, file, line)
        text = one_line(in_cli_terms(str(message)))
        if text not in seen:
            seen.add(text)
            console.print(f"[yellow]warning:[/] {escape(text)}", highlight=False, soft_wrap=True)

    class _Once(contextlib.AbstractContextManager):
        def __enter__(self) -> None:
            manager.__enter__()
            warnings.filterwarnings("always", category=UserWarning, module="prune_repair")  # `show` keeps one of each
            warnings.showwarning = show

        def __exit__(self, *exc: Any) -> None:
            manager.__exit__(*exc)

    return _Once()


def handle_errors(command: Callable) -> Callable:
    """Run a command inside an output transaction; turn user mistakes (ValueError,
    OSError) into one line and exit code 2, and Ctrl-C into one line and exit code 130.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is initialized here (gloo,
    or NCCL for a CUDA device); only rank 0 prints and writes its outputs."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        token = _LOADED.set([])
        device = kwargs.get("device") or "auto"
        device = "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"
        quiet, out_quiet = console.quiet, out_console.quiet
        try:
            with distributed.process_group_from_env(device):
                console.quiet = quiet or not distributed.is_main_process()
                out_console.quiet = out_quiet or not distributed.is_main_process()  # one table, from rank 0
                with output_transaction(commit=distributed.is_main_process()), show_warnings_once():
                    return command(*args, **kwargs)
        except (ValueError, OSError) as err:
            fail(str(err) or type(err).__name__)
        except KeyboardInterrupt as err:
            console.print("interrupted: nothing written", highlight=False)
            sys.exit(EXIT_TERMINATED if isinstance(err, Terminated) else EXIT_INTERRUPTED)
        finally:
            console.quiet, out_console.quiet = quiet, out_quiet
            _LOADED.reset(token)

    return wrapper
