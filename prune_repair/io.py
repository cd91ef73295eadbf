"""Checkpoints in and out, safely; models built from ``--arch`` specs.

- Loading never runs code from a file: ``torch.load(..., weights_only=True)`` always.
- A checkpoint is a state_dict, or a dict holding one under ``"state_dict"``/``"model"``.
  Checkpoints saved with ``torch.nn.utils.prune`` masks (``weight_orig`` +
  ``weight_mask``) are read as the masked weights.
- Writing is atomic: a temporary file in the target directory, fsynced, renamed.

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
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import zoo

ZOO_PREFIX = "zoo:"


class CheckpointError(ValueError):
    """A checkpoint or architecture the user gave cannot be used (message says what to do)."""


def build_model(arch: str, arch_kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """Build an untrained model from a torchvision name (``resnet18``) or ``package.module:Factory``."""
    kwargs = dict(arch_kwargs or {})
    if not arch:
        raise CheckpointError("no architecture given: pass --arch (a torchvision name or package.module:Factory)")
    if ":" in arch:
        module_name, _, factory_name = arch.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise CheckpointError(f"cannot import '{module_name}' for --arch {arch}: {err}") from None
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
    try:
        model = factory(**kwargs)
    except TypeError as err:
        raise CheckpointError(f"cannot build --arch {arch} with --arch-kwargs {kwargs}: {err}") from None
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"--arch {arch} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state_dict from ``path`` with ``weights_only=True``; masks are applied."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint '{p}' does not exist: check the path")
    if not p.is_file():
        raise CheckpointError(f"checkpoint '{p}' is not a file: give the path of a .pt file")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            raise CheckpointError(
                f"checkpoint '{p}' holds Python objects that need pickle to load: refused for safety "
                "(weights_only=True); re-save it as a plain state_dict"
            ) from None
        raise CheckpointError(f"checkpoint '{p}' is corrupt or not a torch checkpoint: {_first_line(err)}") from None
    except Exception as err:  # truncated zip, random bytes, wrong format
        raise CheckpointError(f"checkpoint '{p}' is corrupt or not a torch checkpoint: {_first_line(err)}") from None
    return _unwrap(obj, p)


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
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"checkpoint '{path}' entry '{bad[0]}' is not a tensor: save model.state_dict()")
    return apply_prune_masks(dict(obj))


def apply_prune_masks(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Turn ``X_orig`` + ``X_mask`` pairs (torch.nn.utils.prune) into plain ``X = orig * mask``."""
    out = {}
    for key, value in state.items():
        if key.endswith("_orig") and key[: -len("_orig")] + "_mask" in state:
            base = key[: -len("_orig")]
            out[base] = value * state[base + "_mask"].to(value.dtype)
        elif key.endswith("_mask") and key[: -len("_mask")] + "_orig" in state:
            continue
        else:
            out[key] = value
    return out


def check_compatible(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise naming the first key whose presence or shape differs between model and state."""
    expected = model.state_dict()
    for key, value in expected.items():
        if key not in state:
            raise CheckpointError(f"{source} lacks key '{key}' of the architecture: check --arch and --arch-kwargs")
        if tuple(state[key].shape) != tuple(value.shape):
            raise CheckpointError(
                f"{source}: key '{key}' is {list(state[key].shape)} but the architecture expects "
                f"{list(value.shape)}: check --arch and --arch-kwargs"
            )
    extra = [k for k in state if k not in expected]
    if extra:
        raise CheckpointError(f"{source} has key '{extra[0]}' that the architecture lacks: check --arch")


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


def load_model(ckpt: str, arch: str, arch_kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """Build ``arch`` and load ``ckpt`` (a path or ``zoo:NAME``) into it, strictly, in eval mode."""
    model = build_model(arch, arch_kwargs)
    if ckpt.startswith(ZOO_PREFIX):
        _zoo_entry(ckpt[len(ZOO_PREFIX):])
        state = torch.load(zoo.weights_path(ckpt[len(ZOO_PREFIX):]), map_location="cpu", weights_only=True)
    else:
        state = load_state_dict(ckpt)
    check_compatible(model, state, f"checkpoint '{ckpt}'")
    model.load_state_dict(state, strict=True)
    return model.eval()


def check_output_path(out: str | os.PathLike[str], inputs: list[str], force: bool) -> Path:
    """Validate ``--out`` before any work: not an input, directory exists, no silent overwrite."""
    target = Path(out).expanduser()
    for given in inputs:
        if given.startswith(ZOO_PREFIX):
            continue
        if Path(given).expanduser().resolve() == target.resolve():
            raise CheckpointError(f"--out {out} is also an input: write the result to another file")
    if target.is_dir():
        raise CheckpointError(f"--out {out} is a directory: give a file name")
    if not target.parent.resolve().is_dir():
        raise CheckpointError(f"the directory of --out {out} does not exist: create it first")
    if target.exists() and not force:
        raise CheckpointError(f"--out {out} already exists: pass --force to overwrite it")
    return target


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str]):
    """Yield a temporary path next to ``path``; on success it is fsynced and renamed onto
    ``path``, on any error (or Ctrl-C) it is removed and ``path`` is untouched."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_state_dict(model_or_state: nn.Module | Mapping[str, torch.Tensor], path: str | os.PathLike[str]) -> None:
    """Atomically save a plain state_dict (masks applied, tensors made contiguous on the CPU)."""
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    plain = {k: v.detach().cpu().contiguous() for k, v in apply_prune_masks(dict(state)).items()}
    with atomic_write(path) as tmp, open(tmp, "wb") as fh:
        torch.save(plain, fh)  # a file object: the archive name does not depend on the temp name
