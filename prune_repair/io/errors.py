"""Errors and shared constants of checkpoint input/output."""

from __future__ import annotations

import torch

ZOO_PREFIX = "zoo:"


SAFETENSORS_SUFFIX = ".safetensors"


SAFETENSORS_INSTALL = "pip install 'prune-repair[safetensors]'"


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


_RESAVE = "re-save it with torch.save(model.state_dict(), path)"


class DataError(ValueError):
    """A data spec or data file the user gave cannot be used; the message says why and what to do."""


class CheckpointError(ValueError):
    """A checkpoint or architecture the user gave cannot be used (message says what to do)."""


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _safetensors_torch(purpose: str):
    try:
        import safetensors.torch as safetensors_torch
    except ImportError:
        raise CheckpointError(
            f"{purpose} needs the optional safetensors package: {SAFETENSORS_INSTALL} (or use a .pt file)"
        ) from None
    return safetensors_torch

