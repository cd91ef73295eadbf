"""What every command shares: options, loading, data, errors, reports, output.

Human output (tables, progress bars) goes to stderr; a user mistake ends with
exit code 2 and one line ``error: ...`` and nothing written.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..data import DataError, calibration_batch, load_dataset
from ..io import atomic_write, check_output_path

console = Console(stderr=True)

EXIT_USAGE = 2


def fail(message: str) -> None:
    """Print one line and exit with code 2."""
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    sys.exit(EXIT_USAGE)


def handle_errors(command: Callable) -> Callable:
    """Turn user mistakes (ValueError, OSError) into one line and exit code 2."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (ValueError, OSError) as err:
            fail(" ".join(str(err).split()) or type(err).__name__)
        except KeyboardInterrupt:
            console.print("interrupted: nothing written")
            sys.exit(130)

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
        click.option("--calib-size", default=64, show_default=True, type=click.IntRange(min=1),
                     help="calibration samples drawn from --data."),
        click.option("--seed", default=0, show_default=True, type=int, help="seed of the calibration draw."),
        click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]),
                     help="where to run; auto picks cuda when available."),
        click.option("--out", required=True, type=click.Path(dir_okay=False), help="output checkpoint (state_dict)."),
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
        check_output_path(report, inputs + [out], force)


@dataclass
class Data:
    """Calibration batch and evaluation set of a command."""

    calib_x: torch.Tensor
    calib_y: torch.Tensor
    eval_x: torch.Tensor
    eval_y: torch.Tensor
    eval_name: str


def load_data(data: str, eval_data: str | None, calib_size: int, seed: int, device: torch.device) -> Data:
    """Load --data / --eval-data and draw the calibration batch."""
    if calib_size < 2:
        raise DataError(f"--calib-size {calib_size} is too small: statistics need at least 2 samples")
    x, y = load_dataset(data)
    cx, cy = calibration_batch(x, y, calib_size, seed)
    if eval_data is None:
        eval_data = "mnist:test" if data.strip().lower() in ("mnist", "mnist:train") else data
    ex, ey = (x, y) if eval_data == data else load_dataset(eval_data)
    return Data(cx.to(device), cy.to(device), ex, ey, eval_data)


def check_fits(model: torch.nn.Module, x: torch.Tensor, what: str = "--data") -> None:
    """Run two samples through the model; a shape error becomes a one-line DataError."""
    try:
        with torch.no_grad():
            was = model.training
            model.eval()
            out = model(x[:2])
            model.train(was)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"{what} samples of shape {list(x.shape[1:])} do not fit the model ({first}): "
                        "check --data and --arch") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise DataError(f"the model does not output (N, classes) logits on {what}: check --arch")


def write_report(path: str | None, report: dict[str, Any]) -> None:
    """Atomically write the JSON report."""
    if path is None:
        return
    with atomic_write(path) as tmp:
        Path(tmp).write_text(json.dumps(report, indent=2) + "\n")


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
