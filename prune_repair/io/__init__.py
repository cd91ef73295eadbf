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
    >>> model = build_model("prune_repair.zoo.models:MLP", {"widths": [16]})
    >>> sorted(model.state_dict())[:2]
    ['classifier.bias', 'classifier.weight']
"""

from .checkpoints import apply_prune_masks, check_compatible, load_state_dict, save_state_dict
from .errors import SAFETENSORS_SUFFIX, ZOO_PREFIX, CheckpointError
from .models import CastInputs, build_model, checkpoint_dtype, load_model, resolve_arch
from .outputs import OutputTransaction, atomic_write, check_output_path, current_transaction, output_transaction

__all__ = [
    "SAFETENSORS_SUFFIX",
    "ZOO_PREFIX",
    "CastInputs",
    "CheckpointError",
    "OutputTransaction",
    "apply_prune_masks",
    "atomic_write",
    "build_model",
    "check_compatible",
    "check_output_path",
    "checkpoint_dtype",
    "current_transaction",
    "load_model",
    "load_state_dict",
    "output_transaction",
    "resolve_arch",
    "save_state_dict",
]
