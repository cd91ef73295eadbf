"""Fuzzing `prune-repair repair` with bad checkpoints and bad data (issue 5).

Every generated case is a user mistake or a hostile file: truncated files, random
bytes, wrong dtypes (integers, booleans, complex, float8), wrong or empty shapes,
missing/extra keys, non-tensor values, sparse tensors, NaN/Inf, pickles carrying a
code payload, object arrays in .npz, directories, zero-length files, data that does
not fit the model. Each one must end with

- exit code 2 and exactly one line of output (never a traceback),
- nothing written (the folder of the case and the inputs are byte-identical),
- the code payload never run (its marker file never appears),
- within the time limit (no hang).

Hypothesis runs derandomized, so CI sees the same cases every run; the number of
cases tried is printed in the terminal summary (see conftest.py).
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import signal
import tempfile
import zipfile
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from safety_helpers import make_world, repair_args, run_cli, snapshot, tiny_model

pytestmark = pytest.mark.slow  # the fuzz run (about 200 generated cases)

try:
    import safetensors.torch as safetensors_torch
except ImportError:  # the optional extra is not installed: its cases are skipped
    safetensors_torch = None

CASE_SECONDS = 20  # a case taking longer than this counts as a hang
PER_KIND = 6  # cases per kind of mistake and run (fewer when a kind has fewer distinct cases)
FUZZ = settings(max_examples=PER_KIND, derandomize=True, database=None, deadline=timedelta(seconds=CASE_SECONDS),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
STATE = tiny_model(0).state_dict()
KEYS = sorted(STATE)


class Payload:
    """Unpickling this runs code that creates ``marker`` (if it ever runs)."""

    def __init__(self, marker: Path, how: str):
        self.marker, self.how = str(marker), how

    def __reduce__(self):
        if self.how == "open":
            return (open, (self.marker, "w"))
        if self.how == "exec":
            return (exec, (f"open({self.marker!r}, 'w').close()",))
        return (os.system, (f"touch '{self.marker}'",))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("fuzz-world"))


@contextlib.contextmanager
def time_limit(seconds: float):
    """Fail (instead of hanging forever) when the block runs longer than ``seconds``."""

    def expire(signum, frame):
        raise TimeoutError(f"a fuzz case ran longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def save_torch(obj, path: Path, legacy: bool = False) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


def valid_bytes(suffix: str) -> bytes:
    """A valid checkpoint of the tiny model in the format of ``suffix``."""
    if suffix == ".safetensors":
        return safetensors_torch.save(STATE)
    buffer = io.BytesIO()
    torch.save(STATE, buffer)
    return buffer.getvalue()


# --- checkpoint cases: bad_checkpoint(kind) draws write(folder, marker) -> path ----------

SUFFIXES = [".pt", ".safetensors"] if safetensors_torch is not None else [".pt"]
BAD_DTYPES = [torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128,
              torch.float8_e4m3fn, torch.float8_e5m2]
SAFETENSORS_DTYPES = [torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn,
                      torch.float8_e5m2]


def write_state(state, folder: Path, suffix: str, legacy: bool) -> Path:
    path = folder / f"ckpt{suffix}"
    if suffix == ".safetensors":
        safetensors_torch.save_file(state, str(path))
        return path
    return save_torch(state, path, legacy)


def shapes_other_than(shape):
    return st.lists(st.integers(0, 9), min_size=0, max_size=3).filter(lambda s: tuple(s) != tuple(shape))


CHECKPOINT_KINDS = [
    "random-bytes", "header-like-bytes", "truncated", "zero-length", "wrong-dtype", "wrong-shape",
    "empty-tensor", "missing-key", "extra-key", "non-tensor-value", "not-a-state-dict", "nan-inf",
    "sparse-tensor", "bad-prune-mask", "pickle-payload", "npz-instead", "directory",
]


@st.composite
def bad_checkpoint(draw, kind: str):
    """A checkpoint with the mistake ``kind``: ``write(folder, marker) -> path``."""
    suffix = draw(st.sampled_from(SUFFIXES))
    legacy = draw(st.booleans())
    key = draw(st.sampled_from(KEYS))
    state = {k: v.clone() for k, v in STATE.items()}

    if kind == "random-bytes":
        blob = draw(st.binary(max_size=600))
        return lambda folder, marker: _write(folder / f"ckpt{suffix}", blob)
    if kind == "header-like-bytes":  # an 8-byte length and '{': looks like safetensors, is not
        body = b"{" + draw(st.binary(max_size=200))
        blob = draw(st.integers(2, 400)).to_bytes(8, "little") + body
        return lambda folder, marker: _write(folder / "ckpt.pt", blob)
    if kind == "truncated":
        blob = valid_bytes(suffix)
        cut = draw(st.integers(0, len(blob) - 1))
        return lambda folder, marker: _write(folder / f"ckpt{suffix}", blob[:cut])
    if kind == "zero-length":
        return lambda folder, marker: _write(folder / f"ckpt{suffix}", b"")
    if kind == "wrong-dtype":
        dtypes = SAFETENSORS_DTYPES if suffix == ".safetensors" else BAD_DTYPES
        state[key] = state[key].to(draw(st.sampled_from(dtypes)))
    elif kind == "wrong-shape":
        state[key] = torch.zeros(draw(shapes_other_than(state[key].shape)))
    elif kind == "empty-tensor":
        state = {k: torch.zeros(0) for k in state} if draw(st.booleans()) else {**state, key: torch.zeros(0)}
    elif kind == "missing-key":
        del state[key]
    elif kind == "extra-key":
        state[draw(st.text(min_size=1, max_size=12))] = torch.zeros(draw(st.integers(0, 3)))
        if len(state) == len(STATE):  # the drawn key was an existing one: make it wrong instead
            state[key] = torch.zeros(1, 1, 1)
    elif kind == "non-tensor-value":
        value = draw(st.one_of(st.integers(), st.floats(), st.text(max_size=8), st.none(),
                               st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)))
        state[key] = value
        suffix = ".pt"
    elif kind == "not-a-state-dict":
        obj = draw(st.sampled_from(["tensor", "list", "int", "str", "empty", "nested-empty"]))
        state = {"tensor": torch.zeros(3), "list": [torch.zeros(3)], "int": 7, "str": "weights", "empty": {},
                 "nested-empty": {"state_dict": {}}}[obj]
        suffix = ".pt"
    elif kind == "nan-inf":
        flat = state[key].view(-1)
        flat[draw(st.integers(0, flat.numel() - 1))] = draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
    elif kind == "sparse-tensor":
        state[key] = state[key].to_sparse()
        suffix = ".pt"
    elif kind == "bad-prune-mask":
        weight = state.pop("features.fc1.weight")
        mask = draw(st.sampled_from(["shape", "complex"]))
        state["features.fc1.weight_orig"] = weight
        state["features.fc1.weight_mask"] = (torch.ones(3, 3) if mask == "shape"
                                             else torch.ones_like(weight, dtype=torch.complex64))
        suffix = ".pt"
    elif kind == "pickle-payload":
        how = draw(st.sampled_from(["open", "exec", "system"]))
        where = draw(st.sampled_from(["top", "value", "nested", "raw-pickle"]))
        protocol = draw(st.integers(0, pickle.HIGHEST_PROTOCOL))

        def write_payload(folder, marker):
            payload = Payload(marker, how)
            if where == "raw-pickle":
                return _write(folder / "ckpt.pt", pickle.dumps(payload, protocol=protocol))
            obj = {"top": payload, "value": {**state, key: payload}, "nested": {"state_dict": state, "x": [payload]}}[where]
            return save_torch(obj, folder / "ckpt.pt", legacy)

        return write_payload
    elif kind == "npz-instead":
        return lambda folder, marker: _npz(folder / "ckpt.pt", x=np.zeros(3), y=np.zeros(3))
    elif kind == "directory":
        def write_dir(folder, marker):
            path = folder / f"ckpt{suffix}"
            path.mkdir()
            (path / "data.pkl").write_bytes(b"\x80\x02}q\x00.")
            return path

        return write_dir
    return lambda folder, marker: write_state(state, folder, suffix, legacy)


def _write(path: Path, blob: bytes) -> Path:
    path.write_bytes(blob)
    return path


def _npz(path: Path, **arrays) -> Path:
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)
    return path


# --- data cases ---------------------------------------------------------------------------


DATA_KINDS = [
    "random-bytes", "truncated", "zero-length", "x-dtype", "y-dtype", "x-shape", "y-shape", "empty",
    "too-few-samples", "x-nan-inf", "y-nan", "y-negative", "y-out-of-range", "pickle-payload",
    "npz-object-array", "npz-keys", "non-tensor", "directory", "unsupported-suffix",
]


@st.composite
def bad_data(draw, kind: str):
    """A data file with the mistake ``kind``: ``write(folder, marker) -> path``."""
    suffix = draw(st.sampled_from([".pt", ".npz"]))
    n = draw(st.integers(16, 40))
    x, y = np.random.default_rng(draw(st.integers(0, 9))).standard_normal((n, 4)).astype(np.float32), np.arange(n) % 3
    arrays: dict = {"x": x, "y": y}

    if kind == "random-bytes":
        blob = draw(st.binary(max_size=600))
        return lambda folder, marker: _write(folder / f"data{suffix}", blob)
    if kind == "truncated":
        path_bytes = _data_bytes(arrays, suffix)
        cut = draw(st.integers(0, len(path_bytes) - 1))
        return lambda folder, marker: _write(folder / f"data{suffix}", path_bytes[:cut])
    if kind == "zero-length":
        return lambda folder, marker: _write(folder / f"data{suffix}", b"")
    if kind == "x-dtype":
        arrays["x"] = draw(st.sampled_from([x.astype(np.complex64), x > 0, x.astype(str)]))
    elif kind == "y-dtype":
        arrays["y"] = draw(st.sampled_from([y.astype(np.complex64), y > 0, y + 0.5, y.astype(str)]))
    elif kind == "x-shape":
        features = draw(st.lists(st.integers(0, 6), max_size=3).filter(lambda s: int(np.prod(s)) != 4))
        arrays["x"] = np.zeros((n, *features), dtype=np.float32)
    elif kind == "y-shape":
        arrays["y"] = draw(st.sampled_from([y.reshape(-1, 1), y[:-1], np.int64(1), np.concatenate([y, y])]))
    elif kind == "empty":
        arrays = draw(st.sampled_from([{"x": x[:0], "y": y[:0]}, {"x": np.zeros((0,)), "y": np.zeros((0,))}]))
    elif kind == "too-few-samples":  # --calib-size is 16
        k = draw(st.integers(1, 15))
        arrays = {"x": x[:k], "y": y[:k]}
    elif kind == "x-nan-inf":
        x = x.copy()
        x[draw(st.integers(0, n - 1)), draw(st.integers(0, 3))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        arrays["x"] = x
    elif kind == "y-nan":
        arrays["y"] = np.where(np.arange(n) == draw(st.integers(0, n - 1)), np.nan, y.astype(np.float64))
    elif kind == "y-negative":
        arrays["y"] = y - draw(st.integers(1, 3))
    elif kind == "y-out-of-range":  # the model has 3 classes
        arrays["y"] = y + draw(st.integers(1, 1000))
    elif kind == "pickle-payload":
        how = draw(st.sampled_from(["open", "exec", "system"]))
        return lambda folder, marker: save_torch({"x": torch.from_numpy(x), "y": Payload(marker, how)},
                                                       folder / "data.pt")
    elif kind == "npz-object-array":
        how = draw(st.sampled_from(["open", "exec", "system"]))
        return lambda folder, marker: _npz(folder / "data.npz", x=np.array([Payload(marker, how)], dtype=object),
                                                 y=y)
    elif kind == "npz-keys":  # keys other than x and y; the names end up in the message (rich markup!)
        names = draw(st.lists(st.text(min_size=1, max_size=8).filter(lambda t: t not in ("x", "y") and "/" not in t
                                                                      and "\x00" not in t), min_size=1, max_size=3,
                              unique=True))
        return lambda folder, marker: _npz(folder / "data.npz", **{name: x for name in names})
    elif kind == "non-tensor":
        value = draw(st.sampled_from([[1.0, 2.0], "pixels", 3, None, {"a": 1}]))
        return lambda folder, marker: save_torch({"x": value, "y": torch.from_numpy(y)}, folder / "data.pt")
    elif kind == "directory":
        layout = draw(st.sampled_from(["empty", "flat-file", "class-with-bad-image", "class-without-images"]))

        def write_dir(folder, marker):
            root = folder / "images"
            root.mkdir()
            if layout == "flat-file":
                (root / "a.png").write_bytes(b"not an image")
            elif layout == "class-with-bad-image":
                (root / "cat").mkdir()
                (root / "cat" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
            elif layout == "class-without-images":
                (root / "cat").mkdir()
                (root / "cat" / "notes.txt").write_text("no images here")
            return root

        return write_dir
    elif kind == "unsupported-suffix":
        suffix = draw(st.sampled_from([".csv", ".json", ".npy", ""]))
        return lambda folder, marker: _write(folder / f"data{suffix}", b"1,2,3\n")

    def write(folder, marker):
        if suffix == ".npz":
            return _npz(folder / "data.npz", **arrays)
        tensors = {k: torch.from_numpy(np.asarray(v)) if np.asarray(v).dtype.kind in "biufc" else v
                   for k, v in arrays.items()}
        return save_torch(tensors, folder / "data.pt")

    return write


def _data_bytes(arrays, suffix: str) -> bytes:
    buffer = io.BytesIO()
    if suffix == ".npz":
        np.savez(buffer, **arrays)
    else:
        torch.save({k: torch.from_numpy(v) for k, v in arrays.items()}, buffer)
    return buffer.getvalue()


# --- the properties -------------------------------------------------------------------------


def check_rejected(world, args, folder: Path, marker: Path):
    inputs_before, case_before = snapshot(world.root), snapshot(folder)
    with time_limit(CASE_SECONDS):
        result = run_cli(*args)
    output = result.output
    assert result.exit_code == 2, f"exit {result.exit_code}:\n{output}\n{result.exception!r}"
    assert "Traceback" not in output
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    assert not marker.exists(), "a pickle payload ran"
    assert snapshot(folder) == case_before, "something was written next to the inputs"
    assert snapshot(world.root) == inputs_before, "an input changed"
    assert not (folder / "out.pt").exists()


@pytest.mark.filterwarnings("ignore:Validating sparse tensor invariants")
@pytest.mark.parametrize("kind", CHECKPOINT_KINDS)
@FUZZ
@given(case=st.data(), position=st.sampled_from(["pruned", "reference"]))
def test_bad_checkpoints_exit_2_with_one_line(world, fuzz_cases, kind, case, position):
    write = case.draw(bad_checkpoint(kind), label="checkpoint")
    fuzz_cases[f"checkpoint: {kind}"] += 1
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        marker = folder.parent / f"{folder.name}-payload-ran"
        bad = write(folder, marker)
        args = repair_args(world, folder / "out.pt", pruned=bad if position == "pruned" else None)
        if position == "reference":
            args[args.index("--reference") + 1] = bad
        check_rejected(world, args, folder, marker)


@pytest.mark.parametrize("kind", DATA_KINDS)
@FUZZ
@given(case=st.data(), position=st.sampled_from(["--data", "--eval-data"]))
def test_bad_data_exits_2_with_one_line(world, fuzz_cases, kind, case, position):
    if kind == "too-few-samples":
        position = "--data"  # --eval-data needs no --calib-size samples
    write = case.draw(bad_data(kind), label="data")
    fuzz_cases[f"data: {kind}"] += 1
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        marker = folder.parent / f"{folder.name}-payload-ran"
        bad = write(folder, marker)
        if position == "--data":
            args = repair_args(world, folder / "out.pt", data=bad)
        else:
            args = [*repair_args(world, folder / "out.pt"), "--eval-data", bad]
        check_rejected(world, args, folder, marker)


def test_the_payload_does_run_when_unpickled_unsafely(tmp_path):
    """The payload is real: plain pickle.loads runs it (so its absence above means something)."""
    marker = tmp_path / "ran"
    for how in ("open", "exec", "system"):
        pickle.loads(pickle.dumps(Payload(marker, how)))
        assert marker.exists(), how
        marker.unlink()
    with zipfile.ZipFile(_npz(tmp_path / "o.npz", x=np.array([Payload(marker, "open")], dtype=object))) as zf:
        assert "x.npy" in zf.namelist()
    np.load(tmp_path / "o.npz", allow_pickle=True)["x"]
    assert marker.exists()
