"""Checkpoints in and out, safely; models built from ``--arch`` specs.

- Loading never runs code from a file: ``torch.load(..., weights_only=True)`` always;
  ``.safetensors`` files (optional extra ``prune-repair[safetensors]``) hold no code at all.
- A checkpoint is a state_dict, or a dict holding one under ``"state_dict"``/``"model"``.
  Checkpoints saved with ``torch.nn.utils.prune`` masks (``weight_orig`` +
  ``weight_mask``) are read as the masked weights.
- A checkpoint stored in float16, bfloat16 or float64 gives a model in that dtype
  (floating inputs are cast to it), so the output keeps the dtype of the input.
- Writing is atomic: a temporary file in the target directory, fsynced, renamed.
  Inside :func:`output_transaction` (every CLI command runs in one) the renames wait
  until the command has succeeded, so an error or Ctrl-C leaves no output at all.

Example:
    >>> model = build_model("prune_repair.models:MLP", {"widths": [16]})
    >>> sorted(model.state_dict())[:2]
    ['classifier.bias', 'classifier.weight']
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import signal
import tempfile
import threading
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import zoo

ZOO_PREFIX = "zoo:"
SAFETENSORS_SUFFIX = ".safetensors"
SAFETENSORS_INSTALL = "pip install 'prune-repair[safetensors]'"
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_RESAVE = "re-save it with torch.save(model.state_dict(), path)"


class CheckpointError(ValueError):
    """A checkpoint or architecture the user gave cannot be used (message says what to do)."""


# --- models ---------------------------------------------------------------------------


def build_model(arch: str, arch_kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """Build an untrained model from a torchvision name (``resnet18``) or ``package.module:Factory``."""
    kwargs = dict(arch_kwargs or {})
    if not arch:
        raise CheckpointError("no architecture given: pass --arch (a torchvision name or package.module:Factory)")
    if ":" in arch:
        module_name, _, factory_name = arch.partition(":")
        try:
            module = importlib.import_module(module_name)
        except Exception as err:  # ImportError, or any error raised while importing the module
            raise CheckpointError(f"cannot import '{module_name}' for --arch {arch}: {_first_line(err)}") from None
        factory = module
        for part in factory_name.split("."):
            factory = getattr(factory, part, None)
            if factory is None:
                raise CheckpointError(f"'{module_name}' has no '{factory_name}' for --arch {arch}")
    else:
        import torchvision

        if arch not in torchvision.models.list_models():
            raise CheckpointError(
                f"unknown architecture '{arch}': give a torchvision model name (e.g. resnet18) "
                "or package.module:Factory"
            )
        factory = lambda **kw: torchvision.models.get_model(arch, weights=None, **kw)  # noqa: E731
    if not callable(factory):
        raise CheckpointError(f"--arch {arch} names a {type(factory).__name__}, not a model class or factory")
    try:
        model = factory(**kwargs)
    except Exception as err:  # a bad keyword, or a value the constructor rejects (negative width, ...)
        raise CheckpointError(
            f"cannot build --arch {arch} with --arch-kwargs {kwargs}: {_first_line(err)}"
        ) from None
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"--arch {arch} returned {type(model).__name__}, not a torch.nn.Module")
    return model


class CastInputs:
    """Forward pre-hook casting floating tensor inputs to the dtype of the model's parameters.

    :func:`load_model` registers it on models loaded from float16/bfloat16/float64
    checkpoints, so float32 data (what :mod:`prune_repair.data` yields) can be fed.

    >>> model = nn.Linear(2, 1).half()
    >>> _ = model.register_forward_pre_hook(CastInputs())
    >>> model(torch.ones(1, 2)).dtype
    torch.float16
    """

    def __call__(self, module: nn.Module, args: tuple) -> tuple | None:
        param = next((p for p in module.parameters() if p.is_floating_point()), None)
        if param is None:
            return None
        return tuple(
            a.to(param.dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype != param.dtype else a
            for a in args
        )


def checkpoint_dtype(model: nn.Module, state: Mapping[str, torch.Tensor]) -> torch.dtype | None:
    """The dtype a model loaded from ``state`` computes in: the dtype of the checkpoint's
    floating entries (their promoted dtype if they differ, e.g. float16 + bfloat16 ->
    float32); ``None`` when the model has no floating parameters or buffers."""
    expected = model.state_dict()
    dtypes = {state[k].dtype for k, v in expected.items() if v.is_floating_point() and k in state}
    if not dtypes:
        return None
    result = dtypes.pop()
    for dtype in dtypes:
        result = torch.promote_types(result, dtype)
    return result


def load_model(ckpt: str, arch: str, arch_kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """Build ``arch`` and load ``ckpt`` (a path or ``zoo:NAME``) into it, strictly, in eval mode.

    The model takes the dtype of the checkpoint (see :func:`checkpoint_dtype`); when that
    is not the default float32, a :class:`CastInputs` pre-hook casts floating inputs.
    """
    model = build_model(arch, arch_kwargs)
    if ckpt.startswith(ZOO_PREFIX):
        _zoo_entry(ckpt[len(ZOO_PREFIX):])
        state = torch.load(zoo.weights_path(ckpt[len(ZOO_PREFIX):]), map_location="cpu", weights_only=True)
    else:
        state = load_state_dict(ckpt)
    source = f"checkpoint '{ckpt}'"
    check_compatible(model, state, source)
    dtype = checkpoint_dtype(model, state)
    if dtype is not None and dtype != torch.get_default_dtype():
        model.to(dtype)
        model.register_forward_pre_hook(CastInputs())
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{source} does not load into --arch {arch}: {_first_line(err)}") from None
    return model.eval()


def resolve_arch(checkpoints: list[str], arch: str | None, arch_kwargs: Mapping[str, Any] | None):
    """The (arch, kwargs) to build: explicit ``--arch``, else implied by a ``zoo:`` checkpoint."""
    if arch:
        return arch, dict(arch_kwargs or {})
    for ckpt in checkpoints:
        if ckpt.startswith(ZOO_PREFIX):
            name = ckpt[len(ZOO_PREFIX):]
            _zoo_entry(name)
            return zoo.arch_spec(name), {**zoo.arch_kwargs(name), **dict(arch_kwargs or {})}
    raise CheckpointError("no architecture given: pass --arch (a torchvision name or package.module:Factory)")


def _zoo_entry(name: str):
    try:
        return zoo.entry(name)
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"unknown zoo model '{name}': choose one of {', '.join(zoo.zoo_names())}") from err


# --- reading checkpoints --------------------------------------------------------------


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state_dict from ``path``: a torch file (``weights_only=True``) or a
    safetensors file (recognized by its content, else by the suffix); masks are applied."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint '{p}' does not exist: check the path")
    if not p.is_file():
        raise CheckpointError(f"checkpoint '{p}' is not a file: give the path of a .pt or .safetensors file")
    try:
        size = p.stat().st_size
        with open(p, "rb") as fh:
            head = fh.read(16)
    except OSError as err:
        raise CheckpointError(f"cannot read checkpoint '{p}': {err.strerror or err}") from None
    if size == 0:
        raise CheckpointError(f"checkpoint '{p}' is empty (0 bytes): {_RESAVE}")
    is_zip = head.startswith(b"PK\x03\x04")  # what torch.save writes
    if _looks_like_safetensors(head, size) or (p.suffix.lower() == SAFETENSORS_SUFFIX and not is_zip):
        return _unwrap(_load_safetensors(p), p)
    try:
        with open(p, "rb") as fh:  # a file object: torch decides by content, not by the suffix
            obj = torch.load(fh, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            raise CheckpointError(
                f"checkpoint '{p}' holds Python objects that need pickle to load: refused for safety "
                "(weights_only=True); re-save it as a plain state_dict"
            ) from None
        raise CheckpointError(f"checkpoint '{p}' is corrupt or not a torch checkpoint ({_first_line(err)}): {_RESAVE}") from None
    except Exception as err:  # truncated zip, random bytes, wrong format, absurd sizes (MemoryError)
        raise CheckpointError(f"checkpoint '{p}' is corrupt or not a torch checkpoint ({_first_line(err)}): {_RESAVE}") from None
    return _unwrap(obj, p)


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    """A safetensors file starts with the little-endian u64 length of a JSON header."""
    if len(head) < 9:
        return False
    header_len = int.from_bytes(head[:8], "little")
    return 2 <= header_len <= size - 8 and head[8:9] == b"{"


def _safetensors_torch(purpose: str):
    try:
        import safetensors.torch as safetensors_torch
    except ImportError:
        raise CheckpointError(
            f"{purpose} needs the optional safetensors package: {SAFETENSORS_INSTALL} (or use a .pt file)"
        ) from None
    return safetensors_torch


def _load_safetensors(p: Path) -> dict[str, torch.Tensor]:
    safetensors_torch = _safetensors_torch(f"reading '{p}'")
    try:
        return safetensors_torch.load_file(str(p), device="cpu")
    except Exception as err:  # SafetensorError: truncated, bad header, unknown dtype
        raise CheckpointError(
            f"checkpoint '{p}' is corrupt or not a safetensors file ({_first_line(err)}): "
            "re-save it with safetensors.torch.save_file(model.state_dict(), path)"
        ) from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"checkpoint '{path}' holds no state_dict: save model.state_dict()")
    for key, value in obj.items():
        if not isinstance(key, str):
            raise CheckpointError(f"checkpoint '{path}' has a non-text key {key!r}: save model.state_dict()")
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"checkpoint '{path}' entry '{key}' is not a tensor: save model.state_dict()")
        if value.layout != torch.strided or value.is_quantized or value.device.type != "cpu":
            kind = "quantized" if value.is_quantized else str(value.layout if value.layout != torch.strided else value.device)
            raise CheckpointError(
                f"checkpoint '{path}' entry '{key}' is a {kind} tensor: save dense tensors "
                "(tensor.to_dense(), tensor.dequantize())"
            )
    return apply_prune_masks(dict(obj))


def apply_prune_masks(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Turn ``X_orig`` + ``X_mask`` pairs (torch.nn.utils.prune) into plain ``X = orig * mask``."""
    out = {}
    for key, value in state.items():
        if key.endswith("_orig") and key[: -len("_orig")] + "_mask" in state:
            base = key[: -len("_orig")]
            mask = state[base + "_mask"]
            if tuple(mask.shape) != tuple(value.shape) or mask.is_complex():
                raise CheckpointError(
                    f"mask '{base}_mask' ({list(mask.shape)}, {_dtype_name(mask.dtype)}) does not fit "
                    f"'{key}' ({list(value.shape)}): save the masks torch.nn.utils.prune made, or plain weights"
                )
            out[base] = value * mask.to(value.dtype)
        elif key.endswith("_mask") and key[: -len("_mask")] + "_orig" in state:
            continue
        else:
            out[key] = value
    return out


def check_compatible(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise naming the first key whose presence, shape or kind of dtype differs between model and state.

    Floating entries of the model need float16, bfloat16, float32 or float64 in the
    state (never integers, booleans, complex or float8); integer buffers need integers.
    """
    expected = model.state_dict()
    for key, value in expected.items():
        if key not in state:
            raise CheckpointError(f"{source} lacks key '{key}' of the architecture: check --arch and --arch-kwargs")
        got = state[key]
        if tuple(got.shape) != tuple(value.shape):
            raise CheckpointError(
                f"{source}: key '{key}' is {list(got.shape)} but the architecture expects "
                f"{list(value.shape)}: check --arch and --arch-kwargs"
            )
        if value.is_floating_point() and got.dtype not in FLOAT_DTYPES:
            raise CheckpointError(
                f"{source}: key '{key}' has dtype {_dtype_name(got.dtype)} but the architecture expects floating "
                "point (float16, bfloat16, float32 or float64): save the model's float weights"
            )
        if not value.is_floating_point() and (got.is_floating_point() or got.is_complex()):
            raise CheckpointError(
                f"{source}: key '{key}' has dtype {_dtype_name(got.dtype)} but the architecture expects "
                f"{_dtype_name(value.dtype)}: save model.state_dict() unchanged"
            )
    extra = [k for k in state if k not in expected]
    if extra:
        raise CheckpointError(f"{source} has key '{extra[0]}' that the architecture lacks: check --arch")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --- writing outputs ------------------------------------------------------------------


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
def output_transaction() -> Iterator[OutputTransaction]:
    """Write every :func:`atomic_write` output of the block only if the block succeeds.

    Inside the block each output is fully written to a fsynced temporary file next to
    its target; when the block returns, all are renamed into place (Ctrl-C is held
    back for those few renames). On an exception, ``KeyboardInterrupt`` or
    ``SystemExit`` every temporary file is removed and no target is touched. A nested
    call joins the outer transaction.

    >>> import tempfile, pathlib
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


def save_state_dict(
    model_or_state: nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    *,
    allow_nonfinite: bool = False,
) -> None:
    """Atomically save a plain state_dict (masks applied, tensors made contiguous on the CPU).

    The format follows the suffix: ``.safetensors`` (needs the optional package) or a
    torch file. Tensors keep their dtype. A state holding NaN/Inf is refused (nothing is
    written) unless ``allow_nonfinite``: a repaired network never should.
    """
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    plain = {k: v.detach().cpu().contiguous() for k, v in apply_prune_masks(dict(state)).items()}
    if not allow_nonfinite:
        _check_finite_state(plain, path)
    if Path(path).suffix.lower() == SAFETENSORS_SUFFIX:
        safetensors_torch = _safetensors_torch(f"writing '{path}'")
        plain = _unshared(plain)
        with atomic_write(path) as tmp:
            safetensors_torch.save_file(plain, str(tmp), metadata={"format": "pt"})
        return
    with atomic_write(path) as tmp, open(tmp, "wb") as fh:
        torch.save(plain, fh)  # a file object: the archive name does not depend on the temp name


def _check_finite_state(state: Mapping[str, torch.Tensor], path: str | os.PathLike[str]) -> None:
    for key, value in state.items():
        if value.is_floating_point() and value.numel() and not bool(torch.isfinite(value.sum(dtype=torch.float64))):
            count = int((~torch.isfinite(value)).sum())
            raise CheckpointError(
                f"the result holds NaN/Inf in '{key}' ({count} values), so {path} was not written: "
                f"the correction overflowed {_dtype_name(value.dtype)}; try another --repair mode or a float32 checkpoint"
            )


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies of tensors whose storage an earlier entry already uses (safetensors refuses shared memory)."""
    seen: set[int] = set()
    out = {}
    for key, value in state.items():
        ptr = value.untyped_storage().data_ptr()
        if ptr and ptr in seen:
            value = value.clone()
        elif ptr:
            seen.add(ptr)
        out[key] = value
    return out


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
