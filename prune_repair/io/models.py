"""Models built from ``--arch`` specs and loaded from checkpoints (or the zoo).

Example:
    >>> model = build_model("prune_repair.zoo.models:MLP", {"widths": [16]})
    >>> sorted(model.state_dict())[:2]
    ['classifier.bias', 'classifier.weight']
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .. import zoo
from .checkpoints import check_compatible, load_state_dict
from .errors import ZOO_PREFIX, CheckpointError, _first_line
from .hf import hf_settings, is_hf_spec, load_hf_dir, load_hf_model

def build_model(arch: str, arch_kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """Build an untrained model from a torchvision name (``resnet18``) or ``package.module:Factory``."""
    kwargs = dict(arch_kwargs or {})
    if is_hf_spec(arch):
        hf_settings(kwargs)
        return load_hf_dir(arch)
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
    checkpoints, so float32 data (what :mod:`prune_repair.io.data` yields) can be fed.

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
    if is_hf_spec(arch):  # an HF model directory (optional extra): see prune_repair.io.hf
        hf_settings(arch_kwargs)
        return load_hf_model(ckpt, arch)
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
        if is_hf_spec(ckpt):  # hf:DIR implies --arch hf:DIR
            return ckpt, dict(arch_kwargs or {})
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

