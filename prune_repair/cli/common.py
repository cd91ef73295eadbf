"""What every command shares: options, loading, data, errors, reports, output.

Human output (result tables, where each output file went) goes to stdout; progress,
notes and errors go to stderr. A user mistake ends with exit
code 2 and one line ``error: ...``; Ctrl-C ends with exit code 130 (SIGTERM: 143)
and one line. Either way nothing is written: each command runs inside
:func:`~prune_repair.io.output_transaction`, so its outputs (``--out``,
``--report``, ...) appear only together, when the command succeeds.
"""

from __future__ import annotations

import enum
import functools
import json
import math
import os
import sys
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..engine import distributed
from ..io.data import DataError
from ..io.preprocess import parse_preprocess
from ..io.sources import ImageFolderSource, TensorSource, draw_indices, open_source
from ..io.errors import _first_line
from ..io import atomic_write, check_output_path, current_transaction, output_transaction
from ..engine._forward import eval_mode
from ..engine.renorm import RepairMode
from ..merge.groups import HAND_HELP

console = Console(stderr=True)
"""Progress, notes and errors (stderr)."""
out_console = Console()
"""Results: tables and the paths written (stdout)."""

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class Terminated(KeyboardInterrupt):
    """Raised in place of the default action of SIGTERM, so outputs are cleaned up as on Ctrl-C."""


def one_line(message: str) -> str:
    """``message`` with every run of whitespace (newlines too) collapsed to one space."""
    return " ".join(str(message).split())


CLI_TERMS = {
    # the library's wording -> the option a command-line user changes
    "ask for at least one sample": "raise --calib-size",
    "ask for fewer samples": "lower --calib-size",
    HAND_HELP: "pass groups by hand with --groups FILE.json (see prune-repair merge --help)",
    "(the 'plot' extra)": "(the 'plot' extra), or drop --plot",
    "the same architecture and arguments": "the same --arch and --arch-kwargs",
    "use fewer gradients or more data": "lower --fisher-samples or give more --data",
}


def in_cli_terms(message: str) -> str:
    """A library error message with the command-line options named in place of API terms.

    >>> in_cli_terms("calibration size 9 exceeds the 5 samples in the data: ask for fewer samples")
    'calibration size 9 exceeds the 5 samples in the data: lower --calib-size'
    """
    for library, cli in CLI_TERMS.items():
        message = message.replace(library, cli)
    return message


def fail(message: str) -> None:
    """Print one line (in command-line terms) and exit with code 2."""
    console.quiet = False  # every rank reports its own error
    console.print(f"[bold red]error:[/] {escape(one_line(in_cli_terms(message)))}", highlight=False, soft_wrap=True)
    sys.exit(EXIT_USAGE)


_LOADED: ContextVar[list["Data"] | None] = ContextVar("prune_repair_loaded_data", default=None)


def handle_errors(command: Callable) -> Callable:
    """Run a command inside an output transaction; turn user mistakes (ValueError,
    OSError) into one line and exit code 2, and Ctrl-C into one line and exit code 130.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is initialized here (gloo,
    or NCCL for a CUDA device); only rank 0 prints and writes its outputs."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        token = _LOADED.set([])
        device = kwargs.get("device") or "auto"
        device = "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"
        quiet, out_quiet = console.quiet, out_console.quiet
        try:
            with distributed.process_group_from_env(device):
                console.quiet = quiet or not distributed.is_main_process()
                out_console.quiet = out_quiet or not distributed.is_main_process()  # one table, from rank 0
                with output_transaction(commit=distributed.is_main_process()):
                    return command(*args, **kwargs)
        except (ValueError, OSError) as err:
            fail(str(err) or type(err).__name__)
        except KeyboardInterrupt as err:
            console.print("interrupted: nothing written", highlight=False)
            sys.exit(EXIT_TERMINATED if isinstance(err, Terminated) else EXIT_INTERRUPTED)
        finally:
            console.quiet, out_console.quiet = quiet, out_quiet
            _LOADED.reset(token)

    return wrapper


def parse_arch_kwargs(ctx: click.Context, param: click.Parameter, value: str | None) -> dict[str, Any]:
    if not value:
        return {}
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as err:
        raise click.BadParameter(f"not valid JSON ({err.msg}): e.g. '{{\"num_classes\": 10}}'") from None
    if not isinstance(parsed, dict):
        raise click.BadParameter("must be a JSON object, e.g. '{\"num_classes\": 10}'")
    return parsed


def common_options(command: Callable) -> Callable:
    """Options shared by all commands (DESIGN.md sec. 4)."""
    options = [
        click.option("--arch", default=None, help="torchvision model name (resnet18) or package.module:Factory; "
                     "implied by a zoo:NAME checkpoint."),
        click.option("--arch-kwargs", default=None, callback=parse_arch_kwargs,
                     help="JSON keyword arguments for the architecture, e.g. '{\"num_classes\": 10}'."),
        click.option("--data", required=True, help="calibration data: mnist, mnist:train, mnist:test, x.pt "
                     "({'x','y'}), x.npz (arrays x, y) or an ImageFolder directory."),
        click.option("--eval-data", default=None, help="evaluation data (same forms); default: mnist:test when "
                     "--data is MNIST train, else all of --data."),
        click.option("--calib-size", default=None, type=click.IntRange(min=1),
                     help=f"calibration samples drawn from --data [default: {CALIB_SIZE}; {RECONSTRUCT_CALIB_SIZE} "
                          "for --repair reconstruct / reconstruct+repair, which solve d_in unknowns per row]."),
        click.option("--seed", default=0, show_default=True, type=int, help="seed of the calibration draw."),
        click.option("--preprocess", default=None, help="ImageFolder data: a torchvision weights name whose "
                     "transforms() to apply (ResNet50_Weights.IMAGENET1K_V2), or resize=256,crop=224,"
                     "mean=0.485/0.456/0.406,std=0.229/0.224/0.225 (any of them). Not for tensor data."),
        click.option("--batch-size", default=None, type=click.IntRange(min=1),
                     help=f"samples per batch in evaluation [default: {BATCH_SIZE}] and in calibration [default: "
                          "all --calib-size samples in one batch, so the exact repair takes one pass]."),
        click.option("--eval-size", default=None, type=click.IntRange(min=1),
                     help="evaluate on this many samples of --eval-data (a subset drawn with --seed) "
                          "[default: all]."),
        click.option("--workers", default=None, type=click.IntRange(min=0),
                     help="ImageFolder data: processes reading images [default: min(4, CPU count)]."),
        click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]),
                     help="where to run; auto picks cuda when available."),
        click.option("--out", required=True, type=click.Path(),
                     help="output checkpoint (state_dict); .safetensors writes safetensors (optional extra); "
                          "for --arch hf:DIR an HF model directory (save_pretrained)."),
        click.option("--report", default=None, type=click.Path(dir_okay=False), help="write a JSON report here."),
        click.option("--force", is_flag=True, help="overwrite an existing --out / --report (never an input)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is available: use --device cpu")
    return torch.device(name)


def check_outputs(out: str, report: str | None, inputs: list[str], force: bool) -> None:
    """Validate --out and --report before any work is done."""
    check_output_path(out, inputs, force)
    if report is not None:
        check_output_path(report, inputs + [out], force, what="--report")


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


def damping_option(command: Callable) -> Callable:
    """``--damping`` of the reconstruct modes."""
    return click.option("--damping", default=1e-2, show_default=True, type=click.FloatRange(min=0),
                        help="reconstruct: ridge damping, relative to the mean diagonal of each layer's Gram "
                             "matrix (raised tenfold where a system is singular; the report says where).")(command)


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


def written(paths: Mapping[str, str | None]) -> None:
    """Say on stdout where each output file went (``{what: path}``; None entries skipped)."""
    for what, path in paths.items():
        if path is not None:
            out_console.print(f"wrote {what}: {escape(str(Path(path).expanduser().resolve()))}", highlight=False,
                              soft_wrap=True)


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


def _jsonable(value: Any) -> Any:
    """Report values as strict JSON: NaN/Inf become null, tensors/arrays lists, enums their value."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, enum.Enum):
        return _jsonable(value.value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return _jsonable(value.tolist())
    return str(value)


def write_report(path: str | None, report: dict[str, Any]) -> None:
    """Atomically write the JSON report (strict JSON: non-finite numbers become null)."""
    if path is None:
        return
    report = {**report, "world_size": distributed.world_size()}
    text = json.dumps(_jsonable(report), indent=2, allow_nan=False) + "\n"
    with atomic_write(path) as tmp:
        Path(tmp).write_text(text)


def progress() -> Progress:
    """A rich progress bar on stderr (hidden when stderr is not a terminal)."""
    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TimeElapsedColumn(), console=console, transient=True)


def metrics_table(title: str, rows: list[tuple[str, dict[str, float]]], caption: str | None = None) -> Table:
    """A table of (name, {"acc", "loss"}) rows."""
    table = Table(title=title, caption=caption)
    table.add_column("model")
    table.add_column("accuracy", justify="right")
    table.add_column("loss", justify="right")
    for name, metrics in rows:
        table.add_row(name, f"{100 * metrics['acc']:.2f}%", f"{metrics['loss']:.4f}")
    return table
