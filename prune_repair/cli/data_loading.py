"""What the commands load from ``--data`` / ``--eval-data``: the calibration draw, the evaluation
batches, and the check that the data fits the model (one-line errors for every mistake)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..engine.run import distributed
from ..engine.run.forward import eval_mode
from ..engine.correct.modes import RepairMode
from ..io import current_transaction
from ..io.data import DataError
from ..io.errors import _first_line
from ..io.preprocess import parse_preprocess
from ..io.sources import ImageFolderSource, TensorSource, draw_indices, open_source

_LOADED: ContextVar[list["Data"] | None] = ContextVar("prune_repair_loaded_data", default=None)


@dataclass
class Data:
    """Calibration batch and evaluation set of a command.

    ``eval_x`` is an iterable of ``(x, y)`` batches (:class:`~prune_repair.io.sources.Batches`:
    an ImageFolder is read from disk batch by batch), ``eval_y`` its labels; ``evaluate(model,
    d.eval_x, d.eval_y)`` takes both. ``calib_batches`` is the calibration inputs split
    into ``--batch-size`` batches, as the engine takes them."""

    calib_x: torch.Tensor
    calib_y: torch.Tensor
    eval_x: Any
    eval_y: torch.Tensor
    eval_name: str  # the --eval-data spec used
    data_name: str = ""  # the --data spec
    source: Any = None  # the opened --data (TensorSource / ImageFolderSource)
    batch_size: int = 0  # 0: one batch
    settings: dict[str, Any] | None = None  # preprocess, batch_size, eval_size, workers (for reports)

    @property
    def calib_batches(self) -> list[torch.Tensor]:
        return list(self.calib_x.split(self.batch_size)) if self.batch_size else [self.calib_x]


CALIB_SIZE = 64
BATCH_SIZE = 256
EVAL_SEED_OFFSET = 2
"""The --eval-size subset is drawn with --seed + 2 (the calibration draw uses --seed, fisher's --seed + 1)."""

RECONSTRUCT_CALIB_SIZE = 1024  # measured: 95% sparse zoo CNNs reach 96-98% with it (benchmarks/RESULTS.md)


def default_workers() -> int:
    """min(4, CPU count): processes reading images."""
    return min(4, os.cpu_count() or 1)


def calib_size_for(calib_size: int | None, repair: str) -> int:
    """The ``--calib-size`` to use: the given one, else the default of the correction."""
    if calib_size is not None:
        return calib_size
    return RECONSTRUCT_CALIB_SIZE if RepairMode.parse(repair, "correction").reconstructs else CALIB_SIZE


def load_data(data: str, eval_data: str | None, calib_size: int, seed: int, device: torch.device, *,
              preprocess: str | None = None, batch_size: int | None = None, eval_size: int | None = None,
              workers: int | None = None) -> Data:
    """Open --data / --eval-data and draw the calibration batch.

    Only the calibration samples are loaded; an ImageFolder evaluation set is streamed
    from disk in ``batch_size`` batches (``workers`` processes), tensor data is sliced.
    Refuses a data file that is also an output of the command, ``--preprocess`` on tensor
    data and evaluation samples whose shape differs from the calibration samples. Inside a
    command the result is remembered, so :func:`check_fits` can check its labels against
    the model.
    """
    if calib_size < 2:
        raise DataError(f"--calib-size {calib_size} is too small: statistics need at least 2 samples")
    if eval_data is None:
        eval_data = "mnist:test" if data.strip().lower() in ("mnist", "mnist:train") else data
    _check_not_an_output("--data", data)
    _check_not_an_output("--eval-data", eval_data)
    workers = default_workers() if workers is None else workers
    prep = parse_preprocess(preprocess)
    source = open_source(data, prep, "--data")
    index = draw_indices(len(source), calib_size, seed)
    if distributed.is_distributed():  # each rank takes its contiguous shard of the same draw
        if calib_size < 2 * distributed.world_size():
            raise DataError(f"--calib-size {calib_size} is too small for {distributed.world_size()} processes: "
                            "each needs at least 2 samples")
        index = index[distributed.shard(len(index))]
    cx, cy = source.load(index, workers)
    eval_source = source if eval_data == data else open_source(eval_data, prep, "--eval-data")
    eval_index = None
    if eval_size is not None:
        if eval_size > len(eval_source):
            raise DataError(f"--eval-size {eval_size} exceeds the {len(eval_source)} samples in --eval-data "
                            f"{eval_data}: lower --eval-size or drop it")
        eval_index = draw_indices(len(eval_source), eval_size, seed + EVAL_SEED_OFFSET).sort().values
    eval_batches = eval_source.batches(eval_index, batch_size or BATCH_SIZE, workers)
    eval_batches.shape = tuple(cx.shape[1:])
    first = _first_sample_shape(eval_source, eval_index)
    if first != eval_batches.shape:
        raise DataError(f"--eval-data samples have shape {list(first)} but --data samples have "
                        f"{list(eval_batches.shape)}: give evaluation data of the same kind")
    settings = {"preprocess": prep.to_dict() if prep is not None else None, "batch_size": batch_size,
                "eval_batch_size": batch_size or BATCH_SIZE,
                "eval_size": eval_size, "eval_samples": len(eval_batches), "workers": workers}
    if eval_size is not None:
        settings["eval_seed"] = seed + EVAL_SEED_OFFSET
    d = Data(cx.to(device), cy.to(device), eval_batches, eval_batches.labels, eval_data, data, source,
             batch_size or 0, settings)
    loaded = _LOADED.get()
    if loaded is not None:
        loaded.append(d)
    return d


def _first_sample_shape(source: TensorSource | ImageFolderSource, index: torch.Tensor | None) -> tuple[int, ...]:
    """Shape of the first evaluation sample (an ImageFolder reads that one file)."""
    i = int(index[0]) if index is not None else 0
    if isinstance(source, TensorSource):
        return tuple(source.x.shape[1:])
    tensor, reason = source[i]
    if tensor is None:
        raise DataError(reason)
    return tuple(tensor.shape)


def data_options(preprocess: str | None, batch_size: int, eval_size: int | None, workers: int | None) -> dict[str, Any]:
    """The keywords of :func:`load_data` from the common options."""
    return {"preprocess": preprocess, "batch_size": batch_size, "eval_size": eval_size, "workers": workers}


def _check_not_an_output(option: str, spec: str) -> None:
    tx = current_transaction()
    if tx is None or not Path(spec).expanduser().exists():
        return
    what = tx.output_named(spec)
    if what is not None:
        raise DataError(f"{option} {spec} is also the {what} of this command: write the result to another file")


def check_fits(model: torch.nn.Module, x: torch.Tensor, what: str = "--data",
               labels: Mapping[str, torch.Tensor] | None = None) -> None:
    """Run two samples through the model: a failure, an output that is not finite
    ``(N, classes)`` logits, or a label >= the number of classes becomes a one-line DataError.

    ``labels`` maps a name (``--data``) to label tensors; by default the labels that
    :func:`load_data` loaded together with ``x`` in the running command are checked.
    """
    try:
        with eval_mode(model), torch.no_grad():
            out = model(x[:2])
    except Exception as err:  # shape/dtype mismatch, an assert in the model's forward, ...
        raise DataError(f"{what} samples of shape {list(x.shape[1:])} do not fit the model ({_first_line(err)}): "
                        "check --data and --arch") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise DataError(f"the model does not output (N, classes) logits on {what}: check --arch")
    if out.is_floating_point() and not bool(torch.isfinite(out).all()):
        raise DataError(f"the model outputs NaN/Inf on {what} (in {str(out.dtype).removeprefix('torch.')}): "
                        "check the scale of the data and the checkpoint")
    classes = out.shape[1]
    if labels is None:
        labels = {}
        for d in _LOADED.get() or []:
            if d.calib_x is x:
                eval_option = what if d.eval_name == d.data_name else "--eval-data"
                labels = {what: d.calib_y, eval_option: d.eval_y}  # same key: eval_y is all of --data
    for name, y in labels.items():
        if y.numel() and int(y.max()) >= classes:
            raise DataError(f"{name} has label {int(y.max())} but the model outputs {classes} classes: "
                            "check the data and --arch-kwargs (e.g. num_classes)")
