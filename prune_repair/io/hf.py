"""HF transformers models from a local directory (``--arch hf:DIR``), written back as one.

The optional extra ``prune-repair[hf]`` installs transformers. A model directory holds a
``config.json`` and weights (``model.safetensors`` or ``pytorch_model.bin``); it is read
with ``from_pretrained(DIR, local_files_only=True)`` (never the hub), with the class named
in ``config.architectures`` (else ``AutoModel``), in the dtype of its weights.

A checkpoint argument next to ``--arch hf:DIR`` may be ``DIR`` itself (or ``hf:DIR``),
another HF directory of the same architecture, or a state_dict file (``.pt`` /
``.safetensors``) that loads strictly into it. ``hf:DIR`` as a checkpoint implies
``--arch hf:DIR`` (as ``zoo:NAME`` does). The language models of the zoo
(:mod:`prune_repair.zoo.lm`, e.g. ``zoo:py-gpt2``) are HF directories inside the package:
``zoo:NAME`` stands for ``hf:`` their directory wherever ``hf:DIR`` is accepted.

:func:`save_hf_model` writes ``save_pretrained(..., safe_serialization=True)`` into a
temporary directory beside the target and renames it into place; an existing target is
replaced only with ``force`` and only when it is itself an HF model directory.

Example:
    >>> is_hf_spec("hf:/models/gpt2"), is_hf_spec("resnet18"), hf_dir("hf:/models/gpt2")
    (True, False, '/models/gpt2')
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from ..zoo.lm import is_lm, lm_dir
from .checkpoints import check_compatible, load_state_dict
from .errors import CheckpointError, _first_line

HF_PREFIX = "hf:"
HF_INSTALL = "pip install 'prune-repair[hf]'"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def is_hf_spec(spec: str | None) -> bool:
    """Whether ``spec`` (an ``--arch`` or a checkpoint argument) names an HF directory (or a zoo LM)."""
    return bool(spec) and (str(spec).startswith(HF_PREFIX) or is_lm(str(spec)))


def hf_dir(spec: str) -> str:
    """The directory of ``hf:DIR`` or of a zoo LM ``zoo:NAME`` (a plain path is returned as it is)."""
    if is_lm(spec):
        return str(lm_dir(spec))
    return spec[len(HF_PREFIX):] if is_hf_spec(spec) else spec


def require_transformers(purpose: str = "--arch hf:DIR"):
    """The transformers module, or a one-line error saying how to install it."""
    try:
        import transformers
    except ImportError:
        raise CheckpointError(f"{purpose} needs the optional transformers package: {HF_INSTALL}") from None
    return transformers


def is_hf_model_dir(path: str | os.PathLike[str]) -> bool:
    p = Path(path).expanduser()
    return p.is_dir() and (p / "config.json").is_file()


def check_model_dir(spec: str, what: str = "--arch") -> Path:
    """``DIR`` of ``hf:DIR`` as a path, checked to hold a config and weights."""
    directory = hf_dir(spec)
    p = Path(directory).expanduser()
    if not directory:
        raise CheckpointError(f"{what} hf: names no directory: write hf:DIR (a save_pretrained directory)")
    if not p.exists():
        raise CheckpointError(f"{what} {spec}: directory '{directory}' does not exist: check the path")
    if not p.is_dir():
        raise CheckpointError(f"{what} {spec}: '{directory}' is not a directory: give a save_pretrained directory")
    if not (p / "config.json").is_file():
        raise CheckpointError(f"{what} {spec}: '{directory}' has no config.json: give a directory written by "
                              "save_pretrained")
    if not any((p / name).is_file() for name in WEIGHT_FILES):
        raise CheckpointError(f"{what} {spec}: '{directory}' has no model.safetensors or pytorch_model.bin: "
                              "save the weights with model.save_pretrained(DIR)")
    return p


def load_hf_dir(spec: str, what: str = "--arch") -> nn.Module:
    """The model saved in ``DIR`` (``hf:DIR`` or a path), in eval mode, from local files only."""
    p = check_model_dir(spec, what)
    transformers = require_transformers(f"{what} {spec}")
    with contextlib.suppress(Exception):
        transformers.utils.logging.disable_progress_bar()
    try:
        config = transformers.AutoConfig.from_pretrained(str(p), local_files_only=True)
    except Exception as err:  # bad JSON, unknown model_type
        raise CheckpointError(f"{what} {spec}: cannot read config.json ({_first_line(err)}): re-save it with "
                              "save_pretrained") from None
    names = list(getattr(config, "architectures", None) or [])
    cls = next((getattr(transformers, n) for n in names if isinstance(getattr(transformers, n, None), type)), None)
    cls = cls or transformers.AutoModel
    try:
        model = cls.from_pretrained(str(p), local_files_only=True)
    except Exception as err:  # truncated safetensors, missing shards, shapes that do not fit the config
        raise CheckpointError(f"{what} {spec}: cannot load the model in '{p}' ({_first_line(err)}): re-save it "
                              "with save_pretrained") from None
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"{what} {spec} did not load a torch model: save a PyTorch model")
    return model.eval()


def load_hf_model(ckpt: str, arch: str) -> nn.Module:
    """Load a checkpoint argument for ``--arch hf:DIR`` (see the module docstring)."""
    if is_hf_spec(ckpt) or is_hf_model_dir(ckpt):
        what = "checkpoint"
        if Path(hf_dir(ckpt)).expanduser().resolve() == Path(hf_dir(arch)).expanduser().resolve():
            what = "--arch"
        model = load_hf_dir(ckpt, what)
        if what == "checkpoint":  # another directory: it must be the same architecture
            check_compatible(load_hf_dir(arch), model.state_dict(), f"checkpoint '{ckpt}'")
        return model
    model = load_hf_dir(arch)
    state = load_state_dict(ckpt)
    source = f"checkpoint '{ckpt}'"
    check_compatible(model, state, source)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{source} does not load into --arch {arch}: {_first_line(err)}") from None
    return model.eval()


# --- writing --------------------------------------------------------------------------


def check_hf_output(out: str, inputs: list[str], force: bool) -> Path:
    """Validate ``--out DIR`` for an HF model before any work."""
    target = Path(out).expanduser()
    for given in inputs:
        if given.startswith("zoo:"):
            continue
        if Path(hf_dir(given)).expanduser().resolve() == target.resolve():
            raise CheckpointError(f"--out {out} is also an input: write the result to another directory")
    parent = target.resolve().parent
    if not parent.is_dir():
        raise CheckpointError(f"the directory of --out {out} does not exist: create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CheckpointError(f"the directory of --out {out} is not writable: choose another place")
    if target.exists() or target.is_symlink():
        if not force:
            raise CheckpointError(f"--out {out} already exists: pass --force to overwrite it")
        if not is_hf_model_dir(target) or target.is_symlink():
            raise CheckpointError(f"--out {out} exists and is not an HF model directory, so it is not replaced "
                                  "even with --force: give a new directory name for the HF model")
    return target


def save_hf_model(model: nn.Module, out: str | os.PathLike[str], *, force: bool = False) -> Path:
    """Write ``model`` with ``save_pretrained`` (safetensors) to the directory ``out``, atomically.

    The model is written to a temporary directory beside ``out``, which then takes its name
    (an old HF directory there, allowed only with ``force``, is moved aside first and removed
    after). On any error nothing is left behind and ``out`` is untouched.
    """
    from .checkpoints import _check_finite_state

    target = Path(out).expanduser()
    if not hasattr(model, "save_pretrained"):
        raise CheckpointError(f"--out {out}: the model is not an HF model (no save_pretrained): write a .pt file")
    if target.exists() and not (force and is_hf_model_dir(target)):
        raise CheckpointError(f"--out {out} already exists: pass --force to overwrite it")
    _check_finite_state(model.state_dict(), target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.resolve().parent))
    old: Path | None = None
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        os.chmod(tmp, 0o777 & ~_umask())
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.resolve().parent))
            os.replace(target, old / "dir")
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and (old / "dir").exists() and not target.exists():
            os.replace(old / "dir", target)  # put the old directory back
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def model_inputs_name(model: nn.Module) -> str:
    """The keyword the model's forward takes its main input by (``input_ids``, ``pixel_values``)."""
    return str(getattr(model, "main_input_name", "input_ids"))


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` predicts the next token (evaluated by perplexity)."""
    name = type(model).__name__
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as names
        if name in set(names.values()):
            return True
    except ImportError:  # pragma: no cover - transformers without the auto mappings
        pass
    return name.endswith("ForCausalLM") or name.endswith("LMHeadModel")


def hf_settings(arch_kwargs: Mapping[str, Any] | None) -> None:
    if arch_kwargs:
        raise CheckpointError("--arch-kwargs does not apply to --arch hf:DIR (the config.json of DIR sets the "
                              "architecture): drop --arch-kwargs")
