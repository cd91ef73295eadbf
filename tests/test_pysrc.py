"""Built-in Python-source token data (``pysrc:SPLIT``): a deterministic split by file, read as bytes."""

from __future__ import annotations

import pytest
import torch

from prune_repair.io import pysrc
from prune_repair.io.errors import DataError
from prune_repair.io.tokens import is_token_data, load_tokens


def test_every_file_has_exactly_one_split_and_all_splits_are_used() -> None:
    files = pysrc.source_files()
    assert list(files) == sorted(files) and len(set(files)) == len(files)
    splits = {name: {f for f in files if pysrc.split_of(f) == name} for name in pysrc.SPLITS}
    assert all(splits.values())
    assert sum(len(s) for s in splits.values()) == len(files)
    assert not any(part in pysrc._SKIP_DIRS for f in files for part in f.split("/")[:-1])


def test_split_depends_on_the_path_only() -> None:
    assert pysrc.split_of("json/decoder.py") == pysrc.split_of("json/decoder.py")
    counts = {name: 0 for name in pysrc.SPLITS}
    for i in range(2000):
        counts[pysrc.split_of(f"pkg/module_{i}.py")] += 1
    assert 0.85 < counts["train"] / 2000 < 0.95 and counts["calib"] > 50 and counts["eval"] > 50


def test_eval_windows_are_the_bytes_of_eval_files() -> None:
    data = load_tokens("pysrc:eval")
    ids, mask = data["input_ids"], data["attention_mask"]
    assert ids.dtype == torch.int64 and ids.shape == (pysrc.MAX_SEQUENCES["eval"], pysrc.SEQ_LEN)
    assert bool((mask == 1).all()) and 0 <= int(ids.min()) and int(ids.max()) < 256
    text = b"".join(pysrc.split_bytes("eval"))
    for row in (ids[0], ids[-1]):
        assert bytes(row.to(torch.uint8).tolist()) in text
    train_text = b"\0".join(pysrc.split_bytes("train"))
    assert bytes(ids[len(ids) // 2].to(torch.uint8).tolist()) not in train_text


def test_specs() -> None:
    assert is_token_data("pysrc") and is_token_data("PySrc:Calib") and not is_token_data("pysrcx")
    assert torch.equal(load_tokens("pysrc")["input_ids"], load_tokens("pysrc:calib")["input_ids"])
    assert len(load_tokens("pysrc:calib")["input_ids"]) == pysrc.MAX_SEQUENCES["calib"]
    with pytest.raises(DataError, match="unknown pysrc split 'test': use pysrc:train, pysrc:calib or pysrc:eval"):
        load_tokens("pysrc:test")
