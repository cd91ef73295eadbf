"""Tokenized data for HF models: ``input_ids`` with an optional ``attention_mask`` and ``labels``.

A token data spec is

- a ``.pt`` file holding a dict with a tensor ``input_ids`` (N, T), and optionally
  ``attention_mask`` (N, T; 1 = a real token) and ``labels`` ((N,) class indices for a
  sequence classifier, or (N, T) token targets with -100 for ignored positions);
- a ``.npz`` with the same arrays;
- a ``.jsonl`` file, one ``{"input_ids": [...], "attention_mask": [...], "labels": ...}``
  per line; sequences of different lengths are right-padded (id 0, mask 0, label -100).
- ``pysrc`` / ``pysrc:calib`` / ``pysrc:eval`` / ``pysrc:train``: the built-in bytes of the Python
  standard library's sources (:mod:`prune_repair.io.pysrc`), no file needed.

Without ``attention_mask`` every position is a real token. Batches are dicts trimmed to
their longest sequence, fed to the model as ``model(**batch)`` (labels kept apart).

Example:
    >>> import json, tempfile, pathlib
    >>> f = pathlib.Path(tempfile.mkdtemp()) / "t.jsonl"
    >>> _ = f.write_text(json.dumps({"input_ids": [5, 6, 7]}) + "\\n" + json.dumps({"input_ids": [8]}) + "\\n")
    >>> data = load_tokens(f)
    >>> data["input_ids"].tolist(), data["attention_mask"].tolist()
    ([[5, 6, 7], [8, 0, 0]], [[1, 1, 1], [1, 0, 0]])
    >>> sorted(draw(data, 1, seed=0))
    ['attention_mask', 'input_ids']
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch

from .errors import DataError
from .errors import _first_line
from .pysrc import is_pysrc_spec, load_pysrc

TOKEN_KEYS = ("input_ids", "attention_mask", "labels")
IGNORE_INDEX = -100
_SAVE_HINT = "save torch.save({'input_ids': ids, 'attention_mask': mask}, path)"


def is_token_data(spec: str | os.PathLike[str]) -> bool:
    """Whether a data spec is tokenized data: a ``.jsonl`` file, or a ``.pt``/``.npz`` holding ``input_ids``."""
    if is_pysrc_spec(os.fspath(spec)):  # built-in Python-source bytes (see prune_repair.io.pysrc)
        return True
    p = Path(os.fspath(spec).strip()).expanduser()
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        return True
    if suffix not in (".pt", ".pth", ".npz") or not p.is_file() or p.stat().st_size == 0:
        return False
    try:
        if suffix == ".npz":
            if not zipfile.is_zipfile(p):
                return False
            with np.load(p, allow_pickle=False) as archive:
                return "input_ids" in archive.files
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception:  # not readable here: load_dataset reports it
        return False
    return isinstance(obj, dict) and "input_ids" in obj


def load_tokens(spec: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """``{"input_ids", "attention_mask"[, "labels"]}`` as int64 tensors (see the module docstring)."""
    text = os.fspath(spec).strip()
    if is_pysrc_spec(text):
        return load_pysrc(text)
    p = Path(text).expanduser()
    if not p.exists():
        raise DataError(f"data file not found: {text}: check the path")
    if not p.is_file():
        raise DataError(f"data file {text} is not a regular file: give a .pt, .npz or .jsonl file")
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        raw = _load_jsonl(p)
    elif suffix == ".npz":
        try:
            with np.load(p, allow_pickle=False) as archive:
                raw = {k: archive[k] for k in archive.files if k in TOKEN_KEYS}
        except Exception as err:
            raise DataError(f"cannot read {text} as a .npz archive ({_first_line(err)}): save it with "
                            "np.savez(path, input_ids=ids, attention_mask=mask)") from None
    else:
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise DataError(f"{text} holds objects that need pickle, which is never loaded: {_SAVE_HINT}") from None
        except Exception as err:
            raise DataError(f"cannot read {text} as a torch file ({_first_line(err)}): {_SAVE_HINT}") from None
        if not isinstance(obj, dict):
            raise DataError(f"{text} must hold a dict with 'input_ids', found a {type(obj).__name__}: {_SAVE_HINT}")
        raw = {k: v for k, v in obj.items() if k in TOKEN_KEYS}
    return _validated(raw, text)


def _load_jsonl(p: Path) -> dict[str, torch.Tensor]:
    rows = []
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read {p} as UTF-8 text ({_first_line(err)}): write one JSON object per line") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{p} line {number} is not valid JSON ({err.msg}): write one "
                            '{"input_ids": [...]} object per line') from None
        if not isinstance(row, dict) or not isinstance(row.get("input_ids"), list) or not row["input_ids"]:
            raise DataError(f"{p} line {number} has no list 'input_ids': write one "
                            '{"input_ids": [...], "attention_mask": [...]} object per line')
        n = len(row["input_ids"])
        for key in ("attention_mask",) + (("labels",) if isinstance(row.get("labels"), list) else ()):
            if key in row and (not isinstance(row[key], list) or len(row[key]) != n):
                raise DataError(f"{p} line {number}: '{key}' must be a list as long as 'input_ids' ({n})")
        for key in ("input_ids", "attention_mask", "labels"):
            values = row.get(key, [])
            bad = [v for v in (values if isinstance(values, list) else [values]) if not _is_integer(v)]
            if bad:
                raise DataError(f"{p} line {number}: '{key}' must hold integers, found {bad[0]!r}: write token ids "
                                "as whole numbers")
        rows.append(row)
    if not rows:
        raise DataError(f"{p} holds no sequences: write one JSON object per line")
    width = max(len(r["input_ids"]) for r in rows)
    try:
        ids = torch.tensor([r["input_ids"] + [0] * (width - len(r["input_ids"])) for r in rows], dtype=torch.int64)
        mask = torch.tensor([list(r.get("attention_mask", [1] * len(r["input_ids"])))
                             + [0] * (width - len(r["input_ids"])) for r in rows], dtype=torch.int64)
        out = {"input_ids": ids, "attention_mask": mask}
        with_labels = [r for r in rows if "labels" in r]
        if with_labels and len(with_labels) != len(rows):
            raise DataError(f"{p}: some lines have 'labels' and some do not: give labels on every line or none")
        if with_labels:
            if all(isinstance(r["labels"], list) for r in rows):
                out["labels"] = torch.tensor([r["labels"] + [IGNORE_INDEX] * (width - len(r["labels"])) for r in rows],
                                             dtype=torch.int64)
            else:
                out["labels"] = torch.tensor([r["labels"] for r in rows], dtype=torch.int64)
    except (TypeError, ValueError, OverflowError) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(f"{p}: token ids, masks and labels must be integers ({_first_line(err)})") from None
    return out


def _is_integer(value: object) -> bool:
    """A whole number, as ``.pt`` / ``.npz`` data accept (``3`` or ``3.0``; not ``2.5``, not ``true``)."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


def _validated(raw: dict, source: str) -> dict[str, torch.Tensor]:
    if "input_ids" not in raw:
        raise DataError(f"{source} has no 'input_ids': {_SAVE_HINT}")
    out = {}
    for key, value in raw.items():
        if isinstance(value, np.ndarray):
            if value.dtype.kind not in "biu" and not (value.dtype.kind == "f" and np.all(value == np.round(value))):
                raise DataError(f"{source}: '{key}' must hold integers, found dtype {value.dtype}")
            value = torch.from_numpy(np.ascontiguousarray(value))
        if not isinstance(value, torch.Tensor):
            raise DataError(f"{source}: '{key}' must be a tensor/array, found {type(value).__name__}")
        if value.is_complex() or (value.is_floating_point() and not torch.equal(value, value.round())):
            raise DataError(f"{source}: '{key}' must hold integers, found dtype {value.dtype}")
        out[key] = value.to(torch.int64)
    ids = out["input_ids"]
    if ids.dim() != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
        raise DataError(f"{source}: 'input_ids' must be (sequences, tokens), got shape {list(ids.shape)}")
    if int(ids.min()) < 0:
        raise DataError(f"{source}: 'input_ids' holds negative token ids: use ids of the model's vocabulary")
    mask = out.setdefault("attention_mask", torch.ones_like(ids))
    if tuple(mask.shape) != tuple(ids.shape):
        raise DataError(f"{source}: 'attention_mask' is {list(mask.shape)} but 'input_ids' is {list(ids.shape)}: "
                        "give one mask value per token")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise DataError(f"{source}: 'attention_mask' must hold 0 (padding) and 1 (a token)")
    if not bool((mask.sum(1) > 0).all()):
        raise DataError(f"{source}: sequence {int((mask.sum(1) == 0).nonzero()[0])} has no real token: drop it")
    labels = out.get("labels")
    if labels is not None and labels.shape[0] != ids.shape[0]:
        raise DataError(f"{source}: 'labels' has {labels.shape[0]} rows but 'input_ids' has {ids.shape[0]}: "
                        "give one label (or one label row) per sequence")
    if labels is not None and labels.dim() == 2 and tuple(labels.shape) != tuple(ids.shape):
        raise DataError(f"{source}: 'labels' is {list(labels.shape)} but 'input_ids' is {list(ids.shape)}")
    if labels is not None and labels.dim() not in (1, 2):
        raise DataError(f"{source}: 'labels' must be (N,) class indices or (N, T) token ids")
    return out


def num_sequences(data: dict[str, torch.Tensor]) -> int:
    return int(next(iter(data.values())).shape[0])


def select(data: dict[str, torch.Tensor], index: torch.Tensor | slice) -> dict[str, torch.Tensor]:
    """The sequences at ``index``, trimmed to the longest of them (padding columns dropped)."""
    part = {k: v[index] for k, v in data.items()}
    mask = part.get("attention_mask")
    if mask is not None and mask.dim() == 2 and mask.shape[1] and mask.shape[0]:
        real = mask.bool().any(0).nonzero()
        width = int(real.max()) + 1 if len(real) else 1
        part = {k: (v[:, :width] if v.dim() == 2 and v.shape[1] == mask.shape[1] else v) for k, v in part.items()}
    return part


def draw(data: dict[str, torch.Tensor], size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """``size`` sequences drawn without replacement with ``seed`` (the draw of
    :func:`~prune_repair.io.data.calibration_batch`), padded to their longest."""
    n = num_sequences(data)
    if size > n:
        raise DataError(f"calibration size {size} exceeds the {n} sequences in the data: ask for fewer samples")
    index = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))[:size]
    return select(data, index)
