"""Reading and writing state_dicts: torch files with ``weights_only=True``, or safetensors."""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..engine.checks import is_finite
from .errors import (
    _RESAVE,
    FLOAT_DTYPES,
    SAFETENSORS_SUFFIX,
    CheckpointError,
    _dtype_name,
    _first_line,
    _safetensors_torch,
)
from .outputs import atomic_write

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


def _load_safetensors(p: Path) -> dict[str, torch.Tensor]:
    safetensors_torch = _safetensors_torch(f"reading '{p}'")
    try:
        return safetensors_torch.load_file(str(p), device="cpu")
    except Exception as err:  # SafetensorError: truncated, bad header, unknown dtype
        raise CheckpointError(
            f"checkpoint '{p}' is corrupt or not a safetensors file ({_first_line(err)}): "
            "re-save it with safetensors.torch.save_file(model.state_dict(), path)"
        ) from None


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
        if not is_finite(value):
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

