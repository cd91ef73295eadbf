"""Output files: validated before any work, written atomically, all or nothing per command."""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path

from .errors import SAFETENSORS_SUFFIX, ZOO_PREFIX, CheckpointError, _safetensors_torch

def check_output_path(out: str | os.PathLike[str], inputs: list[str], force: bool, what: str = "--out") -> Path:
    """Validate an output path before any work: not an input, directory exists and is
    writable, no silent overwrite; ``.safetensors`` needs the optional package.
    Inside :func:`output_transaction` the path is remembered as an output of the command."""
    target = Path(out).expanduser()
    for given in inputs:
        if given.startswith(ZOO_PREFIX):
            continue
        if Path(given).expanduser().resolve() == target.resolve():
            raise CheckpointError(f"{what} {out} is also an input: write the result to another file")
    if target.is_dir():
        raise CheckpointError(f"{what} {out} is a directory: give a file name")
    parent = target.parent.resolve()
    if not parent.is_dir():
        raise CheckpointError(f"the directory of {what} {out} does not exist: create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CheckpointError(f"the directory of {what} {out} is not writable: choose another place")
    if target.exists() and not force:
        raise CheckpointError(f"{what} {out} already exists: pass --force to overwrite it")
    if what == "--out" and target.suffix.lower() == SAFETENSORS_SUFFIX:
        _safetensors_torch(f"{what} {out}")
    tx = _TRANSACTION.get()
    if tx is not None:
        tx.outputs.append((what, target.resolve()))
    return target


class OutputTransaction:
    """The outputs of one command: staged temporary files, renamed into place together
    when the command succeeds, all removed when it fails or is interrupted."""

    def __init__(self) -> None:
        self.outputs: list[tuple[str, Path]] = []  # (option, resolved path) declared by check_output_path
        self._temps: list[Path] = []  # every temporary file created, staged or not
        self._staged: list[tuple[Path, Path]] = []  # (temporary file, target)

    def output_named(self, path: str | os.PathLike[str]) -> str | None:
        """The option (``--out``, ``--report``, ...) that declared ``path`` as an output, if any."""
        resolved = Path(path).expanduser().resolve()
        return next((what for what, target in self.outputs if target == resolved), None)

    def _commit(self) -> None:
        done = 0
        try:
            for tmp, target in self._staged:
                os.replace(tmp, target)
                done += 1
        finally:
            for tmp, _ in self._staged[done:]:
                _unlink(tmp)
        for directory in {target.parent for _, target in self._staged}:
            _fsync_dir(directory)

    def _discard(self) -> None:
        for tmp in self._temps:
            _unlink(tmp)


_TRANSACTION: ContextVar[OutputTransaction | None] = ContextVar("prune_repair_outputs", default=None)


def current_transaction() -> OutputTransaction | None:
    """The :func:`output_transaction` the caller runs in, if any."""
    return _TRANSACTION.get()


@contextlib.contextmanager
def output_transaction(commit: bool = True) -> Iterator[OutputTransaction]:
    """Write every :func:`atomic_write` output of the block only if the block succeeds.

    Inside the block each output is fully written to a fsynced temporary file next to
    its target; when the block returns, all are renamed into place (Ctrl-C is held
    back for those few renames). On an exception, ``KeyboardInterrupt`` or
    ``SystemExit`` every temporary file is removed and no target is touched. A nested
    call joins the outer transaction. With ``commit=False`` (a rank other than 0 of a
    distributed run) the outputs are discarded even on success.

    >>> import tempfile, pathlib, torch
    >>> from prune_repair.io import save_state_dict
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> try:
    ...     with output_transaction():
    ...         save_state_dict({"w": torch.ones(1)}, d / "a.pt")
    ...         raise ValueError("something failed after the save")
    ... except ValueError:
    ...     pass
    >>> sorted(p.name for p in d.iterdir())
    []
    """
    outer = _TRANSACTION.get()
    if outer is not None:
        yield outer
        return
    tx = OutputTransaction()
    token = _TRANSACTION.set(tx)
    try:
        yield tx
    except BaseException:
        _TRANSACTION.reset(token)
        tx._discard()
        raise
    _TRANSACTION.reset(token)
    if not commit:
        tx._discard()
        return
    try:
        with _signals_deferred(reraise=False):
            tx._commit()
    except BaseException:
        tx._discard()
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; when the block succeeds it is fsynced and
    renamed onto ``path`` (inside :func:`output_transaction`: when the transaction
    succeeds); on any error (or Ctrl-C) it is removed and ``path`` is untouched."""
    target = Path(path)
    tx = _TRANSACTION.get()
    tmp: Path | None = None
    try:
        with _signals_deferred():  # no Ctrl-C between creating the file and knowing its name
            fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
            os.close(fd)
            tmp = Path(name)
            if tx is not None:
                tx._temps.append(tmp)
        yield tmp
        os.chmod(tmp, _output_mode(target))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        if tx is not None:
            tx._staged.append((tmp, target))
        else:
            os.replace(tmp, target)
            _fsync_dir(target.parent)
    except BaseException:
        if tmp is not None:
            _unlink(tmp)
        raise


def _output_mode(target: Path) -> int:
    """Permissions of a new output: those of the file it replaces, else 0o666 minus the umask
    (a temporary file is created 0o600)."""
    try:
        return target.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable (best effort: not every platform can open a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_DEFERRED_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM") if hasattr(signal, name))


@contextlib.contextmanager
def _signals_deferred(reraise: bool = True) -> Iterator[None]:
    """Hold back SIGINT/SIGTERM for a short critical section (main thread only).

    On exit the previous handlers come back; a signal that arrived meanwhile is then
    delivered to its handler (``reraise``) or dropped (the section finished the work).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {}
    for sig in _DEFERRED_SIGNALS:
        try:
            previous[sig] = signal.signal(sig, lambda signum, frame: caught.append(signum))
        except (ValueError, OSError):  # not allowed here: leave the signal as it is
            continue
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        if caught and reraise:
            handler = previous.get(caught[0])
            if callable(handler):
                handler(caught[0], None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(caught[0])

