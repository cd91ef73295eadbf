"""The ``prune-repair`` command line: a thin layer over the public API.

Each command lives in its own module and registers itself on :data:`main`.
Run ``prune-repair --help`` or ``prune-repair COMMAND --help``.
"""

from __future__ import annotations

import sys

import click

from .. import __version__


class OneLineErrorGroup(click.Group):
    """A group whose usage errors are one line on stderr with exit code 2 (no usage dump)."""

    def main(self, *args, **kwargs):
        kwargs["standalone_mode"] = False
        try:
            return super().main(*args, **kwargs)
        except click.ClickException as err:
            from .common import console

            hint = " (see --help)" if isinstance(err, click.UsageError) else ""
            console.print(f"[bold red]error:[/] {err.format_message()}{hint}", highlight=False, soft_wrap=True)
            sys.exit(err.exit_code)
        except click.Abort:
            sys.exit(130)


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
      prune-repair merge a.pt b.pt --arch prune_repair.models:MLP --data mnist --out merged.pt
    """


from . import repair_cmd  # noqa: E402,F401  (registers the command)
