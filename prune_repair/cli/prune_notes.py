"""What ``prune`` prints after its table: defaults it chose and what the correction left out.

The same notes ``repair`` prints (dead channels, sites with no bias whose correction could
only scale), read from the last row's correction report, plus the run's own notes (e.g.
``auto`` -> ``none`` after obs) and layers a sparsity left all zero.

Example:
    >>> from prune_repair.prune.pipeline import PruneRow, PruneRun
    >>> row = PruneRow(0.5, 0.5, 1, 0, 1, 0, {}, correction={"sites": [
    ...     {"fqn": "q_proj", "shift_dropped": True, "dead_channels": []}]},
    ...     layers=[{"fqn": "q_proj", "sparsity": 0.5, "pattern": "unstructured"}])
    >>> prune_notes(PruneRun("wanda", "repair", {}, [row]))
    ['no bias to hold the shift at 1 site(s) (q_proj): the correction applied the scale only']
"""

from __future__ import annotations

from ..prune.pipeline import PruneRun
from .output import console, repair_notes, some


def prune_notes(run: PruneRun) -> list[str]:
    """The notes of a finished run (see the module doc), in print order."""
    notes = list(run.notes)
    if not run.rows:
        return notes
    last = run.rows[-1]
    notes += repair_notes(last.correction.get("sites", []))
    empty = [la["fqn"] for la in last.layers if la["sparsity"] >= 1.0]
    if empty:
        notes.append(f"{len(empty)} layer(s) are all zero ({some(empty)}): lower the sparsity for them")
    return notes


def print_prune_notes(run: PruneRun) -> None:
    """Print :func:`prune_notes` on stderr."""
    for note in prune_notes(run):
        console.print(note)
