"""What every command shares: options, loading, data, errors, reports, output.

Human output (result tables, where each output file went) goes to stdout; progress,
notes and errors go to stderr. A user mistake ends with exit
code 2 and one line ``error: ...``; Ctrl-C ends with exit code 130 (SIGTERM: 143)
and one line. Either way nothing is written: each command runs inside
:func:`~prune_repair.io.output_transaction`, so its outputs (``--out``,
``--report``, ...) appear only together, when the command succeeds.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import json
import math
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import click
import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..engine.run import distributed
from ..engine.checks import check_finite
from ..engine.run.lockstep import Passes
from ..io import atomic_write, check_output_path, output_transaction
from ..merge.groups import HAND_HELP
from .data_loading import (_LOADED, BATCH_SIZE, CALIB_SIZE, RECONSTRUCT_CALIB_SIZE, Data, calib_size_for,  # noqa: F401
                           check_fits, data_options, default_workers, load_data)

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
    "pass include_tied=True to prune them anyway": "add --include-tied to prune them anyway",
    "name them with blocks=[...], or use passes='per-site'": "use --passes per-site (or lockstep)",
    "refitting it would change the other module too)": "refitting it would change the other module too; it is "
    "not pruned either, unless --prune-head --include-tied)",
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




def show_warnings_once() -> contextlib.AbstractContextManager:
    """Within the block, the package's warnings are printed on stderr in command-line terms, each distinct
    one once (a flow that repeats per sparsity or batch repeats none); other warnings as usual."""
    seen: set[str] = set()
    manager = warnings.catch_warnings()
    shown = warnings.showwarning

    def show(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        if "prune_repair" not in str(filename):
            return shown(message, category, filename, lineno, file, line)
        text = one_line(in_cli_terms(str(message)))
        if text not in seen:
            seen.add(text)
            console.print(f"[yellow]warning:[/] {escape(text)}", highlight=False, soft_wrap=True)

    class _Once(contextlib.AbstractContextManager):
        def __enter__(self) -> None:
            manager.__enter__()
            warnings.filterwarnings("always", category=UserWarning, module="prune_repair")  # `show` keeps one of each
            warnings.showwarning = show

        def __exit__(self, *exc: Any) -> None:
            manager.__exit__(*exc)

    return _Once()


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
                with output_transaction(commit=distributed.is_main_process()), show_warnings_once():
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
    """Options shared by all commands (the CLI contract in ARCHITECTURE.md)."""
    options = [
        click.option("--arch", default=None, help="torchvision model name (resnet18) or package.module:Factory; "
                     "implied by a zoo:NAME checkpoint."),
        click.option("--arch-kwargs", default=None, callback=parse_arch_kwargs,
                     help="JSON keyword arguments for the architecture, e.g. '{\"num_classes\": 10}'."),
        click.option("--data", required=True, help="calibration data: mnist, mnist:train, mnist:test, x.pt "
                     "({'x','y'}), x.npz (arrays x, y) or an ImageFolder directory; for HF models also tokens "
                     "(.jsonl, .pt/.npz with input_ids) or pysrc[:calib|eval|train] (Python's own sources as "
                     "bytes, for the zoo's byte-level LMs)."),
        click.option("--eval-data", default=None, help="evaluation data (same forms); default: mnist:test when "
                     "--data is MNIST train, pysrc:eval when it is pysrc, else all of --data."),
        click.option("--calib-size", default=None, type=click.IntRange(min=1),
                     help=f"calibration samples drawn from --data [default: {CALIB_SIZE}; {RECONSTRUCT_CALIB_SIZE} "
                          "for --repair reconstruct / reconstruct+repair and --method obs, which solve d_in "
                          "unknowns per row]."),
        click.option("--seed", default=0, show_default=True, type=int, help="seed of the calibration draw."),
        click.option("--preprocess", default=None, help="ImageFolder data: a torchvision weights name whose "
                     "transforms() to apply (ResNet50_Weights.IMAGENET1K_V2), or resize=256,crop=224,"
                     "mean=0.485/0.456/0.406,std=0.229/0.224/0.225 (any of them). Not for tensor data."),
        click.option("--batch-size", default=None, type=click.IntRange(min=1),
                     help=f"samples per batch in evaluation [default: {BATCH_SIZE}] and in calibration [default: "
                          "all --calib-size samples in one batch]; the exact repair and reconstruction still run "
                          "one forward per calibration batch (the batches meet at every site)."),
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


def check_finite_models(models: Mapping[str, torch.nn.Module]) -> None:
    """:func:`~prune_repair.engine.checks.check_finite` on each model, the error naming which one."""
    for name, model in models.items():
        try:
            check_finite(model)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None


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


def passes_option(command: Callable) -> Callable:
    """``--passes`` and ``--offload``: how the exact repair and reconstruction go over the calibration batches."""
    command = click.option("--offload", default=None, metavar="cpu|DIR",
                           help="with --passes blockwise: keep the block inputs in host memory (cpu) or in files "
                                "under DIR (removed afterwards) instead of on the device.")(command)
    return click.option("--passes", default=Passes.LOCKSTEP.value, show_default=True, type=click.Choice(Passes.choices()),
                        help="how the exact repair and reconstruction go over the calibration batches "
                             "(--batch-size splits them): " + Passes.describe() + ".")(command)


def check_passes(passes: str, offload: str | None) -> None:
    """Refuse an ``--offload`` that would be ignored or fail late.

    >>> check_passes("blockwise", "cpu")
    >>> check_passes("lockstep", "cpu")
    Traceback (most recent call last):
    ...
    click.exceptions.UsageError: --offload applies to --passes blockwise only: add --passes blockwise or drop --offload
    """
    if offload is not None and passes != Passes.BLOCKWISE.value:
        raise click.UsageError("--offload applies to --passes blockwise only: add --passes blockwise or drop --offload")
    if offload not in (None, "cpu"):
        folder = Path(offload).expanduser()
        if folder.exists() and not folder.is_dir():
            raise click.UsageError(f"--offload {offload} is a file: give a folder (it is created if missing) or cpu")


def repair_title(mode: str, result: Any, seconds: float) -> str:
    """``repair (MODE, N sites|layers, S s)``: layers for a pure reconstruction, sites otherwise."""
    layers = result.to_dict().get("reconstruct", {}).get("layers", [])
    count, unit = (len(layers), "layers") if mode == "reconstruct" else (len(result.sites), "sites")
    return f"repair ({mode}, {count} {unit}, {seconds:.2f} s)"


def some(names: list[str]) -> str:
    """The first three names, then ``...``.

    >>> some(["a", "b", "c", "d"])
    'a, b, c, ...'
    """
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def repair_notes(sites: list[dict[str, Any]]) -> list[str]:
    """What a correction left out, from its report's ``sites``: dead channels, shifts with no bias to hold them.

    >>> repair_notes([{"fqn": "fc1", "dead_channels": [3], "shift_dropped": True}])[1]
    'no bias to hold the shift at 1 site(s) (fc1): the correction applied the scale only'
    """
    notes = []
    dead = {s["fqn"]: s["dead_channels"] for s in sites if s.get("dead_channels")}
    if dead:
        notes.append(f"{sum(len(v) for v in dead.values())} dead channel(s) (zero or non-finite spread) left as they "
                     f"were, at {len(dead)} site(s) ({some(list(dead))}); the report lists them")
    dropped = [s["fqn"] for s in sites if s.get("shift_dropped")]
    if dropped:
        notes.append(f"no bias to hold the shift at {len(dropped)} site(s) ({some(dropped)}): the correction applied "
                     "the scale only")
    return notes


def print_repair_notes(result: Any) -> None:
    """Print :func:`repair_notes` of a :class:`~prune_repair.engine.correct.report.RepairReport` on stderr."""
    for note in repair_notes(result.to_dict()["sites"]):
        console.print(note)


def damping_option(command: Callable) -> Callable:
    """``--damping`` of the reconstruct modes."""
    return click.option("--damping", default=1e-2, show_default=True, type=click.FloatRange(min=0),
                        help="reconstruct: ridge damping, relative to the mean diagonal of each layer's Gram "
                             "matrix (raised tenfold where a system is singular; the report says where).")(command)


def written(paths: Mapping[str, str | None]) -> None:
    """Say on stdout where each output file went (``{what: path}``; None entries skipped)."""
    for what, path in paths.items():
        if path is not None:
            out_console.print(f"wrote {what}: {escape(str(Path(path).expanduser().resolve()))}", highlight=False,
                              soft_wrap=True)


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


class PlainProgress:
    """Progress as plain lines on stderr for logs and CI (no terminal): one line when a task
    starts, at most one every ``every`` seconds while it runs, and one when it is done.

    >>> bar = PlainProgress(every=0.0)
    >>> with bar:
    ...     task = bar.add_task("curve", total=2, visible=False)
    ...     bar.advance(task)
    """

    def __init__(self, every: float = 5.0):
        self.every, self.tasks = every, {}

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def add_task(self, description: str, total: float | None = None, visible: bool = True) -> int:
        task = len(self.tasks)
        self.tasks[task] = {"description": description, "total": total, "completed": 0, "visible": visible,
                            "start": time.perf_counter(), "last": 0.0}
        return task

    def advance(self, task: int, amount: float = 1) -> None:
        self.update(task, completed=self.tasks[task]["completed"] + amount)

    def update(self, task: int, completed: float | None = None, total: float | None = None) -> None:
        t = self.tasks[task]
        t["completed"] = t["completed"] if completed is None else completed
        t["total"] = t["total"] if total is None else total
        now = time.perf_counter()
        done = t["total"] is not None and t["completed"] >= t["total"]
        if t["visible"] and (done or now - t["last"] >= self.every):
            t["last"] = now
            total_text = "?" if t["total"] is None else f"{t['total']:g}"
            console.print(f"{t['description']}: {t['completed']:g}/{total_text} ({now - t['start']:.1f} s)",
                          highlight=False)


def progress() -> Progress | PlainProgress:
    """A rich progress bar on stderr, or plain lines at most every 5 s when stderr is not a terminal."""
    if not console.is_terminal:
        return PlainProgress()
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
