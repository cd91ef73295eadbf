"""benchmarks/RESULTS.md is shared: each benchmark owns the text between its two markers.

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "R.md"
    >>> replace_section(p, "<!-- a:start -->\\nold\\n<!-- a:end -->")
    >>> replace_section(p, "<!-- a:start -->\\nnew\\n<!-- a:end -->")
    >>> p.read_text().count("new"), "old" in p.read_text()
    (1, False)
"""

from __future__ import annotations

from pathlib import Path

HEADER = "# Benchmark results\n\nMeasured on this repository's 2-core CPU machine; each section names its command.\n"


def replace_section(path: Path, section: str) -> None:
    """Put ``section`` (which starts and ends with its markers) into ``path``, replacing the
    previous text between the same markers, or appending it when they are absent."""
    lines = section.strip("\n").splitlines()
    start, end = lines[0], lines[-1]
    old = path.read_text() if path.is_file() else HEADER
    if start in old and end in old:
        new = old[: old.index(start)] + "\n".join(lines) + old[old.index(end) + len(end):]
    else:
        new = old.rstrip("\n") + "\n\n" + "\n".join(lines) + "\n"
    path.write_text(new)
