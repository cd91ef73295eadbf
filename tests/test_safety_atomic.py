"""Outputs are all-or-nothing (issue 5): on an error, Ctrl-C or SIGTERM no output and no
temporary file remains, an existing file is never half-overwritten, and a successful
command leaves complete files with ordinary permissions.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from prune_repair.cli.output import write_report
from prune_repair.io import CheckpointError, atomic_write, output_transaction, save_state_dict
from safety_helpers import make_world, repair_args, run_cli, snapshot


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("atomic-world"))


@pytest.fixture
def outdir(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


def files(folder: Path) -> list[str]:
    """Every entry of ``folder``, temporary (hidden) files included."""
    return sorted(p.name for p in folder.iterdir())


def half_written_then(exc: BaseException):
    """A torch.save that writes part of the archive, then fails with ``exc``."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(f.tell() // 2)
        raise exc

    return save


# --- a failure while writing --out ---------------------------------------------------------


@pytest.mark.parametrize("exc, code, line", [
    (KeyboardInterrupt(), 130, "interrupted: nothing written"),
    (OSError(28, "No space left on device"), 2, "error: [Errno 28] No space left on device"),
], ids=["ctrl-c", "disk-full"])
def test_a_failure_while_saving_leaves_no_file(world, outdir, monkeypatch, exc, code, line):
    monkeypatch.setattr(torch, "save", half_written_then(exc))
    result = run_cli(*repair_args(world, outdir / "out.pt"), "--report", outdir / "report.json")
    assert result.exit_code == code
    lines = result.output.strip().splitlines()  # progress lines of the repair come first
    assert lines[-1] == line and "Traceback" not in result.output
    assert files(outdir) == []


def test_a_failed_overwrite_keeps_the_old_file(world, outdir, monkeypatch):
    out = outdir / "out.pt"
    out.write_bytes(b"the previous result")
    monkeypatch.setattr(torch, "save", half_written_then(KeyboardInterrupt()))
    result = run_cli(*repair_args(world, out), "--force")
    assert result.exit_code == 130
    assert out.read_bytes() == b"the previous result"
    assert files(outdir) == ["out.pt"]


@pytest.mark.parametrize("exc, code", [(KeyboardInterrupt(), 130), (OSError(5, "Input/output error"), 2)],
                         ids=["ctrl-c", "io-error"])
def test_a_failure_after_out_was_saved_removes_out_too(world, outdir, monkeypatch, exc, code):
    """--out is complete on disk as a temporary file when the report fails: neither appears."""
    real_write_text = Path.write_text

    def write_text(self, *args, **kwargs):
        if self.name.startswith(".report.json."):
            raise exc
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    result = run_cli(*repair_args(world, outdir / "out.pt"), "--report", outdir / "report.json")
    assert result.exit_code == code
    lines = result.output.strip().splitlines()  # progress lines of the repair come first
    assert lines[-1].startswith(("error:", "interrupted:")) and "Traceback" not in result.output
    assert not any(line.startswith(("error:", "interrupted:")) for line in lines[:-1])
    assert files(outdir) == []


def test_success_writes_complete_files_with_ordinary_permissions(world, outdir):
    result = run_cli(*repair_args(world, outdir / "out.pt"), "--report", outdir / "report.json")
    assert result.exit_code == 0, result.output
    assert files(outdir) == ["out.pt", "report.json"]
    umask = os.umask(0)
    os.umask(umask)
    for name in ("out.pt", "report.json"):
        assert (outdir / name).stat().st_mode & 0o777 == 0o666 & ~umask
    assert set(torch.load(outdir / "out.pt", weights_only=True)) == set(torch.load(world.pruned, weights_only=True))
    assert json.loads((outdir / "report.json").read_text())["after"]["acc"] is not None


# --- the API underneath ------------------------------------------------------------------


def test_atomic_write_on_error_leaves_the_target_untouched(tmp_path):
    target = tmp_path / "x.bin"
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt), atomic_write(target) as tmp:
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt
    assert files(tmp_path) == ["x.bin"] and target.read_bytes() == b"old"


def test_a_transaction_writes_all_outputs_or_none(tmp_path):
    with output_transaction():
        save_state_dict({"w": torch.ones(2)}, tmp_path / "a.pt")
        write_report(str(tmp_path / "r.json"), {"acc": 1.0})
        assert files(tmp_path)[0].startswith(".a.pt.")  # staged, not yet in place
    assert files(tmp_path) == ["a.pt", "r.json"]
    with pytest.raises(RuntimeError), output_transaction():
        save_state_dict({"w": torch.zeros(2)}, tmp_path / "b.pt")
        raise RuntimeError("the command failed after saving")
    assert files(tmp_path) == ["a.pt", "r.json"]


def test_ctrl_c_waits_while_outputs_are_renamed_into_place(tmp_path):
    """The final renames are not interrupted: Ctrl-C during them lets them finish."""
    real_replace, seen = os.replace, []

    def replace(src, dst):
        if not seen:
            os.kill(os.getpid(), signal.SIGINT)  # arrives between the two renames
        seen.append(dst)
        real_replace(src, dst)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "replace", replace)
        try:
            with output_transaction():
                save_state_dict({"w": torch.ones(1)}, tmp_path / "a.pt")
                write_report(str(tmp_path / "r.json"), {"acc": 1.0})
        except KeyboardInterrupt:
            pytest.fail(f"Ctrl-C interrupted the renames after {seen}")
    assert files(tmp_path) == ["a.pt", "r.json"]


def test_a_result_with_nan_or_inf_is_never_written(tmp_path):
    state = {"fc.weight": torch.tensor([1.0, float("inf")], dtype=torch.float16)}
    with pytest.raises(CheckpointError, match=r"NaN/Inf in 'fc.weight' \(1 values\)"):
        save_state_dict(state, tmp_path / "out.pt")
    assert files(tmp_path) == []


def test_the_report_is_strict_json(tmp_path):
    """NaN and Inf (e.g. the loss of a broken model) become null instead of invalid JSON."""
    write_report(str(tmp_path / "r.json"), {"loss": float("inf"), "acc": float("nan"), "ok": [1.5, torch.tensor(2.0)]})
    assert json.loads((tmp_path / "r.json").read_text(), parse_constant=pytest.fail) == {
        "loss": None, "acc": None, "ok": [1.5, 2.0], "world_size": 1}


# --- real signals to the real command-line program ----------------------------------------

SLOW_MODEL = '''
import os, time
from prune_repair.zoo.models import MLP

class SlowMLP(MLP):
    """Announces the first full forward pass through a marker file, then works forever."""

    def forward(self, x):
        if len(x) > 2:
            open(os.environ["MARKER"], "w").close()
            while True:
                time.sleep(0.05)
        return super().forward(x)
'''

SLOW_SAVE = '''
import os, sys, time, torch
real_save = torch.save

def save(obj, f, *args, **kwargs):
    real_save(obj, f, *args, **kwargs)
    f.truncate(f.tell() // 2)
    f.flush()
    open(os.environ["MARKER"], "w").close()
    while True:
        time.sleep(0.05)

torch.save = save
from prune_repair.cli import main
sys.exit(main())
'''


@pytest.mark.parametrize("when, sig, code", [
    ("working", signal.SIGINT, 130),
    ("writing", signal.SIGINT, 130),
    ("working", signal.SIGTERM, 143),
], ids=["ctrl-c-while-working", "ctrl-c-while-writing", "sigterm-while-working"])
@pytest.mark.slow  # a real program in a subprocess
def test_a_signal_to_the_program_leaves_nothing(world, tmp_path, when, sig, code):
    outdir = tmp_path / "out"
    outdir.mkdir()
    (tmp_path / "slowmodel.py").write_text(textwrap.dedent(SLOW_MODEL))
    marker = tmp_path / "started"
    args = [str(a) for a in repair_args(world, outdir / "out.pt")[1:]] + ["--report", str(outdir / "r.json")]
    if when == "working":
        args[args.index("--arch") + 1] = "slowmodel:SlowMLP"
        command = [sys.executable, "-c", "import sys; from prune_repair.cli import main; sys.exit(main())"]
    else:
        command = [sys.executable, "-c", SLOW_SAVE]
    env = {**os.environ, "MARKER": str(marker), "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    before = snapshot(world.root)
    proc = subprocess.Popen([*command, "repair", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the command never started working"
            time.sleep(0.05)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr
    lines = (stdout + stderr).strip().splitlines()  # progress lines may come before the interruption
    assert lines[-1] == "interrupted: nothing written" and "interrupted: nothing written" not in lines[:-1]
    assert files(outdir) == []
    assert snapshot(world.root) == before
