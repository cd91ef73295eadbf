"""Built-in byte-level token data: the Python standard library's own ``.py`` sources.

Every machine with Python has this text, so it needs no file and no download. The
``.py`` files under ``sysconfig.get_paths()["stdlib"]`` (leaving out ``site-packages``,
the test suites and the build-specific ``_sysconfigdata*``) are split BY FILE into
``train`` (90%), ``calib`` (5%) and ``eval`` (5%) by a hash of each file's relative path,
so the split does not depend on which other files a Python build ships. Tokens are the
file's bytes (ids 0-255); each file is cut into non-overlapping windows of
:data:`SEQ_LEN` bytes (a tail shorter than that is dropped).

Data specs (``--data`` / ``--eval-data`` of an HF causal LM with a 256-byte vocabulary):

- ``pysrc`` or ``pysrc:calib``: calibration windows (at most 1024, evenly spaced);
- ``pysrc:eval``: evaluation windows (at most 256, evenly spaced);
- ``pysrc:train``: every training window (used by ``benchmarks/train_transformers.py``).

Without ``--eval-data``, ``pysrc`` / ``pysrc:calib`` / ``pysrc:train`` are evaluated on
``pysrc:eval`` (as ``mnist`` is on ``mnist:test``).

Example:
    >>> split_of("json/decoder.py") in SPLITS
    True
    >>> data = load_pysrc("pysrc:eval")
    >>> data["input_ids"].shape[1], int(data["input_ids"].max()) < 256
    (256, True)
"""

from __future__ import annotations

import functools
import hashlib
import os
import sysconfig
from pathlib import Path

import torch

from .errors import DataError

__all__ = ["PYSRC", "SEQ_LEN", "SPLITS", "default_eval_spec", "is_pysrc_spec", "load_pysrc", "split_of", "source_files", "split_bytes",
           "windows"]

PYSRC = "pysrc"
SEQ_LEN = 256
SPLITS = ("train", "calib", "eval")
MAX_SEQUENCES = {"train": None, "calib": 1024, "eval": 256}
_PERCENT = {"train": range(0, 90), "calib": range(90, 95), "eval": range(95, 100)}
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def is_pysrc_spec(spec: object) -> bool:
    """Whether a data spec names the built-in Python-source data (``pysrc`` or ``pysrc:SPLIT``).

    Example:
        >>> is_pysrc_spec("pysrc:eval"), is_pysrc_spec("data.jsonl")
        (True, False)
    """
    text = str(spec).strip().lower()
    return text == PYSRC or text.startswith(PYSRC + ":")


def stdlib_dir() -> Path:
    """The directory of the running Python's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(relpath: str) -> str:
    """The split (``train`` / ``calib`` / ``eval``) of a file, from a hash of its relative path."""
    bucket = int(hashlib.sha256(relpath.encode()).hexdigest()[:8], 16) % 100
    return next(name for name, part in _PERCENT.items() if bucket in part)


@functools.lru_cache(maxsize=1)
def source_files() -> tuple[str, ...]:
    """Sorted relative paths (``/``-separated) of the standard library's ``.py`` files used."""
    root = stdlib_dir()
    if not root.is_dir():
        raise DataError(f"the Python standard library was not found at {root}: pysrc data needs the .py sources")
    files = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in _SKIP_DIRS]  # never walk site-packages or the test suites
        rel_dir = Path(directory).relative_to(root)
        files += [(rel_dir / n).as_posix() for n in names if n.endswith(".py") and not n.startswith("_sysconfigdata")]
    if not files:
        raise DataError(f"no .py files under {root}: pysrc data needs the standard library's sources")
    return tuple(sorted(files))


def split_bytes(split: str) -> list[bytes]:
    """The contents of every file of ``split``, in sorted path order."""
    _check_split(split)
    root = stdlib_dir()
    return [(root / rel).read_bytes() for rel in source_files() if split_of(rel) == split]


@functools.lru_cache(maxsize=3)
def windows(split: str, seq_len: int = SEQ_LEN) -> torch.Tensor:
    """All non-overlapping ``seq_len``-byte windows of the files of ``split``, ``(N, seq_len)`` uint8."""
    rows = []
    for content in split_bytes(split):
        usable = len(content) - len(content) % seq_len
        if usable:
            rows.append(torch.frombuffer(bytearray(content[:usable]), dtype=torch.uint8).view(-1, seq_len))
    if not rows:
        raise DataError(f"pysrc:{split} has no file of at least {seq_len} bytes: the standard library looks empty")
    return torch.cat(rows)


def load_pysrc(spec: str) -> dict[str, torch.Tensor]:
    """``{"input_ids", "attention_mask"}`` (int64, ``(N, SEQ_LEN)``) of a ``pysrc[:SPLIT]`` spec.

    ``calib`` and ``eval`` keep at most ``MAX_SEQUENCES[split]`` windows, evenly spaced
    over the split (so they span many files).
    """
    if not is_pysrc_spec(spec):
        raise DataError(f"{spec!r} is not a pysrc data spec: write pysrc:calib, pysrc:eval or pysrc:train")
    split = str(spec).strip().lower().partition(":")[2] or "calib"
    _check_split(split)
    ids = windows(split)
    cap = MAX_SEQUENCES[split]
    if cap is not None and len(ids) > cap:
        ids = ids[(torch.arange(cap) * len(ids)) // cap]
    ids = ids.long()
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def default_eval_spec(data: str) -> str | None:
    """The evaluation data that goes with ``--data`` when no ``--eval-data`` is given:
    ``pysrc:eval`` for the calibration split, else ``None`` (evaluate on ``--data``).

    Example:
        >>> default_eval_spec("pysrc"), default_eval_spec("pysrc:train"), default_eval_spec("t.jsonl")
        ('pysrc:eval', 'pysrc:eval', None)
    """
    if is_pysrc_spec(data) and str(data).strip().lower().partition(":")[2] in ("", "calib", "train"):
        return "pysrc:eval"
    return None


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown pysrc split {split!r}: use pysrc:train, pysrc:calib or pysrc:eval")
